use std::path::PathBuf;

/// What went wrong in the engine, naming the file and the phase.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read model file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: unsupported architecture `{architecture}` (supported: qwen2, qwen3, llama)")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: metadata key `{key}` is missing or has the wrong type")]
    Metadata { path: PathBuf, key: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{path} holds tensors of type {type_name} (GGML type {id}), which this engine cannot \
         read; it runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K (a \
         Q4_K_M, Q5_K_M, Q6_K, Q8_0 or Q4_0 file of the model runs fastest)"
    )]
    UnknownTensorType {
        path: PathBuf,
        id: u32,
        type_name: &'static str,
    },
    #[error("{path}: tensor `{name}` has type {dtype:?}, which this engine cannot run")]
    TensorType {
        path: PathBuf,
        name: String,
        dtype: candle_core::quantized::GgmlDType,
    },
    #[error(
        "{path}: file is truncated or corrupt: tensor `{name}` needs bytes up to {needed}, \
         the file has {length}"
    )]
    Truncated {
        path: PathBuf,
        name: String,
        needed: u64,
        length: u64,
    },
    #[error("{path}: reading tensor `{name}`: {source}")]
    TensorRead {
        path: PathBuf,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path} is malformed: reading it failed with `{reason}`")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: building the tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizing text: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(#[source] minijinja::Error),
    #[error("this model file has no chat template")]
    NoChatTemplate,
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("tree node {node} has parent {parent}; a parent must come before its child")]
    InvalidTree { node: usize, parent: usize },
    #[error("the forward pass needs at least one new token")]
    EmptyInput,
    #[error("context of {needed} tokens exceeds the model's window of {limit} tokens")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("a quantized kernel failed: {0}")]
    Kernel(#[source] candle_core::Error),
    #[error("cannot keep tree nodes {path:?} of a {len}-node forward")]
    InvalidPath { path: Vec<usize>, len: usize },
    #[error(
        "this sibyl was built without CUDA: build it with `--features sibyl-engine/cuda` to \
         use a GPU (docs/gpu.md)"
    )]
    CudaNotBuilt,
    #[error("device {device} is not usable: {source}")]
    DeviceUnavailable {
        device: crate::Device,
        #[source]
        source: candle_core::Error,
    },
    #[error("the compute device failed: {0}")]
    Device(#[source] candle_core::Error),
    #[error("a KV cache of one device was given to a model on another")]
    CacheDevice,
}
