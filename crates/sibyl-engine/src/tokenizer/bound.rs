//! A lower bound on the tokens of a text, found without tokenizing it, so that a prompt far
//! over the context window is refused at the cost of reading its bytes once.

use super::is_added;
use aho_corasick::{AhoCorasick, AhoCorasickKind};
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// What [`TokenBound::least_tokens`] needs to know of a vocabulary.
#[derive(Debug, Clone)]
pub(super) struct TokenBound {
    /// Most bytes of non-ASCII characters (bytes 0x80 and above) one token stands for.
    most_high_bytes: usize,
    /// What ASCII bytes weigh, two ways.
    ascii_bounds: [AsciiBound; 2],
    letter_runs: LetterRuns,
    reach: Reach,
    symbol_runs: SymbolRuns,
    segments: Segments,
    /// Whether text is NFC-normalized before it is split (which can shorten it).
    normalizes: bool,
}

impl TokenBound {
    /// From the vocabulary's token strings and types (control and user-defined tokens are
    /// matched as written; the others are byte-level strings).
    pub(super) fn new(
        tokens: &[&str],
        token_types: &[u32],
        merges: &[(String, String)],
        normalizes: bool,
        newline_pieces: bool,
    ) -> Result<Self, aho_corasick::BuildError> {
        let added = |i: usize| token_types.get(i).copied().is_some_and(is_added);
        // Added tokens match their text as it is; the others are byte-level strings.
        let mut most_high_bytes = 1;
        let mut ascii_bytes: Vec<Vec<u8>> = Vec::with_capacity(tokens.len());
        let mut reach = Reach::default();
        let mut token_bytes: Vec<Vec<u8>> = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let bytes = if added(i) {
                reach.add(token.as_bytes());
                Some(token.as_bytes().to_vec())
            } else {
                reach.add_byte_level(token);
                token.chars().map(byte_of).collect::<Option<Vec<u8>>>()
            };
            token_bytes.extend(bytes.filter(|b| !b.is_empty()));
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
        let added_tokens: Vec<&str> = tokens
            .iter()
            .enumerate()
            .filter(|&(i, _)| added(i))
            .map(|(_, token)| *token)
            .collect();
        let letter_runs =
            LetterRuns::new(ascii_bounds[0].most_letters, added_tokens.iter().copied())?;
        // Bytes of the longest token: a byte-level token has a character a byte.
        let longest = tokens.iter().map(|t| t.chars().count()).max().unwrap_or(1);
        let symbol_runs = SymbolRuns::new(merges, added_tokens.iter().copied(), longest);
        let segments = Segments::new(&token_bytes, &added_tokens, newline_pieces);
        Ok(Self {
            most_high_bytes,
            ascii_bounds,
            letter_runs,
            reach,
            symbol_runs,
            segments,
            normalizes,
        })
    }

    /// Builds what [`Self::fewest_tokens`] matches the text with now, rather than at its
    /// first call.
    pub(super) fn prepare(&self) {
        self.segments.matcher.get();
    }

    /// At least how many tokens `text` encodes to, from the fewest strings of the
    /// vocabulary that it can be cut into ([`Segments`]): within a few percent of the real
    /// count for text of every kind measured (code, prose, one long word, punctuation,
    /// indentation, Cyrillic, Han), where [`Self::least_tokens`] can be a tenth of it, and
    /// some tens of microseconds per kilobyte. Stops once it reaches `enough`.
    pub(super) fn fewest_tokens(&self, text: &str, enough: usize) -> usize {
        use unicode_normalization_alignments::{
            char::canonical_combining_class, is_nfc_quick, IsNormalized,
        };
        let bytes = text.as_bytes();
        let longest = self.segments.longest;
        if !self.normalizes || is_nfc_quick(text.chars()) == IsNormalized::Yes {
            // NFC leaves the text as it is: all of it, from within a token of its ends.
            return self.segments.fewest_tokens(
                bytes,
                enough,
                std::iter::once(0..bytes.len()),
                longest,
            );
        }
        // Otherwise the stretches between the characters that NFC may change or compose
        // with what comes before (a combining mark, one that is not surely NFC): it leaves
        // each as it is but for its last character (up to 4 bytes), which may compose
        // with what follows.
        let mut start = 0;
        let mut chars = text.char_indices();
        let stretches = std::iter::from_fn(|| {
            for (i, c) in chars.by_ref() {
                let stable = canonical_combining_class(c) == 0
                    && is_nfc_quick(std::iter::once(c)) == IsNormalized::Yes;
                if !stable {
                    let stretch = start..i;
                    start = i + c.len_utf8();
                    return Some(stretch);
                }
            }
            let stretch = start..bytes.len();
            start = bytes.len() + 1;
            (stretch.start <= stretch.end).then_some(stretch)
        });
        self.segments
            .fewest_tokens(bytes, enough, stretches, longest + 4)
    }

