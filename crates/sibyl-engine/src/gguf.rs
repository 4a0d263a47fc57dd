use crate::quant::QuantMatrix;
use crate::EngineError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The transformer families this engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2 / Qwen2.5: biases on q, k, v; rotary embedding on split halves (NeoX style).
    Qwen2,
    /// Llama as written by llama.cpp's converter: q and k permuted for interleaved rotation.
    Llama,
    /// Qwen3: no biases; each head's q and k RMS-normalised (`attn_q_norm`, `attn_k_norm`)
    /// before the rotation (NeoX style); heads may be wider than `hidden_size / heads`.
    Qwen3,
}

/// Hyper-parameters read from the GGUF metadata, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of each attention head (`num_heads * head_dim` is the width of q).
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// How positions turn into the rotary embedding's angles.
    pub rope: Rope,
    /// Longest sequence (prompt and output) the model was trained for.
    pub context_length: usize,
}

impl ModelConfig {
    /// Checks the shape relations the forward pass relies on.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("context_length", self.context_length),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is zero"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "{} heads / {} kv heads do not divide",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is not usable", self.head_dim));
        }
        self.rope.validate(self.head_dim)
    }

    /// Width of the attention's queries (and of its output before the output projection).
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// How a position becomes the rotary embedding's angles, as llama.cpp computes them from a
/// GGUF file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base of the frequencies (`rope.freq_base`).
    pub theta: f32,
    /// One divisor per rotated pair of dimensions (the `rope_freqs.weight` tensor): how
    /// Llama 3.1 and later files carry their long-context frequency scaling.
    pub freq_factors: Option<Vec<f32>>,
    pub scaling: RopeScaling,
}

impl Default for Rope {
    fn default() -> Self {
        Self {
            theta: 10_000.0,
            freq_factors: None,
            scaling: RopeScaling::None,
        }
    }
}

/// Context-extension scaling of the rotary embedding (`rope.scaling.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        factor: f32,
    },
    /// YaRN: low frequencies interpolated by `factor`, high ones kept, a ramp between them
    /// set by `beta_fast` and `beta_slow` rotations over `original_context` positions; the
    /// angles' sines and cosines scaled by `attn_factor * (1 + 0.1 ln factor)`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attn_factor: f32,
    },
}

impl Rope {
    fn validate(&self, head_dim: usize) -> Result<(), String> {
        let usable = |v: f32| v.is_finite() && v > 0.0;
        if !usable(self.theta) {
            return Err(format!("rope.freq_base {} is not usable", self.theta));
        }
        if let Some(factors) = &self.freq_factors {
            if factors.len() != head_dim / 2 {
                return Err(format!(
                    "rope_freqs.weight has {} values, the heads rotate {} pairs",
                    factors.len(),
                    head_dim / 2
                ));
            }
            if let Some(bad) = factors.iter().find(|&&f| !usable(f)) {
                return Err(format!(
                    "rope_freqs.weight holds {bad}, not a positive factor"
                ));
            }
        }
        match self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } if usable(factor) => Ok(()),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attn_factor,
            } if usable(factor)
                && original_context > 0
                && usable(beta_fast)
                && usable(beta_slow)
                && usable(attn_factor) =>
            {
                Ok(())
            }
            scaling => Err(format!("rope scaling {scaling:?} is not usable")),
        }
    }
}

/// How weights are prepared at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Re-quantize Q4_1, Q5_0 and Q5_1 tensors to Q8_0, whose dot product has SIMD kernels
    /// (candle runs those three types with scalar code). Q8_0 holds every value of those
    /// types to within half a step of its 8-bit grid. CPU only: a GPU runs every type as
    /// stored.
    pub requantize_slow_types: bool,
    /// Where the model computes.
    pub device: crate::Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            requantize_slow_types: true,
            device: crate::Device::Cpu,
        }
    }
}

/// The sampling a model file recommends: llama.cpp's converter writes the
/// `general.sampling.*` keys from the model's `generation_config.json`, as vLLM reads that
/// file, for requests that set none. `None` where nothing is said.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    /// 0: every token.
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
}

