//! AVX-512 VNNI kernels: `dpbusd` sums four products straight into 32 bits, on 256-bit
//! vectors for one group of eight columns and on 512-bit vectors for the two groups of a
//! stored pair. Each unpacked weight vector serves a tile of up to eight activation rows.

use super::*;
use crate::kernels::{GroupBlocks, Q8};

/// Adds `w * x` (unsigned weight bytes times signed activation bytes, four per lane) to `acc`.
#[inline(always)]
unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, x)
}

/// As [`sum256`] for 512-bit accumulators.
#[inline(always)]
unsafe fn sum512<const R: usize>(chains: &[[__m512i; R]; MAX_CHAINS], i: usize) -> __m512i {
    let [a, b, c, d] = chains;
    _mm512_add_epi32(_mm512_add_epi32(a[i], b[i]), _mm512_add_epi32(c[i], d[i]))
}

/// See `portable::q4k`. With VNNI, `dpbusd` sums four products straight into 32 bits, and
/// each sub-block's sum is multiplied by its scale afterwards; the integers are the same.
///
/// # Safety
/// The CPU must have AVX2, F16C, AVX-512 VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q4k_vnni(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(
        q4k_vnni_tile,
        TILE_VNNI,
        Q4K_GROUP_BYTES,
        group,
        blocks,
        xs,
        out
    )
}

#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn q4k_vnni_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    k4_vnni_tile::<R, false>(block, xs, blocks, b, first, acc)
}

#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn q5k_vnni_tile<const R: usize>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    k4_vnni_tile::<R, true>(block, xs, blocks, b, first, acc)
}

/// The Q4_K tile, or with `FIVE` the Q5_K one (the values' fifth bits put onto the
/// nibbles; `dpbusd` sums into 32 bits, so the runs need no split).
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn k4_vnni_tile<const R: usize, const FIVE: bool>(
    block: *const u8,
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m256],
) {
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let low = _mm256_set1_epi8(0x0F);
    let mut isum = [_mm256_setzero_si256(); R];
    for g in 0..4 {
        let scale_low = scales_u8(block.add(Q4K_SCALES + 16 * g));
        let scale_high = scales_u8(block.add(Q4K_SCALES + 16 * g + 8));
        let mut s_low = [[_mm256_setzero_si256(); R]; MAX_CHAINS];
        let mut s_high = [[_mm256_setzero_si256(); R]; MAX_CHAINS];
        for t in 0..8 {
            let packed = load(block.add(Q4K_QS + 32 * (8 * g + t)));
            let mut w_low = _mm256_and_si256(packed, low);
            let mut w_high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
            if FIVE {
                let (h_low, h_high) = fifth_bits(load(block.add(Q5K_QH + 32 * t)), g);
                w_low = _mm256_or_si256(w_low, h_low);
                w_high = _mm256_or_si256(w_high, h_high);
            }
            let (s_low, s_high) = (&mut s_low[t % chains(R)], &mut s_high[t % chains(R)]);
            for i in 0..R {
                let q = x[i].qs.as_ptr();
                s_low[i] = dot4(s_low[i], w_low, broadcast(q.add(64 * g + 4 * t)));
                s_high[i] = dot4(s_high[i], w_high, broadcast(q.add(64 * g + 32 + 4 * t)));
            }
        }
        for (i, isum) in isum.iter_mut().enumerate() {
            let s = _mm256_add_epi32(
                _mm256_mullo_epi32(sum256(&s_low, i), scale_low),
                _mm256_mullo_epi32(sum256(&s_high, i), scale_high),
            );
            *isum = _mm256_add_epi32(*isum, s);
        }
    }
    q4k_finish(block, &x, &isum, acc);
}

/// See `portable::q5k` and [`q4k_vnni`].
///
/// # Safety
/// The CPU must have AVX2, F16C, AVX-512 VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q5k_vnni(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(
        q5k_vnni_tile,
        TILE_VNNI,
        Q5K_GROUP_BYTES,
        group,
        blocks,
        xs,
        out
    )
}

/// See `portable::q6k` and [`q4k_vnni`].
///
/// # Safety
/// The CPU must have AVX2, F16C, AVX-512 VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q6k_vnni(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
) {
    tiled!(
        q6k_vnni_tile,
        TILE_VNNI,
        GROUP * 210,
        group,
        blocks,
        xs,
        out
    )
}

