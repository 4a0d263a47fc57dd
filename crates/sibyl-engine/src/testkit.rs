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
    /// Width of a head (Qwen3 states it); `None`: `hidden_size / num_heads`.
    pub head_dim: Option<usize>,
    pub context_length: usize,
    /// Storage type of the weight matrices (widths must be multiples of its block).
    pub dtype: GgmlDType,
    /// Seed of the weights.
    pub seed: u64,
    /// Fill quantized matrices with random blocks rather than quantizing random values:
    /// much faster for models of a real size (benchmarks), for Q4_K, Q6_K and Q8_0.
    pub random_blocks: bool,
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
            head_dim: None,
            context_length: 512,
            dtype: GgmlDType::Q8_0,
            seed: 7,
            random_blocks: false,
        }
    }
}

struct RandomWeights {
    dtype: GgmlDType,
    seed: u64,
    with_bias: bool,
    random_blocks: bool,
}

impl RandomWeights {
    fn scale(&self, name: &str, cols: usize) -> f32 {
        if name == "token_embd.weight" {
            1.0
        } else {
            1.7 / (cols as f32).sqrt()
        }
    }

    fn state(&self, name: &str) -> u64 {
        self.seed
            ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
    }

    /// Random blocks of `self.dtype` with every scale set to `scale`, or `None` for a type
    /// whose scale this does not know where to put.
    fn random_blocks(&self, name: &str, rows: usize, cols: usize, scale: f32) -> Option<Vec<u8>> {
        // Where each block keeps its f16 scales, and the largest quantized magnitude.
        let (scales, top): (&[usize], f32) = match self.dtype {
            GgmlDType::Q8_0 => (&[0], 127.0),
            GgmlDType::Q4K => (&[0, 2], 15.0 * 63.0),
            GgmlDType::Q5K => (&[0, 2], 31.0 * 63.0),
            GgmlDType::Q6K => (&[208], 32.0 * 127.0),
            _ => return None,
        };
        let (block, size) = (self.dtype.block_size(), self.dtype.type_size());
        let mut state = self.state(name);
        let mut bytes: Vec<u8> = (0..rows * cols / block * size)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect();
        let d = half::f16::from_f32(scale / top).to_le_bytes();
        for block in bytes.chunks_exact_mut(size) {
            for &at in scales {
                block[at..at + 2].copy_from_slice(&d);
            }
        }
        Some(bytes)
    }

    fn values(&self, name: &str, len: usize, scale: f32) -> Vec<f32> {
        let mut state = self.state(name);
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
        if self.random_blocks {
            let (dtype, bytes) = self.blocks(name, rows, cols)?;
            return QuantMatrix::from_bytes(dtype, rows, cols, &bytes, &Default::default())
                .ok_or_else(|| self.unsupported(name, dtype));
        }
        let values = self.values(name, rows * cols, self.scale(name, cols));
        QuantMatrix::quantize(self.dtype, rows, cols, &values)
            .ok_or_else(|| self.unsupported(name, self.dtype))
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

    fn blocks(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(GgmlDType, Vec<u8>), EngineError> {
        if self.random_blocks {
            let scale = self.scale(name, cols);
            if let Some(bytes) = self.random_blocks(name, rows, cols, scale) {
                return Ok((self.dtype, bytes));
            }
        }
        let values = self.values(name, rows * cols, self.scale(name, cols));
        if self.dtype == GgmlDType::F32 {
            return Ok((
                self.dtype,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
        let quantized =
            candle_core::Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu)
                .and_then(|t| candle_core::quantized::QTensor::quantize(&t, self.dtype))
                .and_then(|q| q.data().map(|d| d.into_owned()))
                .map_err(|_| self.unsupported(name, self.dtype))?;
        Ok((self.dtype, quantized))
    }

    fn unsupported(&self, name: &str, dtype: GgmlDType) -> EngineError {
        EngineError::TensorType {
            path: "testkit".into(),
            name: name.to_string(),
            dtype,
        }
    }
}

/// Builds a tiny model with random weights.
pub fn tiny_model(config: &TinyModelConfig) -> Result<Model, EngineError> {
    let (model_config, weights) = random_weights(config)?;
    Model::build(model_config, &weights)
}

/// The device tests run the tensor engine on: the CPU, or GPU 0 where the environment sets
/// `SIBYL_TEST_DEVICE=cuda` (a build with `--features sibyl-engine/cuda` on a machine with a GPU).
pub fn tensor_test_device() -> candle_core::Device {
    match std::env::var("SIBYL_TEST_DEVICE").as_deref() {
        Ok("cuda") => candle_core::Device::new_cuda(0).expect("SIBYL_TEST_DEVICE=cuda: no GPU"),
        _ => candle_core::Device::Cpu,
    }
}

/// Builds the same model for the tensor engine (`crate::tensor`) on a candle device: the
/// CPU in tests, a GPU on a machine with one.
pub fn tiny_model_on(
    config: &TinyModelConfig,
    device: &candle_core::Device,
) -> Result<Model, EngineError> {
    let (model_config, weights) = random_weights(config)?;
    let spec = match device {
        candle_core::Device::Cuda(_) => crate::Device::Cuda(0),
        _ => crate::Device::Cpu,
    };
    Model::build_on(model_config, &weights, device, spec)
}

fn random_weights(config: &TinyModelConfig) -> Result<(ModelConfig, RandomWeights), EngineError> {
    let model_config = ModelConfig {
        architecture: config.architecture,
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_layers: config.num_layers,
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        head_dim: config
            .head_dim
            .unwrap_or(config.hidden_size / config.num_heads),
        rms_norm_eps: 1e-6,
        rope: Default::default(),
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
        random_blocks: config.random_blocks,
    };
    Ok((model_config, weights))
}
