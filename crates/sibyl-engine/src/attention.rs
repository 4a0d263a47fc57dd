//! Attention of new tree nodes over the cached prefix and their own ancestors.
//!
//! Each (node, head) pair is reduced alone, over its visible keys in position order, with
//! the same fixed summation order whatever else is in the forward pass. The heads that share
//! a KV head, of up to eight nodes of one sequence, are one work item, so that its keys and
//! values are read from memory once for all of them.

use crate::parallel::{for_each_range, DisjointWrites};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// What a cache stores its keys and values as: `f16` in the CPU engine's caches (half the
/// memory, and half the bytes read per attended position), `f32` in the tensor engine's
/// caches on the CPU. Widening an `f16` to `f32` is exact, so the portable and the AVX2
/// code read the same values.
pub(crate) trait Cached: Copy + Send + Sync {
    /// `values` as `f32`s: themselves, or widened into `buffer`.
    fn widen<'b>(values: &'b [Self], buffer: &'b mut Vec<f32>) -> &'b [f32];

    /// The eight values at `p`, widened.
    ///
    /// # Safety
    /// Eight values must be readable at `p`, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Cached for f32 {
    #[inline(always)]
    fn widen<'b>(values: &'b [f32], _: &'b mut Vec<f32>) -> &'b [f32] {
        values
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Cached for f16 {
    #[inline(always)]
    fn widen<'b>(values: &'b [f16], buffer: &'b mut Vec<f32>) -> &'b [f32] {
        buffer.resize(values.len(), 0.0);
        values.convert_to_f32_slice(buffer);
        buffer
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// Sizes of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLayout {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Eight strided partial sums combined pairwise, then what came after the last eight: the
/// closing of [`dot`] and [`sum`].
#[inline(always)]
fn combine(lanes: [f32; 8], tail: f32) -> f32 {
    let a = lanes;
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail
}

/// Dot product with a fixed association: eight strided partial sums (each a chain of fused
/// multiply-adds), combined pairwise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(0f32, |t, (x, y)| x.mul_add(*y, t));
    for (a, b) in a8.zip(b8) {
        for lane in 0..8 {
            acc[lane] = a[lane].mul_add(b[lane], acc[lane]);
        }
    }
    combine(acc, tail)
}

/// Sum with [`dot`]'s association: eight strided partial sums, combined pairwise, then the
/// values after the last eight.
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().fold(0f32, |t, x| t + x);
    for chunk in chunks {
        for lane in 0..8 {
            acc[lane] += chunk[lane];
        }
    }
    combine(acc, tail)
}

/// Below this (and for NaN), [`exp`] gives 0: a softmax weight under `e^-64` of the largest
/// changes no sum that holds the largest, and a weight this small over a sum of millions of
/// terms would still be a normal float, where smaller ones come out subnormal, and each
/// multiply-add with a subnormal operand costs a hundred cycles or more on many CPUs (with
/// real attention, where most scores are far below the largest, steps ran 10% slower).
const EXP_LOW: f32 = -64.0;
/// Above this, [`exp`] takes this (a softmax never asks for more than 0).
const EXP_HIGH: f32 = 88.0;
/// ln 2 in two parts, the first (355 / 512) exact in few bits, so that `x - n ln 2` loses
/// nothing.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// Cephes's polynomial for `(exp(r) - 1 - r) / r^2` on |r| <= ln 2 / 2, highest power first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The exponential of a softmax's shifted score (within two ulps of the exact value between
/// [`EXP_LOW`] and [`EXP_HIGH`]; 0 below, and clamped above): `x = n ln 2 + r` with `n` whole,
/// `exp(r)` from a polynomial, times `2^n` made from its bits. Written as the AVX2 path
/// computes each lane, so that both give the same bits, and faster than the C library's.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let kept = x >= EXP_LOW;
    // `max` and `min` as the vector instructions take them: NaN becomes `EXP_LOW`.
    let x = if x > EXP_LOW { x } else { EXP_LOW };
    let x = if x < EXP_HIGH { x } else { EXP_HIGH };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HIGH, x);
    let r = n.mul_add(-LN2_LOW, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // `n` lies in -92..=127: a normal power of two.
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if kept {
        e
    } else {
        0.0
    }
}

/// Softmax in place: the exponentials of the scores less their maximum, each over their
/// [`sum`].
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let sum = sum(scores);
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// [`exp`] of eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let kept = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_LOW));
    let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LOW));
    let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_HIGH));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HIGH), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LOW), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(kept, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
}