#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
#[inline]
unsafe fn q6k_vnni_tile<const R: usize>(
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
            let scale_low = scales_i8(scales.add(8 * (4 * g + half)));
            let scale_high = scales_i8(scales.add(8 * (4 * g + 2 + half)));
            let mut s_low = [[_mm256_setzero_si256(); R]; MAX_CHAINS];
            let mut s_high = [[_mm256_setzero_si256(); R]; MAX_CHAINS];
            for t in 4 * half..4 * half + 4 {
                let ql = load(block.add(Q6K_QL + 32 * (8 * g + t)));
                let qh = load(block.add(Q6K_QH + 32 * (8 * (g / 2) + t)));
                let (w_low, w_high) = q6k_unpack(ql, qh, g % 2 == 1, low, bits45);
                let (s_low, s_high) = (&mut s_low[t % chains(R)], &mut s_high[t % chains(R)]);
                for i in 0..R {
                    let q = x[i].qs.as_ptr();
                    s_low[i] = dot4(s_low[i], w_low, broadcast(q.add(64 * g + 4 * t)));
                    s_high[i] = dot4(s_high[i], w_high, broadcast(q.add(64 * g + 32 + 4 * t)));
                }
            }
            for (i, isum) in isum.iter_mut().enumerate() {
                let s = _mm256_add_epi32(
                    _mm256_mullo_epi32(sum256(&s_low, i), scale_low),
                    _mm256_mullo_epi32(sum256(&s_high, i), scale_high),
                );
                *isum = _mm256_add_epi32(*isum, s);
            }
        }
    }
    q6k_finish(block, &x, &isum, acc);
}

/// Two 32-byte vectors, at `a` and `b`, as one 512-bit vector (`a` in the low half).
#[inline(always)]
unsafe fn load_pair(a: *const u8, b: *const u8) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(a)), load(b))
}

/// Eight bytes at `a` and eight at `b` as sixteen 32-bit lanes (zero-extended).
#[inline(always)]
unsafe fn bytes_u8_pair(a: *const u8, b: *const u8) -> __m512i {
    let a = _mm_loadl_epi64(a as *const __m128i);
    let b = _mm_loadl_epi64(b as *const __m128i);
    _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(a, b))
}

/// As [`bytes_u8_pair`], sign-extended.
#[inline(always)]
unsafe fn bytes_i8_pair(a: *const u8, b: *const u8) -> __m512i {
    let a = _mm_loadl_epi64(a as *const __m128i);
    let b = _mm_loadl_epi64(b as *const __m128i);
    _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(a, b))
}

/// Eight f16 at `a` and eight at `b` as sixteen f32.
#[inline(always)]
unsafe fn halves_pair(a: *const u8, b: *const u8) -> __m512 {
    let a = _mm_loadu_si128(a as *const __m128i);
    let b = _mm_loadu_si128(b as *const __m128i);
    _mm512_cvtph_ps(_mm256_set_m128i(b, a))
}

/// [`fifth_bits`] for two groups' `qh` vectors.
#[inline(always)]
unsafe fn fifth_bits512(qh: __m512i, g: usize) -> (__m512i, __m512i) {
    let bit4 = _mm512_set1_epi8(0x10);
    let (low, high) = match g {
        0 => (_mm512_slli_epi16::<4>(qh), _mm512_slli_epi16::<3>(qh)),
        1 => (_mm512_slli_epi16::<2>(qh), _mm512_slli_epi16::<1>(qh)),
        2 => (qh, _mm512_srli_epi16::<1>(qh)),
        _ => (_mm512_srli_epi16::<2>(qh), _mm512_srli_epi16::<3>(qh)),
    };
    (_mm512_and_si512(low, bit4), _mm512_and_si512(high, bit4))
}

