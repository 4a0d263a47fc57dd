//! Attention of new tree nodes over the cached prefix and their own ancestors.
//!
//! Each (node, head) pair is reduced alone, over its visible keys in position order, with
//! the same fixed summation order whatever else is in the forward pass. The heads that share
//! a KV head are one work item, so that its keys and values are read from memory once.

use crate::parallel::for_each_chunk_mut;

/// Sizes of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLayout {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Dot product with a fixed association: eight strided partial sums, combined pairwise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(0f32, |t, (x, y)| t + x * y);
    for (a, b) in a8.zip(b8) {
        for lane in 0..8 {
            acc[lane] += a[lane] * b[lane];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One sequence's share of a batched attention: `keys`/`values` are the cache of this
/// layer, `[position][kv_head][head_dim]`, holding the prefix (`prefix_len` rows) and then
/// the sequence's new nodes; `visible[i]` lists the new nodes its node `i` attends to (its
/// ancestors and itself), ascending.
pub(crate) struct AttendedSequence<'a> {
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) prefix_len: usize,
    pub(crate) visible: &'a [Vec<usize>],
}

/// `queries`: `[node][head][head_dim]` for the new nodes of every sequence, in sequence
/// order; each node attends to its own sequence only. Writes `[node][head][head_dim]` into
/// `out`. The heads of one node that share a KV head are one work item (their keys and
/// values are read once for all of them), and each head's arithmetic is its own, so the
/// split over threads never changes a value.
pub(crate) fn tree_attention(
    layout: HeadLayout,
    queries: &[f32],
    sequences: &[AttendedSequence<'_>],
    out: &mut [f32],
) {
    let HeadLayout {
        heads,
        kv_heads,
        head_dim,
    } = layout;
    let group = heads / kv_heads;
    let kv_row = kv_heads * head_dim;
    // Per node of the batch: its sequence and its index there.
    let owners: Vec<(usize, usize)> = sequences
        .iter()
        .enumerate()
        .flat_map(|(s, sequence)| (0..sequence.visible.len()).map(move |node| (s, node)))
        .collect();
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::kernels::Isa::detect() != crate::kernels::Isa::Portable;
    let span = group * head_dim;
    for_each_chunk_mut(out, span, |index, out_group| {
        let (s, node) = owners[index / kv_heads];
        let sequence = &sequences[s];
        let kv_head = index % kv_heads;
        let heads = KvGroup {
            queries: &queries[index * span..(index + 1) * span],
            head_dim,
            keys: &sequence.keys[kv_head * head_dim..],
            values: &sequence.values[kv_head * head_dim..],
            stride: kv_row,
            prefix_len: sequence.prefix_len,
            visible: &sequence.visible[node],
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `Isa::detect` finds AVX2 before it answers anything but `Portable`.
            return unsafe { heads.attend_avx2(out_group) };
        }
        heads.attend(out_group)
    });
}

/// Positions the AVX2 path reads per pass over its heads: their keys (or values) stay in
/// the first-level cache while every head of the group uses them.
#[cfg(target_arch = "x86_64")]
const TILE: usize = 32;

/// The query heads of one node that share a KV head: `queries` `[head][head_dim]`, and the
/// keys and values of their KV head, `stride` apart.
struct KvGroup<'a> {
    queries: &'a [f32],
    head_dim: usize,
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    prefix_len: usize,
    visible: &'a [usize],
}

