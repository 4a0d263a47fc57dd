use crate::attention::{tree_attention, AttendedSequence, HeadLayout};
use crate::gguf::{Architecture, LoadOptions, ModelConfig, ModelFile};
use crate::parallel::for_each_chunk_mut;
use crate::tensor::TensorModel;
use crate::{Device, EngineError, KvCache, QuantMatrix, TokenId};
use candle_core::quantized::GgmlDType;

/// Where weights come from: a GGUF file, or the testkit's random generator.
pub(crate) trait WeightSource {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QuantMatrix, EngineError>;
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError>;
    fn contains(&self, name: &str) -> bool;
    /// A matrix's storage type and raw blocks, as GGUF lays them out (the tensor engine).
    fn blocks(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(GgmlDType, Vec<u8>), EngineError>;
    /// The error for a matrix whose type the engine cannot run.
    fn unsupported(&self, name: &str, dtype: GgmlDType) -> EngineError;
}

pub(crate) struct FileWeights<'a> {
    pub(crate) file: &'a ModelFile,
    pub(crate) options: &'a LoadOptions,
}

impl WeightSource for FileWeights<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QuantMatrix, EngineError> {
        self.file.matrix(name, rows, cols, self.options)
    }
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        self.file.vector(name, len)
    }
    fn contains(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }
    fn blocks(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(GgmlDType, Vec<u8>), EngineError> {
        self.file.tensor_bytes(name, &[rows, cols])
    }
    fn unsupported(&self, name: &str, dtype: GgmlDType) -> EngineError {
        EngineError::TensorType {
            path: self.file.path.clone(),
            name: name.to_string(),
            dtype,
        }
    }
}

/// New tokens for one forward pass: each node's parent is an earlier node, or `None` when
/// it directly follows the cached prefix. A chain is node `i` with parent `i - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeInput {
    pub tokens: Vec<TokenId>,
    pub parents: Vec<Option<usize>>,
}

impl TreeInput {
    pub fn chain(tokens: &[TokenId]) -> Self {
        Self {
            tokens: tokens.to_vec(),
            parents: (0..tokens.len()).map(|i| i.checked_sub(1)).collect(),
        }
    }

    pub fn tree(tokens: Vec<TokenId>, parents: Vec<Option<usize>>) -> Self {
        Self { tokens, parents }
    }
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// One row per new node (verification).
    All,
    /// The last node's row only (end of prompt processing).
    Last,
    /// No logits (a prompt chunk before the last).
    None,
}

impl LogitRows {
    /// The rows asked for of a sequence whose `n` nodes start at row `start` of a pass:
    /// the first and how many.
    pub(crate) fn span(self, start: usize, n: usize) -> (usize, usize) {
        match self {
            LogitRows::All => (start, n),
            LogitRows::Last => (start + n - 1, 1),
            LogitRows::None => (start, 0),
        }
    }
}

/// The logits of a pass's selected rows, `vocab` per row, split by sequence (`counts` rows
/// each, in order).
pub(crate) fn split_logits(logits: &[f32], counts: Vec<usize>, vocab: usize) -> Vec<Vec<f32>> {
    let mut rest = logits;
    counts
        .into_iter()
        .map(|count| {
            let (mine, after) = rest.split_at(count * vocab);
            rest = after;
            mine.to_vec()
        })
        .collect()
}

/// Rotary position embedding.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f32>,
    interleaved: bool,
}

impl Rotary {
    fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim;
        Self {
            inv_freq: (0..d)
                .step_by(2)
                .map(|i| 1f32 / config.rope_theta.powf(i as f32 / d as f32))
                .collect(),
            interleaved: config.architecture == Architecture::Llama,
        }
    }

    /// Sines and cosines of `position`, one pair per rotated pair of dimensions.
    fn angles(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|f| (position as f32 * f).sin_cos())
            .unzip()
    }

    /// Rotates every head of one token (`heads * head_dim` values) by `angles`.
    fn apply(&self, x: &mut [f32], head_dim: usize, (sin, cos): &(Vec<f32>, Vec<f32>)) {
        let half = head_dim / 2;
        for head in x.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if self.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(weight.len()) {
        let root_mean_square =
            (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + eps).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(v, w)| v / root_mean_square * w),
        );
    }
    out
}

