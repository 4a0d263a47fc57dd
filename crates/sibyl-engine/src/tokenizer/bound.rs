//! A lower bound on the tokens of a text, found without tokenizing it, so that a prompt far
//! over the context window is refused at the cost of reading its bytes once.

use super::is_added;
use aho_corasick::AhoCorasick;

/// What [`TokenBound::least_tokens`] needs to know of a vocabulary.
#[derive(Debug, Clone)]
pub(super) struct TokenBound {
    /// Most bytes of non-ASCII characters (bytes 0x80 and above) one token stands for.
    most_high_bytes: usize,
    /// What ASCII bytes weigh, two ways.
    ascii_bounds: [AsciiBound; 2],
    letter_runs: LetterRuns,
    /// Whether text is NFC-normalized before it is split (which can shorten it).
    normalizes: bool,
}

impl TokenBound {
    /// From the vocabulary's token strings and types (control and user-defined tokens are
    /// matched as written; the others are byte-level strings).
    pub(super) fn new(
        tokens: &[&str],
        token_types: &[u32],
        normalizes: bool,
    ) -> Result<Self, aho_corasick::BuildError> {
        let added = |i: usize| token_types.get(i).copied().is_some_and(is_added);
        // Added tokens match their text as it is; the others are byte-level strings.
        let mut most_high_bytes = 1;
        let mut ascii_bytes: Vec<Vec<u8>> = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let (high, ascii) = if added(i) {
                let high = token.bytes().filter(|b| *b >= 0x80).count();
                (high, token.bytes().filter(u8::is_ascii).collect())
            } else {
                let high = token.chars().filter(|&c| stands_for_high_byte(c)).count();
                (high, token.chars().filter_map(ascii_byte_of).collect())
            };
            most_high_bytes = most_high_bytes.max(high);
            ascii_bytes.push(ascii);
        }
        let ascii_bounds = [Grouping::Kinds, Grouping::Bytes]
            .map(|grouping| AsciiBound::new(&ascii_bytes, grouping));
        let letter_runs = LetterRuns::new(
            ascii_bounds[0].most_letters,
            tokens
                .iter()
                .enumerate()
                .filter(|&(i, _)| added(i))
                .map(|(_, token)| *token),
        )?;
        Ok(Self {
            most_high_bytes,
            ascii_bounds,
            letter_runs,
            normalizes,
        })
    }

    /// At least how many tokens `text` encodes to, found without tokenizing it (about a
    /// millisecond per megabyte): the largest of three bounds. Every byte of a non-ASCII
    /// character belongs to one token, and no token stands for more than the vocabulary's
    /// most such bytes (a third as many where NFC normalization could compose the text
    /// shorter). And every ASCII byte belongs to one token, so the ASCII bytes, each weighed
    /// by one over the most bytes of its class that any token holds, add up to at most the
    /// tokens times the most weight one token carries ([`AsciiBound`], with two groupings
    /// into classes). And every supported pre-tokenizer puts each run of letters in a piece
    /// of its own, so each run between two ASCII non-letters takes its own tokens, as many
    /// as its ASCII letters need ([`LetterRuns`]). An ASCII byte right before a non-ASCII
    /// one is not counted: NFC may compose it with a combining mark that follows.
    pub(super) fn least_tokens(&self, text: &str) -> usize {
        let bytes = text.as_bytes();
        let mut high = 0usize;
        let mut ascii = [0usize; 128];
        let (mut runs, mut letters) = (0usize, 0usize);
        for (i, &b) in bytes.iter().enumerate() {
            if b >= 0x80 {
                high += 1;
                continue;
            }
            // NFC may compose a byte with a combining mark after it: such bytes count for
            // nothing (but a letter among them does not end its run).
            let kept = bytes.get(i + 1).is_none_or(|next| next.is_ascii());
            if kept {
                ascii[usize::from(b)] += 1;
            }
            if b.is_ascii_alphabetic() {
                letters += usize::from(kept);
            } else {
                runs += letters.div_ceil(self.letter_runs.most_letters);
                letters = 0;
            }
        }
        runs += letters.div_ceil(self.letter_runs.most_letters);
        // NFC may change the text (and so its tokens) only where it is not surely NFC
        // already, and only around non-ASCII characters.
        let may_normalize = high > 0
            && self.normalizes
            && unicode_normalization_alignments::is_nfc_quick(text.chars())
                != unicode_normalization_alignments::IsNormalized::Yes;
        let from_high = high.div_ceil(self.most_high_bytes * if may_normalize { 3 } else { 1 });
        let from_runs = self.letter_runs.least_tokens(text, runs, may_normalize);
        let from_ascii = self.ascii_bounds.iter().map(|b| b.least_tokens(&ascii));
        from_ascii.fold(from_high.max(from_runs), usize::max)
    }
}

