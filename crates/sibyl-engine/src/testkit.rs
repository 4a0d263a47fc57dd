//! Tiny random-weight models built in memory, for fast tests that need no download.

use crate::gguf::{Architecture, ModelConfig};
use crate::model::WeightSource;
use crate::{EngineError, Model, QuantMatrix};
use candle_core::quantized::GgmlDType;

/// Shape and storage of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub context_length: usize,
    /// Storage type of the weight matrices (widths must be multiples of its block).
    pub dtype: GgmlDType,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyModelConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::Qwen2,
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            context_length: 512,
            dtype: GgmlDType::Q8_0,
            seed: 7,
        }
    }
}

struct RandomWeights {
    dtype: GgmlDType,
    seed: u64,
    with_bias: bool,
}

impl RandomWeights {
    fn values(&self, name: &str, len: usize, scale: f32) -> Vec<f32> {
        let mut state = self.seed
            ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

impl WeightSource for RandomWeights {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QuantMatrix, EngineError> {
        let scale = if name == "token_embd.weight" {
            1.0
        } else {
            1.7 / (cols as f32).sqrt()
        };
        let values = self.values(name, rows * cols, scale);
        QuantMatrix::quantize(self.dtype, rows, cols, &values).ok_or_else(|| {
            EngineError::TensorType {
                path: "testkit".into(),
                name: name.to_string(),
                dtype: self.dtype,
            }
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        if name.ends_with(".bias") {
            return Ok(self.values(name, len, 0.1));
        }
        Ok(self
            .values(name, len, 0.2)
            .into_iter()
            .map(|v| 1.0 + v)
            .collect())
    }

    fn contains(&self, name: &str) -> bool {
        // Untied output projection; biases only where the architecture has them.
        name == "output.weight" || (self.with_bias && name.ends_with(".bias"))
    }
}

/// Builds a tiny model with random weights.
pub fn tiny_model(config: &TinyModelConfig) -> Result<Model, EngineError> {
    let model_config = ModelConfig {
        architecture: config.architecture,
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_layers: config.num_layers,
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.hidden_size / config.num_heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        context_length: config.context_length,
    };
    model_config
        .validate()
        .map_err(|reason| EngineError::Config {
            path: "testkit".into(),
            reason,
        })?;
    let weights = RandomWeights {
        dtype: config.dtype,
        seed: config.seed,
        with_bias: config.architecture == Architecture::Qwen2,
    };
    Model::build(model_config, &weights)
}