fn add_bias(x: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(bias) = bias {
        for row in x.chunks_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// [`project`] for matrices that read the same rows (quantized once).
fn project_many<const N: usize>(
    weights: [&QuantMatrix; N],
    x: &[f32],
    m: usize,
) -> Result<[Vec<f32>; N], EngineError> {
    let outs = QuantMatrix::matmul_many(&weights, x, m).map_err(EngineError::Kernel)?;
    Ok(outs.try_into().expect("one product per matrix"))
}

fn project(weight: &QuantMatrix, x: &[f32], m: usize) -> Result<Vec<f32>, EngineError> {
    let mut out = vec![0f32; m * weight.rows()];
    weight.matmul(x, m, &mut out).map_err(EngineError::Kernel)?;
    Ok(out)
}

struct Attention {
    q: QuantMatrix,
    k: QuantMatrix,
    v: QuantMatrix,
    o: QuantMatrix,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    /// Qwen3's RMS norms of each head of q and of k (`head_dim` weights each).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

impl Attention {
    fn new(c: &ModelConfig, w: &dyn WeightSource, prefix: &str) -> Result<Self, EngineError> {
        let (q, kv) = (c.q_width(), c.num_kv_heads * c.head_dim);
        let bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>, EngineError> {
            let name = format!("{prefix}.{name}.bias");
            match c.architecture {
                Architecture::Qwen2 => w.vector(&name, len).map(Some),
                Architecture::Llama | Architecture::Qwen3 if w.contains(&name) => {
                    w.vector(&name, len).map(Some)
                }
                Architecture::Llama | Architecture::Qwen3 => Ok(None),
            }
        };
        let norm = |name: &str| match c.architecture {
            Architecture::Qwen3 => w
                .vector(&format!("{prefix}.{name}.weight"), c.head_dim)
                .map(Some),
            Architecture::Qwen2 | Architecture::Llama => Ok(None),
        };
        Ok(Self {
            q: w.matrix(&format!("{prefix}.attn_q.weight"), q, c.hidden_size)?,
            k: w.matrix(&format!("{prefix}.attn_k.weight"), kv, c.hidden_size)?,
            v: w.matrix(&format!("{prefix}.attn_v.weight"), kv, c.hidden_size)?,
            o: w.matrix(&format!("{prefix}.attn_output.weight"), c.hidden_size, q)?,
            q_bias: bias("attn_q", q)?,
            k_bias: bias("attn_k", kv)?,
            v_bias: bias("attn_v", kv)?,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
        })
    }
}

struct Mlp {
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
}

impl Mlp {
    fn new(c: &ModelConfig, w: &dyn WeightSource, prefix: &str) -> Result<Self, EngineError> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate: w.matrix(&format!("{prefix}.ffn_gate.weight"), i, h)?,
            up: w.matrix(&format!("{prefix}.ffn_up.weight"), i, h)?,
            down: w.matrix(&format!("{prefix}.ffn_down.weight"), h, i)?,
        })
    }

    fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>, EngineError> {
        let [mut gate, up] = project_many([&self.gate, &self.up], x, m)?;
        // SiLU(gate) * up, element by element (so the split does not change any value).
        const CHUNK: usize = 2048;
        for_each_chunk_mut(&mut gate, CHUNK, |i, gate| {
            for (g, u) in gate.iter_mut().zip(&up[i * CHUNK..]) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        });
        project(&self.down, &gate, m)
    }
}

struct Block {
    attention_norm: Vec<f32>,
    attention: Attention,
    mlp_norm: Vec<f32>,
    mlp: Mlp,
}