/// How [`TokenBound::least_tokens`] counts runs of letters. A run is what lies between
/// two ASCII bytes that are not letters (non-ASCII characters, which may be letters, do not
/// end one; NFC composes no ASCII non-letter into a letter). The pre-tokenizer puts the
/// letters of one run in pieces of their own, so no token of an encoding holds letters of
/// two runs, and a run takes at least its ASCII letters over `most_letters` tokens. Only
/// added tokens, matched before the pre-tokenizer, can hold several runs: each of those in
/// the text takes the place of at most its runs less one, and where the text could be
/// normalized into more of them, the sum is divided by the most runs one holds.
#[derive(Debug, Clone)]
struct LetterRuns {
    /// The most ASCII letters one token holds (at least 1).
    most_letters: usize,
    /// A matcher of the added tokens that hold letters of several runs, and the most runs
    /// one of them holds; none where no added token does.
    several: Option<(AhoCorasick, usize)>,
}

impl LetterRuns {
    fn new<'a>(
        most_letters: usize,
        added: impl Iterator<Item = &'a str>,
    ) -> Result<Self, aho_corasick::BuildError> {
        let several: Vec<&str> = added.filter(|token| letter_runs(token) > 1).collect();
        let most_runs = several.iter().map(|t| letter_runs(t)).max().unwrap_or(1);
        let several = if several.is_empty() {
            None
        } else {
            Some((AhoCorasick::new(&several)?, most_runs))
        };
        Ok(Self {
            most_letters: most_letters.max(1),
            several,
        })
    }

    /// At least how many tokens `text` takes, given the sum over its runs of their ASCII
    /// letters over `most_letters`, rounded up (`runs`).
    fn least_tokens(&self, text: &str, runs: usize, may_normalize: bool) -> usize {
        let Some((matcher, most_runs)) = &self.several else {
            return runs;
        };
        let divided = runs.div_ceil(*most_runs);
        if may_normalize {
            return divided;
        }
        // Every place an added token could match (overlapping ones too): at least as
        // many as the tokenizer matches.
        let places = matcher.find_overlapping_iter(text).count();
        divided.max(runs.saturating_sub(places.saturating_mul(most_runs - 1)))
    }
}

/// Runs of letters in `text` (see [`LetterRuns`]) that hold an ASCII letter.
fn letter_runs(text: &str) -> usize {
    text.split(|c: char| c.is_ascii() && !c.is_ascii_alphabetic())
        .filter(|run| run.bytes().any(|b| b.is_ascii_alphabetic()))
        .count()
}

/// How an [`AsciiBound`] groups ASCII bytes into classes. Letters are one class and digits
/// another in both (a token holds few of any one letter, but many letters).
#[derive(Debug, Clone, Copy)]
enum Grouping {
    /// Letters, digits, space, other whitespace and control bytes, and the rest
    /// (punctuation and symbols): tight for text that mixes them, as code does.
    Kinds,
    /// Letters, digits, and every other byte a class of its own: tight for long runs of
    /// one symbol or of mixed punctuation, which some tokens hold many of.
    Bytes,
}

