//! The model engine of sibyl: GGUF models (qwen2, llama) on candle's quantized blocks, with
//! a forward pass over a token tree and a KV cache that can be truncated and compacted.
//!
//! The property everything else stands on is **batch invariance**: the logits of a position
//! are bit-identical whether it is computed alone or inside a chain or tree of new tokens.
//! Every op computes each row (each token) with arithmetic that does not depend on the other
//! rows: quantized matrix products run candle's block dot products once per (row, column),
//! attention reduces each (token, head) pair in a fixed order, norms and rotations are
//! per row. Greedy speculation is therefore exactly lossless, not "up to numerics".

mod attention;
mod chat;
mod error;
mod gguf;
mod kv_cache;
mod model;
mod parallel;
mod quant;
pub mod testkit;
mod tokenizer;

/// Storage types of GGUF tensors.
pub use candle_core::quantized::GgmlDType;
pub use chat::{ChatMessage, ChatTemplate};
pub use error::EngineError;
pub use gguf::{Architecture, LoadOptions, ModelConfig};
pub use kv_cache::KvCache;
pub use model::{argmax, LogitRows, Model, TreeInput};
pub use quant::QuantMatrix;
pub use tokenizer::{Detokenizer, TextTokenizer};

/// A token id.
pub type TokenId = u32;

/// Everything loaded from one model file: weights, tokenizer, chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    /// The chat template of the file, if it has one.
    pub chat_template: Option<ChatTemplate>,
}

/// Loads a GGUF file: weights, tokenizer and chat template.
pub fn load(path: &std::path::Path, options: &LoadOptions) -> Result<LoadedModel, EngineError> {
    let file = gguf::ModelFile::open(path)?;
    let model = Model::from_gguf(&file, options)?;
    let tokenizer = TextTokenizer::from_gguf(&file)?;
    let chat_template = ChatTemplate::from_gguf(&file, &tokenizer)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
    })
}