/// Where the new nodes sit: absolute positions and, per node, the new nodes it sees.
pub(crate) struct TreeLayout {
    pub(crate) positions: Vec<usize>,
    pub(crate) visible: Vec<Vec<usize>>,
}

/// A decoder-only transformer (qwen2, qwen3 or llama) with a tree forward pass.
pub struct Model {
    config: ModelConfig,
    rotary: Rotary,
    device: Device,
    weights: Weights,
}

enum Weights {
    /// sibyl's own CPU kernels.
    Host(HostWeights),
    /// The tensor engine on a candle device.
    Tensor(TensorModel),
}

struct HostWeights {
    embedding: QuantMatrix,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `None`: the output projection is tied to the embedding.
    output: Option<QuantMatrix>,
}

impl Model {
    pub(crate) fn from_gguf(file: &ModelFile, options: &LoadOptions) -> Result<Self, EngineError> {
        let config = file.config()?;
        let weights = FileWeights { file, options };
        match options.device {
            Device::Cpu => Self::build(config, &weights),
            Device::Cuda(ordinal) => {
                let device = Device::open_cuda(ordinal)?;
                Self::build_on(config, &weights, &device, options.device)
            }
        }
    }

    /// A model for the tensor engine on `device` (`spec` names it for users).
    pub(crate) fn build_on(
        config: ModelConfig,
        w: &dyn WeightSource,
        device: &candle_core::Device,
        spec: Device,
    ) -> Result<Self, EngineError> {
        let qwen2 = config.architecture == Architecture::Qwen2;
        let tensor = TensorModel::build(&config, w, device, |name| qwen2 || w.contains(name))?;
        Ok(Self {
            rotary: Rotary::new(&config),
            config,
            device: spec,
            weights: Weights::Tensor(tensor),
        })
    }

    pub(crate) fn build(config: ModelConfig, w: &dyn WeightSource) -> Result<Self, EngineError> {
        let c = &config;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let prefix = format!("blk.{i}");
                Ok(Block {
                    attention_norm: w
                        .vector(&format!("{prefix}.attn_norm.weight"), c.hidden_size)?,
                    attention: Attention::new(c, w, &prefix)?,
                    mlp_norm: w.vector(&format!("{prefix}.ffn_norm.weight"), c.hidden_size)?,
                    mlp: Mlp::new(c, w, &prefix)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let output = if w.contains("output.weight") {
            Some(w.matrix("output.weight", c.vocab_size, c.hidden_size)?)
        } else {
            None
        };
        let weights = HostWeights {
            embedding: w.matrix("token_embd.weight", c.vocab_size, c.hidden_size)?,
            output_norm: w.vector("output_norm.weight", c.hidden_size)?,
            output,
            blocks,
        };
        Ok(Self {
            rotary: Rotary::new(c),
            config,
            device: Device::Cpu,
            weights: Weights::Host(weights),
        })
    }

    /// The device the model computes on.
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        match &self.weights {
            Weights::Host(_) => KvCache::new(c.num_layers, c.num_kv_heads, c.head_dim),
            Weights::Tensor(t) => KvCache::on_device(t.new_cache(c), c.num_kv_heads * c.head_dim),
        }
    }

    /// Bytes of weights held in memory (on the device, for a model on one).
    pub fn weights_size_in_bytes(&self) -> usize {
        match &self.weights {
            Weights::Host(h) => h.size_in_bytes(),
            Weights::Tensor(t) => t.weights_size_in_bytes(),
        }
    }
}

impl HostWeights {
    fn size_in_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let a = &b.attention;
                [&a.q, &a.k, &a.v, &a.o, &b.mlp.gate, &b.mlp.up, &b.mlp.down]
                    .iter()
                    .map(|m| m.size_in_bytes())
                    .sum::<usize>()
            })
            .sum();
        blocks
            + self.embedding.size_in_bytes()
            + self.output.as_ref().map_or(0, |o| o.size_in_bytes())
    }
}