/// Four activation bytes broadcast to all sixteen lanes.
#[inline(always)]
unsafe fn broadcast512(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// `i16` pairs (`low`, `high`) per lane from two sets of sixteen 32-bit lanes.
#[inline(always)]
unsafe fn pack_pairs512(low: __m512i, high: __m512i) -> __m512i {
    let low = _mm512_and_si512(low, _mm512_set1_epi32(0xFFFF));
    _mm512_or_si512(low, _mm512_slli_epi32::<16>(high))
}

macro_rules! paired {
    ($tile:ident, $size:expr, $groups:expr, $blocks:expr, $xs:expr, $one:expr, $two:expr) => {
        paired!($tile, TILE_VNNI, $size, $groups, $blocks, $xs, $one, $two)
    };
    ($tile:ident, $max:expr, $size:expr, $groups:expr, $blocks:expr, $xs:expr, $one:expr, $two:expr) => {{
        let rows = $one.len();
        debug_assert!(rows <= ROWS_PER_PASS && $two.len() == rows);
        let mut acc = [const { MaybeUninit::<__m512>::uninit() }; ROWS_PER_PASS];
        let acc = zeroed(&mut acc, rows, _mm512_setzero_ps());
        for b in 0..$blocks {
            let blocks = [$groups[0].ptr(b), $groups[1].ptr(b)];
            prefetch_ahead(blocks[0], $groups[0].stride(), $size);
            prefetch_ahead(blocks[1], $groups[1].stride(), $size);
            for_tiles!($tile, $max, blocks, $xs, $blocks, b, acc, rows);
        }
        for ((one, two), acc) in $one.iter_mut().zip($two.iter_mut()).zip(acc.iter()) {
            let mut lanes = [0f32; 2 * GROUP];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
            one.copy_from_slice(&lanes[..GROUP]);
            two.copy_from_slice(&lanes[GROUP..]);
        }
    }};
}

/// [`q4k_vnni`] for two groups at once: lanes 0..8 are the first group's columns, 8..16 the
/// second's. Each lane does exactly what the 256-bit kernels do.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q4k_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(q4k_pair_tile, Q4K_GROUP_BYTES, groups, blocks, xs, one, two)
}

/// [`q5k_vnni`] for two groups at once, as [`q4k_pair`].
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q5k_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(q5k_pair_tile, Q5K_GROUP_BYTES, groups, blocks, xs, one, two)
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q4k_pair_tile<const R: usize>(
    block: [*const u8; 2],
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    k4_pair_tile::<R, false>(block, xs, blocks, b, first, acc)
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q5k_pair_tile<const R: usize>(
    block: [*const u8; 2],
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    k4_pair_tile::<R, true>(block, xs, blocks, b, first, acc)
}

/// [`k4_vnni_tile`] for the two groups of a pair.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn k4_pair_tile<const R: usize, const FIVE: bool>(
    block: [*const u8; 2],
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let [p0, p1] = block;
    let low = _mm512_set1_epi8(0x0F);
    let mut isum = [_mm512_setzero_si512(); R];
    for g in 0..4 {
        let at = Q4K_SCALES + 16 * g;
        let scale_low = bytes_u8_pair(p0.add(at), p1.add(at));
        let scale_high = bytes_u8_pair(p0.add(at + 8), p1.add(at + 8));
        let mut s_low = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
        let mut s_high = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
        for t in 0..8 {
            let at = Q4K_QS + 32 * (8 * g + t);
            let packed = load_pair(p0.add(at), p1.add(at));
            let mut w_low = _mm512_and_si512(packed, low);
            let mut w_high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
            if FIVE {
                let at = Q5K_QH + 32 * t;
                let (h_low, h_high) = fifth_bits512(load_pair(p0.add(at), p1.add(at)), g);
                w_low = _mm512_or_si512(w_low, h_low);
                w_high = _mm512_or_si512(w_high, h_high);
            }
            let (s_low, s_high) = (&mut s_low[t % chains(R)], &mut s_high[t % chains(R)]);
            for i in 0..R {
                let q = x[i].qs.as_ptr();
                let a = broadcast512(q.add(64 * g + 4 * t));
                let h = broadcast512(q.add(64 * g + 32 + 4 * t));
                s_low[i] = _mm512_dpbusd_epi32(s_low[i], w_low, a);
                s_high[i] = _mm512_dpbusd_epi32(s_high[i], w_high, h);
            }
        }
        for (i, isum) in isum.iter_mut().enumerate() {
            let s = _mm512_add_epi32(
                _mm512_mullo_epi32(sum512(&s_low, i), scale_low),
                _mm512_mullo_epi32(sum512(&s_high, i), scale_high),
            );
            *isum = _mm512_add_epi32(*isum, s);
        }
    }
    let mins: [__m512i; 4] = std::array::from_fn(|jp| {
        let at = Q4K_MINS + 16 * jp;
        pack_pairs512(
            bytes_u8_pair(p0.add(at), p1.add(at)),
            bytes_u8_pair(p0.add(at + 8), p1.add(at + 8)),
        )
    });
    let d = halves_pair(p0.add(Q4K_D), p1.add(Q4K_D));
    let dmin = halves_pair(p0.add(Q4K_DMIN), p1.add(Q4K_DMIN));
    for i in 0..R {
        let sums = x[i].sums32.as_ptr() as *const i8;
        let mut msum = _mm512_setzero_si512();
        for (jp, mins) in mins.iter().enumerate() {
            let s = _mm512_madd_epi16(*mins, broadcast512(sums.add(4 * jp)));
            msum = _mm512_add_epi32(msum, s);
        }
        let xd = _mm512_set1_ps(x[i].d);
        let t1 = _mm512_mul_ps(_mm512_mul_ps(xd, d), _mm512_cvtepi32_ps(isum[i]));
        let t2 = _mm512_mul_ps(_mm512_mul_ps(xd, dmin), _mm512_cvtepi32_ps(msum));
        acc[i] = _mm512_add_ps(acc[i], _mm512_sub_ps(t1, t2));
    }
}

