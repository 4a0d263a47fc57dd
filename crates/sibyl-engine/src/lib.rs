//! The model engine of sibyl: GGUF models (qwen2, llama) on candle's quantized blocks, with
//! a forward pass over a token tree and a KV cache that can be truncated and compacted.
//!
//! The property everything else stands on is **batch invariance**: the logits of a position
//! are bit-identical whether it is computed alone or inside a chain or tree of new tokens.
//! Every op computes each row (each token) with arithmetic that does not depend on the other
//! rows: quantized matrix products compute each output element with the same operations
//! whatever the row count (`kernels`),
//! attention reduces each (token, head) pair in a fixed order, norms and rotations are
//! per row. Greedy speculation is therefore exactly lossless, not "up to numerics". The same
//! holds across sequences: [`Model::forward_batch`] runs several sessions' rows through one
//! pass, and each session's logits are those it would get alone.

mod attention;
mod chat;
mod device;
mod error;
mod gguf;
mod kernels;
mod kv_cache;
mod load;
mod model;
mod parallel;
mod quant;
mod tensor;
pub mod testkit;
mod tokenizer;

/// Storage types of GGUF tensors.
pub use candle_core::quantized::GgmlDType;
pub use chat::{ChatMessage, ChatOptions, ChatTemplate, FunctionCall, ToolCall, ToolCallFormat};
pub use device::Device;
pub use error::EngineError;
pub use gguf::{Architecture, LoadOptions, ModelConfig, Rope, RopeScaling, SamplingDefaults};
pub use kv_cache::KvCache;
pub use load::{load, load_text, LoadedModel, TextModel};
pub use model::{LogitRows, Model, Sequence, TreeInput};
pub use quant::QuantMatrix;
pub use tokenizer::{Detokenizer, FimTokens, InfillBudget, InfillFile, RepoInfill, TextTokenizer};

/// A token id.
pub type TokenId = u32;
