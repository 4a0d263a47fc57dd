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
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for lane in 0..8 {
            acc[lane] += a[c * 8 + lane] * b[c * 8 + lane];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `queries`: `[node][head][head_dim]` for the new nodes. `keys`/`values`: the cache of
/// this layer, `[position][kv_head][head_dim]`, holding the prefix (`prefix_len` rows) and
/// then the new nodes. `visible[i]`: the new nodes node `i` attends to (its ancestors and
/// itself), ascending. Writes `[node][head][head_dim]` into `out`.
pub(crate) fn tree_attention(
    layout: HeadLayout,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    prefix_len: usize,
    visible: &[Vec<usize>],
    out: &mut [f32],
) {
    let HeadLayout {
        heads,
        kv_heads,
        head_dim,
    } = layout;
    let group = heads / kv_heads;
    let kv_row = kv_heads * head_dim;
    let scale = (head_dim as f32).sqrt();
    for_each_chunk_mut(out, head_dim, |index, out_head| {
        let node = index / heads;
        let head = index % heads;
        let kv_head = head / group;
        let q = &queries[index * head_dim..(index + 1) * head_dim];
        let positions = (0..prefix_len).chain(visible[node].iter().map(|&j| prefix_len + j));
        let mut scores: Vec<f32> = positions
            .clone()
            .map(|p| {
                let k = &keys[p * kv_row + kv_head * head_dim..][..head_dim];
                dot(q, k) / scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out_head.fill(0.0);
        for (p, s) in positions.zip(&scores) {
            let weight = s / sum;
            let v = &values[p * kv_row + kv_head * head_dim..][..head_dim];
            for (o, &x) in out_head.iter_mut().zip(v) {
                *o += weight * x;
            }
        }
    });
}