/// [`q6k_vnni`] for two groups at once, as [`q4k_pair`].
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q6k_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(
        q6k_pair_tile,
        Q6K_TILE,
        GROUP * 210,
        groups,
        blocks,
        xs,
        one,
        two
    )
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q6k_pair_tile<const R: usize>(
    block: [*const u8; 2],
    xs: &[Q8K],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let [p0, p1] = block;
    let low = _mm512_set1_epi8(0x0F);
    let bits45 = _mm512_set1_epi8(0x30);
    let mut isum = [_mm512_setzero_si512(); R];
    for g in 0..4 {
        for half in 0..2 {
            let (a, h) = (
                Q6K_SCALES + 8 * (4 * g + half),
                Q6K_SCALES + 8 * (4 * g + 2 + half),
            );
            let scale_low = bytes_i8_pair(p0.add(a), p1.add(a));
            let scale_high = bytes_i8_pair(p0.add(h), p1.add(h));
            let mut s_low = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
            let mut s_high = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
            for t in 4 * half..4 * half + 4 {
                let (l, hb) = (Q6K_QL + 32 * (8 * g + t), Q6K_QH + 32 * (8 * (g / 2) + t));
                let ql = load_pair(p0.add(l), p1.add(l));
                let qh = load_pair(p0.add(hb), p1.add(hb));
                let (h_low, h_high) = if g % 2 == 1 {
                    (
                        _mm512_and_si512(qh, bits45),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(qh), bits45),
                    )
                } else {
                    (
                        _mm512_and_si512(_mm512_slli_epi16::<4>(qh), bits45),
                        _mm512_and_si512(_mm512_slli_epi16::<2>(qh), bits45),
                    )
                };
                let w_low = _mm512_or_si512(_mm512_and_si512(ql, low), h_low);
                let w_high =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low), h_high);
                let (s_low, s_high) = (&mut s_low[t % chains(R)], &mut s_high[t % chains(R)]);
                for i in 0..R {
                    let q = x[i].qs.as_ptr();
                    let a = broadcast512(q.add(64 * g + 4 * t));
                    let h = broadcast512(q.add(64 * g + 32 + 4 * t));
                    s_low[i] = _mm512_dpbusd_epi32(s_low[i], w_low, a);
                    s_high[i] = _mm512_dpbusd_epi32(s_high[i], w_high, h);
                }
            }
            for (i, isum) in isum.iter_mut().enumerate() {
                let s = _mm512_add_epi32(
                    _mm512_mullo_epi32(sum512(&s_low, i), scale_low),
                    _mm512_mullo_epi32(sum512(&s_high, i), scale_high),
                );
                *isum = _mm512_add_epi32(*isum, s);
            }
        }
    }
    let scale_pairs: [__m512i; 8] = std::array::from_fn(|k| {
        let at = Q6K_SCALES + 16 * k;
        pack_pairs512(
            bytes_i8_pair(p0.add(at), p1.add(at)),
            bytes_i8_pair(p0.add(at + 8), p1.add(at + 8)),
        )
    });
    let d = halves_pair(p0.add(Q6K_D), p1.add(Q6K_D));
    for i in 0..R {
        let sums = x[i].bsums.as_ptr() as *const i8;
        let mut bsum = _mm512_setzero_si512();
        for (k, pair) in scale_pairs.iter().enumerate() {
            let s = _mm512_madd_epi16(*pair, broadcast512(sums.add(4 * k)));
            bsum = _mm512_add_epi32(bsum, s);
        }
        let total = _mm512_sub_epi32(isum[i], _mm512_slli_epi32::<5>(bsum));
        let xd = _mm512_set1_ps(x[i].d);
        let t = _mm512_mul_ps(_mm512_mul_ps(xd, d), _mm512_cvtepi32_ps(total));
        acc[i] = _mm512_add_ps(acc[i], t);
    }
}

