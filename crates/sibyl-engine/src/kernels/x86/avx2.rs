//! AVX2 kernels: a 256-bit vector holds four values of each of eight output columns, four
//! activation values are broadcast to all lanes, `maddubs` multiplies (unsigned weight times
//! signed activation, pairs summed in 16 bits, which cannot overflow for these value ranges)
//! and `madd` applies each column's integer scale while summing to 32 bits. Each unpacked
//! weight vector serves a tile of up to four activation rows.

use super::*;
use crate::kernels::{GroupBlocks, Q8};

/// See `portable::q4k`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q4k(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(q4k_tile, Q4K_GROUP_BYTES, group, blocks, xs, out)
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q4k_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    k4_tile::<R, false>(block, xs, blocks, b, first, acc)
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q5k_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    k4_tile::<R, true>(block, xs, blocks, b, first, acc)
}

/// The Q4_K tile, or with `FIVE` the Q5_K one: the same but for the values' fifth bits,
/// put onto the nibbles.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn k4_tile<const R: usize, const FIVE: bool>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let low = _mm256_set1_epi8(0x0F);
    // Sixteen bits hold the sum of eight `maddubs` results of 4-bit weights
    // (8 * 2 * 15 * 128 < 32768) but only of four of 5-bit ones (4 * 2 * 31 * 128).
    let run = if FIVE { 4 } else { 8 };
    let mut isum = [_mm256_setzero_si256(); R];
    for g in 0..4 {
        let scale_low = pairs_u8(
            block.add(Q4K_SCALES + 16 * g),
            block.add(Q4K_SCALES + 16 * g),
        );
        let scale_high = pairs_u8(
            block.add(Q4K_SCALES + 16 * g + 8),
            block.add(Q4K_SCALES + 16 * g + 8),
        );
        for start in (0..8).step_by(run) {
            let mut p_low = [_mm256_setzero_si256(); R];
            let mut p_high = [_mm256_setzero_si256(); R];
            for t in start..start + run {
                let packed = load(block.add(Q4K_QS + 32 * (8 * g + t)));
                let mut w_low = _mm256_and_si256(packed, low);
                let mut w_high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                if FIVE {
                    let (h_low, h_high) = fifth_bits(load(block.add(Q5K_QH + 32 * t)), g);
                    w_low = _mm256_or_si256(w_low, h_low);
                    w_high = _mm256_or_si256(w_high, h_high);
                }
                for i in 0..R {
                    let q = x[i].qs.as_ptr();
                    let a = _mm256_maddubs_epi16(w_low, broadcast(q.add(64 * g + 4 * t)));
                    let h = _mm256_maddubs_epi16(w_high, broadcast(q.add(64 * g + 32 + 4 * t)));
                    p_low[i] = _mm256_add_epi16(p_low[i], a);
                    p_high[i] = _mm256_add_epi16(p_high[i], h);
                }
            }
            for i in 0..R {
                let s = _mm256_add_epi32(
                    _mm256_madd_epi16(p_low[i], scale_low),
                    _mm256_madd_epi16(p_high[i], scale_high),
                );
                isum[i] = _mm256_add_epi32(isum[i], s);
            }
        }
    }
    q4k_finish(block, &x, &isum, acc);
}

/// See `portable::q5k`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q5k(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(q5k_tile, Q5K_GROUP_BYTES, group, blocks, xs, out)
}