/// [`softmax`] eight scores at a time, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn softmax_avx2(scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = _mm256_setzero_ps();
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let shifted = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), _mm256_set1_ps(max));
        let e = exp_avx2(shifted);
        _mm256_storeu_ps(chunk.as_mut_ptr(), e);
        lanes = _mm256_add_ps(lanes, e);
    }
    let mut tail = 0f32;
    for s in chunks.into_remainder() {
        *s = exp(*s - max);
        tail += *s;
    }
    let mut a = [0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), lanes);
    let sum = combine(a, tail);
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let divided = _mm256_div_ps(_mm256_loadu_ps(chunk.as_ptr()), _mm256_set1_ps(sum));
        _mm256_storeu_ps(chunk.as_mut_ptr(), divided);
    }
    for s in chunks.into_remainder() {
        *s /= sum;
    }
}

/// One sequence's share of a batched attention: `keys`/`values` are the cache of this
/// layer, `[position][kv_head][head_dim]`, holding the prefix (`prefix_len` rows) and then
/// the sequence's new nodes; `visible[i]` lists the new nodes its node `i` attends to (its
/// ancestors and itself), ascending.
pub(crate) struct AttendedSequence<'a, T> {
    pub(crate) keys: &'a [T],
    pub(crate) values: &'a [T],
    pub(crate) prefix_len: usize,
    pub(crate) visible: &'a [Vec<usize>],
}

/// Most nodes of one sequence in one work item: the cached prefix's keys and values are
/// read from memory once for all of them rather than once a node, and their scores stay a
/// few hundred kilobytes at long contexts.
const NODE_BLOCK: usize = 8;

/// `queries`: `[node][head][head_dim]` for the new nodes of every sequence, in sequence
/// order; each node attends to its own sequence only. Writes `[node][head][head_dim]` into
/// `out`. A work item is one KV head of up to [`NODE_BLOCK`] nodes of one sequence: the
/// query heads that share that KV head, for all those nodes, read its keys and values once.
/// Each (node, head) pair's arithmetic is its own, so neither the split over items nor the
/// split over threads ever changes a value.
pub(crate) fn tree_attention<T: Cached>(
    layout: HeadLayout,
    queries: &[f32],
    sequences: &[AttendedSequence<'_, T>],
    out: &mut [f32],
) {
    let HeadLayout {
        heads,
        kv_heads,
        head_dim,
    } = layout;
    let group = heads / kv_heads;
    let span = group * head_dim;
    // Nodes per item: all of a sequence's (up to the block) while there are items enough to
    // keep every thread busy, fewer when there are not.
    let nodes: usize = sequences.iter().map(|s| s.visible.len()).sum();
    let threads = candle_core::utils::get_num_threads().max(1);
    let per_item = (nodes * kv_heads).div_ceil(threads).clamp(1, NODE_BLOCK);
    // Per item: its sequence, the batch index of its first node, its nodes in the sequence
    // and its KV head.
    let mut items = Vec::new();
    let mut offset = 0;
    for (s, sequence) in sequences.iter().enumerate() {
        let count = sequence.visible.len();
        for first in (0..count).step_by(per_item) {
            let last = count.min(first + per_item);
            items.extend((0..kv_heads).map(|kv_head| (s, offset + first, first..last, kv_head)));
        }
        offset += count;
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::kernels::Isa::detect() != crate::kernels::Isa::Portable;
    let writes = DisjointWrites::new(out);
    for_each_range(items.len(), |range| {
        let mut attended = Vec::new();
        for (s, first_in_batch, nodes, kv_head) in items[range].iter().cloned() {
            let sequence = &sequences[s];
            let count = nodes.len();
            let heads = KvGroup {
                queries: &queries[(first_in_batch * kv_heads + kv_head) * span..],
                node_stride: kv_heads * span,
                group,
                head_dim,
                keys: &sequence.keys[kv_head * head_dim..],
                values: &sequence.values[kv_head * head_dim..],
                stride: kv_heads * head_dim,
                prefix_len: sequence.prefix_len,
                visible: &sequence.visible[nodes],
            };
            attended.clear();
            attended.resize(count * span, 0.0);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `Isa::detect` finds AVX2, FMA and F16C before it answers anything
                // but `Portable`.
                unsafe { heads.attend_avx2(&mut attended) };
            } else {
                heads.attend(&mut attended);
            }
            #[cfg(not(target_arch = "x86_64"))]
            heads.attend(&mut attended);
            for (k, node) in attended.chunks_exact(span).enumerate() {
                let at = ((first_in_batch + k) * kv_heads + kv_head) * span;
                // SAFETY: each (node, KV head) pair belongs to one item, so no two items write
                // the same span; `out` is borrowed until the pool returns.
                unsafe { writes.write_all(at, node) };
            }
        }
    });
}

/// Positions the AVX2 path reads per pass over its heads: their keys (or values) stay in
/// the first-level cache while every head of every node of the item uses them.
#[cfg(target_arch = "x86_64")]
const TILE: usize = 32;

/// The query heads of some nodes of one sequence that share a KV head: node `k`'s heads at
/// `queries[k * node_stride..]`, `[head][head_dim]` (`group` of them), and the keys and
/// values of their KV head, `stride` apart; `visible[k]` is what node `k` sees of the new
/// nodes.
struct KvGroup<'a, T> {
    queries: &'a [f32],
    node_stride: usize,
    group: usize,
    head_dim: usize,
    keys: &'a [T],
    values: &'a [T],
    stride: usize,
    prefix_len: usize,
    visible: &'a [Vec<usize>],
}