impl KvGroup<'_> {
    /// Each head alone ([`Head::attend`]), into `out` `[head][head_dim]`.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        for (query, out) in self
            .queries
            .chunks_exact(self.head_dim)
            .zip(out.chunks_exact_mut(self.head_dim))
        {
            self.head(query).attend(out);
        }
    }

    fn head<'b>(&'b self, query: &'b [f32]) -> Head<'b> {
        Head { query, group: self }
    }

    /// [`dot`]'s closing sum of its eight lanes (and of its empty tail).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn total(lanes: std::arch::x86_64::__m256) -> f32 {
        let mut a = [0f32; 8];
        std::arch::x86_64::_mm256_storeu_ps(a.as_mut_ptr(), lanes);
        let tail = 0f32;
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail
    }

    /// The arithmetic of [`KvGroup::attend`] in AVX2 vectors, so the same bits: the eight
    /// lanes of [`dot`] in one vector, four keys at a time (independent sums, so they
    /// overlap), and each output value's sum over the positions in order, 64 outputs at a
    /// time in registers. [`TILE`] positions at a time for every head, so that the keys and
    /// values are read from memory once for the group. Head sizes that are not a multiple
    /// of 64 take the portable loop, compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn attend_avx2(&self, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let head_dim = self.head_dim;
        if !head_dim.is_multiple_of(64) {
            return self.attend(out);
        }
        let group = self.queries.len() / head_dim;
        let chunks = head_dim / 8;
        let scale = (head_dim as f32).sqrt();
        let positions: Vec<usize> = (0..self.prefix_len)
            .chain(self.visible.iter().map(|&j| self.prefix_len + j))
            .collect();
        let n = positions.len();
        if n == 0 {
            // Nothing visible (never so for a node, which sees itself): as the portable loop.
            out.fill(0.0);
            return;
        }
        let key = |p: usize| self.keys[p * self.stride..][..head_dim].as_ptr();
        // Per head, the scaled dot products, then the softmax weights.
        let mut scores = vec![0f32; group * n];
        for first in (0..n).step_by(TILE) {
            let tile = &positions[first..n.min(first + TILE)];
            for (g, scores) in scores.chunks_exact_mut(n).enumerate() {
                let query = self.queries[g * head_dim..][..head_dim].as_ptr();
                let scores = &mut scores[first..first + tile.len()];
                let mut blocks = tile.chunks_exact(4);
                let mut written = 0;
                for block in &mut blocks {
                    let keys = [key(block[0]), key(block[1]), key(block[2]), key(block[3])];
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for c in 0..chunks {
                        let q = _mm256_loadu_ps(query.add(c * 8));
                        for (acc, k) in acc.iter_mut().zip(keys) {
                            let x = _mm256_mul_ps(q, _mm256_loadu_ps(k.add(c * 8)));
                            *acc = _mm256_add_ps(*acc, x);
                        }
                    }
                    for acc in acc {
                        scores[written] = Self::total(acc) / scale;
                        written += 1;
                    }
                }
                for &p in blocks.remainder() {
                    let k = key(p);
                    let mut acc = _mm256_setzero_ps();
                    for c in 0..chunks {
                        let q = _mm256_loadu_ps(query.add(c * 8));
                        acc = _mm256_add_ps(acc, _mm256_mul_ps(q, _mm256_loadu_ps(k.add(c * 8))));
                    }
                    scores[written] = Self::total(acc) / scale;
                    written += 1;
                }
            }
        }
        for scores in scores.chunks_exact_mut(n) {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
        }
        // Every output value starts at 0 and adds `weight * value` position by position.
        out.fill(0.0);
        for first in (0..n).step_by(TILE) {
            let tile = &positions[first..n.min(first + TILE)];
            for (weights, out) in scores.chunks_exact(n).zip(out.chunks_exact_mut(head_dim)) {
                let weights = &weights[first..first + tile.len()];
                let out = out.as_mut_ptr();
                for block in (0..chunks).step_by(8) {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_loadu_ps(out.add((block + c) * 8));
                    }
                    for (&p, &weight) in tile.iter().zip(weights) {
                        let weight = _mm256_set1_ps(weight);
                        let v = self.values[p * self.stride..][..head_dim].as_ptr();
                        for (c, acc) in acc.iter_mut().enumerate() {
                            let x = _mm256_loadu_ps(v.add((block + c) * 8));
                            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(weight, x));
                        }
                    }
                    for (c, acc) in acc.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((block + c) * 8), acc);
                    }
                }
            }
        }
    }
}

/// One (node, head) pair: its query, and the keys and values of its group.
struct Head<'a> {
    query: &'a [f32],
    group: &'a KvGroup<'a>,
}

impl Head<'_> {
    /// Softmax of the scaled dot products over the visible positions, in position order,
    /// applied to their values.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        let KvGroup {
            keys,
            values,
            stride,
            prefix_len,
            visible,
            ..
        } = *self.group;
        let head_dim = out.len();
        let scale = (head_dim as f32).sqrt();
        let positions = (0..prefix_len).chain(visible.iter().map(|&j| prefix_len + j));
        // A plain loop, not `map(..).collect()`, whose closure would be a function of its
        // own, compiled without the caller's AVX2.
        let mut scores = Vec::with_capacity(prefix_len + visible.len());
        for p in positions.clone() {
            scores.push(dot(self.query, &keys[p * stride..][..head_dim]) / scale);
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        for (p, s) in positions.zip(&scores) {
            let weight = s / sum;
            let v = &values[p * stride..][..head_dim];
            for (o, &x) in out.iter_mut().zip(v) {
                *o += weight * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build of a KV group's attention gives the same bits as the portable one,
    /// for head sizes with and without a tail after the last eight values.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_build_gives_the_portable_bits() {
        if crate::kernels::Isa::detect() == crate::kernels::Isa::Portable {
            return;
        }
        let mut state = 7u64;
        let mut value = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        // Positions a multiple of the four keys at a time, one over, and past a tile.
        for (head_dim, prefix_len) in [(64, 37), (128, 38), (13, 37), (128, 70)] {
            let (group, stride) = (3, 2 * head_dim);
            let rows = prefix_len + 4;
            let queries: Vec<f32> = (0..group * head_dim).map(|_| value()).collect();
            let keys: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let values: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let heads = KvGroup {
                queries: &queries,
                head_dim,
                keys: &keys[head_dim..],
                values: &values[head_dim..],
                stride,
                prefix_len,
                visible: &[0, 2, 3],
            };
            let (mut portable, mut avx2) =
                (vec![0f32; group * head_dim], vec![1f32; group * head_dim]);
            heads.attend(&mut portable);
            // SAFETY: checked above.
            unsafe { heads.attend_avx2(&mut avx2) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&portable), bits(&avx2), "head size {head_dim}");
            assert!(portable.iter().all(|x| x.is_finite()));
        }
    }
}