/// The AVX2 set's `q4_0` for two groups at once with VNNI: `dpbusd` takes the stored
/// (unsigned) values, and 8 times the block's activation sum is taken off.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q4_0_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(q4_0_pair_tile, GROUP * 18, groups, blocks, xs, one, two)
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q4_0_pair_tile<const R: usize>(
    block: [*const u8; 2],
    xs: &[Q8],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    let x: [&Q8; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let [p0, p1] = block;
    let low = _mm512_set1_epi8(0x0F);
    let mut isum = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
    for t in 0..4 {
        let at = Q40_QS + 32 * t;
        let packed = load_pair(p0.add(at), p1.add(at));
        let w_low = _mm512_and_si512(packed, low);
        let w_high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
        let isum = &mut isum[t % chains(R)];
        for i in 0..R {
            let q = x[i].qs.as_ptr();
            isum[i] = _mm512_dpbusd_epi32(isum[i], w_low, broadcast512(q.add(4 * t)));
            isum[i] = _mm512_dpbusd_epi32(isum[i], w_high, broadcast512(q.add(16 + 4 * t)));
        }
    }
    let d = halves_pair(p0.add(Q40_D), p1.add(Q40_D));
    q8_pair_finish(d, &x, &isum, 8, acc);
}

/// The float step of a pair of Q4_0 or Q8_0 group blocks: each row's integer sums less
/// `offset` times its activation sum (what the stored weights add to their values),
/// times the scales.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q8_pair_finish<const R: usize>(
    d: __m512,
    x: &[&Q8; R],
    isum: &[[__m512i; R]; MAX_CHAINS],
    offset: i32,
    acc: &mut [__m512],
) {
    for i in 0..R {
        let correction = _mm512_set1_epi32(offset * x[i].sum);
        let total = _mm512_sub_epi32(sum512(isum, i), correction);
        let scale = _mm512_mul_ps(d, _mm512_set1_ps(x[i].d));
        acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(total)));
    }
}

/// The AVX2 set's `q8_0` for two groups at once with VNNI: the signed weights are offset by 128 to be
/// unsigned for `dpbusd`, and 128 times the block's activation sum is taken off again, so
/// the integer is the same as the portable kernel's.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) unsafe fn q8_0_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(q8_0_pair_tile, GROUP * 34, groups, blocks, xs, one, two)
}

#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q8_0_pair_tile<const R: usize>(
    block: [*const u8; 2],
    xs: &[Q8],
    blocks: usize,
    b: usize,
    first: usize,
    acc: &mut [__m512],
) {
    let x: [&Q8; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let [p0, p1] = block;
    let offset = _mm512_set1_epi8(-128);
    let mut isum = [[_mm512_setzero_si512(); R]; MAX_CHAINS];
    for t in 0..8 {
        let at = Q8_QS + 32 * t;
        let w = _mm512_xor_si512(load_pair(p0.add(at), p1.add(at)), offset);
        let isum = &mut isum[t % chains(R)];
        for i in 0..R {
            isum[i] = _mm512_dpbusd_epi32(isum[i], w, broadcast512(x[i].qs.as_ptr().add(4 * t)));
        }
    }
    let d = halves_pair(p0.add(Q8_D), p1.add(Q8_D));
    q8_pair_finish(d, &x, &isum, 128, acc);
}