impl<T: Cached> KvGroup<'_, T> {
    /// Node `k`'s query heads, `[head][head_dim]`.
    fn node_queries(&self, k: usize) -> &[f32] {
        &self.queries[k * self.node_stride..][..self.group * self.head_dim]
    }

    /// Each (node, head) alone ([`Head::attend`]), into `out` `[node][head][head_dim]`.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        let span = self.group * self.head_dim;
        for (k, out) in out.chunks_exact_mut(span).enumerate() {
            for (query, out) in self
                .node_queries(k)
                .chunks_exact(self.head_dim)
                .zip(out.chunks_exact_mut(self.head_dim))
            {
                let head = Head {
                    query,
                    group: self,
                    visible: &self.visible[k],
                };
                head.attend(out);
            }
        }
    }

    /// [`combine`] of one vector's eight lanes and an empty tail, in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn total(lanes: std::arch::x86_64::__m256) -> f32 {
        use std::arch::x86_64::*;
        // [a0 + a4, a1 + a5, a2 + a6, a3 + a7]
        let pairs = _mm_add_ps(
            _mm256_castps256_ps128(lanes),
            _mm256_extractf128_ps::<1>(lanes),
        );
        // [pairs0 + pairs1, _, pairs2 + pairs3, _]
        let quads = _mm_add_ps(pairs, _mm_movehdup_ps(pairs));
        let all = _mm_add_ss(quads, _mm_movehl_ps(quads, quads));
        // The empty tail's `+ 0.0`, which turns a -0.0 into 0.0 as the portable sum does.
        _mm_cvtss_f32(_mm_add_ss(all, _mm_setzero_ps()))
    }

    /// [`KvGroup::total`] of eight vectors at once, in order: the same additions, made
    /// across vectors instead of one vector at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn totals(v: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // [a0 + a4, a1 + a5, a2 + a6, a3 + a7] of vectors i and i + 4, side by side.
        let pairs = |i: usize| {
            let low = _mm256_permute2f128_ps::<0x20>(v[i], v[i + 4]);
            let high = _mm256_permute2f128_ps::<0x31>(v[i], v[i + 4]);
            _mm256_add_ps(low, high)
        };
        // Each 128-bit half of `hadd(x, y)` is [x0 + x1, x2 + x3, y0 + y1, y2 + y3].
        let halves = _mm256_hadd_ps(pairs(0), pairs(1));
        let rest = _mm256_hadd_ps(pairs(2), pairs(3));
        let all = _mm256_hadd_ps(halves, rest);
        // The empty tail's `+ 0.0`, as in `total`.
        _mm256_add_ps(all, _mm256_setzero_ps())
    }

    /// Scaled dot products of one query head with the keys at `positions`, into `scores`:
    /// the eight lanes of [`dot`] in one vector, eight keys at a time (independent chains of
    /// multiply-adds, so that they overlap), then four, then one.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scores_avx2(&self, query: &[f32], positions: &[usize], scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let head_dim = self.head_dim;
        let chunks = head_dim / 8;
        let scale = (head_dim as f32).sqrt();
        let query = query.as_ptr();
        let key = |p: usize| self.keys[p * self.stride..][..head_dim].as_ptr();
        let mut blocks = positions.chunks_exact(8);
        let mut written = 0;
        for block in &mut blocks {
            let keys: [*const T; 8] = std::array::from_fn(|i| key(block[i]));
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                let q = _mm256_loadu_ps(query.add(c * 8));
                for (acc, k) in acc.iter_mut().zip(keys) {
                    *acc = _mm256_fmadd_ps(q, T::load8(k.add(c * 8)), *acc);
                }
            }
            let totals = _mm256_div_ps(Self::totals(acc), _mm256_set1_ps(scale));
            _mm256_storeu_ps(scores[written..][..8].as_mut_ptr(), totals);
            written += 8;
        }
        for &p in blocks.remainder() {
            let k = key(p);
            let mut acc = _mm256_setzero_ps();
            for c in 0..chunks {
                let q = _mm256_loadu_ps(query.add(c * 8));
                acc = _mm256_fmadd_ps(q, T::load8(k.add(c * 8)), acc);
            }
            scores[written] = Self::total(acc) / scale;
            written += 1;
        }
    }

    /// Adds `weight * value` for the values at `positions`, in order, to one head's output
    /// `out`, 64 outputs at a time in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn accumulate_avx2(&self, weights: &[f32], positions: &[usize], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let head_dim = self.head_dim;
        let out = out.as_mut_ptr();
        for block in (0..head_dim / 8).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_loadu_ps(out.add((block + c) * 8));
            }
            for (&p, &weight) in positions.iter().zip(weights) {
                let weight = _mm256_set1_ps(weight);
                let v = self.values[p * self.stride..][..head_dim].as_ptr();
                for (c, acc) in acc.iter_mut().enumerate() {
                    let x = T::load8(v.add((block + c) * 8));
                    *acc = _mm256_fmadd_ps(weight, x, *acc);
                }
            }
            for (c, acc) in acc.into_iter().enumerate() {
                _mm256_storeu_ps(out.add((block + c) * 8), acc);
            }
        }
    }

    /// [`KvGroup::scores_avx2`] for two query heads over the same positions, four keys at
    /// a time: each key is loaded once for both.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scores_pair_avx2(
        &self,
        queries: [&[f32]; 2],
        positions: &[usize],
        scores: [&mut [f32]; 2],
    ) {
        use std::arch::x86_64::*;
        let head_dim = self.head_dim;
        let chunks = head_dim / 8;
        let scale = _mm256_set1_ps((head_dim as f32).sqrt());
        let [a, b] = queries.map(|q| q.as_ptr());
        let key = |p: usize| self.keys[p * self.stride..][..head_dim].as_ptr();
        let [scores_a, scores_b] = scores;
        let mut blocks = positions.chunks_exact(4);
        let mut written = 0;
        for block in &mut blocks {
            let keys: [*const T; 4] = std::array::from_fn(|i| key(block[i]));
            // Four accumulators for `a`, then four for `b`.
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                let (qa, qb) = (_mm256_loadu_ps(a.add(c * 8)), _mm256_loadu_ps(b.add(c * 8)));
                for (i, k) in keys.iter().enumerate() {
                    let k = T::load8(k.add(c * 8));
                    acc[i] = _mm256_fmadd_ps(qa, k, acc[i]);
                    acc[i + 4] = _mm256_fmadd_ps(qb, k, acc[i + 4]);
                }
            }
            let totals = _mm256_div_ps(Self::totals(acc), scale);
            _mm_storeu_ps(
                scores_a[written..][..4].as_mut_ptr(),
                _mm256_castps256_ps128(totals),
            );
            _mm_storeu_ps(
                scores_b[written..][..4].as_mut_ptr(),
                _mm256_extractf128_ps::<1>(totals),
            );
            written += 4;
        }
        let rest = blocks.remainder();
        self.scores_avx2(queries[0], rest, &mut scores_a[written..]);
        self.scores_avx2(queries[1], rest, &mut scores_b[written..]);
    }

    /// [`KvGroup::accumulate_avx2`] for two heads over the same positions, 32 outputs of
    /// each at a time: each value is loaded once for both.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn accumulate_pair_avx2(
        &self,
        weights: [&[f32]; 2],
        positions: &[usize],
        out: [&mut [f32]; 2],
    ) {
        use std::arch::x86_64::*;
        let head_dim = self.head_dim;
        let [out_a, out_b] = out.map(|o| o[..head_dim].as_mut_ptr());
        for block in (0..head_dim / 8).step_by(4) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..4 {
                acc[c] = _mm256_loadu_ps(out_a.add((block + c) * 8));
                acc[c + 4] = _mm256_loadu_ps(out_b.add((block + c) * 8));
            }
            for ((&p, &wa), &wb) in positions.iter().zip(weights[0]).zip(weights[1]) {
                let (wa, wb) = (_mm256_set1_ps(wa), _mm256_set1_ps(wb));
                let v = self.values[p * self.stride..][..head_dim].as_ptr();
                for c in 0..4 {
                    let x = T::load8(v.add((block + c) * 8));
                    acc[c] = _mm256_fmadd_ps(wa, x, acc[c]);
                    acc[c + 4] = _mm256_fmadd_ps(wb, x, acc[c + 4]);
                }
            }
            for c in 0..4 {
                _mm256_storeu_ps(out_a.add((block + c) * 8), acc[c]);
                _mm256_storeu_ps(out_b.add((block + c) * 8), acc[c + 4]);
            }
        }
    }

    /// The arithmetic of [`KvGroup::attend`] in AVX2 vectors, so the same bits. The cached
    /// prefix, which every node sees, is read [`TILE`] positions at a time for every head of
    /// every node, so that its keys and values come from memory once for the item; each
    /// node's own new nodes follow. Each score and each output value is summed in the
    /// portable order. Head sizes that are not a multiple of 64 take the portable loop,
    /// compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_avx2(&self, out: &mut [f32]) {
        let head_dim = self.head_dim;
        if !head_dim.is_multiple_of(64) {
            return self.attend(out);
        }
        let (group, prefix_len) = (self.group, self.prefix_len);
        let prefix: Vec<usize> = (0..prefix_len).collect();
        let tails: Vec<Vec<usize>> = self
            .visible
            .iter()
            .map(|visible| visible.iter().map(|&j| prefix_len + j).collect())
            .collect();
        // Per (node, head), in that order: where its scores start and how many it has.
        let rows: Vec<(usize, usize)> = tails
            .iter()
            .flat_map(|tail| std::iter::repeat_n(prefix_len + tail.len(), group))
            .scan(0, |start, n| {
                let here = *start;
                *start += n;
                Some((here, n))
            })
            .collect();
        let total = rows.last().map_or(0, |&(start, n)| start + n);
        let mut scores = vec![0f32; total];
        let query = |row: usize| {
            let (k, g) = (row / group, row % group);
            &self.node_queries(k)[g * head_dim..][..head_dim]
        };
        for first in (0..prefix_len).step_by(TILE) {
            let tile = &prefix[first..prefix_len.min(first + TILE)];
            // Two rows at a time, then the last if their number is odd.
            for row in (0..rows.len()).step_by(2) {
                let (start, _) = rows[row];
                let Some(&(next, _)) = rows.get(row + 1) else {
                    let scores = &mut scores[start + first..][..tile.len()];
                    self.scores_avx2(query(row), tile, scores);
                    continue;
                };
                let (mine, theirs) = scores.split_at_mut(next);
                let pair = [
                    &mut mine[start + first..][..tile.len()],
                    &mut theirs[first..][..tile.len()],
                ];
                self.scores_pair_avx2([query(row), query(row + 1)], tile, pair);
            }
        }
        for (row, &(start, n)) in rows.iter().enumerate() {
            let tail = &tails[row / group];
            self.scores_avx2(query(row), tail, &mut scores[start + prefix_len..start + n]);
            softmax_avx2(&mut scores[start..start + n]);
        }
        // Every output value starts at 0 and adds `weight * value` position by position.
        out.fill(0.0);
        for first in (0..prefix_len).step_by(TILE) {
            let tile = &prefix[first..prefix_len.min(first + TILE)];
            let weights = |row: usize| &scores[rows[row].0 + first..][..tile.len()];
            for (pair, out) in out.chunks_mut(2 * head_dim).enumerate() {
                let row = 2 * pair;
                if out.len() == head_dim {
                    self.accumulate_avx2(weights(row), tile, out);
                    continue;
                }
                let (a, b) = out.split_at_mut(head_dim);
                self.accumulate_pair_avx2([weights(row), weights(row + 1)], tile, [a, b]);
            }
        }
        for (row, (&(start, n), out)) in rows.iter().zip(out.chunks_exact_mut(head_dim)).enumerate()
        {
            let tail = &tails[row / group];
            self.accumulate_avx2(&scores[start + prefix_len..start + n], tail, out);
        }
    }
}