impl SamplingDefaults {
    /// `self`'s values, and `other`'s where `self` has none.
    pub fn or(self, other: Self) -> Self {
        Self {
            temperature: self.temperature.or(other.temperature),
            top_k: self.top_k.or(other.top_k),
            top_p: self.top_p.or(other.top_p),
            min_p: self.min_p.or(other.min_p),
        }
    }

    /// Whether nothing is said.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks that each value is one a request may set (naming the first that is not):
    /// temperature at least 0, top-k at least 0 (0 or -1: every token), top-p in (0, 1],
    /// min-p in [0, 1].
    pub fn check(&self) -> Result<(), String> {
        let finite = |v: f32| v.is_finite();
        if let Some(t) = self.temperature.filter(|&t| !finite(t) || t < 0.0) {
            return Err(format!("temperature {t} is not at least 0"));
        }
        if let Some(k) = self.top_k.filter(|&k| k < -1) {
            return Err(format!("top_k {k} is not at least -1"));
        }
        if let Some(p) = self.top_p.filter(|&p| !finite(p) || p <= 0.0 || p > 1.0) {
            return Err(format!("top_p {p} is not in (0, 1]"));
        }
        if let Some(p) = self
            .min_p
            .filter(|&p| !finite(p) || !(0.0..=1.0).contains(&p))
        {
            return Err(format!("min_p {p} is not in [0, 1]"));
        }
        Ok(())
    }
}

/// An open GGUF file: its header and a handle to read tensors from.
pub(crate) struct ModelFile {
    pub(crate) path: PathBuf,
    pub(crate) content: Content,
    length: u64,
    file: Mutex<File>,
}