    /// At least how many tokens `text` encodes to, found without tokenizing it (about a
    /// few milliseconds per megabyte): the largest of five bounds. Every byte of a non-ASCII
    /// character belongs to one token, and no token stands for more than the vocabulary's
    /// most such bytes (a third as many where NFC normalization could compose the text
    /// shorter). And every ASCII byte belongs to one token, so the ASCII bytes, each weighed
    /// by one over the most bytes of its class that any token holds, add up to at most the
    /// tokens times the most weight one token carries ([`AsciiBound`], with two groupings
    /// into classes). And every supported pre-tokenizer puts each run of letters in a piece
    /// of its own, so each run between two ASCII non-letters takes its own tokens, as many
    /// as its ASCII letters need ([`LetterRuns`]). An ASCII byte right before a non-ASCII
    /// one is not counted: NFC may compose it with a combining mark that follows. And the
    /// tokens of an encoding follow one another through the text, each no longer than the
    /// longest token that starts with the bytes where it starts ([`Reach`]), which bounds
    /// long runs that no pre-tokenizer cuts (one symbol repeated, one long word). And BPE
    /// merges a long run of one symbol into blocks of a size it cannot grow past
    /// ([`SymbolRuns`]), often shorter than its longest token of that symbol.
    ///
    /// The bounds that walk the text are skipped once another reaches `enough`, and stop
    /// there.
    pub(super) fn least_tokens(&self, text: &str, enough: usize) -> usize {
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
        let cheap = from_ascii.fold(from_high.max(from_runs), usize::max);
        if cheap >= enough {
            return cheap;
        }
        // The walks cost more: only where the counts fall short.
        let from_symbols = self.symbol_runs.least_tokens(bytes);
        if from_symbols >= enough {
            return from_symbols;
        }
        // Where NFC may change the text, its tokens need not follow its bytes.
        let from_reach = if may_normalize {
            0
        } else {
            self.reach.least_tokens(bytes, enough)
        };
        cheap.max(from_symbols).max(from_reach)
    }
}

/// The most bytes a token holds that starts with given bytes: a bound on the tokens of a
/// text found by walking it. An encoding cuts the text into tokens, each a string of the
/// vocabulary; one that starts at byte `i` is no longer than the longest token starting
/// with the bytes at `i`. So the fewest steps that cross the text, each from `i` at most
/// [`Reach::at`] bytes on, are at most its tokens. Tight where the tokenizer cannot cut the
/// text: a run of one symbol takes its length over the longest token of that symbol.
#[derive(Debug, Clone)]
struct Reach {
    /// By two ASCII bytes (`first * 128 + second`): the most bytes of a token that starts
    /// with them, or is the first alone (at least 1).
    pairs: Vec<u16>,
    /// By an ASCII byte followed by a non-ASCII one: the most bytes of a token that starts
    /// with that ASCII byte.
    firsts: [u16; 128],
    /// The most bytes of a token that starts with a non-ASCII byte.
    high: u16,
}

impl Default for Reach {
    fn default() -> Self {
        Self {
            pairs: vec![1; 128 * 128],
            firsts: [1; 128],
            high: 1,
        }
    }
}

impl Reach {
    /// Counts a token of the vocabulary, by the bytes it stands for.
    fn add(&mut self, bytes: &[u8]) {
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        match *bytes {
            [] => {}
            [first, ..] if first >= 0x80 => self.high = self.high.max(len),
            [first, ..] => {
                let first = usize::from(first);
                self.firsts[first] = self.firsts[first].max(len);
                match bytes.get(1) {
                    Some(&second) if second < 0x80 => {
                        let pair = &mut self.pairs[first * 128 + usize::from(second)];
                        *pair = (*pair).max(len);
                    }
                    // A token of one byte is in every pair's 1; one whose second byte is
                    // not ASCII is in `firsts`.
                    _ => {}
                }
            }
        }
    }

    /// Counts a byte-level BPE token by the bytes its characters stand for. A character
    /// outside GPT-2's byte map (which byte-level BPE never makes) counts as a non-ASCII
    /// byte, so that such a token still bounds what follows it.
    fn add_byte_level(&mut self, token: &str) {
        let bytes: Vec<u8> = token.chars().map(|c| byte_of(c).unwrap_or(0x80)).collect();
        self.add(&bytes);
    }

    /// The most bytes of a token that starts at `bytes[i]`.
    fn at(&self, bytes: &[u8], i: usize) -> usize {
        let first = bytes[i];
        let reach = if first >= 0x80 {
            self.high
        } else {
            match bytes.get(i + 1) {
                Some(&second) if second < 0x80 => {
                    self.pairs[usize::from(first) * 128 + usize::from(second)]
                }
                Some(_) => self.firsts[usize::from(first)],
                None => 1,
            }
        };
        usize::from(reach)
    }

    /// The fewest steps from the start of `bytes` to its end, each at most [`Self::at`]
    /// bytes on from where it starts, less one (a tokenizer that puts a space before the
    /// text, or a template's text before it, may hold its first bytes in a token that
    /// starts before it). Stops once they are more than `enough`.
    fn least_tokens(&self, bytes: &[u8], enough: usize) -> usize {
        // Breadth first: `end` is the furthest start that `steps` steps reach; every start
        // up to it may take the next step.
        let (mut steps, mut end, mut next) = (0usize, 0usize, 0usize);
        let mut i = 0;
        while end < bytes.len() && steps <= enough {
            while i <= end {
                next = next.max(i + self.at(bytes, i));
                i += 1;
            }
            steps += 1;
            end = next;
        }
        steps.saturating_sub(1)
    }
}

