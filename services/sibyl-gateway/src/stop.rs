//! Stop strings: the text ends before the first occurrence of any of them (or after it, with
//! vLLM's `include_stop_str_in_output`). Text that might be the start of a stop string is
//! held back until the next piece shows it is not.

/// Finds stop strings in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    /// The text ends after the stop string found rather than before it.
    include: bool,
    /// The index in `stops` of the stop string found.
    found: Option<usize>,
}

impl StopStrings {
    pub fn new(stops: Vec<String>, include: bool) -> Self {
        Self {
            stops,
            held: String::new(),
            include,
            found: None,
        }
    }

    /// The stop string that ended the text, once one has.
    pub fn found(&self) -> Option<&str> {
        self.found.map(|i| self.stops[i].as_str())
    }

    /// Takes the next piece of text; returns the text that is safe to emit and whether a
    /// stop string was found (the text then ends before it, or after it when included).
    /// Of stop strings found, the one that starts first ends the text; of those starting
    /// at the same place, the first listed.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| Some((self.held.find(stop.as_str())?, stop.len(), i)))
            .min_by_key(|&(at, _, _)| at);
        if let Some((at, len, i)) = first {
            let end = if self.include { at + len } else { at };
            let text = self.held[..end].to_string();
            self.held.clear();
            self.found = Some(i);
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
        run_with(stops, false, pieces)
    }

    fn run_with(stops: &[&str], include: bool, pieces: &[&str]) -> (String, bool) {
        let stops = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(stops, include);
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
        let mut matcher = StopStrings::new(vec!["END".into()], false);
        assert_eq!(matcher.push("abE"), ("ab".into(), false));
        assert_eq!(matcher.push("x"), ("Ex".into(), false));
        assert_eq!(run(&["END"], &["aEN"]), ("aEN".into(), false));
    }

    #[test]
    fn the_stop_string_found_is_reported() {
        let mut matcher = StopStrings::new(vec!["bc".into(), "cd".into(), "a".into()], false);
        assert_eq!(matcher.push("xxc"), ("xx".into(), false));
        assert_eq!(matcher.found(), None);
        assert_eq!(matcher.push("d a"), ("".into(), true));
        assert_eq!(matcher.found(), Some("cd"));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "é", "!"]), ("café".into(), true));
        assert_eq!(run(&[], &["naïve"]), ("naïve".into(), false));
    }

    #[test]
    fn an_included_stop_string_ends_the_text() {
        assert_eq!(
            run_with(&["\n\n"], true, &["def f", "():\n", "\n    x"]),
            ("def f():\n\n".into(), true)
        );
        // The earliest stop string wins; at one place, the first listed.
        assert_eq!(
            run_with(&["cd", "bc"], true, &["abcdef"]),
            ("abc".into(), true)
        );
        assert_eq!(
            run_with(&["bcd", "bc"], true, &["abcdef"]),
            ("abcd".into(), true)
        );
        assert_eq!(
            run_with(&["bc", "bcd"], true, &["abcdef"]),
            ("abc".into(), true)
        );
        assert_eq!(run_with(&["END"], true, &["aEN"]), ("aEN".into(), false));
    }
}
