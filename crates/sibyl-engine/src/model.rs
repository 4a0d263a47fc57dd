use crate::attention::{tree_attention, AttendedSequence, HeadLayout};
use crate::gguf::{Architecture, LoadOptions, ModelConfig, ModelFile, RopeScaling};
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
    /// Per rotated pair of dimensions, its angle per position.
    inv_freq: Vec<f32>,
    /// Scale of every sine and cosine (YaRN's attention factor; 1 otherwise).
    scale: f32,
    interleaved: bool,
}

impl Rotary {
    /// The angles as llama.cpp's rope computes them (frequency factors divide, then linear
    /// or YaRN scaling), folded into one frequency per pair since each is linear in the
    /// position.
    fn new(config: &ModelConfig) -> Self {
        let d = config.head_dim;
        let rope = &config.rope;
        let extrapolated = (0..d / 2).map(|i| {
            let base = 1f32 / rope.theta.powf((2 * i) as f32 / d as f32);
            match &rope.freq_factors {
                Some(factors) => base / factors[i],
                None => base,
            }
        });
        let (inv_freq, scale) = match rope.scaling {
            RopeScaling::None => (extrapolated.collect(), 1.0),
            RopeScaling::Linear { factor } => (extrapolated.map(|f| f / factor).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attn_factor,
            } => {
                // The pair where `rotations` turns fit in the original context.
                let pair = |rotations: f32| {
                    d as f32
                        * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * rope.theta.ln())
                };
                let low = pair(beta_fast).floor().max(0.0);
                let high = pair(beta_slow).ceil().min(d as f32 - 1.0);
                let inv_freq = extrapolated
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = (i as f32 - low) / (high - low).max(0.001);
                        let kept = 1.0 - ramp.clamp(0.0, 1.0);
                        f / factor * (1.0 - kept) + f * kept
                    })
                    .collect();
                let scale = if factor > 1.0 {
                    attn_factor * (1.0 + 0.1 * factor.ln())
                } else {
                    attn_factor
                };
                (inv_freq, scale)
            }
        };
        Self {
            inv_freq,
            scale,
            interleaved: config.architecture == Architecture::Llama,
        }
    }

    /// Sines and cosines of `position`, one pair per rotated pair of dimensions.
    fn angles(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|f| {
                let (sin, cos) = (position as f32 * f).sin_cos();
                (sin * self.scale, cos * self.scale)
            })
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

    /// A file of random f32 weights of architecture `arch`, shaped as Qwen3 models are
    /// (heads wider than hidden size / heads, tied output projection), with `metadata` and
    /// `tensors` added.
    fn write_model(
        path: &std::path::Path,
        arch: &str,
        metadata: &[(&str, Value)],
        tensors: &[(&str, QTensor)],
    ) {
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
            f32_tensor(values, dims)
        };
        let mut weights = vec![
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
                let values = random(&dims, scale, offset);
                if arch == "qwen3" || !matches!(name, "attn_q_norm" | "attn_k_norm") {
                    weights.push((format!("blk.{i}.{name}.weight"), values));
                }
            }
        }
        let key = |k: &str| format!("{arch}.{k}");
        let mut all = vec![
            (
                "general.architecture".to_string(),
                Value::String(arch.into()),
            ),
            ("general.dtype".to_string(), Value::U32(0)),
            (key("embedding_length"), Value::U32(hidden as u32)),
            (key("attention.head_count"), Value::U32(heads as u32)),
            (key("attention.head_count_kv"), Value::U32(kv_heads as u32)),
            (key("attention.key_length"), Value::U32(head_dim as u32)),
            (key("feed_forward_length"), Value::U32(ffn as u32)),
            (key("block_count"), Value::U32(layers as u32)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (key("rope.freq_base"), Value::F32(1_000_000.0)),
            (key("context_length"), Value::U32(256)),
        ];
        all.extend(metadata.iter().map(|(k, v)| (key(k), v.clone())));
        let all: Vec<(&str, &Value)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut tensor_refs: Vec<(&str, &QTensor)> =
            weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tensor_refs.extend(tensors.iter().map(|(n, t)| (*n, t)));
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &all, &tensor_refs).unwrap();
    }

    fn f32_tensor(values: Vec<f32>, dims: &[usize]) -> QTensor {
        let tensor =
            candle_core::Tensor::from_vec(values, dims, &candle_core::Device::Cpu).unwrap();
        QTensor::quantize(&tensor, GgmlDType::F32).unwrap()
    }

    fn write_qwen3(path: &std::path::Path) {
        write_model(path, "qwen3", &[], &[]);
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("sibyl-{name}-{}.gguf", std::process::id()))
    }

    /// The logits of every position of `tokens` on the CPU engine and on the tensor engine.
    fn both_engines(file: &ModelFile, tokens: &[u32]) -> [Vec<f32>; 2] {
        let options = LoadOptions::default();
        let host = Model::from_gguf(file, &options).unwrap();
        let weights = FileWeights {
            file,
            options: &options,
        };
        let tensor = Model::build_on(
            file.config().unwrap(),
            &weights,
            &candle_core::Device::Cpu,
            Device::Cpu,
        )
        .unwrap();
        [host, tensor].map(|model| {
            let mut cache = model.new_cache();
            model
                .forward(&mut cache, &TreeInput::chain(tokens), LogitRows::All)
                .unwrap()
        })
    }

    /// Llama 3's frequencies as transformers computes them (`rope_type: llama3`).
    fn llama3_inv_freq(
        d: usize,
        theta: f64,
        factor: f64,
        low: f64,
        high: f64,
        original: f64,
    ) -> Vec<f64> {
        let (low_wavelen, high_wavelen) = (original / low, original / high);
        (0..d / 2)
            .map(|i| {
                let inv = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                let wavelen = 2.0 * std::f64::consts::PI / inv;
                if wavelen < high_wavelen {
                    inv
                } else if wavelen > low_wavelen {
                    inv / factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    (1.0 - smooth) * inv / factor + smooth * inv
                }
            })
            .collect()
    }

    /// The `rope_freqs.weight` values llama.cpp's converter writes for the same settings.
    fn llama3_factors(
        d: usize,
        theta: f64,
        factor: f64,
        low: f64,
        high: f64,
        original: f64,
    ) -> Vec<f32> {
        (0..d / 2)
            .map(|i| {
                let inv = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                let wavelen = 2.0 * std::f64::consts::PI / inv;
                if wavelen < original / high {
                    1.0
                } else if wavelen > original / low {
                    factor as f32
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect()
    }

    /// YaRN's frequencies and attention factor as transformers computes them
    /// (`rope_type: yarn`, `truncate: true`).
    fn yarn_inv_freq(d: usize, theta: f64, factor: f64, original: f64) -> (Vec<f64>, f64) {
        let correction = |rotations: f64| {
            d as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let low = correction(32.0).floor().max(0.0);
        let mut high = correction(1.0).ceil().min(d as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = (0..d / 2)
            .map(|i| {
                let extrapolation = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                let interpolation = extrapolation / factor;
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let kept = 1.0 - ramp;
                interpolation * (1.0 - kept) + extrapolation * kept
            })
            .collect();
        (inv_freq, 0.1 * factor.ln() + 1.0)
    }

    fn rope_config(head_dim: usize, rope: crate::Rope) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: head_dim,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim,
            rms_norm_eps: 1e-6,
            rope,
            context_length: 8,
        }
    }

    fn assert_close(ours: &[f32], theirs: &[f64], what: &str) {
        assert_eq!(ours.len(), theirs.len());
        for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
            assert!(
                (f64::from(a) - b).abs() <= 1e-5 * b.abs(),
                "{what}: pair {i}: {a} against {b}"
            );
        }
    }

    #[test]
    fn rope_scaling_gives_the_frequencies_transformers_gives() {
        // Llama 3.1's settings, carried as llama.cpp's converter carries them.
        let (d, theta) = (128, 500_000.0);
        let rope = crate::Rope {
            theta: theta as f32,
            freq_factors: Some(llama3_factors(d, theta, 8.0, 1.0, 4.0, 8192.0)),
            scaling: RopeScaling::None,
        };
        let rotary = Rotary::new(&rope_config(d, rope));
        let expected = llama3_inv_freq(d, theta, 8.0, 1.0, 4.0, 8192.0);
        assert_close(&rotary.inv_freq, &expected, "llama3");
        assert_eq!(rotary.scale, 1.0);
        // The factors do something: the lowest frequency is divided by 8, the highest kept.
        let unscaled = |i: usize| 1.0 / theta.powf((2 * i) as f64 / d as f64);
        assert_close(
            &rotary.inv_freq[d / 2 - 1..],
            &[unscaled(d / 2 - 1) / 8.0],
            "lowest",
        );
        assert_close(&rotary.inv_freq[..1], &[unscaled(0)], "highest");
        // Qwen2.5's long-context setting (YaRN, 4 x 32768).
        let (d, theta) = (128, 1_000_000.0);
        let rope = crate::Rope {
            theta: theta as f32,
            freq_factors: None,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_context: 32_768,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attn_factor: 1.0,
            },
        };
        let rotary = Rotary::new(&rope_config(d, rope));
        let (expected, attention) = yarn_inv_freq(d, theta, 4.0, 32_768.0);
        assert_close(&rotary.inv_freq, &expected, "yarn");
        assert!((f64::from(rotary.scale) - attention).abs() < 1e-6);
        let (sin, cos) = rotary.angles(3);
        let norm = (sin[0] * sin[0] + cos[0] * cos[0]).sqrt();
        assert!(
            (f64::from(norm) - attention).abs() < 1e-5,
            "sines and cosines scaled"
        );
        // Linear scaling divides every frequency.
        let rope = crate::Rope {
            theta: theta as f32,
            freq_factors: None,
            scaling: RopeScaling::Linear { factor: 2.0 },
        };
        let rotary = Rotary::new(&rope_config(d, rope));
        let plain: Vec<f64> = (0..d / 2)
            .map(|i| 0.5 / theta.powf((2 * i) as f64 / d as f64))
            .collect();
        assert_close(&rotary.inv_freq, &plain, "linear");
    }

    #[test]
    fn rope_factors_and_scaling_in_a_file_reach_both_engines() {
        // A llama file with heads wider than hidden size / heads (as Mistral NeMo's are).
        let tokens = [5u32, 17, 42, 3, 88, 61, 9, 30, 30, 71];
        let pairs = 12;
        let logits = |name: &str, metadata: &[(&str, Value)], tensors: &[(&str, QTensor)]| {
            let path = temp_path(name);
            write_model(&path, "llama", metadata, tensors);
            let file = ModelFile::open(&path).unwrap();
            let out = both_engines(&file, &tokens);
            let _ = std::fs::remove_file(&path);
            out
        };
        let plain = logits("rope-plain", &[], &[]);
        let factors = logits(
            "rope-factors",
            &[],
            &[("rope_freqs.weight", f32_tensor(vec![4.0; pairs], &[pairs]))],
        );
        let linear = logits(
            "rope-linear",
            &[
                ("rope.scaling.type", Value::String("linear".into())),
                ("rope.scaling.factor", Value::F32(4.0)),
            ],
            &[],
        );
        let yarn = logits(
            "rope-yarn",
            &[
                ("rope.scaling.type", Value::String("yarn".into())),
                ("rope.scaling.factor", Value::F32(4.0)),
                ("rope.scaling.original_context_length", Value::U32(64)),
            ],
            &[],
        );
        let vocab = 96;
        for engine in 0..2 {
            // Frequency factors of 4 everywhere are a linear scaling by 4, bit for bit.
            assert_eq!(factors[engine], linear[engine], "engine {engine}");
            // The first position does not rotate; every later one does, differently.
            assert_eq!(plain[engine][..vocab], factors[engine][..vocab]);
            for other in [&factors, &yarn] {
                assert_ne!(
                    plain[engine][vocab..],
                    other[engine][vocab..],
                    "engine {engine}"
                );
            }
            assert_ne!(yarn[engine], linear[engine]);
        }
        // The two engines agree on each setting (to the tensor engine's rounding).
        for run in [&plain, &factors, &yarn] {
            let spread = run[0].iter().fold(0f32, |m, v| m.max(v.abs()));
            let differs = run[0]
                .iter()
                .zip(&run[1])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                differs < 1e-3 * spread,
                "engines differ by {differs} of {spread}"
            );
        }
    }

    #[test]
    fn rope_settings_the_engine_cannot_compute_are_refused() {
        let refused = |name: &str, metadata: &[(&str, Value)], tensors: &[(&str, QTensor)]| {
            let path = temp_path(name);
            write_model(&path, "llama", metadata, tensors);
            let file = ModelFile::open(&path).unwrap();
            let error = Model::from_gguf(&file, &LoadOptions::default())
                .err()
                .expect("refused");
            let _ = std::fs::remove_file(&path);
            error.to_string()
        };
        // A file's name, what it adds, and what the refusal must say.
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, Value)],
            Vec<(&'a str, QTensor)>,
            &'a str,
        );
        let cases: [Case; 5] = [
            (
                "rope-longrope",
                &[("rope.scaling.type", Value::String("longrope".into()))],
                vec![],
                "`longrope` is not supported",
            ),
            (
                "rope-partial",
                &[("rope.dimension_count", Value::U32(12))],
                vec![],
                "over 12 of a head's 24",
            ),
            (
                "rope-short-factors",
                &[],
                vec![("rope_freqs.weight", f32_tensor(vec![1.0; 6], &[6]))],
                "6 values, the heads rotate 12 pairs",
            ),
            (
                "rope-zero-factor",
                &[],
                vec![("rope_freqs.weight", f32_tensor(vec![0.0; 12], &[12]))],
                "not a positive factor",
            ),
            (
                "rope-value-width",
                &[("attention.value_length", Value::U32(16))],
                vec![],
                "keys 24 and values 16",
            ),
        ];
        for (name, metadata, tensors, expected) in cases {
            let message = refused(name, metadata, &tensors);
            assert!(message.contains(expected), "{name}: {message}");
        }
    }

    #[test]
    fn qwen3_computes_what_candle_transformers_computes() {
        let path = temp_path("qwen3");
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