impl Model {
    fn layout(&self, cache: &KvCache, input: &TreeInput) -> Result<TreeLayout, EngineError> {
        let n = input.tokens.len();
        if n == 0 {
            return Err(EngineError::EmptyInput);
        }
        if input.parents.len() != n {
            return Err(EngineError::InvalidTree {
                node: n.min(input.parents.len()),
                parent: usize::MAX,
            });
        }
        if let Some(&token) = input
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange {
                token,
                vocab: self.config.vocab_size,
            });
        }
        let mut depth = vec![0usize; n];
        let mut visible: Vec<Vec<usize>> = Vec::with_capacity(n);
        for (node, parent) in input.parents.iter().enumerate() {
            let mut seen = match *parent {
                None => Vec::new(),
                Some(p) if p < node => {
                    depth[node] = depth[p] + 1;
                    visible[p].clone()
                }
                Some(p) => return Err(EngineError::InvalidTree { node, parent: p }),
            };
            seen.push(node);
            visible.push(seen);
        }
        let positions: Vec<usize> = depth.iter().map(|d| cache.len() + d).collect();
        let needed = positions.iter().max().map_or(0, |p| p + 1);
        if needed > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed,
                limit: self.config.context_length,
            });
        }
        Ok(TreeLayout { positions, visible })
    }

    /// Runs the new nodes of `input` after the cached prefix, appends their keys and values
    /// to `cache` (node order) and returns their logits, `vocab_size` per returned row.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        input: &TreeInput,
        rows: LogitRows,
    ) -> Result<Vec<f32>, EngineError> {
        let mut batch = [Sequence { cache, input, rows }];
        Ok(self.forward_batch(&mut batch)?.pop().unwrap_or_default())
    }

    /// One forward pass over several sequences, each with its own cache and tree: their rows
    /// go through every matrix product together (each weight is read once for the whole
    /// batch), and each attends only to its own cache. Returns each sequence's logits, in
    /// order, as [`Model::forward`] would have returned them alone: bit for bit, since no
    /// row's arithmetic depends on the other rows. Every sequence is checked before any
    /// cache changes; on an error none has.
    pub fn forward_batch(&self, batch: &mut [Sequence<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let trees = batch
            .iter()
            .map(|s| self.layout(s.cache, s.input))
            .collect::<Result<Vec<_>, _>>()?;
        let on_device = matches!(self.weights, Weights::Tensor(_));
        if batch.iter().any(|s| s.cache.is_on_device() != on_device) {
            return Err(EngineError::CacheDevice);
        }
        match &self.weights {
            Weights::Host(weights) => self.forward_host(weights, batch, &trees),
            Weights::Tensor(tensor) => {
                let angles: Vec<_> = trees
                    .iter()
                    .flat_map(|t| &t.positions)
                    .map(|&p| self.rotary.angles(p))
                    .collect();
                tensor.forward_batch(
                    &self.config,
                    batch,
                    &trees,
                    &angles,
                    self.rotary.interleaved,
                )
            }
        }
    }

    fn forward_host(
        &self,
        weights: &HostWeights,
        batch: &mut [Sequence<'_>],
        trees: &[TreeLayout],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        let offsets: Vec<usize> = batch
            .iter()
            .scan(0, |start, s| {
                let here = *start;
                *start += s.input.tokens.len();
                Some(here)
            })
            .collect();
        let m: usize = batch.iter().map(|s| s.input.tokens.len()).sum();
        let prefix_lens: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        let mut x: Vec<f32> = batch
            .iter()
            .flat_map(|s| &s.input.tokens)
            .flat_map(|&t| weights.embedding.dequantize_row(t as usize))
            .collect();
        let layout = HeadLayout {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        // The same rotation serves every layer.
        let angles: Vec<_> = trees
            .iter()
            .flat_map(|t| &t.positions)
            .map(|&p| self.rotary.angles(p))
            .collect();
        let kv_row = c.num_kv_heads * c.head_dim;
        for (index, block) in weights.blocks.iter().enumerate() {
            let h = rms_norm(&x, &block.attention_norm, c.rms_norm_eps);
            let a = &block.attention;
            let [mut q, mut k, mut v] = project_many([&a.q, &a.k, &a.v], &h, m)?;
            add_bias(&mut q, a.q_bias.as_ref());
            add_bias(&mut k, a.k_bias.as_ref());
            add_bias(&mut v, a.v_bias.as_ref());
            if let (Some(q_norm), Some(k_norm)) = (&a.q_norm, &a.k_norm) {
                // Each head's row of `head_dim` values on its own.
                q = rms_norm(&q, q_norm, c.rms_norm_eps);
                k = rms_norm(&k, k_norm, c.rms_norm_eps);
            }
            let q_row = c.q_width();
            for (node, node_angles) in angles.iter().enumerate() {
                self.rotary
                    .apply(&mut q[node * q_row..][..q_row], c.head_dim, node_angles);
                self.rotary
                    .apply(&mut k[node * kv_row..][..kv_row], c.head_dim, node_angles);
            }
            for (s, &start) in batch.iter_mut().zip(&offsets) {
                let rows = start * kv_row..(start + s.input.tokens.len()) * kv_row;
                s.cache.append(index, &k[rows.clone()], &v[rows]);
            }
            let sequences: Vec<AttendedSequence<'_, half::f16>> = batch
                .iter()
                .zip(trees)
                .zip(&prefix_lens)
                .map(|((s, tree), &prefix_len)| {
                    let (keys, values) = s.cache.layer(index);
                    AttendedSequence {
                        keys,
                        values,
                        prefix_len,
                        visible: &tree.visible,
                    }
                })
                .collect();
            let mut attended = vec![0f32; m * c.q_width()];
            tree_attention(layout, &q, &sequences, &mut attended);
            let projected = project(&a.o, &attended, m)?;
            for (x, p) in x.iter_mut().zip(&projected) {
                *x += p;
            }
            let h = rms_norm(&x, &block.mlp_norm, c.rms_norm_eps);
            let mlp = block.mlp.forward(&h, m)?;
            for (x, p) in x.iter_mut().zip(&mlp) {
                *x += p;
            }
        }
        // The rows each sequence asked logits for, gathered for one output product.
        let mut selected = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        for ((s, &start), &prefix_len) in batch.iter_mut().zip(&offsets).zip(&prefix_lens) {
            let n = s.input.tokens.len();
            s.cache.set_len(prefix_len + n);
            let (first, count) = s.rows.span(start, n);
            selected.extend_from_slice(&x[first * c.hidden_size..][..count * c.hidden_size]);
            counts.push(count);
        }
        let total: usize = counts.iter().sum();
        let logits = if total == 0 {
            Vec::new()
        } else {
            let h = rms_norm(&selected, &weights.output_norm, c.rms_norm_eps);
            let output = weights.output.as_ref().unwrap_or(&weights.embedding);
            project(output, &h, total)?
        };
        Ok(split_logits(&logits, counts, c.vocab_size))
    }
}

/// One sequence of a batched forward pass ([`Model::forward_batch`]).
pub struct Sequence<'a> {
    /// Its cached prefix, to which the new nodes are appended.
    pub cache: &'a mut KvCache,
    pub input: &'a TreeInput,
    pub rows: LogitRows,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::ModelFile;
    use crate::LoadOptions;
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_transformers::models::quantized_qwen3;

    /// A Qwen3 file of random f32 weights, shaped as the real models are (heads wider than
    /// hidden size / heads, tied output projection).
    fn write_qwen3(path: &std::path::Path) {
        let (vocab, hidden, heads, kv_heads, head_dim, ffn, layers) = (96, 64, 4, 2, 24, 128, 2);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = |dims: &[usize], scale: f32, offset: f32| {
            let len = dims.iter().product();
            let values: Vec<f32> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    offset + ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect();
            let tensor =
                candle_core::Tensor::from_vec(values, dims, &candle_core::Device::Cpu).unwrap();
            QTensor::quantize(&tensor, GgmlDType::F32).unwrap()
        };
        let mut tensors = vec![
            (
                "token_embd.weight".to_string(),
                random(&[vocab, hidden], 1.0, 0.0),
            ),
            (
                "output_norm.weight".to_string(),
                random(&[hidden], 0.2, 1.0),
            ),
        ];
        let matrix = 1.7 / (hidden as f32).sqrt();
        for i in 0..layers {
            let shapes: [(&str, Vec<usize>, f32, f32); 11] = [
                ("attn_norm", vec![hidden], 0.2, 1.0),
                ("attn_q", vec![heads * head_dim, hidden], matrix, 0.0),
                ("attn_k", vec![kv_heads * head_dim, hidden], matrix, 0.0),
                ("attn_v", vec![kv_heads * head_dim, hidden], matrix, 0.0),
                ("attn_q_norm", vec![head_dim], 0.2, 1.0),
                ("attn_k_norm", vec![head_dim], 0.2, 1.0),
                ("attn_output", vec![hidden, heads * head_dim], matrix, 0.0),
                ("ffn_norm", vec![hidden], 0.2, 1.0),
                ("ffn_gate", vec![ffn, hidden], matrix, 0.0),
                ("ffn_up", vec![ffn, hidden], matrix, 0.0),
                (
                    "ffn_down",
                    vec![hidden, ffn],
                    1.7 / (ffn as f32).sqrt(),
                    0.0,
                ),
            ];
            for (name, dims, scale, offset) in shapes {
                tensors.push((
                    format!("blk.{i}.{name}.weight"),
                    random(&dims, scale, offset),
                ));
            }
        }
        let metadata = [
            ("general.architecture", Value::String("qwen3".into())),
            ("general.dtype", Value::U32(0)),
            ("qwen3.embedding_length", Value::U32(hidden as u32)),
            ("qwen3.attention.head_count", Value::U32(heads as u32)),
            ("qwen3.attention.head_count_kv", Value::U32(kv_heads as u32)),
            ("qwen3.attention.key_length", Value::U32(head_dim as u32)),
            ("qwen3.feed_forward_length", Value::U32(ffn as u32)),
            ("qwen3.block_count", Value::U32(layers as u32)),
            ("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("qwen3.rope.freq_base", Value::F32(1_000_000.0)),
            ("qwen3.context_length", Value::U32(256)),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    }

    #[test]
    fn qwen3_computes_what_candle_transformers_computes() {
        let path = std::env::temp_dir().join(format!("sibyl-qwen3-{}.gguf", std::process::id()));
        write_qwen3(&path);
        let file = ModelFile::open(&path).unwrap();
        let model = Model::from_gguf(&file, &LoadOptions::default()).unwrap();
        assert_eq!(model.config().architecture, Architecture::Qwen3);
        assert_eq!(model.config().q_width(), 96);
        let tokens = [5u32, 17, 42, 3, 88, 61, 9, 30, 30, 71];
        let mut cache = model.new_cache();
        let ours = model
            .forward(&mut cache, &TreeInput::chain(&tokens), LogitRows::All)
            .unwrap();
        let mut reader = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let device = candle_core::Device::Cpu;
        let mut reference =
            quantized_qwen3::ModelWeights::from_gguf(content, &mut reader, &device).unwrap();
        let _ = std::fs::remove_file(&path);
        let vocab = model.vocab_size();
        for (position, &token) in tokens.iter().enumerate() {
            let input = candle_core::Tensor::new(&[[token]], &device).unwrap();
            let expected: Vec<f32> = reference
                .forward(&input, position)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let row = &ours[position * vocab..][..vocab];
            let spread = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let differs = row
                .iter()
                .zip(&expected)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(spread > 1.0, "position {position}: logits near zero");
            assert!(
                differs < 1e-3 * spread,
                "position {position}: differs by {differs} (largest logit {spread})"
            );
        }
    }
}