/// The fewest strings of the vocabulary that text can be cut into.
///
/// Every token of an encoding stands for bytes of the text as the tokenizer sees it (NFC
/// normalized where the tokenizer normalizes; an added token for the bytes it is written
/// as), one after the other. Where NFC leaves the text as it is, the tokens are strings of
/// the vocabulary that cut it, from within `slack` bytes of its start to within `slack`
/// bytes of its end (tokens of a template around it may hold its first and last bytes),
/// so they are at least the fewest such strings that cut some such middle of it: the
/// shortest path over every place a token's string matches (dynamic programming over the
/// matches, in the order they end). Where NFC may change the text, it is counted stretch
/// by stretch, between the characters that NFC may change: the tokens wholly inside one
/// cut it from within `slack` bytes of its ends, and no token lies inside two, so the
/// stretches' counts add up. Where other bounds lean on how the tokenizer merges,
/// this leans only on which strings are tokens: for code, prose, long words and
/// punctuation it is within a few percent of the real count (byte pair encoding cuts
/// text into close to as few tokens as it can).
///
/// Every supported pre-tokenizer (qwen2, llama3, gpt2, smollm) also cuts text at places no
/// token crosses ([`Segments::cut_before`]), around whitespace: such a place is where a
/// path must pass.
///
/// A vocabulary may hold one byte repeated at every length up to its longest (128 spaces),
/// which would match that many times at each byte of a long run. Such tokens are not
/// matched. Inside a run of a byte that starts at such a cut (spaces after a word), only
/// tokens of that byte alone can follow, so the path takes the fewest of them that make
/// the length walked ([`Segments::exact_runs`], exact up to [`EXACT_RUN`] bytes). Inside
/// other runs, a path may instead step over any length up to the longest token of that
/// byte alone (more cuts than the vocabulary's, so no more tokens), found with the fewest
/// of the places in reach kept in order.
#[derive(Debug, Clone)]
struct Segments {
    /// Every token but a byte repeated, as the bytes it stands for.
    matcher: Arc<TokenMatcher>,
    /// By byte: the bytes of the longest token made of it alone (0 where none is).
    runs: [usize; 256],
    /// By byte, for lengths 0 to [`EXACT_RUN`]: the fewest tokens of that byte alone that
    /// make it (`u16::MAX` where none do); empty for a byte with no such token longer than
    /// one byte.
    exact_runs: Vec<Vec<u16>>,
    /// Whether the cuts around whitespace hold for this vocabulary (no added token, matched
    /// before the pre-tokenizer, holds whitespace).
    cuts: bool,
    /// Bytes an added token starts with (whitespace before one is not cut).
    added_first: [bool; 256],
    /// Whether the pre-tokenizer's patterns end a piece at the last newline of whitespace
    /// (qwen2's and llama3's `\s*[\r\n]+`).
    newline_pieces: bool,
    /// Bytes of the longest token.
    longest: usize,
}

/// The token strings [`Segments`] matches, and the automaton that finds them all in a text
/// (overlapping), built at its first use: 17 MB for Qwen2.5's vocabulary, and about 60 MB
/// more while it is built, which only a role that bounds prompts needs. Shared by clones.
#[derive(Debug, Default)]
struct TokenMatcher {
    /// The strings, one after another.
    bytes: Vec<u8>,
    /// Where each ends in `bytes`.
    ends: Vec<usize>,
    automaton: OnceLock<Option<AhoCorasick>>,
}

impl TokenMatcher {
    fn push(&mut self, token: &[u8]) {
        self.bytes.extend_from_slice(token);
        self.ends.push(self.bytes.len());
    }

    /// The automaton, built now if it was not yet (`None` if it cannot be: prompts are
    /// then bounded without it).
    fn get(&self) -> Option<&AhoCorasick> {
        self.automaton
            .get_or_init(|| {
                let starts = std::iter::once(0).chain(self.ends.iter().copied());
                let tokens = starts.zip(&self.ends).map(|(from, &to)| &self.bytes[from..to]);
                AhoCorasick::builder()
                    .kind(Some(AhoCorasickKind::ContiguousNFA))
                    .build(tokens)
                    .inspect_err(|error| {
                        tracing::warn!(%error, "prompts are bounded without the vocabulary's strings");
                    })
                    .ok()
            })
            .as_ref()
    }
}

/// Runs of one byte up to this long are counted in the tokens of that byte the vocabulary
/// has; longer ones by its longest such token.
const EXACT_RUN: usize = 512;

/// Matches one call looks at, at most (some tens of milliseconds' work), whatever the
/// text: the bound found by then is kept.
const MATCH_BUDGET: usize = 1 << 22;

/// Bytes between two checks of whether a stretch's tokens so far reach `enough`.
const CHECK_EVERY: usize = 4096;

impl Segments {
    /// From the bytes each token stands for, the added tokens, and whether the
    /// pre-tokenizer ends pieces at newlines.
    fn new(tokens: &[Vec<u8>], added: &[&str], newline_pieces: bool) -> Self {
        let mut runs = [0usize; 256];
        let mut lengths: Vec<Vec<usize>> = vec![Vec::new(); 256];
        let mut matched = TokenMatcher::default();
        for token in tokens {
            match only_byte(token) {
                Some(b) => {
                    let b = usize::from(b);
                    runs[b] = runs[b].max(token.len());
                    lengths[b].push(token.len());
                    if token.len() == 1 {
                        matched.push(token);
                    }
                }
                None => matched.push(token),
            }
        }
        let exact_runs = lengths
            .iter()
            .map(|lengths| {
                if lengths.iter().all(|&l| l == 1) {
                    return Vec::new();
                }
                let mut fewest = vec![u16::MAX; EXACT_RUN + 1];
                fewest[0] = 0;
                for m in 1..=EXACT_RUN {
                    for &l in lengths.iter().filter(|&&l| l <= m) {
                        fewest[m] = fewest[m].min(fewest[m - l].saturating_add(1));
                    }
                }
                fewest
            })
            .collect();
        let mut added_first = [false; 256];
        for token in added {
            if let Some(&b) = token.as_bytes().first() {
                added_first[usize::from(b)] = true;
            }
        }
        let cuts = !added.iter().any(|t| t.chars().any(char::is_whitespace));
        let longest = tokens.iter().map(Vec::len).max().unwrap_or(1);
        Self {
            matcher: Arc::new(matched),
            runs,
            exact_runs,
            cuts,
            added_first,
            newline_pieces,
            longest,
        }
    }

