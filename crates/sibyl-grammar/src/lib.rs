//! Output constraints: JSON that matches a JSON Schema (OpenAI's `response_format`), text
//! that matches a regular expression, one of a list of strings, or a Lark grammar (vLLM's
//! `guided_*`), held token by token with
//! [llguidance](https://github.com/guidance-ai/llguidance), the constrained-decoding engine
//! vLLM, SGLang and llama.cpp use.
//!
//! A [`GrammarCompiler`] is made once per model from its vocabulary (some hundreds of
//! milliseconds for 150,000 tokens); each request compiles its grammar into a
//! [`GrammarConstraint`], a [`TokenConstraint`] the session applies to every row it
//! chooses a token from, plain or speculative.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use sibyl_spec::{TokenConstraint, TokenId, JSON_WHITESPACE};
use std::sync::Arc;

/// A schema or vocabulary the grammar engine cannot take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("the JSON schema is not valid JSON: {0}")]
    NotJson(String),
    #[error("the JSON schema must be an object or a boolean")]
    NotSchema,
    #[error("the JSON schema cannot be used: {0}")]
    Schema(String),
    #[error("the grammar cannot be used: {0}")]
    Grammar(String),
    #[error("a choice needs at least one non-empty string")]
    NoChoice,
    #[error("the vocabulary has no stop token to end the output with")]
    NoStopToken,
    #[error("the grammar engine cannot take this vocabulary: {0}")]
    Vocabulary(String),
}

/// Compiles output grammars for one model's vocabulary; shared by its sessions.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    stop_tokens: Arc<[TokenId]>,
    vocab: usize,
}

impl GrammarCompiler {
    /// `tokens`: for each token id of the model's logits, its bytes and whether it is a
    /// special (control) token, which the grammar never takes as text; ids the tokenizer
    /// lacks have no bytes. `stop_tokens` end the output once the grammar is complete.
    pub fn new(
        tokens: impl IntoIterator<Item = (Vec<u8>, bool)>,
        stop_tokens: &[TokenId],
    ) -> Result<Self, GrammarError> {
        let words: Vec<Vec<u8>> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, (bytes, special))| {
                let marked = |text: &[u8]| [&[TokTrie::SPECIAL_TOKEN_MARKER], text].concat();
                match (bytes.is_empty(), special) {
                    // A placeholder no text can match (the engine's own convention).
                    (true, _) => marked(format!("<[{id}]>").as_bytes()),
                    (false, true) => marked(&bytes),
                    (false, false) => bytes,
                }
            })
            .collect();
        let &eos = stop_tokens.first().ok_or(GrammarError::NoStopToken)?;
        let vocab = u32::try_from(words.len())
            .map_err(|_| GrammarError::Vocabulary("too many tokens".into()))?;
        if stop_tokens.iter().any(|&t| t >= vocab) {
            return Err(GrammarError::Vocabulary(
                "a stop token is outside the vocabulary".into(),
            ));
        }
        let trie = TokTrie::from(&TokRxInfo::new(vocab, eos), &words).with_eos_tokens(stop_tokens);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            stop_tokens: stop_tokens.into(),
            vocab: words.len(),
        })
    }

    /// A constraint to JSON that matches `schema`, a JSON Schema. Keywords the engine does
    /// not implement are ignored (lenient, as vLLM's engines are); whitespace between
    /// tokens is bounded.
    pub fn json_schema(&self, schema: &str) -> Result<GrammarConstraint, GrammarError> {
        let mut schema: Value =
            serde_json::from_str(schema).map_err(|e| GrammarError::NotJson(e.to_string()))?;
        match &mut schema {
            Value::Object(fields) => {
                fields.entry("x-guidance").or_insert_with(
                    || json!({"lenient": true, "whitespace_pattern": JSON_WHITESPACE}),
                );
            }
            Value::Bool(_) => {}
            _ => return Err(GrammarError::NotSchema),
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
            .map_err(GrammarError::Schema)
    }

    /// A constraint to text that matches the regular expression `regex` as a whole.
    pub fn regex(&self, regex: &str) -> Result<GrammarConstraint, GrammarError> {
        self.compile(TopLevelGrammar::from_regex(regex))
            .map_err(GrammarError::Grammar)
    }

    /// A constraint to exactly one of `choices`.
    pub fn choice(&self, choices: &[String]) -> Result<GrammarConstraint, GrammarError> {
        if choices.is_empty() || choices.iter().any(String::is_empty) {
            return Err(GrammarError::NoChoice);
        }
        // Lark string literals take JSON's escapes.
        let alternatives: Vec<String> = choices.iter().map(|c| json!(c).to_string()).collect();
        self.lark(&format!("start: {}", alternatives.join(" | ")))
    }

    /// A constraint to text of the Lark grammar `grammar` (llguidance's dialect: rule
    /// `start`, `/regex/` terminals, `%json {...}` for a schema).
    pub fn lark(&self, grammar: &str) -> Result<GrammarConstraint, GrammarError> {
        self.compile(TopLevelGrammar::from_lark(grammar.to_string()))
            .map_err(GrammarError::Grammar)
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<GrammarConstraint, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(GrammarConstraint {
            matcher,
            pending: Vec::new(),
            stop_tokens: self.stop_tokens.clone(),
            vocab: self.vocab,
            ended: false,
        })
    }
}

