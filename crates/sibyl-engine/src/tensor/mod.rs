//! The engine on candle tensors: the forward pass of [`crate::Model`] over several
//! sequences' token trees, with each sequence's keys and values kept on the device. It runs
//! on any candle device: a CUDA GPU with the `cuda` feature (`--device cuda`), and the CPU
//! in the test suite, so that everything but the device's own kernels is tested everywhere.
//!
//! Batch invariance holds here as in the CPU engine, by the choice of each op:
//! - quantized products go through candle's matrix-vector kernels at most
//!   [`ROWS_PER_PRODUCT`] rows at a time: for 1 to 4 rows those kernels reduce every output
//!   with the same threads in the same order (above 4 they change their warp count, and
//!   above 8 candle switches to tiled kernels), so a row's result never depends on the
//!   rows beside it; dense (F32/F16/BF16) matrices go one row at a time;
//! - norms reduce each row alone, rotations and the MLP's gate are element by element;
//! - attention reduces each (node, head) over its own visible keys in an order fixed by
//!   those keys alone (`tree_attention.cu`; on the CPU the CPU engine's own attention).
//!
//! The price is that weights are read once per four rows rather than once per pass.

mod attention;
#[cfg(feature = "cuda")]
mod cuda;
mod kv;

pub(crate) use kv::TensorKv;

use crate::gguf::ModelConfig;
use crate::model::{split_logits, LogitRows, Sequence, TreeInput, TreeLayout, WeightSource};
use crate::EngineError;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};

/// Rows one quantized product takes at most (see the module documentation).
const ROWS_PER_PRODUCT: usize = 4;

fn device_error(error: candle_core::Error) -> EngineError {
    EngineError::Device(error)
}

/// A weight matrix on the device.
struct Matrix {
    product: QMatMul,
    /// Rows of activations one product takes (1 for dense matrices).
    rows_per_product: usize,
}

