use crate::gguf::{value_as_u32, ModelFile};
use crate::{EngineError, TokenId};
use aho_corasick::{AhoCorasick, MatchKind};
use std::sync::OnceLock;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

mod bound;

use bound::TokenBound;

const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Whether a token of this type is an added token: matched in text as it is written,
/// before the pre-tokenizer splits the text.
fn is_added(token_type: u32) -> bool {
    token_type == TOKEN_TYPE_CONTROL || token_type == TOKEN_TYPE_USER_DEFINED
}

/// Names of end-of-turn tokens that stop generation when the vocabulary has them.
const STOP_TOKEN_NAMES: [&str; 5] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
];

/// Fill-in-the-middle token names of code models, prefix / suffix / middle, where the file
/// does not give their ids: Qwen2.5-Coder's, StarCoder's, DeepSeek-Coder's.
const FIM_NAMES: [[&str; 3]; 3] = [
    ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
    ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    [
        "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
        "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
        "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
    ],
];

/// Tokens a model with fill-in-the-middle tokens ends a middle with, besides its end of
/// text (padding, the start of another file or repository), which stop generation as
/// llama.cpp stops on them.
const FIM_STOP_NAMES: [&str; 6] = [
    "<|fim_pad|>",
    "<|file_sep|>",
    "<|repo_name|>",
    "<fim_pad>",
    "<file_sep>",
    "<repo_name>",
];

/// Repository-level fill-in-the-middle token names (Qwen2.5-Coder's, StarCoder's), of the
/// repository's name and of the file separator, where the file does not give their ids.
const FIM_REPO_NAMES: [&str; 3] = ["<|repo_name|>", "<repo_name>", "<reponame>"];
const FIM_SEP_NAMES: [&str; 2] = ["<|file_sep|>", "<file_sep>"];

/// A code model's fill-in-the-middle tokens: `prefix` code `suffix` code `middle`, after
/// which the model writes what goes between; with a repository's other files before them
/// (`repo` name, then `file_sep` name and text of each) where the model has those tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: TokenId,
    pub suffix: TokenId,
    pub middle: TokenId,
    pub repo: Option<TokenId>,
    pub file_sep: Option<TokenId>,
}

impl FimTokens {
    /// The three tokens, prefix, suffix, middle, where all three are there.
    fn new([prefix, suffix, middle]: [Option<TokenId>; 3]) -> Option<Self> {
        Some(Self {
            prefix: prefix?,
            suffix: suffix?,
            middle: middle?,
            repo: None,
            file_sep: None,
        })
    }
}

/// A file of the repository around the code being filled in: its name and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfillFile {
    pub filename: String,
    pub text: String,
}

/// A repository-level fill-in-the-middle prompt, as llama.cpp's `/infill` assembles it:
/// other files first, then the code before the gap with the start of the middle already
/// written (`middle`), then the code after it.
#[derive(Debug, Clone, Copy)]
pub struct RepoInfill<'a> {
    pub files: &'a [InfillFile],
    pub prefix: &'a str,
    pub middle: &'a str,
    pub suffix: &'a str,
}

/// How many tokens of a [`RepoInfill`] are kept, as llama.cpp keeps them: the last
/// `3 * batch / 4` of the prefix, the first `batch / 4 - 2` of the suffix less the middle's,
/// the last `files` of the other files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfillBudget {
    pub batch: usize,
    pub files: usize,
}

/// A byte-level BPE tokenizer built from GGUF metadata, with the model's stop tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// `inner` with control tokens read as plain text (content that must not steer), made
    /// on first use: only roles that tokenize chats need this second copy of the vocabulary.
    text_only: OnceLock<Tokenizer>,
    /// What each token stands for, as bytes ([`Self::token_bytes`]), made at its first call.
    token_bytes: OnceLock<Vec<Box<[u8]>>>,
    /// The control tokens' strings, in id order, and a matcher of them (leftmost longest,
    /// as the tokenizer itself matches them).
    controls: Vec<(String, TokenId)>,
    control_matcher: AhoCorasick,
    stop_tokens: Vec<TokenId>,
    fim: Option<FimTokens>,
    bos: Option<(TokenId, String)>,
    eos_text: String,
    add_bos: bool,
    fingerprint: u64,
    /// Bytes of the longest token string (at least what any token stands for).
    longest_token_bytes: usize,
    /// What [`TextTokenizer::least_tokens`] finds its bound with.
    bound: TokenBound,
    /// Whether text may be tokenized piece by piece at [`next_cut`]'s cuts (no added token
    /// holds a space or a newline, so none can straddle one).
    piecewise: bool,
    /// Pieces tokenized side by side: the machine's cores.
    cores: usize,
}