/// The GGML type id of candle's refusal of a tensor type it has no blocks for (the
/// i-quants, ternary and MXFP4 types), which it reports only as text.
fn unknown_tensor_type(error: &candle_core::Error) -> Option<u32> {
    let text = error.to_string();
    let rest = text.split("unknown dtype for tensor ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// ggml's name of a tensor type id (`ggml_type` in ggml.h) that candle cannot read.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

impl ModelFile {
    pub(crate) fn open(path: &Path) -> Result<Self, EngineError> {
        let open_error = |source| EngineError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(open_error)?;
        let length = file.metadata().map_err(open_error)?.len();
        let content =
            Content::read(&mut file).map_err(|source| match unknown_tensor_type(&source) {
                Some(id) => EngineError::UnknownTensorType {
                    path: path.to_path_buf(),
                    id,
                    type_name: ggml_type_name(id),
                },
                None => EngineError::Header {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            length,
            file: Mutex::new(file),
        })
    }

    fn config_error(&self, reason: String) -> EngineError {
        EngineError::Config {
            path: self.path.clone(),
            reason,
        }
    }

    fn metadata_error(&self, key: &str) -> EngineError {
        EngineError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    pub(crate) fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn string(&self, key: &str) -> Result<&str, EngineError> {
        self.metadata(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| self.metadata_error(key))
    }

    pub(crate) fn uint(&self, key: &str) -> Result<u64, EngineError> {
        self.metadata(key)
            .and_then(value_as_u64)
            .ok_or_else(|| self.metadata_error(key))
    }

    pub(crate) fn float(&self, key: &str) -> Result<f32, EngineError> {
        match self.metadata(key) {
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            _ => Err(self.metadata_error(key)),
        }
    }

    /// The `general.sampling.*` values the file has. They are advice: one of the wrong
    /// type or out of range is left out with a warning naming the file, and the model
    /// loads.
    pub(crate) fn sampling_defaults(&self) -> SamplingDefaults {
        let value = |name: &str| {
            let key = format!("general.sampling.{name}");
            self.metadata(&key).map(|value| (key, value))
        };
        let unusable = |key: &str, reason: &str| {
            tracing::warn!(
                file = %self.path.display(),
                key,
                reason,
                "a sampling default of the model file is left out"
            );
        };
        let float = |name: &str| {
            let (key, found) = value(name)?;
            match found {
                Value::F32(v) => Some(*v),
                Value::F64(v) => Some(*v as f32),
                _ => {
                    unusable(&key, "not a number");
                    None
                }
            }
        };
        let top_k = value("top_k").and_then(|(key, found)| {
            let k = value_as_i64(found);
            if k.is_none() {
                unusable(&key, "not an integer");
            }
            k
        });
        let read = SamplingDefaults {
            temperature: float("temp"),
            top_k,
            top_p: float("top_p"),
            min_p: float("min_p"),
        };
        // Each value checked alone, so that one bad value leaves the others.
        let alone = [
            (
                "general.sampling.temp",
                SamplingDefaults {
                    temperature: read.temperature,
                    ..Default::default()
                },
            ),
            (
                "general.sampling.top_k",
                SamplingDefaults {
                    top_k: read.top_k,
                    ..Default::default()
                },
            ),
            (
                "general.sampling.top_p",
                SamplingDefaults {
                    top_p: read.top_p,
                    ..Default::default()
                },
            ),
            (
                "general.sampling.min_p",
                SamplingDefaults {
                    min_p: read.min_p,
                    ..Default::default()
                },
            ),
        ];
        let mut defaults = SamplingDefaults::default();
        for (key, one) in alone {
            match one.check() {
                Ok(()) => defaults = defaults.or(one),
                Err(reason) => unusable(key, &reason),
            }
        }
        defaults
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&str>, EngineError> {
        let values = self
            .metadata(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.metadata_error(key))?;
        values
            .iter()
            .map(|v| v.to_string().map(String::as_str).ok())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.metadata_error(key))
    }

    pub(crate) fn config(&self) -> Result<ModelConfig, EngineError> {
        let arch_name = self.string("general.architecture")?;
        let architecture = match arch_name {
            "qwen2" => Architecture::Qwen2,
            "llama" => Architecture::Llama,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: self.path.clone(),
                    architecture: other.to_string(),
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = self.uint(&key("embedding_length"))? as usize;
        let num_heads = self.uint(&key("attention.head_count"))? as usize;
        let num_kv_heads = match self.uint(&key("attention.head_count_kv")) {
            Ok(v) => v as usize,
            Err(_) => num_heads,
        };
        let embedding = self.tensor_dims("token_embd.weight")?;
        let head_dim = self.head_dim(&key, hidden_size, num_heads)?;
        let context_length = self.uint(&key("context_length"))? as usize;
        let config = ModelConfig {
            architecture,
            vocab_size: embedding.first().copied().unwrap_or(0),
            hidden_size,
            intermediate_size: self.uint(&key("feed_forward_length"))? as usize,
            num_layers: self.uint(&key("block_count"))? as usize,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.float(&key("attention.layer_norm_rms_epsilon"))?,
            rope: self.rope(&key, head_dim, context_length)?,
            context_length,
        };
        config
            .validate()
            .map_err(|reason| self.config_error(reason))?;
        Ok(config)
    }

    /// The width of a head: `attention.key_length` where the file states it (Qwen3, and
    /// llama-architecture models such as Mistral NeMo whose heads are not hidden size /
    /// heads wide), else the hidden size over the heads.
    fn head_dim(
        &self,
        key: &dyn Fn(&str) -> String,
        hidden_size: usize,
        num_heads: usize,
    ) -> Result<usize, EngineError> {
        let Ok(width) = self.uint(&key("attention.key_length")) else {
            if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
                return Err(self.config_error(format!(
                    "hidden size {hidden_size} does not divide into {num_heads} heads"
                )));
            }
            return Ok(hidden_size / num_heads);
        };
        match self.uint(&key("attention.value_length")) {
            Ok(value) if value != width => Err(self.config_error(format!(
                "heads of keys {width} and values {value} wide are not supported"
            ))),
            _ => Ok(width as usize),
        }
    }

    /// The rotary embedding's settings: base, frequency factors and scaling, read as
    /// llama.cpp reads them. A rotation over part of a head, or a scaling this engine does
    /// not compute, is refused rather than run wrong.
    fn rope(
        &self,
        key: &dyn Fn(&str) -> String,
        head_dim: usize,
        context_length: usize,
    ) -> Result<Rope, EngineError> {
        if let Ok(dims) = self.uint(&key("rope.dimension_count")) {
            if dims != head_dim as u64 {
                return Err(self.config_error(format!(
                    "a rotary embedding over {dims} of a head's {head_dim} dimensions is not supported"
                )));
            }
        }
        let freq_factors = if self.has_tensor("rope_freqs.weight") {
            let dims = self.tensor_dims("rope_freqs.weight")?;
            Some(self.vector("rope_freqs.weight", dims.iter().product())?)
        } else {
            None
        };
        // llama.cpp: the factor from `rope.scaling.factor`, else the older
        // `rope.scale_linear`; the type `linear` unless stated.
        let factor = self
            .float(&key("rope.scaling.factor"))
            .or_else(|_| self.float(&key("rope.scale_linear")))
            .ok()
            .filter(|&f| f != 0.0);
        let kind = match self.metadata(&key("rope.scaling.type")) {
            None => "linear",
            Some(_) => self.string(&key("rope.scaling.type"))?,
        };
        let optional = |name: &str, default: f32| {
            if self.metadata(&key(name)).is_some() {
                self.float(&key(name))
            } else {
                Ok(default)
            }
        };
        let scaling = match (kind, factor) {
            ("none", _) | ("linear", None) => RopeScaling::None,
            ("linear", Some(factor)) => RopeScaling::Linear { factor },
            ("yarn", factor) => {
                if self
                    .metadata(&key("rope.scaling.yarn_log_multiplier"))
                    .is_some()
                {
                    return Err(self.config_error(
                        "YaRN with rope.scaling.yarn_log_multiplier is not supported".into(),
                    ));
                }
                RopeScaling::Yarn {
                    factor: factor.unwrap_or(1.0),
                    original_context: match self.uint(&key("rope.scaling.original_context_length"))
                    {
                        Ok(n) => n as usize,
                        Err(_) => context_length,
                    },
                    beta_fast: optional("rope.scaling.yarn_beta_fast", 32.0)?,
                    beta_slow: optional("rope.scaling.yarn_beta_slow", 1.0)?,
                    attn_factor: optional("rope.scaling.attn_factor", 1.0)?,
                }
            }
            (other, _) => {
                return Err(self.config_error(format!(
                    "rope scaling `{other}` is not supported (linear and yarn are)"
                )))
            }
        };
        Ok(Rope {
            theta: self.float(&key("rope.freq_base")).unwrap_or(10_000.0),
            freq_factors,
            scaling,
        })
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Dimensions in candle's order (outermost first: rows, then columns).
    pub(crate) fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, EngineError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Reads the raw bytes of a tensor after checking its shape and that the file holds it.
    pub(crate) fn tensor_bytes(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(GgmlDType, Vec<u8>), EngineError> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                })?;
        let dims = info.shape.dims().to_vec();
        if dims != expected {
            return Err(EngineError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                found: dims,
                expected: expected.to_vec(),
            });
        }
        let dtype = info.ggml_dtype;
        let elements = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX);
        let bytes = (elements / dtype.block_size()).saturating_mul(dtype.type_size());
        // A corrupt header can claim any offset: compute the end without overflow.
        let needed = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes as u64));
        let start = self.content.tensor_data_offset.wrapping_add(info.offset);
        if needed.is_none_or(|end| end > self.length)
            || !elements.is_multiple_of(dtype.block_size())
        {
            return Err(EngineError::Truncated {
                path: self.path.clone(),
                name: name.to_string(),
                needed: needed.unwrap_or(u64::MAX),
                length: self.length,
            });
        }
        let read_error = |source| EngineError::TensorRead {
            path: self.path.clone(),
            name: name.to_string(),
            source,
        };
        let mut data = vec![0u8; bytes];
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.seek(SeekFrom::Start(start)).map_err(read_error)?;
        file.read_exact(&mut data).map_err(read_error)?;
        Ok((dtype, data))
    }

    /// A 1-D tensor of floats (norm weights, biases).
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let (dtype, bytes) = self.tensor_bytes(name, &[len])?;
        QuantMatrix::from_bytes(dtype, 1, len, &bytes, &LoadOptions::default())
            .map(|m| m.dequantize_row(0))
            .ok_or_else(|| EngineError::TensorType {
                path: self.path.clone(),
                name: name.to_string(),
                dtype,
            })
    }

    /// A weight matrix with `rows` outputs and `cols` inputs.
    pub(crate) fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        options: &LoadOptions,
    ) -> Result<QuantMatrix, EngineError> {
        let (dtype, bytes) = self.tensor_bytes(name, &[rows, cols])?;
        QuantMatrix::from_bytes(dtype, rows, cols, &bytes, options).ok_or_else(|| {
            EngineError::TensorType {
                path: self.path.clone(),
                name: name.to_string(),
                dtype,
            }
        })
    }
}

