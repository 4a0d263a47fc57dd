//! Attention of new tree nodes over the cached prefix and their own ancestors.
//!
//! Each (node, head) pair is reduced alone, over its visible keys in position order, with
//! the same fixed summation order whatever else is in the forward pass.

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
/// `out`. Every (node, head) pair is one work item, so the split over threads never changes
/// a value.
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
    for_each_chunk_mut(out, head_dim, |index, out_head| {
        let (s, node) = owners[index / heads];
        let sequence = &sequences[s];
        let kv_head = index % heads / group;
        let head = Head {
            query: &queries[index * head_dim..(index + 1) * head_dim],
            keys: &sequence.keys[kv_head * head_dim..],
            values: &sequence.values[kv_head * head_dim..],
            stride: kv_row,
            prefix_len: sequence.prefix_len,
            visible: &sequence.visible[node],
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `Isa::detect` finds AVX2 before it answers anything but `Portable`.
            return unsafe { head.attend_avx2(out_head) };
        }
        head.attend(out_head)
    });
}

/// One (node, head) pair: its query and the keys and values of its KV head, `stride` apart.
struct Head<'a> {
    query: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    prefix_len: usize,
    visible: &'a [usize],
}

impl Head<'_> {
    /// The same arithmetic compiled for AVX2: eight lanes of [`dot`] in one vector, the
    /// same operations in the same order on each, so the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn attend_avx2(&self, out: &mut [f32]) {
        self.attend(out)
    }

    /// Softmax of the scaled dot products over the visible positions, in position order,
    /// applied to their values.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        let head_dim = out.len();
        let scale = (head_dim as f32).sqrt();
        let positions =
            (0..self.prefix_len).chain(self.visible.iter().map(|&j| self.prefix_len + j));
        // A plain loop, not `map(..).collect()`, whose closure would be a function of its
        // own, compiled without the caller's AVX2.
        let mut scores = Vec::with_capacity(self.prefix_len + self.visible.len());
        for p in positions.clone() {
            scores.push(dot(self.query, &self.keys[p * self.stride..][..head_dim]) / scale);
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
            let v = &self.values[p * self.stride..][..head_dim];
            for (o, &x) in out.iter_mut().zip(v) {
                *o += weight * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build of a head's attention gives the same bits as the portable one, for
    /// head sizes with and without a tail after the last eight values.
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
        for head_dim in [64, 13] {
            let (prefix_len, stride) = (37, 2 * head_dim);
            let rows = prefix_len + 4;
            let query: Vec<f32> = (0..head_dim).map(|_| value()).collect();
            let keys: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let values: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let head = Head {
                query: &query,
                keys: &keys,
                values: &values,
                stride,
                prefix_len,
                visible: &[0, 2, 3],
            };
            let (mut portable, mut avx2) = (vec![0f32; head_dim], vec![0f32; head_dim]);
            head.attend(&mut portable);
            // SAFETY: checked above.
            unsafe { head.attend_avx2(&mut avx2) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&portable), bits(&avx2), "head size {head_dim}");
            assert!(portable.iter().all(|x| x.is_finite()));
        }
    }
}