/// Bytes of text [`TextTokenizer::encode_at_most`] tokenizes in one piece, at least.
const PIECE_BYTES: usize = 16 * 1024;

/// Text of more bytes than this (and than there is room for tokens: no token is shorter
/// than a byte) is bounded by [`TextTokenizer::fewest_tokens`] before it is tokenized.
const BOUND_FIRST_BYTES: usize = 16 * 1024;

impl TextTokenizer {
    pub(crate) fn from_gguf(file: &ModelFile) -> Result<Self, EngineError> {
        let error = |reason: String| EngineError::Tokenizer {
            path: file.path.clone(),
            reason,
        };
        let kind = file.string("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(error(format!(
                "tokenizer model `{kind}` is not supported (byte-level BPE `gpt2` is)"
            )));
        }
        let tokens = file.strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = file
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| error(format!("merge `{m}` has no space")))
            })
            .collect::<Result<_, _>>()?;
        let token_types: Vec<u32> = file
            .metadata("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|values| {
                values
                    .iter()
                    .map(|v| value_as_u32(v).unwrap_or(1))
                    .collect()
            })
            .unwrap_or_default();
        let pre = file
            .string("tokenizer.ggml.pre")
            .unwrap_or("gpt2")
            .to_string();
        let fingerprint = fingerprint(&tokens, &merges);
        let longest_token_bytes = tokens.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        // Only the qwen2 pre-tokenizer comes with a normalizer (NFC).
        let normalizes = pre == "qwen2";
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, EngineError> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| error(e.to_string()))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        };
        // The pre-tokenizer, and whether its patterns end a piece at the last newline of
        // whitespace (qwen2's and llama3's do).
        let (pre_tokenizer, newline_pieces): (PreTokenizerWrapper, bool) = match pre.as_str() {
            "qwen2" => (split(QWEN2_SPLIT)?, true),
            "llama3" | "llama-bpe" | "smaug-bpe" => (split(LLAMA3_SPLIT)?, true),
            "smollm" => (
                Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])
                .into(),
                false,
            ),
            "gpt2" | "default" => (ByteLevel::new(false, true, true).into(), false),
            other => {
                return Err(error(format!(
                    "pre-tokenizer `{other}` is not supported (qwen2, smollm, llama3, gpt2 are)"
                )))
            }
        };
        let bound = TokenBound::new(&tokens, &token_types, &merges, normalizes, newline_pieces)
            .map_err(|e| error(e.to_string()))?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        if normalizes {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| error(e.to_string()))?;
        }
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        let controls: Vec<(String, TokenId)> = token_types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t == TOKEN_TYPE_CONTROL)
            .filter_map(|(i, _)| Some((tokens.get(i)?.to_string(), i as TokenId)))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        let control_matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(controls.iter().map(|(s, _)| s))
            .map_err(|e| error(e.to_string()))?;
        let specials: Vec<AddedToken> = token_types
            .iter()
            .enumerate()
            .filter(|&(_, &t)| is_added(t))
            .filter_map(|(i, &t)| {
                tokens
                    .get(i)
                    .map(|s| AddedToken::from(s.to_string(), t == TOKEN_TYPE_CONTROL))
            })
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| error(e.to_string()))?;
        let id_of = |key: &str| {
            file.uint(key)
                .ok()
                .map(|v| v as TokenId)
                .filter(|&id| (id as usize) < tokens.len())
        };
        // The ids the file gives (llama.cpp's keys, then their older names), else the names.
        let fim = [
            ["fim_pre", "fim_suf", "fim_mid"],
            ["prefix", "suffix", "middle"],
        ]
        .iter()
        .find_map(|keys| {
            FimTokens::new(keys.map(|k| id_of(&format!("tokenizer.ggml.{k}_token_id"))))
        })
        .or_else(|| {
            FIM_NAMES
                .iter()
                .find_map(|names| FimTokens::new(names.map(|n| inner.token_to_id(n))))
        })
        .map(|fim| {
            let named = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
            FimTokens {
                repo: id_of("tokenizer.ggml.fim_rep_token_id").or_else(|| named(&FIM_REPO_NAMES)),
                file_sep: id_of("tokenizer.ggml.fim_sep_token_id")
                    .or_else(|| named(&FIM_SEP_NAMES)),
                ..fim
            }
        });
        let fim_stops = FIM_STOP_NAMES
            .iter()
            .filter(|_| fim.is_some())
            .filter_map(|n| inner.token_to_id(n));
        let mut stop_tokens: Vec<TokenId> = id_of("tokenizer.ggml.eos_token_id")
            .into_iter()
            .chain(id_of("tokenizer.ggml.eot_token_id"))
            .chain(STOP_TOKEN_NAMES.iter().filter_map(|n| inner.token_to_id(n)))
            .chain(fim_stops)
            .filter(|&id| (id as usize) < tokens.len())
            .collect();
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let name = |id: TokenId| tokens.get(id as usize).map(|s| s.to_string());
        let bos = id_of("tokenizer.ggml.bos_token_id").and_then(|id| Some((id, name(id)?)));
        let eos_text = id_of("tokenizer.ggml.eos_token_id")
            .and_then(name)
            .unwrap_or_default();
        let add_bos = file
            .metadata("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let piecewise = token_types
            .iter()
            .zip(&tokens)
            .filter(|&(&t, _)| is_added(t))
            .all(|(_, token)| !token.contains([' ', '\n', CJK_FULL_STOP, CJK_COMMA]));
        Ok(Self {
            inner,
            text_only: OnceLock::new(),
            token_bytes: OnceLock::new(),
            controls,
            control_matcher,
            stop_tokens,
            fim,
            bos,
            eos_text,
            add_bos,
            fingerprint,
            longest_token_bytes,
            bound,
            piecewise,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// ids; a BOS token is prepended when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.leading_bos());
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// [`Self::encode`]'s ids of `text`, or `None` as soon as they are known to number more
    /// than `limit`: long text is first bounded without tokenizing it
    /// ([`Self::fewest_tokens`]), then tokenized in pieces, one per core side by side (cut
    /// only where the tokens cannot change, [`next_cut`]), so an over-long prompt costs
    /// about `limit` tokens' work, not its whole length's.
    pub fn encode_at_most(
        &self,
        text: &str,
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        let ids = self.leading_bos().into_iter().collect();
        self.pieces_at_most(&self.inner, ids, text, limit)
    }

    /// [`Self::encode_text`]'s ids, or `None` as soon as they number more than `limit`.
    pub fn encode_text_at_most(
        &self,
        text: &str,
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        self.pieces_at_most(self.text_only(), Vec::new(), text, limit)
    }

    fn pieces_at_most(
        &self,
        tokenizer: &Tokenizer,
        mut ids: Vec<TokenId>,
        text: &str,
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        let error = |e: tokenizers::Error| EngineError::Encode(e.to_string());
        // Long text that must take more tokens than there is room for is refused before
        // tokenizing: a word the tokenizer cannot cut costs its whole length to tokenize.
        let room = limit.saturating_sub(ids.len());
        if text.len() > room.max(BOUND_FIRST_BYTES)
            && self.fewest_tokens(text, room.saturating_add(1)) > room
        {
            return Ok(None);
        }
        // As many pieces at a time as there are cores, tokenized side by side.
        let at_a_time = if self.piecewise { self.cores } else { 1 };
        let mut start = 0;
        while start < text.len() {
            let mut pieces = Vec::with_capacity(at_a_time);
            while pieces.len() < at_a_time && start < text.len() {
                let end = if self.piecewise {
                    next_cut(text, start + PIECE_BYTES)
                } else {
                    text.len()
                };
                pieces.push(&text[start..end]);
                start = end;
            }
            let encodings = match pieces[..] {
                [piece] => vec![tokenizer.encode(piece, false).map_err(error)?],
                _ => tokenizer.encode_batch(pieces, false).map_err(error)?,
            };
            for encoding in encodings {
                ids.extend_from_slice(encoding.get_ids());
            }
            if ids.len() > limit {
                return Ok(None);
            }
        }
        Ok(Some(ids))
    }

    /// The prompt of a fill-in-the-middle request, in the prefix-suffix-middle order code
    /// models are trained on (`<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`),
    /// with `prefix` and `suffix` read as plain text (code may hold a control token's
    /// string); `None` once it numbers more than `limit` tokens. An error for a model
    /// without fill-in-the-middle tokens.
    pub fn encode_infill_at_most(
        &self,
        prefix: &str,
        suffix: &str,
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        let fim = self.fim.ok_or_else(|| {
            EngineError::Encode("this model has no fill-in-the-middle tokens".into())
        })?;
        let mut ids: Vec<TokenId> = self.leading_bos().into_iter().collect();
        ids.push(fim.prefix);
        let Some(mut ids) = self.pieces_at_most(self.text_only(), ids, prefix, limit)? else {
            return Ok(None);
        };
        ids.push(fim.suffix);
        let Some(mut ids) = self.pieces_at_most(self.text_only(), ids, suffix, limit)? else {
            return Ok(None);
        };
        ids.push(fim.middle);
        Ok((ids.len() <= limit).then_some(ids))
    }

    /// The prompt of a repository-level fill-in-the-middle request, as llama.cpp's `/infill`
    /// writes it (every piece read as plain text):
    /// `<|repo_name|>myproject\n` then `<|file_sep|>name\ntext` for each file and
    /// `<|file_sep|>filename\n`, then `<|fim_prefix|>prefix middle<|fim_suffix|>suffix
    /// <|fim_middle|>`; a model without the repository tokens gets its files after a
    /// `--- snippet ---` line each. Pieces over the `budget` lose their far ends (the
    /// start of the files and of the prefix, the end of the suffix). Also returns whether
    /// any piece was cut. An error for a model without fill-in-the-middle tokens.
    pub fn encode_repo_infill(
        &self,
        infill: RepoInfill,
        budget: InfillBudget,
    ) -> Result<(Vec<TokenId>, bool), EngineError> {
        let fim = self.fim.ok_or_else(|| {
            EngineError::Encode("this model has no fill-in-the-middle tokens".into())
        })?;
        let mut files: Vec<TokenId> = fim.repo.into_iter().collect();
        if fim.repo.is_some() {
            files.extend(self.encode_text("myproject\n")?);
        }
        for file in infill.files {
            match fim.file_sep {
                Some(sep) => {
                    files.push(sep);
                    files.extend(self.encode_text(&format!("{}\n", file.filename))?);
                }
                None => files.extend(self.encode_text("\n\n--- snippet ---\n\n")?),
            }
            files.extend(self.encode_text(&file.text)?);
        }
        if let Some(sep) = fim.file_sep {
            files.push(sep);
            files.extend(self.encode_text("filename\n")?);
        }
        let mut prefix = self.encode_text(infill.prefix)?;
        let middle = self.encode_text(infill.middle)?;
        let mut suffix = self.encode_text(infill.suffix)?;
        let prefix_take = 3 * (budget.batch / 4);
        let suffix_take = (budget.batch / 4).saturating_sub(2 + middle.len());
        let cut =
            prefix.len() > prefix_take || suffix.len() > suffix_take || files.len() > budget.files;
        prefix.drain(..prefix.len().saturating_sub(prefix_take));
        suffix.truncate(suffix_take);
        files.drain(..files.len().saturating_sub(budget.files));
        let mut ids = files;
        ids.extend(self.leading_bos());
        ids.push(fim.prefix);
        ids.extend(prefix);
        ids.extend(middle);
        ids.push(fim.suffix);
        ids.extend(suffix);
        ids.push(fim.middle);
        Ok((ids, cut))
    }

    /// The model's fill-in-the-middle tokens, if it has them.
    pub fn fim_tokens(&self) -> Option<FimTokens> {
        self.fim
    }

    /// Token ids of `text` read as plain text: a control token's string (`<|im_start|>`)
    /// becomes the ids of its characters, not the control id. No BOS.
    pub fn encode_text(&self, text: &str) -> Result<Vec<TokenId>, EngineError> {
        let encoding = self
            .text_only()
            .encode(text, false)
            .map_err(|e| EngineError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn text_only(&self) -> &Tokenizer {
        self.text_only.get_or_init(|| {
            let mut tokenizer = self.inner.clone();
            tokenizer.set_encode_special_tokens(true);
            tokenizer
        })
    }

    /// The BOS id to put first, when the model asks for one.
    pub(crate) fn leading_bos(&self) -> Option<TokenId> {
        self.bos
            .as_ref()
            .filter(|_| self.add_bos)
            .map(|(id, _)| *id)
    }

    /// The control tokens' strings and ids, in id order.
    pub(crate) fn controls(&self) -> &[(String, TokenId)] {
        &self.controls
    }

    /// Finds control token strings in text, leftmost longest; the pattern index of a match
    /// is its index in [`Self::controls`].
    pub(crate) fn control_matcher(&self) -> &AhoCorasick {
        &self.control_matcher
    }

    /// Text of `ids`, special tokens left out. Bytes that do not form whole UTF-8
    /// characters come out as U+FFFD.
    pub fn decode(&self, ids: &[TokenId]) -> Result<String, EngineError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Encode(e.to_string()))
    }

    /// The bytes token `id` stands for: a byte-level token's characters mapped back to the
    /// bytes they encode (which may be part of a UTF-8 character), an added token's text;
    /// empty for an id outside the vocabulary. The table of every token is made at the
    /// first call (some tens of milliseconds for Qwen2.5's vocabulary).
    pub fn token_bytes(&self, id: TokenId) -> &[u8] {
        let table = self.token_bytes.get_or_init(|| {
            let added = self.inner.get_added_tokens_decoder();
            let size = self.inner.get_vocab_size(true) as TokenId;
            (0..size)
                .map(|id| match (added.get(&id), self.inner.id_to_token(id)) {
                    (Some(token), _) => token.content.as_bytes().into(),
                    (None, Some(piece)) => piece
                        .chars()
                        .map(bound::byte_of)
                        .collect::<Option<Vec<u8>>>()
                        .unwrap_or_else(|| piece.into_bytes())
                        .into(),
                    (None, None) => Box::default(),
                })
                .collect()
        });
        table.get(id as usize).map_or(&[], |bytes| bytes)
    }

    /// Tokens of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a control token (`<|im_end|>` and the like), never text.
    pub fn is_control(&self, id: TokenId) -> bool {
        self.controls.binary_search_by_key(&id, |&(_, t)| t).is_ok()
    }

    /// Tokens that end generation.
    pub fn stop_tokens(&self) -> &[TokenId] {
        &self.stop_tokens
    }

    pub fn is_stop(&self, token: TokenId) -> bool {
        self.stop_tokens.contains(&token)
    }

    /// Text of the BOS token, for chat templates.
    pub fn bos_text(&self) -> &str {
        self.bos.as_ref().map_or("", |(_, s)| s.as_str())
    }

    /// Text of the EOS token, for chat templates.
    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }

    /// A bound on the bytes of text one token stands for: the longest token string (a
    /// byte-level token's string is at least as long as the bytes it decodes to).
    pub fn longest_token_bytes(&self) -> usize {
        self.longest_token_bytes
    }

    /// At least how many tokens `text` encodes to, found without tokenizing it (about a
    /// millisecond per megabyte), from how many bytes of each kind it has and its runs of
    /// letters, against the densest tokens of the vocabulary, and from walks over it by the
    /// longest tokens that could start at each byte (`tokenizer/bound.rs`). The walks are
    /// skipped once the bound reaches `enough`, and stop there.
    pub fn least_tokens(&self, text: &str, enough: usize) -> usize {
        self.bound.least_tokens(text, enough)
    }

    /// At least how many tokens `text` encodes to, from the fewest strings of the
    /// vocabulary that it can be cut into, passing the places the pre-tokenizer must cut
    /// (`tokenizer/bound.rs`; between the characters that Unicode normalization could
    /// change, where there are any): within a few percent of the real count for text of
    /// every kind measured, at some tens of microseconds per kilobyte, a fraction of
    /// tokenizing it. Stops once the bound reaches `enough`. [`Self::encode_at_most`]
    /// refuses long text with it before tokenizing.
    pub fn fewest_tokens(&self, text: &str, enough: usize) -> usize {
        self.bound.fewest_tokens(text, enough)
    }

    /// Builds what [`Self::fewest_tokens`] needs now (an automaton of every token string:
    /// about 0.1 s and, for Qwen2.5's vocabulary, 17 MB kept and 60 MB more while it is
    /// built), rather than at its first call. Only a role that bounds prompts needs it.
    pub fn prepare_prompt_bound(&self) {
        self.bound.prepare();
    }

    /// A hash of the vocabulary and merges: two tokenizers with equal fingerprints map text
    /// to the same ids. Drafters are refused when theirs differs.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// Ideographic punctuation that text written without spaces can be cut before.
const CJK_FULL_STOP: char = '\u{3002}';
const CJK_COMMA: char = '\u{3001}';

/// The first place at or after `from` where text can be cut without changing its tokens
/// (the end of the text when there is none): after a single newline between two printable
/// ASCII characters, before a space that follows anything but whitespace, before a newline
/// that follows an ASCII letter or digit, or before an ideographic full stop or comma that
/// follows a CJK ideograph of Unicode 1.1 (U+4E00..=U+9FA5, all letters). Every supported
/// pre-tokenizer (qwen2, llama3, gpt2, smollm) ends a piece there (none of their patterns
/// holds anything but whitespace before a space, nor a letter or digit before a newline)
/// and starts the next one at the same place whether the text is whole or cut (they look
/// ahead, never back); NFC composes nothing across a newline, a space or that punctuation;
/// and no added token straddles the cut (checked at load).
fn next_cut(text: &str, from: usize) -> usize {
    let bytes = text.as_bytes();
    let printable = |b: u8| b.is_ascii_graphic();
    let ideograph_before = |at: usize| {
        at >= 3
            && text.is_char_boundary(at - 3)
            && text[at - 3..]
                .chars()
                .next()
                .is_some_and(|c| ('\u{4E00}'..='\u{9FA5}').contains(&c))
    };
    let mut at = from.max(2);
    while at + 1 < bytes.len() {
        let after_newline =
            bytes[at - 1] == b'\n' && printable(bytes[at - 2]) && printable(bytes[at]);
        let before_space = match bytes[at] {
            b' ' => text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace()),
            b'\n' => bytes[at - 1].is_ascii_alphanumeric(),
            _ => false,
        };
        // The two marks are E3 80 82 and E3 80 81 in UTF-8.
        let before_mark = bytes[at] == 0xE3
            && bytes.get(at + 1) == Some(&0x80)
            && matches!(bytes.get(at + 2), Some(0x81 | 0x82))
            && ideograph_before(at);
        if after_newline || before_space || before_mark {
            return at;
        }
        at += 1;
    }
    bytes.len()
}

/// FNV-1a over the tokens and merges, with separators.
fn fingerprint(tokens: &[&str], merges: &[(String, String)]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in tokens {
        feed(t.as_bytes());
        feed(&[0xff]);
    }
    for (a, b) in merges {
        feed(a.as_bytes());
        feed(&[0xfe]);
        feed(b.as_bytes());
        feed(&[0xff]);
    }
    hash
}

/// Turns a stream of tokens into text without ever emitting half a UTF-8 character.
///
/// Keeps a short window of tokens before the unread ones, decodes the window with and
/// without them, and emits the difference once it no longer ends in an incomplete
/// character (the method of TGI and vLLM).
pub struct Detokenizer<'a> {
    tokenizer: &'a TextTokenizer,
    tokens: Vec<TokenId>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token; returns the text that became complete, if any.
    pub fn push(&mut self, token: TokenId) -> Result<Option<String>, EngineError> {
        self.tokens.push(token);
        let before = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let after = self.tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let delta = match after.strip_prefix(before.as_str()) {
                Some(delta) => delta.to_string(),
                None => after.get(before.len()..).unwrap_or(&after).to_string(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Whatever is still held back (incomplete characters come out as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>, EngineError> {
        let before = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let after = self.tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(after
            .strip_prefix(before.as_str())
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }
}