    /// Whether every supported pre-tokenizer cuts `text` before byte `p` (0 < p < its
    /// length), so that no token crosses that place. Their patterns (qwen2's and llama3's
    /// `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}`, ` ?[^\s\p{L}\p{N}]+[\r\n]*`, `\s*[\r\n]+`,
    /// `\s+(?!\S)`, `\s+`; GPT-2's ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`, `\s+(?!\S)`,
    /// `\s+`, after smollm's cut around every digit) never hold an ASCII letter or digit
    /// followed by whitespace, nor anything else but whitespace followed by a space or
    /// tab; and a run of whitespace that ends with a space or tab before anything else but
    /// a digit gives that last byte to what follows (`\s+(?!\S)` stops one short; before a
    /// digit smollm has already cut). With qwen2's and llama3's patterns, whitespace that
    /// holds a newline is a piece up to its last newline (`\s*[\r\n]+` comes before
    /// `\s+(?!\S)`), so spaces and tabs after that newline, up to something that is not
    /// whitespace, are cut from it. An added token is matched before the pre-tokenizer, on
    /// its own: a run of whitespace before one is not cut, and none may hold whitespace.
    fn cut_before(&self, text: &[u8], p: usize) -> bool {
        let at = text[p];
        if !self.cuts || !is_space(at) {
            return false;
        }
        let Some(before) = char_ending_at(text, p) else {
            return false;
        };
        let blank = matches!(at, b' ' | b'\t');
        let word_then_space = before.is_ascii_alphanumeric() || (blank && !before.is_whitespace());
        let last_blank = blank
            && char_starting_at(text, p + 1).is_some_and(|after| {
                !after.is_whitespace()
                    && !after.is_numeric()
                    && !self.added_first[usize::from(text[p + 1])]
            });
        let after_newline = self.newline_pieces
            && blank
            && matches!(before, '\r' | '\n')
            && text[p..]
                .iter()
                .position(|&c| !matches!(c, b' ' | b'\t' | 0x0B | 0x0C))
                .and_then(|i| char_starting_at(text, p + i))
                .is_some_and(|c| !c.is_whitespace());
        word_then_space || last_blank || after_newline
    }

    /// At least how many tokens lie wholly inside the `stretches` of `bytes`, each from
    /// within `slack` bytes of its ends; stops once that reaches `enough`, or once
    /// [`MATCH_BUDGET`] matches are looked at.
    fn fewest_tokens(
        &self,
        bytes: &[u8],
        enough: usize,
        stretches: impl IntoIterator<Item = std::ops::Range<usize>>,
        slack: usize,
    ) -> usize {
        let mut budget = MATCH_BUDGET;
        let mut total = 0usize;
        for stretch in stretches {
            let (found, finished) = self.stretch(
                &bytes[stretch],
                slack,
                enough.saturating_sub(total),
                &mut budget,
            );
            total += found;
            if !finished || total >= enough {
                break;
            }
        }
        total
    }

    /// At least how many tokens lie wholly inside `stretch`, and whether that is its
    /// whole count (not cut short by `budget` or by reaching `enough`).
    fn stretch(
        &self,
        stretch: &[u8],
        slack: usize,
        enough: usize,
        budget: &mut usize,
    ) -> (usize, bool) {
        let n = stretch.len();
        if n <= 2 * slack {
            return (0, true);
        }
        // `fewest[p & mask]`: the fewest tokens that cut the stretch from within `slack`
        // bytes of its start up to byte `p`, for the last places up to `reached`.
        let size = (self.longest.max(slack) + 1).next_power_of_two();
        let mask = size - 1;
        let mut fewest = vec![0u32; size];
        let mut reached = 0usize;
        let mut next_check = CHECK_EVERY;
        // In the run of one byte that ends at `reached`: where it starts, and its places
        // that a step of that byte alone can start from, the fewest first.
        let mut run_start = 0usize;
        let mut in_reach: VecDeque<(usize, u32)> = VecDeque::new();
        // The last place before `reached` that the pre-tokenizer cuts at (0: none), and
        // the fewest tokens that reach it.
        let (mut last_cut, mut at_cut) = (0usize, 0u32);
        // Every cut of the middle that ends past `reached` has a place among the `longest`
        // places before it (no token is longer), none of them reached by fewer tokens.
        let so_far = |fewest: &[u32], reached: usize| -> usize {
            if reached + slack >= n {
                return 0;
            }
            let least = (reached.saturating_sub(self.longest)..reached)
                .map(|p| fewest[p & mask])
                .min();
            reachable(least)
        };
        let Some(matcher) = self.matcher.get() else {
            // No automaton: no token is counted, which is a bound still.
            return (0, true);
        };
        for found in matcher.find_overlapping_iter(stretch) {
            let (from, to) = (found.start(), found.end());
            debug_assert!(to >= reached, "matches come in the order they end");
            if to > reached {
                if *budget == 0 {
                    return (so_far(&fewest, reached), false);
                }
                if to >= next_check {
                    next_check = to + CHECK_EVERY;
                    let found = so_far(&fewest, reached);
                    if found >= enough {
                        return (found, false);
                    }
                }
                while reached < to {
                    reached += 1;
                    if reached >= 2 && self.cut_before(stretch, reached - 1) {
                        last_cut = reached - 1;
                        at_cut = fewest[last_cut & mask];
                    }
                    let mut least = if reached <= slack { 0 } else { u32::MAX };
                    // Steps over the byte before `reached` alone, from the places of its
                    // run at most its longest token back (one byte: matched), and past no
                    // cut.
                    let b = stretch[reached - 1];
                    if reached < 2 || stretch[reached - 2] != b {
                        run_start = reached - 1;
                        in_reach.clear();
                    } else {
                        let p = reached - 2;
                        let f = fewest[p & mask];
                        while in_reach.back().is_some_and(|&(_, g)| g >= f) {
                            in_reach.pop_back();
                        }
                        in_reach.push_back((p, f));
                    }
                    let entry = run_start.max(last_cut);
                    let exact = &self.exact_runs[usize::from(b)];
                    let walked = reached - entry;
                    if walked >= 2 && entry == last_cut && entry >= slack && !exact.is_empty() {
                        // Only tokens of `b` alone since the cut (past the free start):
                        // the fewest that make it.
                        let run_tokens = match exact.get(walked) {
                            Some(&f) => u32::from(f),
                            None => walked.div_ceil(self.runs[usize::from(b)]) as u32,
                        };
                        let via = at_cut.saturating_add(run_tokens);
                        least = least.min(if run_tokens == u32::from(u16::MAX) {
                            u32::MAX
                        } else {
                            via
                        });
                    } else {
                        let longest_run = self.runs[usize::from(b)];
                        let first = reached.saturating_sub(longest_run).max(entry);
                        while in_reach.front().is_some_and(|&(p, _)| p < first) {
                            in_reach.pop_front();
                        }
                        if let Some(&(_, f)) = in_reach.front() {
                            least = least.min(f.saturating_add(1));
                        }
                    }
                    fewest[reached & mask] = least;
                }
            }
            *budget = budget.saturating_sub(1);
            if last_cut > from {
                // The token would cross a place the pre-tokenizer cuts at.
                continue;
            }
            let via = fewest[from & mask].saturating_add(1);
            let at = &mut fewest[to & mask];
            *at = (*at).min(via);
        }
        if reached < n {
            // Only where a byte is no token: nothing reaches past it.
            return (0, true);
        }
        let least = (n - slack..=n).map(|p| fewest[p & mask]).min();
        (reachable(least), true)
    }
}