/// A matrix read as `f32` on the CPU, `[rows, cols]`. `None` for a type without a
/// conversion.
fn dense(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Tensor> {
    let cpu = &Device::Cpu;
    let values: Vec<f32> = match dtype {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => {
            return qtensor_from_ggml(dtype, bytes, vec![rows, cols], cpu)
                .and_then(|q| q.dequantize(cpu))
                .ok()
        }
    };
    Tensor::from_vec(values, (rows, cols), cpu).ok()
}

fn quantized_on_device(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

impl Matrix {
    fn load(
        w: &dyn WeightSource,
        name: &str,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let (dtype, bytes) = w.blocks(name, rows, cols)?;
        let unsupported = || w.unsupported(name, dtype);
        if quantized_on_device(dtype) {
            let tensor =
                qtensor_from_ggml(dtype, &bytes, vec![rows, cols], device).map_err(device_error)?;
            return Ok(Self {
                product: QMatMul::from_qtensor(tensor).map_err(device_error)?,
                rows_per_product: ROWS_PER_PRODUCT,
            });
        }
        if !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Err(unsupported());
        }
        let weights = dense(dtype, &bytes, rows, cols)
            .ok_or_else(unsupported)?
            .to_device(device)
            .map_err(device_error)?;
        Ok(Self {
            product: QMatMul::Tensor(weights),
            rows_per_product: 1,
        })
    }

    /// `x` `[m, cols]` times the matrix transposed: `[m, rows]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, candle_core::Error> {
        #[cfg(feature = "cuda")]
        if let (QMatMul::QTensor(weights), candle_core::Device::Cuda(_)) =
            (&self.product, x.device())
        {
            return cuda::product(weights, x, self.rows_per_product);
        }
        let m = x.dim(0)?;
        if m <= self.rows_per_product {
            return self.product.forward(x);
        }
        let parts = (0..m)
            .step_by(self.rows_per_product)
            .map(|start| {
                let rows = self.rows_per_product.min(m - start);
                self.product.forward(&x.narrow(0, start, rows)?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::cat(&parts, 0)
    }
}

struct Block {
    attention_norm: Tensor,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    /// Qwen3's RMS norms of each head of q and of k.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    mlp_norm: Tensor,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// The weights of a model on a candle device.
pub(crate) struct TensorModel {
    device: Device,
    /// `[vocab, hidden]`, dequantized: the rows of a pass are gathered from it.
    embedding: Tensor,
    blocks: Vec<Block>,
    output_norm: Tensor,
    output: Matrix,
}

fn vector(
    w: &dyn WeightSource,
    name: &str,
    len: usize,
    device: &Device,
) -> Result<Tensor, EngineError> {
    Tensor::from_vec(w.vector(name, len)?, len, device).map_err(device_error)
}

impl TensorModel {
    pub(crate) fn build(
        c: &ModelConfig,
        w: &dyn WeightSource,
        device: &Device,
        biases: impl Fn(&str) -> bool,
    ) -> Result<Self, EngineError> {
        let (q, kv) = (c.q_width(), c.num_kv_heads * c.head_dim);
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let matrix = |name: &str, rows, cols| Matrix::load(w, name, rows, cols, device);
        let bias = |name: &str, len| -> Result<Option<Tensor>, EngineError> {
            biases(name)
                .then(|| vector(w, name, len, device))
                .transpose()
        };
        let norm = |name: &str| -> Result<Option<Tensor>, EngineError> {
            (c.architecture == crate::Architecture::Qwen3)
                .then(|| vector(w, name, c.head_dim, device))
                .transpose()
        };
        let blocks = (0..c.num_layers)
            .map(|l| {
                let p = format!("blk.{l}");
                Ok(Block {
                    attention_norm: vector(w, &format!("{p}.attn_norm.weight"), h, device)?,
                    q: matrix(&format!("{p}.attn_q.weight"), q, h)?,
                    k: matrix(&format!("{p}.attn_k.weight"), kv, h)?,
                    v: matrix(&format!("{p}.attn_v.weight"), kv, h)?,
                    o: matrix(&format!("{p}.attn_output.weight"), h, q)?,
                    q_bias: bias(&format!("{p}.attn_q.bias"), q)?,
                    k_bias: bias(&format!("{p}.attn_k.bias"), kv)?,
                    v_bias: bias(&format!("{p}.attn_v.bias"), kv)?,
                    q_norm: norm(&format!("{p}.attn_q_norm.weight"))?,
                    k_norm: norm(&format!("{p}.attn_k_norm.weight"))?,
                    mlp_norm: vector(w, &format!("{p}.ffn_norm.weight"), h, device)?,
                    gate: matrix(&format!("{p}.ffn_gate.weight"), i, h)?,
                    up: matrix(&format!("{p}.ffn_up.weight"), i, h)?,
                    down: matrix(&format!("{p}.ffn_down.weight"), h, i)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let (dtype, bytes) = w.blocks("token_embd.weight", c.vocab_size, h)?;
        let embedding = dense(dtype, &bytes, c.vocab_size, h)
            .ok_or_else(|| w.unsupported("token_embd.weight", dtype))?
            .to_device(device)
            .map_err(device_error)?;
        let output_name = if w.contains("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let output = matrix(output_name, c.vocab_size, h)?;
        Ok(Self {
            device: device.clone(),
            embedding,
            blocks,
            output_norm: vector(w, "output_norm.weight", h, device)?,
            output,
        })
    }

    pub(crate) fn weights_size_in_bytes(&self) -> usize {
        let matrix = |m: &Matrix| match &m.product {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                    .into_iter()
                    .map(matrix)
                    .sum::<usize>()
            })
            .sum();
        blocks + self.embedding.elem_count() * 4 + matrix(&self.output)
    }

    pub(crate) fn new_cache(&self, c: &ModelConfig) -> TensorKv {
        TensorKv::empty(&self.device, c.num_kv_heads * c.head_dim, c.num_layers)
    }

    /// [`crate::Model::forward_batch`] on the device; `trees` are the checked layouts,
    /// `angles` each row's rotation (sines, cosines), in batch order.
    pub(crate) fn forward_batch(
        &self,
        c: &ModelConfig,
        batch: &mut [Sequence<'_>],
        trees: &[TreeLayout],
        angles: &[(Vec<f32>, Vec<f32>)],
        interleaved: bool,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let inputs: Vec<(&TreeInput, LogitRows)> =
            batch.iter().map(|s| (s.input, s.rows)).collect();
        let lengths: Vec<usize> = batch.iter().map(|s| s.input.tokens.len()).collect();
        let prefix_lens: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        let mut caches = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            match s.cache.tensor_storage() {
                Some(kv) if kv.device().same_device(&self.device) => caches.push(kv),
                _ => return Err(EngineError::CacheDevice),
            }
        }
        for ((kv, &prefix), &n) in caches.iter_mut().zip(&prefix_lens).zip(&lengths) {
            kv.reserve(prefix + n).map_err(device_error)?;
        }
        let rows = self
            .rows(
                c,
                &inputs,
                trees,
                angles,
                interleaved,
                &mut caches,
                &prefix_lens,
            )
            .map_err(device_error)?;
        drop(caches);
        for ((s, &prefix), &n) in batch.iter_mut().zip(&prefix_lens).zip(&lengths) {
            s.cache.set_len(prefix + n);
        }
        Ok(rows)
    }

    #[allow(clippy::too_many_arguments)]
    fn rows(
        &self,
        c: &ModelConfig,
        batch: &[(&TreeInput, LogitRows)],
        trees: &[TreeLayout],
        angles: &[(Vec<f32>, Vec<f32>)],
        interleaved: bool,
        caches: &mut [&mut TensorKv],
        prefix_lens: &[usize],
    ) -> Result<Vec<Vec<f32>>, candle_core::Error> {
        let device = &self.device;
        let m = angles.len();
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|(input, _)| input.tokens.iter().copied())
            .collect();
        let ids = Tensor::from_vec(tokens, m, device)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        // One rotation per row: `rope` takes each row as a batch of its own.
        let (sin, cos): (Vec<f32>, Vec<f32>) = angles
            .iter()
            .flat_map(|(s, c)| s.iter().copied().zip(c.iter().copied()))
            .unzip();
        let sin = Tensor::from_vec(sin, (m, 1, d / 2), device)?;
        let cos = Tensor::from_vec(cos, (m, 1, d / 2), device)?;
        let rotate = |t: &Tensor, heads: usize| -> Result<Tensor, candle_core::Error> {
            let t = t.reshape((m, heads, 1, d))?;
            let rotated = if interleaved {
                candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(&t, &cos, &sin)?
            };
            rotated.reshape((m, heads * d))
        };
        let masks = trees
            .iter()
            .map(|tree| attention::Mask::new(&tree.visible, device))
            .collect::<Result<Vec<_>, _>>()?;
        let eps = c.rms_norm_eps;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.attention_norm, eps)?;
            let with_bias = |t: Tensor, bias: &Option<Tensor>| match bias {
                Some(b) => t.broadcast_add(b),
                None => Ok(t),
            };
            // Qwen3: each head's row normalised on its own.
            let head_norm = |t: Tensor, norm: &Option<Tensor>, heads: usize| match norm {
                Some(norm) => candle_nn::ops::rms_norm(&t.reshape((m * heads, d))?, norm, eps)?
                    .reshape((m, heads * d)),
                None => Ok(t),
            };
            let q = with_bias(block.q.forward(&h)?, &block.q_bias)?;
            let k = with_bias(block.k.forward(&h)?, &block.k_bias)?;
            let q = rotate(&head_norm(q, &block.q_norm, heads)?, heads)?;
            let k = rotate(&head_norm(k, &block.k_norm, kv_heads)?, kv_heads)?;
            let v = with_bias(block.v.forward(&h)?, &block.v_bias)?;
            let mut start = 0;
            let mut attended = Vec::with_capacity(batch.len());
            for ((((input, _), kv), mask), &prefix) in batch
                .iter()
                .zip(caches.iter_mut())
                .zip(&masks)
                .zip(prefix_lens)
            {
                let n = input.tokens.len();
                kv.write(
                    layer,
                    prefix,
                    &k.narrow(0, start, n)?,
                    &v.narrow(0, start, n)?,
                )?;
                let (keys, values) = kv.layer(layer, prefix + n)?;
                attended.push(attention::tree_attention(
                    &q.narrow(0, start, n)?,
                    &keys,
                    &values,
                    mask,
                    prefix,
                    crate::attention::HeadLayout {
                        heads,
                        kv_heads,
                        head_dim: d,
                    },
                )?);
                start += n;
            }
            let attended = Tensor::cat(&attended, 0)?;
            x = (x + block.o.forward(&attended)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.mlp_norm, eps)?;
            let gated = (block.gate.forward(&h)?.silu()? * block.up.forward(&h)?)?;
            x = (x + block.down.forward(&gated)?)?;
        }
        // The rows each sequence asked logits for, gathered for one output product.
        let mut selected: Vec<u32> = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        let mut start = 0;
        for (input, rows) in batch {
            let n = input.tokens.len();
            let (first, count) = rows.span(start, n);
            selected.extend((first..first + count).map(|row| row as u32));
            counts.push(count);
            start += n;
        }
        let logits = if selected.is_empty() {
            Vec::new()
        } else {
            let index = Tensor::from_vec(selected.clone(), selected.len(), device)?;
            let h = candle_nn::ops::rms_norm(&x.index_select(&index, 0)?, &self.output_norm, eps)?;
            self.output.forward(&h)?.flatten_all()?.to_vec1::<f32>()?
        };
        Ok(split_logits(&logits, counts, c.vocab_size))
    }
}