/// See `portable::q6k`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q6k(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(q6k_tile, GROUP * 210, group, blocks, xs, out)
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q6k_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let low = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let scales = block.add(Q6K_SCALES);
    let mut isum = [_mm256_setzero_si256(); R];
    for g in 0..4 {
        for half in 0..2 {
            // Values 64g + 16 half.. (scale 4g + half) and 64g + 32 + 16 half.. (4g + 2 + half).
            let scale_low = pairs_i8(
                scales.add(8 * (4 * g + half)),
                scales.add(8 * (4 * g + half)),
            );
            let scale_high = pairs_i8(
                scales.add(8 * (4 * g + 2 + half)),
                scales.add(8 * (4 * g + 2 + half)),
            );
            // Two maddubs results fit in 16 bits (2 * 2 * 63 * 128 < 32768), not three.
            for pair in 0..2 {
                let mut p_low = [_mm256_setzero_si256(); R];
                let mut p_high = [_mm256_setzero_si256(); R];
                for step in 0..2 {
                    let t = 4 * half + 2 * pair + step;
                    let ql = load(block.add(Q6K_QL + 32 * (8 * g + t)));
                    let qh = load(block.add(Q6K_QH + 32 * (8 * (g / 2) + t)));
                    let (w_low, w_high) = q6k_unpack(ql, qh, g % 2 == 1, low, bits45);
                    for i in 0..R {
                        let q = x[i].qs.as_ptr();
                        let a = _mm256_maddubs_epi16(w_low, broadcast(q.add(64 * g + 4 * t)));
                        let h = _mm256_maddubs_epi16(w_high, broadcast(q.add(64 * g + 32 + 4 * t)));
                        p_low[i] = _mm256_add_epi16(p_low[i], a);
                        p_high[i] = _mm256_add_epi16(p_high[i], h);
                    }
                }
                for i in 0..R {
                    let s = _mm256_add_epi32(
                        _mm256_madd_epi16(p_low[i], scale_low),
                        _mm256_madd_epi16(p_high[i], scale_high),
                    );
                    isum[i] = _mm256_add_epi32(isum[i], s);
                }
            }
        }
    }
    q6k_finish(block, &x, &isum, acc);
}

/// See `portable::q8_0`. Activations must lie in -127..=127 (as `Q8::quantize` makes them):
/// the sign trick below cannot negate -128.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q8_0(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8],
    out: &mut [[f32; GROUP]],
) {
    tiled!(q8_0_tile, GROUP * 34, group, blocks, xs, out)
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q8_0_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    let x: [&Q8; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let ones = _mm256_set1_epi16(1);
    let mut isum = [_mm256_setzero_si256(); R];
    for t in 0..8 {
        let w = load(block.add(Q8_QS + 32 * t));
        let magnitude = _mm256_abs_epi8(w);
        for i in 0..R {
            let a = _mm256_sign_epi8(broadcast(x[i].qs.as_ptr().add(4 * t)), w);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, a), ones);
            isum[i] = _mm256_add_epi32(isum[i], p);
        }
    }
    let d = halves(block.add(Q8_D));
    for i in 0..R {
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[i].d));
        acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum[i])));
    }
}

/// See `portable::q4_0`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q4_0(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8],
    out: &mut [[f32; GROUP]],
) {
    tiled!(q4_0_tile, GROUP * 18, group, blocks, xs, out)
}

#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q4_0_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    let x: [&Q8; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Sixteen bits hold the sum of the eight `maddubs` results (8 * 2 * 15 * 127 < 32768).
    let mut p = [_mm256_setzero_si256(); R];
    for t in 0..4 {
        let packed = load(block.add(Q40_QS + 32 * t));
        let w_low = _mm256_and_si256(packed, low);
        let w_high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
        for i in 0..R {
            let q = x[i].qs.as_ptr();
            let a = _mm256_maddubs_epi16(w_low, broadcast(q.add(4 * t)));
            let h = _mm256_maddubs_epi16(w_high, broadcast(q.add(16 + 4 * t)));
            p[i] = _mm256_add_epi16(p[i], _mm256_add_epi16(a, h));
        }
    }
    let d = halves(block.add(Q40_D));
    for i in 0..R {
        let offset = _mm256_set1_epi32(8 * x[i].sum);
        let isum = _mm256_sub_epi32(_mm256_madd_epi16(p[i], ones), offset);
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[i].d));
        acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum)));
    }
}