/// Classes of a [`Grouping`] at most.
const MAX_CLASSES: usize = 2 + 128;

impl Grouping {
    fn class(self, b: u8) -> usize {
        match (self, b) {
            (_, b'a'..=b'z' | b'A'..=b'Z') => 0,
            (_, b'0'..=b'9') => 1,
            (Grouping::Kinds, b' ') => 2,
            (Grouping::Kinds, 0x00..=0x1F | 0x7F) => 3,
            (Grouping::Kinds, _) => 4,
            (Grouping::Bytes, _) => 2 + usize::from(b),
        }
    }
}

/// A lower bound on the tokens of text from how many of each ASCII byte it has. Each byte
/// is weighed by about `1 / most`, where `most` is the most bytes of its class that one
/// token of the vocabulary holds, and `per_token` is the most weight one token carries.
/// Every byte of text belongs to exactly one token, so the text's weight is at most its
/// tokens times `per_token`, whatever the weights are: they are whole numbers (of
/// [`WEIGHT_UNIT`]ths), and the bound is exact.
#[derive(Debug, Clone)]
struct AsciiBound {
    /// The most ASCII letters one token holds (letters are one class in every grouping).
    most_letters: usize,
    weights: [u64; 128],
    /// At least 1.
    per_token: u128,
}

/// The weight of a byte of a class that tokens hold at most one of: divisible by every
/// count up to 16, so that those weigh exactly one over their count.
const WEIGHT_UNIT: u64 = 720_720 << 32;

impl AsciiBound {
    /// From the ASCII bytes that each token of the vocabulary stands for.
    fn new(tokens: &[Vec<u8>], grouping: Grouping) -> Self {
        let mut most = [0usize; MAX_CLASSES];
        let mut count = [0usize; MAX_CLASSES];
        for bytes in tokens {
            for &b in bytes {
                count[grouping.class(b)] += 1;
            }
            for &b in bytes {
                let class = grouping.class(b);
                most[class] = most[class].max(count[class]);
                count[class] = 0;
            }
        }
        let mut weights = [0u64; 128];
        for (b, weight) in (0u8..128).zip(&mut weights) {
            // A class no token holds cannot be in text the vocabulary encodes: no weight.
            let most = most[grouping.class(b)] as u64;
            *weight = WEIGHT_UNIT.checked_div(most).unwrap_or(0);
        }
        let per_token = tokens
            .iter()
            .map(|bytes| {
                bytes
                    .iter()
                    .map(|&b| u128::from(weights[usize::from(b)]))
                    .sum()
            })
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            most_letters: most[grouping.class(b'a')],
            weights,
            per_token,
        }
    }

    /// At least how many tokens text with `counts` of each ASCII byte encodes to.
    fn least_tokens(&self, counts: &[usize; 128]) -> usize {
        let weight: u128 = counts
            .iter()
            .zip(&self.weights)
            .map(|(&n, &w)| n as u128 * u128::from(w))
            .sum();
        usize::try_from(weight / self.per_token).unwrap_or(usize::MAX)
    }
}

/// The ASCII byte that `c`, a character of a byte-level BPE token's string, stands for, if it
/// stands for one: GPT-2's byte-to-character map keeps the printable bytes 0x21..=0x7E and
/// moves 0x00..=0x20 to U+0100..=U+0120 and 0x7F to U+0121.
fn ascii_byte_of(c: char) -> Option<u8> {
    match c as u32 {
        0x21..=0x7E => Some(c as u8),
        code @ 0x100..=0x120 => Some((code - 0x100) as u8),
        0x121 => Some(0x7F),
        _ => None,
    }
}