fn value_as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::I8(v) => Some(i64::from(v)),
        Value::I16(v) => Some(i64::from(v)),
        Value::I32(v) => Some(i64::from(v)),
        Value::I64(v) => Some(v),
        ref unsigned => value_as_u64(unsigned).and_then(|v| i64::try_from(v).ok()),
    }
}

fn value_as_u64(value: &Value) -> Option<u64> {
    match *value {
        Value::U8(v) => Some(u64::from(v)),
        Value::U16(v) => Some(u64::from(v)),
        Value::U32(v) => Some(u64::from(v)),
        Value::U64(v) => Some(v),
        Value::I8(v) => u64::try_from(v).ok(),
        Value::I16(v) => u64::try_from(v).ok(),
        Value::I32(v) => u64::try_from(v).ok(),
        Value::I64(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

pub(crate) fn value_as_u32(value: &Value) -> Option<u32> {
    value_as_u64(value).and_then(|v| u32::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header-only GGUF file with `metadata`.
    fn file_with(name: &str, metadata: &[(&str, Value)]) -> ModelFile {
        let dir = std::env::temp_dir().join(format!("sibyl-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let mut file = File::create(&path).unwrap();
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &[]).unwrap();
        ModelFile::open(&path).unwrap()
    }

    #[test]
    fn the_file_s_sampling_defaults_are_read_and_checked() {
        let file = file_with(
            "sampling.gguf",
            &[
                ("general.sampling.temp", Value::F32(0.7)),
                ("general.sampling.top_k", Value::I32(20)),
                ("general.sampling.top_p", Value::F32(0.8)),
            ],
        );
        let defaults = file.sampling_defaults();
        assert_eq!(
            defaults,
            SamplingDefaults {
                temperature: Some(0.7),
                top_k: Some(20),
                top_p: Some(0.8),
                min_p: None,
            }
        );
        let none = file_with("nothing.gguf", &[]).sampling_defaults();
        assert!(none.is_empty());
        // What a request sets wins; what it does not falls back.
        let asked = SamplingDefaults {
            temperature: Some(0.0),
            ..SamplingDefaults::default()
        };
        assert_eq!(
            asked.or(defaults),
            SamplingDefaults {
                temperature: Some(0.0),
                ..defaults
            }
        );
        // A value of the wrong type or out of range is left out; the others stay.
        for (key, bad) in [
            ("general.sampling.top_p", Value::F32(1.5)),
            ("general.sampling.temp", Value::F32(-1.0)),
            ("general.sampling.top_k", Value::String("20".into())),
        ] {
            let file = file_with(
                "bad.gguf",
                &[(key, bad), ("general.sampling.min_p", Value::F32(0.05))],
            );
            let expected = SamplingDefaults {
                min_p: Some(0.05),
                ..SamplingDefaults::default()
            };
            assert_eq!(file.sampling_defaults(), expected, "{key}");
        }
    }
}