/// A count of [`Segments::stretch`]'s table as a bound: none where no cut reaches (a
/// vocabulary without some ASCII byte).
fn reachable(fewest: Option<u32>) -> usize {
    match fewest {
        Some(f) if f != u32::MAX => f as usize,
        _ => 0,
    }
}

/// Whether `b` is whitespace to the pre-tokenizers' `\s`.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The character that ends right before byte `p` of UTF-8 `text` (`None` at its start).
fn char_ending_at(text: &[u8], p: usize) -> Option<char> {
    match text.get(p.checked_sub(1)?) {
        Some(&b) if b.is_ascii() => Some(char::from(b)),
        _ => {
            let start = (p.saturating_sub(4)..p)
                .rev()
                .find(|&i| text[i] & 0xC0 != 0x80)?;
            std::str::from_utf8(&text[start..p]).ok()?.chars().next()
        }
    }
}

/// The character that starts at byte `p` of UTF-8 `text` (`None` at its end).
fn char_starting_at(text: &[u8], p: usize) -> Option<char> {
    match text.get(p) {
        Some(&b) if b.is_ascii() => Some(char::from(b)),
        Some(_) => {
            let end = (p + 1..=text.len().min(p + 4))
                .find(|&i| i == text.len() || text[i] & 0xC0 != 0x80)?;
            std::str::from_utf8(&text[p..end]).ok()?.chars().next()
        }
        None => None,
    }
}

/// The byte that `bytes` repeat, if they are one byte repeated.
fn only_byte(bytes: &[u8]) -> Option<u8> {
    let (&first, rest) = bytes.split_first()?;
    rest.iter().all(|&b| b == first).then_some(first)
}

/// What BPE makes of a long run of one ASCII letter or punctuation mark, which every
/// supported pre-tokenizer keeps in one piece. BPE (as the tokenizer runs it: the pair of
/// lowest merge rank first, the leftmost of equal ranks) first merges every two adjacent
/// symbols of the run, left to right, then every two of those, and so on, as long as the
/// merge of a block with itself exists and each such merge ranks after the one before.
/// So the inside of the run ends as blocks of one size, `block`; only near its ends can
/// tokens differ (a token that holds the byte before the run, a cascade of merges from an
/// odd block left over at each size), within a few tokens' bytes. A run of `n` bytes takes
/// at least `(n - 2 * edge) / block` tokens, `edge` bytes being allowed at each end.
#[derive(Debug, Clone)]
struct SymbolRuns {
    /// By ASCII byte: the size BPE's blocks stop at in a run of it, or 0 where the bound
    /// does not apply (a byte no run of which is one piece, or whose merges do not rank in
    /// order, or that an added token is made of).
    block: [usize; 128],
    /// Bytes at either end of a run that the bound does not count on.
    edge: [usize; 128],
}

impl SymbolRuns {
    fn new<'a>(
        merges: &[(String, String)],
        added: impl Iterator<Item = &'a str>,
        longest: usize,
    ) -> Self {
        // By byte, the rank of the merge of `2^k` of it with itself, for each k.
        let mut doubling: Vec<Vec<Option<usize>>> = vec![Vec::new(); 128];
        for (rank, (a, b)) in merges.iter().enumerate() {
            let Some(c) = only_char(a) else { continue };
            if a != b || !a.len().is_power_of_two() || !in_one_piece(c) {
                continue;
            }
            let level = a.len().trailing_zeros() as usize;
            let ranks = &mut doubling[usize::from(c)];
            if ranks.len() <= level {
                ranks.resize(level + 1, None);
            }
            ranks[level].get_or_insert(rank);
        }
        let mut block = [0; 128];
        let mut edge = [0; 128];
        for (c, ranks) in doubling.iter().enumerate() {
            // The levels merge in turn up to the first that does not exist; one that ranks
            // before the level under it could merge blocks as soon as they form, past it.
            let mut levels = 0;
            let mut before = None;
            for rank in ranks {
                match (*rank, before) {
                    (None, _) => break,
                    (Some(rank), Some(b)) if rank <= b => {
                        levels = 0;
                        break;
                    }
                    (Some(rank), _) => {
                        levels += 1;
                        before = Some(rank);
                    }
                }
            }
            if levels > 0 {
                block[c] = 1 << levels;
                // An end token of the neighbouring bytes and one cascade per level.
                edge[c] = (levels + 2) * longest;
            }
        }
        // An added token is matched before BPE: one made of the byte may cut a run.
        for token in added {
            if let Some(c) = only_char(token) {
                block[usize::from(c)] = 0;
            }
        }
        Self { block, edge }
    }

    /// At least how many tokens the long runs of one byte in `bytes` take.
    fn least_tokens(&self, bytes: &[u8]) -> usize {
        let mut total = 0;
        for run in bytes.chunk_by(|a, b| a == b) {
            let c = usize::from(run[0]);
            let Some(&block) = self.block.get(c).filter(|&&b| b > 0) else {
                continue;
            };
            total += run.len().saturating_sub(2 * self.edge[c]) / block;
        }
        total
    }
}