/// One request's grammar: the engine's matcher, advanced by the tokens the session
/// records, and stepped along each verify path and back.
pub struct GrammarConstraint {
    matcher: Matcher,
    /// Tokens consumed past the recorded ones (the path of the last mask).
    pending: Vec<TokenId>,
    /// Tokens that end the output: allowed by the mask when the output is complete, never
    /// consumed (nothing after one is output).
    stop_tokens: Arc<[TokenId]>,
    /// Tokens in the vocabulary: drafts are untrusted, and an id past it would stop the
    /// engine for good.
    vocab: usize,
    /// A stop token was recorded: the output is over (a session that goes on, as with
    /// `ignore_eos`, may only repeat stop tokens).
    ended: bool,
}

impl GrammarConstraint {
    /// `tokens` up to its first stop token, and whether it has one.
    fn until_stop<'a>(&self, tokens: &'a [TokenId]) -> (&'a [TokenId], bool) {
        match tokens.iter().position(|t| self.stop_tokens.contains(t)) {
            Some(stop) => (&tokens[..stop], true),
            None => (tokens, false),
        }
    }

    /// Makes the matcher's tokens past the recorded ones `path`: rolls back what differs,
    /// consumes the rest.
    fn follow(&mut self, path: &[TokenId]) -> Result<(), String> {
        let common = self
            .pending
            .iter()
            .zip(path)
            .take_while(|(a, b)| a == b)
            .count();
        if common < self.pending.len() {
            self.matcher
                .rollback(self.pending.len() - common)
                .map_err(|e| e.to_string())?;
            self.pending.truncate(common);
        }
        for &token in &path[common..] {
            self.matcher
                .consume_token(token)
                .map_err(|e| e.to_string())?;
            self.pending.push(token);
        }
        Ok(())
    }
}

impl TokenConstraint for GrammarConstraint {
    fn mask(&mut self, path: &[TokenId], row: &mut [f32]) -> Result<(), String> {
        let (path, stopped) = self.until_stop(path);
        self.follow(path)?;
        if stopped || self.ended {
            // Past the end of the output: only stop tokens, the same whether the stop token
            // was recorded or is on the path.
            for (token, logit) in row.iter_mut().enumerate() {
                if !self.stop_tokens.contains(&(token as TokenId)) {
                    *logit = f32::NEG_INFINITY;
                }
            }
            return Ok(());
        }
        // Once the output cannot go on, only a stop token may come.
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let words = allowed.as_slice().iter().chain(std::iter::repeat(&0));
        for (chunk, &word) in row.chunks_mut(32).zip(words) {
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, tokens: &[TokenId]) -> Result<(), String> {
        let (tokens, stopped) = self.until_stop(tokens);
        self.follow(tokens)?;
        self.pending.clear();
        self.ended |= stopped;
        Ok(())
    }

    fn allowed_prefix(&mut self, tokens: &[TokenId]) -> usize {
        // A stop token counts where the JSON is complete; checking ends there.
        let known = tokens
            .iter()
            .position(|&t| t as usize >= self.vocab)
            .unwrap_or(tokens.len());
        match self.follow(&[]) {
            Ok(()) => self.matcher.validate_tokens(&tokens[..known]).unwrap_or(0),
            Err(_) => 0,
        }
    }
}