/// Whether `c`, a character of a byte-level BPE token's string, stands for a byte of 0x80 or
/// above. GPT-2's byte-to-character map keeps bytes 0xA1..=0xAC and 0xAE..=0xFF as those
/// characters and moves the bytes it does not keep, in order (0x00..=0x20, 0x7F..=0xA0,
/// 0xAD), to U+0100 onwards: 0x80..=0xA0 and 0xAD land on U+0122..=U+0143.
fn stands_for_high_byte(c: char) -> bool {
    matches!(c as u32, 0xA1..=0xAC | 0xAE..=0xFF | 0x122..=0x143)
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_of_letters_end_only_at_ascii_non_letters() {
        use super::letter_runs;
        assert_eq!(letter_runs("abc"), 1);
        assert_eq!(letter_runs("<|im_start|>"), 2);
        assert_eq!(letter_runs("<tool_call>"), 2);
        assert_eq!(letter_runs("I'll be"), 3);
        // Non-ASCII characters may be letters: they join the runs around them.
        assert_eq!(letter_runs("caf\u{e9}s ab\u{e9}cd"), 2);
        assert_eq!(letter_runs("\u{e9}\u{e8}"), 0);
        assert_eq!(letter_runs("12 + 3"), 0);
    }

    #[test]
    fn the_ascii_bound_weighs_each_class_by_its_densest_token() {
        use super::{AsciiBound, Grouping};
        let bound = |vocab: &[&str], grouping| {
            let tokens: Vec<Vec<u8>> = vocab.iter().map(|t| t.as_bytes().to_vec()).collect();
            AsciiBound::new(&tokens, grouping)
        };
        let least = |bound: &AsciiBound, text: &str| {
            let mut counts = [0; 128];
            for b in text.bytes() {
                counts[usize::from(b)] += 1;
            }
            bound.least_tokens(&counts)
        };
        let vocab = ["a", "b", "ab", "abc", " ", "  ", "=", "==", "-", "\n", "1"];
        let kinds = bound(&vocab, Grouping::Kinds);
        let bytes = bound(&vocab, Grouping::Bytes);
        // Letters: at most 3 a token; spaces and punctuation 2; other whitespace and digits
        // 1. No token holds more than one class's most.
        assert_eq!(least(&kinds, "abcabc"), 2);
        assert_eq!(least(&kinds, "============"), 6);
        // 5/3 for the letters, 1/2 for the space, 1 for the newline, 2 for the digits.
        assert_eq!(least(&kinds, "abc ab\n11"), 5);
        assert_eq!(least(&kinds, ""), 0);
        // A run of '-' takes a token each, which only the grouping by bytes sees.
        assert_eq!(least(&kinds, "------"), 3);
        assert_eq!(least(&bytes, "------"), 6);
        // Three halves for the `=`, one for the `-`: at least 2 (it takes 3).
        assert_eq!(least(&bytes, "==-="), 2);
        // A token that holds two classes' most ("ab==") carries the weight of two tokens.
        let mixed = bound(&["a", "b", "ab", "=", "==", "ab=="], Grouping::Kinds);
        assert_eq!(least(&mixed, "ab==ab=="), 2);
        assert_eq!(least(&mixed, "abab"), 1);
    }

    #[test]
    fn the_characters_standing_for_bytes_are_those_of_the_gpt2_byte_map() {
        // GPT-2's bytes_to_unicode: printable bytes stay themselves, the rest move to
        // U+0100 onwards in order.
        let kept = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut moved = 0x100;
        for byte in 0u32..=0xFF {
            let c = if kept(byte) {
                byte
            } else {
                moved += 1;
                moved - 1
            };
            let c = char::from_u32(c).unwrap();
            assert_eq!(super::stands_for_high_byte(c), byte >= 0x80, "{byte:#x}");
            let ascii = u8::try_from(byte).ok().filter(u8::is_ascii);
            assert_eq!(super::ascii_byte_of(c), ascii, "{byte:#x}");
        }
    }
}