/// The ASCII byte that `text` repeats, if it is one byte repeated.
fn only_char(text: &str) -> Option<u8> {
    only_byte(text.as_bytes()).filter(u8::is_ascii)
}

/// Whether every supported pre-tokenizer keeps a run of `c` in one piece: ASCII letters and
/// punctuation (digits are split, whitespace runs give their last byte to what follows).
/// Printable ASCII is its own character in GPT-2's byte map.
fn in_one_piece(c: u8) -> bool {
    c.is_ascii_graphic() && !c.is_ascii_digit()
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

/// The byte that `c`, a character of a byte-level BPE token's string, stands for (GPT-2's
/// byte-to-character map: bytes 0x21..=0x7E, 0xA1..=0xAC and 0xAE..=0xFF are themselves;
/// 0x00..=0x20, 0x7F..=0xA0 and 0xAD, in order, are U+0100..=U+0143).
pub(super) fn byte_of(c: char) -> Option<u8> {
    match c as u32 {
        code @ (0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) => Some(code as u8),
        code @ 0x100..=0x120 => Some((code - 0x100) as u8),
        code @ 0x121..=0x142 => Some((code - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

/// The ASCII byte that `c`, a character of a byte-level BPE token's string, stands for.
fn ascii_byte_of(c: char) -> Option<u8> {
    byte_of(c).filter(u8::is_ascii)
}

/// Whether `c`, a character of a byte-level BPE token's string, stands for a byte of 0x80 or
/// above.
fn stands_for_high_byte(c: char) -> bool {
    byte_of(c).is_some_and(|b| b >= 0x80)
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
            assert_eq!(super::byte_of(c), u8::try_from(byte).ok(), "{byte:#x}");
        }
        assert_eq!(super::byte_of(' '), None);
        assert_eq!(super::byte_of('\u{144}'), None);
    }

    #[test]
    fn symbol_runs_stop_at_the_first_missing_doubling_and_need_ranks_in_order() {
        let merges = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let in_order = merges(&[
            ("=", "="),
            ("==", "="),
            ("==", "=="),
            ("====", "=="),
            ("====", "===="),
            ("-", "-"),
            ("--", "--"),
            ("1", "1"),
        ]);
        let runs = super::SymbolRuns::new(&in_order, std::iter::empty(), 10);
        // `=` doubles three times: blocks of 8; its edges are (3 + 2) * 10 bytes.
        assert_eq!(runs.block[usize::from(b'=')], 8);
        assert_eq!(runs.least_tokens(&[b'='; 100 + 800]), 100);
        assert_eq!(runs.least_tokens(&[b'='; 100]), 0);
        assert_eq!(runs.block[usize::from(b'-')], 4);
        // Digits are cut by pre-tokenizers; a byte with no merges has no bound.
        assert_eq!(runs.block[usize::from(b'1')], 0);
        assert_eq!(runs.block[usize::from(b'#')], 0);
        // Two runs add up (edges of (2 + 2) * 10 bytes for `-`); other bytes count for
        // nothing.
        let text = [vec![b'-'; 80 + 400], b"ab".to_vec(), vec![b'='; 100 + 800]].concat();
        assert_eq!(runs.least_tokens(&text), 100 + 100);
        // A doubling that ranks before the one under it disables the bound.
        let out_of_order = merges(&[("==", "=="), ("=", "=")]);
        let runs = super::SymbolRuns::new(&out_of_order, std::iter::empty(), 10);
        assert_eq!(runs.block[usize::from(b'=')], 0);
        // So does an added token made of the byte, which may cut a run.
        let runs = super::SymbolRuns::new(&in_order, ["==="].into_iter(), 10);
        assert_eq!(runs.block[usize::from(b'=')], 0);
        assert_eq!(runs.block[usize::from(b'-')], 4);
    }

    fn reach_of(vocab: &[&[u8]]) -> super::Reach {
        let mut reach = super::Reach::default();
        for token in vocab {
            reach.add(token);
        }
        reach
    }

    #[test]
    fn the_reach_bound_steps_by_the_longest_token_at_each_byte() {
        let reach = reach_of(&[b"=", b"==", b"====", b"a", b"b", b"c", b"ab", b"abc"]);
        // Three steps of four `=`, less the one a leading token may hold.
        assert_eq!(reach.least_tokens(&[b'='; 12], usize::MAX), 2);
        assert_eq!(reach.least_tokens(&[b'='; 13], usize::MAX), 3);
        // Counting stops once it is past enough.
        assert_eq!(reach.least_tokens(&[b'='; 4000], 10), 10);
        // "abc" twice: a step each.
        assert_eq!(reach.least_tokens(b"abcabc", usize::MAX), 1);
        // No token starts with "ca" or "bc" but the single letters.
        assert_eq!(reach.least_tokens(b"cacaca", usize::MAX), 5);
        assert_eq!(reach.least_tokens(b"", usize::MAX), 0);
        // A non-ASCII byte steps by the longest token that starts with one (none here: 1).
        assert_eq!(reach.least_tokens("\u{e9}\u{e9}".as_bytes(), usize::MAX), 3);
    }

    /// The fewest of `tokens` that cut each stretch of `text` from within `slack` bytes of
    /// its start to within `slack` bytes of its end, crossing none of the places `segments`
    /// says the pre-tokenizer cuts at, added up, written plainly: every cut tried at every
    /// place. With `relaxed`, a run of one byte may also be cut at every length up to its
    /// longest token of that byte alone.
    fn fewest_reference(
        tokens: &[&[u8]],
        slack: usize,
        text: &[u8],
        segments: &super::Segments,
        relaxed: bool,
    ) -> usize {
        fewest_reference_of(tokens, slack, text, segments, relaxed, false)
    }

    /// [`fewest_reference`], of the whole text as one stretch where `whole`.
    fn fewest_reference_of(
        tokens: &[&[u8]],
        slack: usize,
        text: &[u8],
        segments: &super::Segments,
        relaxed: bool,
        whole: bool,
    ) -> usize {
        let mut all: Vec<Vec<u8>> = tokens.iter().map(|t| t.to_vec()).collect();
        if relaxed {
            for token in tokens {
                if let Some(b) = super::only_byte(token) {
                    all.extend((1..token.len()).map(|k| vec![b; k]));
                }
            }
        }
        let mut total = 0;
        let stretches: Vec<&[u8]> = if whole {
            vec![text]
        } else {
            text.split(|b| !b.is_ascii()).collect()
        };
        for stretch in stretches.into_iter().filter(|s| s.len() > 2 * slack) {
            let n = stretch.len();
            let cut: Vec<bool> = (0..n)
                .map(|p| p > 0 && segments.cut_before(stretch, p))
                .collect();
            let mut fewest = vec![usize::MAX; n + 1];
            for end in 0..=n {
                if end <= slack {
                    fewest[end] = 0;
                    continue;
                }
                for token in &all {
                    let start = end.saturating_sub(token.len());
                    if stretch[..end].ends_with(token)
                        && fewest[start] != usize::MAX
                        && !(start + 1..end).any(|p| cut[p])
                    {
                        fewest[end] = fewest[end].min(fewest[start] + 1);
                    }
                }
            }
            let least = fewest[n - slack..].iter().min().copied().unwrap();
            total += if least == usize::MAX { 0 } else { least };
        }
        total
    }

    /// Segments of `tokens`, with `slack` at the ends of ASCII stretches.
    fn segments_of(tokens: &[&[u8]], slack: usize) -> TestSegments {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.to_vec()).collect();
        TestSegments(super::Segments::new(&tokens, &["<s>"], true), slack)
    }

    /// Segments, and the slack their tests count ASCII stretches with.
    struct TestSegments(super::Segments, usize);

    impl std::ops::Deref for TestSegments {
        type Target = super::Segments;
        fn deref(&self) -> &super::Segments {
            &self.0
        }
    }

    impl TestSegments {
        /// The tokens of `text`'s stretches of ASCII (or of all of it, `whole`, from within
        /// the longest token of its ends).
        fn fewest_tokens(&self, text: &[u8], enough: usize, whole: bool) -> usize {
            if whole {
                return self.0.fewest_tokens(
                    text,
                    enough,
                    std::iter::once(0..text.len()),
                    self.0.longest,
                );
            }
            let mut stretches = Vec::new();
            let mut start = 0;
            for (i, b) in text.iter().enumerate() {
                if !b.is_ascii() {
                    stretches.push(start..i);
                    start = i + 1;
                }
            }
            stretches.push(start..text.len());
            self.0.fewest_tokens(text, enough, stretches, self.1)
        }
    }

    /// Spaces after a word are cut into the vocabulary's tokens of spaces, which need not
    /// hold every length; a space or tab before a word goes with the word; a token that
    /// holds a letter and then a space is never taken; a run before an added token or a
    /// digit, or after a newline, is cut at every length up to its longest token.
    #[test]
    fn segments_follow_the_pre_tokenizers_cuts_around_whitespace() {
        let tokens: [&[u8]; 9] = [
            b"x", b" ", b"  ", b"    ", b" x", b"x ", b"1", b"\n", b"<s>",
        ];
        let segments = segments_of(&tokens, 1);
        let fewest = |text: &str| segments.fewest_tokens(text.as_bytes(), usize::MAX, false);
        // "x" and seven spaces, ten times, then "x": the pre-tokenizer makes "x", then ten
        // times six spaces (four and two) and " x": 31 tokens; the middle from the second
        // byte takes 30.
        let words = format!("x{}", " ".repeat(7)).repeat(10) + "x";
        assert_eq!(fewest(&words), 30);
        // Before a digit or an added token, spaces are not cut before the last one.
        let digits = format!("x{}", " ".repeat(7)).repeat(10) + "1";
        let exact = fewest_reference(&tokens, 1, digits.as_bytes(), &segments, false);
        assert!(fewest(&digits) <= exact, "{} {exact}", fewest(&digits));
        for text in [
            &words,
            &digits,
            &format!("{words}<s>"),
            &format!("\n{}x", " ".repeat(9)),
        ] {
            let relaxed = fewest_reference(&tokens, 1, text.as_bytes(), &segments, true);
            let exact = fewest_reference(&tokens, 1, text.as_bytes(), &segments, false);
            assert!((relaxed..=exact).contains(&fewest(text)), "{text:?}");
        }
    }

    #[test]
    fn segments_count_the_fewest_tokens_that_cut_each_stretch() {
        let tokens: [&[u8]; 7] = [b"a", b"b", b"=", b"ab", b"abab", b"==", b"===="];
        let segments = segments_of(&tokens, 2);
        let fewest = |text: &[u8]| {
            let found = segments.fewest_tokens(text, usize::MAX, false);
            assert_eq!(found, fewest_reference(&tokens, 2, text, &segments, true));
            found
        };
        // "abab" four times: the middle from the third byte to the third last is three.
        assert_eq!(fewest(b"abababababababab"), 3);
        // A non-ASCII byte ends a stretch; each is counted apart.
        let ab = "ab".repeat(50);
        assert_eq!(fewest(format!("{ab}\u{e9}{ab}").as_bytes()), 2 * 24);
        // A run of `=` is stepped over four at a time (three counts as a token too).
        assert_eq!(fewest(&[b'='; 102]), 25);
        assert_eq!(fewest(format!("{ab}{}{ab}", "=".repeat(41)).as_bytes()), 61);
        // Counting stops once it reaches enough, not far past it.
        let long = "ab".repeat(20_000);
        let all = fewest(long.as_bytes());
        assert_eq!(all, 9_999);
        let some = segments.fewest_tokens(long.as_bytes(), 100, false);
        assert!((100..all).contains(&some), "{some}");
        // No tokens for a byte the vocabulary lacks: nothing counted past it.
        assert_eq!(fewest(b"ccccccccccccccccccc"), 0);
    }

    /// Random tokens over `alphabet` (up to 12, of `lengths`), then runs of one byte of
    /// `run_bytes` (`runs` of them, of `run_lengths`).
    fn vocabulary(
        alphabet: &'static [u8],
        lengths: std::ops::Range<usize>,
        run_bytes: &'static [u8],
        run_lengths: std::ops::Range<usize>,
        runs: std::ops::Range<usize>,
    ) -> impl proptest::strategy::Strategy<Value = Vec<Vec<u8>>> {
        use proptest::collection::vec;
        use proptest::sample::select;
        use proptest::strategy::Strategy;
        let words = vec(vec(select(alphabet), lengths), 0..12);
        let runs = vec((select(run_bytes), run_lengths), runs);
        (words, runs).prop_map(|(mut words, runs)| {
            words.extend(runs.into_iter().map(|(b, n)| vec![b; n]));
            words
        })
    }

    proptest::proptest! {
        /// Without whitespace, the count is the fewest tokens that cut each stretch, runs
        /// cut at every length up to their longest token, as the plain reference finds
        /// them, over random vocabularies, texts and slacks (the table it keeps wraps
        /// around many times).
        #[test]
        fn segments_match_the_plain_reference(
            tokens in vocabulary(b"ab=", 2..9, b"ab=", 2..12, 0..3),
            text in proptest::collection::vec(
                proptest::sample::select(b"aaabbb======\xc3".to_vec()), 0..400),
            slack in 1usize..12,
        ) {
            let base: [&[u8]; 5] = [b"a", b"b", b"=", b"\xc3", b"a\xc3"];
            let tokens: Vec<&[u8]> = base.into_iter().chain(tokens.iter().map(Vec::as_slice)).collect();
            let segments = segments_of(&tokens, slack);
            proptest::prop_assert_eq!(
                segments.fewest_tokens(&text, usize::MAX, false),
                fewest_reference(&tokens, slack, &text, &segments, true)
            );
            // The whole text, its non-ASCII bytes too, from within the longest token of
            // its ends.
            let longest = segments.longest;
            proptest::prop_assert_eq!(
                segments.fewest_tokens(&text, usize::MAX, true),
                fewest_reference_of(&tokens, longest, &text, &segments, true, true)
            );
        }

        /// With whitespace, the count lies between the fewest tokens that cut each stretch
        /// at the pre-tokenizer's places with runs cut at every length (which it takes in
        /// runs that do not start at such a place), and with runs cut only into the
        /// vocabulary's tokens (which it takes in runs that do).
        #[test]
        fn segments_lie_between_the_relaxed_and_the_exact_reference(
            tokens in vocabulary(b"a =\t\n", 2..7, b" \t=", 2..9, 0..4),
            text in proptest::collection::vec(
                proptest::sample::select(b"aaa      \t\n==1<\xc3".to_vec()), 0..300),
            slack in 1usize..6,
        ) {
            let base: [&[u8]; 7] = [b"a", b" ", b"=", b"\t", b"\n", b"1", b"<"];
            let tokens: Vec<&[u8]> = base.into_iter().chain(tokens.iter().map(Vec::as_slice)).collect();
            let segments = segments_of(&tokens, slack);
            let found = segments.fewest_tokens(&text, usize::MAX, false);
            let relaxed = fewest_reference(&tokens, slack, &text, &segments, true);
            let exact = fewest_reference(&tokens, slack, &text, &segments, false);
            proptest::prop_assert!(relaxed <= found && found <= exact, "{relaxed} {found} {exact}");
        }

        /// The bound never exceeds the fewest tokens of the vocabulary that spell the text
        /// (which no encoding undercuts), found by dynamic programming.
        #[test]
        fn the_reach_bound_is_at_most_the_fewest_tokens(
            vocab in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(b"ab=\xc3".to_vec()), 2..9),
                0..12,
            ),
            text in proptest::collection::vec(proptest::sample::select(b"ab=\xc3".to_vec()), 0..64),
        ) {
            let mut tokens: Vec<&[u8]> = vec![b"a", b"b", b"=", b"\xc3"];
            tokens.extend(vocab.iter().map(Vec::as_slice));
            let reach = reach_of(&tokens);
            let mut fewest = vec![usize::MAX; text.len() + 1];
            fewest[0] = 0;
            for end in 1..=text.len() {
                for token in &tokens {
                    if text[..end].ends_with(token) && fewest[end - token.len()] != usize::MAX {
                        fewest[end] = fewest[end].min(fewest[end - token.len()] + 1);
                    }
                }
            }
            proptest::prop_assert!(reach.least_tokens(&text, usize::MAX) <= fewest[text.len()]);
        }
    }
}