/// [`tiled!`] over the two groups of a stored pair, block by block (one sequential stream):
/// each block of the first group, then the same block of the second, with 256-bit tiles.
macro_rules! dual {
    ($tile:ident, $max:expr, $size:expr, $groups:expr, $blocks:expr, $xs:expr, $one:expr, $two:expr) => {{
        let rows = $one.len();
        debug_assert!(rows <= ROWS_PER_PASS && $two.len() == rows);
        let mut acc = [[const { MaybeUninit::<__m256>::uninit() }; ROWS_PER_PASS]; 2];
        let [one, two] = &mut acc;
        let mut acc = [
            zeroed(one, rows, _mm256_setzero_ps()),
            zeroed(two, rows, _mm256_setzero_ps()),
        ];
        for b in 0..$blocks {
            let blocks = [$groups[0].ptr(b), $groups[1].ptr(b)];
            prefetch_ahead(blocks[0], $groups[0].stride(), 2 * $size);
            for (block, acc) in blocks.into_iter().zip(acc.iter_mut()) {
                for_tiles!($tile, $max, block, $xs, $blocks, b, acc, rows);
            }
        }
        for (out, acc) in [$one, $two].into_iter().zip(&acc) {
            for (row, acc) in out.iter_mut().zip(acc.iter()) {
                _mm256_storeu_ps(row.as_mut_ptr(), *acc);
            }
        }
    }};
}

/// See `portable::q4k`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q4k_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(
        q4k_tile,
        TILE,
        Q4K_GROUP_BYTES,
        groups,
        blocks,
        xs,
        one,
        two
    )
}

/// See `portable::q5k`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q5k_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(
        q5k_tile,
        TILE,
        Q5K_GROUP_BYTES,
        groups,
        blocks,
        xs,
        one,
        two
    )
}

/// See `portable::q6k`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q6k_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(q6k_tile, TILE, GROUP * 210, groups, blocks, xs, one, two)
}

/// See `portable::q4_0`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q4_0_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(q4_0_tile, TILE, GROUP * 18, groups, blocks, xs, one, two)
}

/// See `portable::q8_0`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::kernels) unsafe fn q8_0_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(q8_0_tile, TILE, GROUP * 34, groups, blocks, xs, one, two)
}

/// `Q8K::quantize` (ggml's `quantize_row_q8_K`) eight values at a time: each value goes
/// through the same operations as in the scalar code, so the bytes are the same (tested,
/// with NaN, infinities and ties).
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(in crate::kernels) unsafe fn quantize_q8k(x: &[f32]) -> Q8K {
    assert_eq!(x.len(), QK_K);
    let p = x.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    // `max_ps` answers its second operand when either is NaN: NaN values are skipped, as
    // `f32::max` skips them.
    let mut m = _mm256_setzero_ps();
    for i in (0..QK_K).step_by(8) {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i))), m);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
    let mut out = Q8K::ZERO;
    if amax == 0.0 || amax.is_nan() {
        return out;
    }
    // The first value of that magnitude.
    let target = _mm256_set1_ps(amax);
    let mut max = amax;
    for i in (0..QK_K).step_by(8) {
        let v = _mm256_loadu_ps(p.add(i));
        let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
            _mm256_andnot_ps(sign, v),
            target,
        ));
        if hits != 0 {
            max = x[i + hits.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127f32 / max;
    let scale = _mm256_set1_ps(iscale);
    let (half, minus_half, one) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(-0.5),
        _mm256_set1_ps(1.0),
    );
    let (low, high) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    // `packs` works within each 128-bit half: this puts its four-byte groups back in row
    // order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in (0..QK_K).step_by(32) {
        let ints: [__m256i; 4] = std::array::from_fn(|j| {
            let v = _mm256_mul_ps(scale, _mm256_loadu_ps(p.add(i + 8 * j)));
            // `round_away`: the integer part, one more or less when the fraction reaches a
            // half (exact: small integers).
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let fraction = _mm256_sub_ps(v, t);
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(fraction, half), one);
            let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(fraction, minus_half), one);
            let r = _mm256_sub_ps(_mm256_add_ps(t, up), down);
            // `clamp`, and NaN to 0 as `as i8` makes it.
            let r = _mm256_min_ps(_mm256_max_ps(r, low), high);
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
            _mm256_cvttps_epi32(r)
        });
        let words = [
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        ];
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), order);
        _mm256_storeu_si256(out.qs.as_mut_ptr().add(i) as *mut __m256i, bytes);
    }
    out.set_sums();
    out.d = 1.0 / iscale;
    out
}