/// One (node, head) pair: its query, the keys and values of its group, and what it sees
/// of the new nodes.
struct Head<'a, T> {
    query: &'a [f32],
    group: &'a KvGroup<'a, T>,
    visible: &'a [usize],
}

impl<T: Cached> Head<'_, T> {
    /// Softmax of the scaled dot products over the visible positions, in position order,
    /// applied to their values.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        let KvGroup {
            keys,
            values,
            stride,
            prefix_len,
            ..
        } = *self.group;
        let visible = self.visible;
        let head_dim = out.len();
        let scale = (head_dim as f32).sqrt();
        let positions = (0..prefix_len).chain(visible.iter().map(|&j| prefix_len + j));
        // A plain loop, not `map(..).collect()`, whose closure would be a function of its
        // own, compiled without the caller's AVX2.
        let mut scores = Vec::with_capacity(prefix_len + visible.len());
        let mut widened = Vec::new();
        for p in positions.clone() {
            let key = T::widen(&keys[p * stride..][..head_dim], &mut widened);
            scores.push(dot(self.query, key) / scale);
        }
        softmax(&mut scores);
        out.fill(0.0);
        for (p, &weight) in positions.zip(&scores) {
            let v = T::widen(&values[p * stride..][..head_dim], &mut widened);
            for (o, &x) in out.iter_mut().zip(v) {
                *o = weight.mul_add(x, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The softmax's exponential is within two ulps of the exact value over the range it
    /// keeps, exact at 0, 0 below it and for NaN, and its AVX2 build gives the same bits.
    #[test]
    fn exp_is_accurate_and_the_same_in_every_build() {
        let inputs: Vec<f32> = (0..=200_000)
            .map(|i| -64.0 * i as f32 / 200_000.0)
            .chain([
                0.0,
                -0.0,
                -1e-30,
                -64.0,
                -64.000_01,
                -100.0,
                f32::NEG_INFINITY,
            ])
            .chain([f32::NAN, 5.0, 88.0, 100.0])
            .collect();
        assert_eq!(exp(0.0), 1.0);
        for &x in &inputs {
            let got = exp(x);
            if x.is_nan() || x < EXP_LOW {
                assert_eq!(exp(x).to_bits(), 0, "exp({x})");
                continue;
            }
            let want = (x.min(EXP_HIGH) as f64).exp();
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, exactly {want}: {ulp} ulps");
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::Isa::detect() != crate::kernels::Isa::Portable {
            for chunk in inputs.chunks_exact(8) {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2 and FMA found above.
                unsafe {
                    use std::arch::x86_64::*;
                    let e = exp_avx2(_mm256_loadu_ps(chunk.as_ptr()));
                    _mm256_storeu_ps(lanes.as_mut_ptr(), e);
                }
                for (&x, e) in chunk.iter().zip(lanes) {
                    assert_eq!(exp(x).to_bits(), e.to_bits(), "exp({x})");
                }
            }
        }
    }

    /// The AVX2 build of a KV group's attention gives the same bits as the portable one,
    /// for head sizes with and without a tail after the last eight values, for one node
    /// and for several nodes of a tree read together, and with an empty prefix.
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
        let one = vec![vec![0, 2, 3]];
        // A tree: a root, two children, a grandchild.
        let tree = vec![vec![0], vec![0, 1], vec![0, 2], vec![0, 1, 3]];
        // Positions a multiple of the keys read together, one over, and past a tile.
        let cases = [
            (64, 37, &one),
            (128, 38, &one),
            (13, 37, &one),
            (128, 70, &one),
            (128, 70, &tree),
            (64, 0, &tree),
            (13, 33, &tree),
        ];
        for (head_dim, prefix_len, visible) in cases {
            let (stride, nodes) = (2 * head_dim, visible.len());
            let rows = prefix_len + 4;
            let queries: Vec<f32> = (0..nodes * GROUP * stride).map(|_| value()).collect();
            let keys: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let values: Vec<f32> = (0..rows * stride).map(|_| value()).collect();
            let case = format!("head size {head_dim}, prefix {prefix_len}, {nodes} nodes");
            let heads = second_kv_head(&queries, &keys, &values, head_dim, prefix_len, visible);
            let exact = same_bits(&heads, &case);
            // The same keys and values stored as the CPU engine's caches store them.
            let narrow = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
            let (keys, values) = (narrow(&keys), narrow(&values));
            let halves = second_kv_head(&queries, &keys, &values, head_dim, prefix_len, visible);
            let rounded = same_bits(&halves, &format!("{case}, f16"));
            // Rounding moves the result a little, not a lot (values of a few units here).
            for (a, b) in exact.iter().zip(&rounded) {
                assert!((a - b).abs() < 0.05, "{case}: {a} from f32, {b} from f16");
            }
        }
    }

    /// Query heads per KV head in [`the_avx2_build_gives_the_portable_bits`].
    #[cfg(target_arch = "x86_64")]
    const GROUP: usize = 3;

    /// The second of two KV heads, as a forward pass lays them out: each node's queries
    /// `[kv_head][head][head_dim]` ([`GROUP`] heads each), the cache `[position][kv_head]
    /// [head_dim]`.
    #[cfg(target_arch = "x86_64")]
    fn second_kv_head<'a, T>(
        queries: &'a [f32],
        keys: &'a [T],
        values: &'a [T],
        head_dim: usize,
        prefix_len: usize,
        visible: &'a [Vec<usize>],
    ) -> KvGroup<'a, T> {
        KvGroup {
            queries: &queries[GROUP * head_dim..],
            node_stride: 2 * GROUP * head_dim,
            group: GROUP,
            head_dim,
            keys: &keys[head_dim..],
            values: &values[head_dim..],
            stride: 2 * head_dim,
            prefix_len,
            visible,
        }
    }

    /// Attends with the portable and the AVX2 code, checks that both give the same finite
    /// bits, and returns them.
    #[cfg(target_arch = "x86_64")]
    fn same_bits<T: Cached>(heads: &KvGroup<'_, T>, case: &str) -> Vec<f32> {
        let span = heads.visible.len() * heads.group * heads.head_dim;
        let (mut portable, mut avx2) = (vec![0f32; span], vec![1f32; span]);
        heads.attend(&mut portable);
        // SAFETY: the caller checked for AVX2, FMA and F16C.
        unsafe { heads.attend_avx2(&mut avx2) };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&portable), bits(&avx2), "{case}");
        assert!(portable.iter().all(|x| x.is_finite()), "{case}");
        portable
    }
}
