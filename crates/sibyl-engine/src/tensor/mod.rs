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

use crate::gguf::ModelConfig;
use crate::model::{split_logits, LogitRows, Sequence, TreeInput, TreeLayout, WeightSource};
use crate::EngineError;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

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
    bytes: usize,
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
        let kv = c.num_kv_heads * c.head_dim;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let matrix = |name: &str, rows, cols| Matrix::load(w, name, rows, cols, device);
        let bias = |name: &str, len| -> Result<Option<Tensor>, EngineError> {
            biases(name)
                .then(|| vector(w, name, len, device))
                .transpose()
        };
        let blocks = (0..c.num_layers)
            .map(|l| {
                let p = format!("blk.{l}");
                Ok(Block {
                    attention_norm: vector(w, &format!("{p}.attn_norm.weight"), h, device)?,
                    q: matrix(&format!("{p}.attn_q.weight"), h, h)?,
                    k: matrix(&format!("{p}.attn_k.weight"), kv, h)?,
                    v: matrix(&format!("{p}.attn_v.weight"), kv, h)?,
                    o: matrix(&format!("{p}.attn_output.weight"), h, h)?,
                    q_bias: bias(&format!("{p}.attn_q.bias"), h)?,
                    k_bias: bias(&format!("{p}.attn_k.bias"), kv)?,
                    v_bias: bias(&format!("{p}.attn_v.bias"), kv)?,
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
        let mut model = Self {
            device: device.clone(),
            embedding,
            blocks,
            output_norm: vector(w, "output_norm.weight", h, device)?,
            output,
            bytes: 0,
        };
        model.bytes = model.size_in_bytes();
        Ok(model)
    }

    fn size_in_bytes(&self) -> usize {
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

    pub(crate) fn weights_size_in_bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn new_cache(&self, c: &ModelConfig) -> TensorKv {
        TensorKv {
            device: self.device.clone(),
            row: c.num_kv_heads * c.head_dim,
            capacity: 0,
            keys: Vec::new(),
            values: Vec::new(),
            layers: c.num_layers,
        }
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
                Some(kv) if kv.device.same_device(&self.device) => caches.push(kv),
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
            .flat_map(|(input, _)| input.tokens.clone())
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
            let q = rotate(&with_bias(block.q.forward(&h)?, &block.q_bias)?, heads)?;
            let k = rotate(&with_bias(block.k.forward(&h)?, &block.k_bias)?, kv_heads)?;
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

/// One sequence's keys and values on a device: per layer `[capacity, kv_heads * head_dim]`
/// tensors of `f32`, of which the owning [`crate::KvCache`]'s length is in use.
pub(crate) struct TensorKv {
    device: Device,
    row: usize,
    layers: usize,
    capacity: usize,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl std::fmt::Debug for TensorKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorKv")
            .field("device", &self.device)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl TensorKv {
    /// Makes room for `len` positions, keeping what is held. Grows by half again at least,
    /// so that appends are amortized.
    fn reserve(&mut self, len: usize) -> Result<(), candle_core::Error> {
        if len <= self.capacity {
            return Ok(());
        }
        let capacity = len.max(self.capacity + self.capacity / 2).max(16);
        self.resize(capacity, self.capacity)
    }

    /// New tensors of `capacity` positions holding the first `keep` positions.
    fn resize(&mut self, capacity: usize, keep: usize) -> Result<(), candle_core::Error> {
        let grow = |old: Option<&Tensor>| -> Result<Tensor, candle_core::Error> {
            let new = Tensor::zeros((capacity, self.row), DType::F32, &self.device)?;
            if let Some(old) = old.filter(|_| keep > 0) {
                new.slice_set(&old.narrow(0, 0, keep)?, 0, 0)?;
            }
            Ok(new)
        };
        let keys = (0..self.layers)
            .map(|l| grow(self.keys.get(l)))
            .collect::<Result<Vec<_>, _>>()?;
        let values = (0..self.layers)
            .map(|l| grow(self.values.get(l)))
            .collect::<Result<Vec<_>, _>>()?;
        self.keys = keys;
        self.values = values;
        self.capacity = capacity;
        Ok(())
    }

    fn write(
        &mut self,
        layer: usize,
        at: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(), candle_core::Error> {
        self.keys[layer].slice_set(&keys.contiguous()?, 0, at)?;
        self.values[layer].slice_set(&values.contiguous()?, 0, at)
    }

    fn layer(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor), candle_core::Error> {
        Ok((
            self.keys[layer].narrow(0, 0, len)?,
            self.values[layer].narrow(0, 0, len)?,
        ))
    }

    /// A copy holding the first `len` positions, with room for exactly those (none, and
    /// nothing allocated, for 0).
    pub(crate) fn copy(&self, len: usize) -> Result<Self, candle_core::Error> {
        let mut copy = Self {
            device: self.device.clone(),
            row: self.row,
            layers: self.layers,
            capacity: 0,
            keys: Vec::new(),
            values: Vec::new(),
        };
        if len > 0 {
            copy.resize(len, 0)?;
            copy.copy_from(self, 0, len)?;
        }
        Ok(copy)
    }

    /// Writes positions `from..to` of `other` at the same positions here.
    pub(crate) fn copy_from(
        &mut self,
        other: &TensorKv,
        from: usize,
        to: usize,
    ) -> Result<(), candle_core::Error> {
        if to <= from {
            return Ok(());
        }
        self.reserve(to)?;
        for l in 0..self.layers {
            let span = |t: &Tensor| t.narrow(0, from, to - from);
            self.keys[l].slice_set(&span(&other.keys[l])?, 0, from)?;
            self.values[l].slice_set(&span(&other.values[l])?, 0, from)?;
        }
        Ok(())
    }

    /// Moves the rows `prefix_len + path[i]` to `prefix_len + i`.
    pub(crate) fn keep_path(
        &mut self,
        prefix_len: usize,
        path: &[usize],
    ) -> Result<(), candle_core::Error> {
        if path.iter().enumerate().all(|(slot, &node)| slot == node) {
            return Ok(());
        }
        let rows: Vec<u32> = path.iter().map(|&p| (prefix_len + p) as u32).collect();
        let index = Tensor::from_vec(rows, path.len(), &self.device)?;
        for layer in self.keys.iter().chain(&self.values) {
            let kept = layer.index_select(&index, 0)?;
            layer.slice_set(&kept, 0, prefix_len)?;
        }
        Ok(())
    }

    /// Gives back room beyond `len` positions.
    pub(crate) fn shrink(&mut self, len: usize) -> Result<(), candle_core::Error> {
        if len == 0 {
            *self = self.copy(0)?;
        } else if len < self.capacity {
            self.resize(len, len)?;
        }
        Ok(())
    }

    pub(crate) fn layers(&self) -> usize {
        self.layers
    }

    pub(crate) fn same_shape(&self, other: &TensorKv) -> bool {
        self.row == other.row
            && self.layers == other.layers
            && self.device.same_device(&other.device)
    }
}

/// Quantized products on CUDA with fewer launches than one candle product per piece of
/// rows: all rows are rounded to 8 bits at once (row by row, as a piece alone would be),
/// then candle's matrix-vector kernel runs on each piece of at most `per` rows, writing
/// into one output. The same kernels on the same values: the same bits as the pieces
/// multiplied one by one.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::{kernels::ffi, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Storage, Tensor};
    use std::ffi::c_void;

    type Launcher = unsafe extern "C" fn(
        *const c_void,
        *const c_void,
        *mut c_void,
        i32,
        i32,
        i32,
        i32,
        i32,
        *mut c_void,
    );

    fn launcher(dtype: GgmlDType) -> candle_core::Result<Launcher> {
        use GgmlDType::*;
        Ok(match dtype {
            Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
            Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
            Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
            Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
            Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
            Q2K => ffi::launch_mmvq_gguf_q2_k_f32_plain,
            Q3K => ffi::launch_mmvq_gguf_q3_k_f32_plain,
            Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
            Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
            Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
            other => candle_core::bail!("no CUDA product for {other:?}"),
        })
    }

    /// candle's padding of a quantized row (`MATRIX_ROW_PADDING`) and its 8-bit blocks.
    const ROW_PADDING: usize = 512;
    const Q8_1_BLOCK: usize = 32;
    const Q8_1_BYTES: usize = 36;

    pub(super) fn product(
        weights: &QTensor,
        x: &Tensor,
        per: usize,
    ) -> candle_core::Result<Tensor> {
        let (rows, cols) = weights.shape().dims2()?;
        let (m, k) = x.dims2()?;
        if k != cols {
            candle_core::bail!("product of [{m}, {k}] by a [{rows}, {cols}] matrix");
        }
        let launch = launcher(weights.dtype())?;
        let x = x.contiguous()?;
        let candle_core::Device::Cuda(device) = x.device() else {
            candle_core::bail!("a CUDA product needs a CUDA tensor");
        };
        let stream = device.cuda_stream();
        let raw_stream = stream.cu_stream() as *mut c_void;
        let padded = k.div_ceil(ROW_PADDING) * ROW_PADDING;
        let row_blocks = padded / Q8_1_BLOCK;
        let quantized = device.alloc_zeros::<u8>(m * row_blocks * Q8_1_BYTES)?;
        let out = device.alloc_zeros::<f32>(m * rows)?;
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                candle_core::bail!("a CUDA product needs a CUDA tensor");
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("product of strided rows".into()))?;
            let input = storage.as_cuda_slice::<f32>()?.slice(start..end);
            let (input_ptr, _input_guard) = input.device_ptr(&stream);
            let (quantized_ptr, _quantized_guard) = quantized.device_ptr(&stream);
            let (out_ptr, _out_guard) = out.device_ptr(&stream);
            let weights_ptr = weights.device_ptr()? as *const c_void;
            // SAFETY: every pointer is a live allocation on this stream of the size the
            // launcher reads or writes: `m` rows of `k` inputs, `m` rows of `row_blocks`
            // 8-bit blocks, `m` rows of `rows` outputs, and the matrix of `rows` by `cols`
            // (candle pads its storage for the kernels); all launches are ordered on the
            // stream, and the guards record their use before the buffers can be freed.
            unsafe {
                ffi::launch_mmvq_gguf_quantize_q8_1_f32(
                    input_ptr as *const c_void,
                    quantized_ptr as *mut c_void,
                    k as i32,
                    padded as i32,
                    m as i32,
                    raw_stream,
                );
                for first in (0..m).step_by(per) {
                    let count = per.min(m - first);
                    launch(
                        weights_ptr,
                        (quantized_ptr as usize + first * row_blocks * Q8_1_BYTES) as *const c_void,
                        (out_ptr as usize + first * rows * std::mem::size_of::<f32>())
                            as *mut c_void,
                        cols as i32,
                        rows as i32,
                        row_blocks as i32,
                        rows as i32,
                        count as i32,
                        raw_stream,
                    );
                }
            }
        }
        let storage = CudaStorage::wrap_cuda_slice(out, device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            (m, rows),
            BackpropOp::none(),
            false,
        ))
    }
}
