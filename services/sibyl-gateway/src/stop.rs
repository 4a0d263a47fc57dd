//! Stop strings: the text ends before the first occurrence of any of them. Text that might be
//! the start of a stop string is held back until the next piece shows it is not.

/// Finds stop strings in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Takes the next piece of text; returns the text that is safe to emit and whether a
    /// stop string was found (the text then ends before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return (text, true);
        }
        let keep = self.partial_match_len();
        let emit_to = self.held.len() - keep;
        let text = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        (text, false)
    }

    /// The text held back at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that begins some stop string.
    fn partial_match_len(&self) -> usize {
        let held = &self.held;
        (1..=held.len())
            .rev()
            .filter(|&n| held.is_char_boundary(held.len() - n))
            .find(|&n| {
                let suffix = &held[held.len() - n..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let (text, stopped) = matcher.push(piece);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn text_ends_before_a_stop_split_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["def f", "():\n", "\n    x"]),
            ("def f():".into(), true)
        );
        assert_eq!(
            run(&["END", "x"], &["abcE", "N", "Dx"]),
            ("abc".into(), true)
        );
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let mut matcher = StopStrings::new(vec!["END".into()]);
        assert_eq!(matcher.push("abE"), ("ab".into(), false));
        assert_eq!(matcher.push("x"), ("Ex".into(), false));
        assert_eq!(run(&["END"], &["aEN"]), ("aEN".into(), false));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "é", "!"]), ("café".into(), true));
        assert_eq!(run(&[], &["naïve"]), ("naïve".into(), false));
    }
}
