//! AVX2 kernels on the interleaved layout: a 256-bit vector holds four values of each of
//! eight output columns, four activation values are broadcast to all lanes, `maddubs`
//! multiplies (unsigned weight times signed activation, pairs summed in 16 bits, which
//! cannot overflow for these value ranges) and `madd` applies each column's integer scale
//! while summing to 32 bits. Each unpacked weight vector serves a tile of up to four
//! activation rows. The float step per column is the one of `portable`, lane by lane, so
//! both give bit-identical results.

use super::packed_layout::*;
use super::GroupBlocks;
use super::{GROUP, Q8, Q8K, QK_K, ROWS_PER_PASS};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Activation rows sharing one unpacked weight vector: four with AVX2's 16 vector registers,
/// eight with AVX-512's 32.
const TILE: usize = 4;
const TILE_VNNI: usize = 8;
/// Q6_K unpacks into more registers: fewer rows per tile.
const Q6K_TILE: usize = 6;

/// Independent integer accumulators per activation row in a tile of `rows` rows. A
/// `dpbusd` waits for the one before it on the same accumulator (4-5 cycles), so a tile of
/// one or two rows would wait on that chain rather than on the arithmetic or the memory; it
/// spreads its products over several accumulators, summed at the end. Integer sums, so the
/// result is the same.
const fn chains(rows: usize) -> usize {
    match rows {
        1 => 4,
        2 => 2,
        _ => 1,
    }
}

/// Most accumulators per row [`chains`] asks for.
const MAX_CHAINS: usize = 4;

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Four activation bytes at `p`, broadcast to every 32-bit lane.
#[inline(always)]
unsafe fn broadcast(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// Eight f16 at `p` as f32.
#[inline(always)]
unsafe fn halves(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Eight bytes at `a` and `b` (one per column) as `i16` pairs: `a` low, `b` high, per lane.
#[inline(always)]
unsafe fn pairs_u8(a: *const u8, b: *const u8) -> __m256i {
    let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(a as *const __m128i));
    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b as *const __m128i));
    _mm256_or_si256(a, _mm256_slli_epi32::<16>(b))
}

/// As [`pairs_u8`] for signed bytes.
#[inline(always)]
unsafe fn pairs_i8(a: *const u8, b: *const u8) -> __m256i {
    let a = _mm256_cvtepi8_epi32(_mm_loadl_epi64(a as *const __m128i));
    let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b as *const __m128i));
    let low = _mm256_and_si256(a, _mm256_set1_epi32(0xFFFF));
    _mm256_or_si256(low, _mm256_slli_epi32::<16>(b))
}

/// Two `i16` at `p` as one 32-bit value broadcast to every lane.
#[inline(always)]
unsafe fn broadcast_pair(p: *const i16) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// Group blocks ahead of the one being computed that are fetched into cache, so that
/// reading the weights overlaps the arithmetic on the rows.
const PREFETCH_AHEAD: usize = 4;

/// Asks for the `size` bytes of the block `PREFETCH_AHEAD` strides after `block` (near a
/// group's end, the start of the next pair of groups) to be brought into L2, not L1: a
/// burst of L1 prefetches fills the L1's few miss buffers and stalls the loads the
/// arithmetic waits on. On an AMD EPYC (Zen 4) this doubled the speed of a Q6_K product
/// whose weights come from memory (`kernel_bench --from-memory`). Never faults, even past
/// the end.
#[inline(always)]
unsafe fn prefetch_ahead(block: *const u8, stride: usize, size: usize) {
    let ahead = block.wrapping_add(PREFETCH_AHEAD * stride);
    for line in (0..size).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line) as *const i8);
    }
}

/// The first `rows` of `acc`, set to `zero`. A kernel call zeroes only the accumulators of
/// the rows it has: zeroing all 64 in every call of one row was 5% of a decoding step.
#[inline(always)]
fn zeroed<T: Copy>(acc: &mut [MaybeUninit<T>], rows: usize, zero: T) -> &mut [T] {
    let acc = &mut acc[..rows];
    for a in acc.iter_mut() {
        a.write(zero);
    }
    // SAFETY: every element of `acc` was just initialized, and `MaybeUninit<T>` has the
    // layout of `T`.
    unsafe { &mut *(acc as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Calls `$tile::<n>($block, $xs, $blocks, $b, first, &mut $acc[first..first + n])` for
/// row tiles of at most `$max` rows (`n` a constant, so each tile is unrolled).
macro_rules! for_tiles {
    ($tile:ident, $max:expr, $block:expr, $xs:expr, $blocks:expr, $b:expr, $acc:expr, $rows:expr) => {{
        let mut first = 0;
        while first < $rows {
            let n = ($rows - first).min($max);
            let acc = &mut $acc[first..first + n];
            match n {
                8 => $tile::<8>($block, $xs, $blocks, $b, first, acc),
                7 => $tile::<7>($block, $xs, $blocks, $b, first, acc),
                6 => $tile::<6>($block, $xs, $blocks, $b, first, acc),
                5 => $tile::<5>($block, $xs, $blocks, $b, first, acc),
                4 => $tile::<4>($block, $xs, $blocks, $b, first, acc),
                3 => $tile::<3>($block, $xs, $blocks, $b, first, acc),
                2 => $tile::<2>($block, $xs, $blocks, $b, first, acc),
                _ => $tile::<1>($block, $xs, $blocks, $b, first, acc),
            }
            first += n;
        }
    }};
}

macro_rules! tiled {
    ($tile:ident, $size:expr, $group:expr, $blocks:expr, $xs:expr, $out:expr) => {
        tiled!($tile, TILE, $size, $group, $blocks, $xs, $out)
    };
    ($tile:ident, $max:expr, $size:expr, $group:expr, $blocks:expr, $xs:expr, $out:expr) => {{
        let rows = $out.len();
        debug_assert!(rows <= ROWS_PER_PASS);
        let mut acc = [const { MaybeUninit::<__m256>::uninit() }; ROWS_PER_PASS];
        let acc = zeroed(&mut acc, rows, _mm256_setzero_ps());
        for b in 0..$blocks {
            let block = $group.ptr(b);
            prefetch_ahead(block, $group.stride(), $size);
            for_tiles!($tile, $max, block, $xs, $blocks, b, acc, rows);
        }
        for (row, acc) in $out.iter_mut().zip(acc.iter()) {
            _mm256_storeu_ps(row.as_mut_ptr(), *acc);
        }
    }};
}

/// See `portable::q4k`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q4k(
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
    let x: [&Q8K; R] = std::array::from_fn(|i| &xs[(first + i) * blocks + b]);
    let low = _mm256_set1_epi8(0x0F);
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
        let mut p_low = [_mm256_setzero_si256(); R];
        let mut p_high = [_mm256_setzero_si256(); R];
        for t in 0..8 {
            let packed = load(block.add(Q4K_QS + 32 * (8 * g + t)));
            let w_low = _mm256_and_si256(packed, low);
            let w_high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
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
    q4k_finish(block, &x, &isum, acc);
}

/// See `portable::q6k`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q6k(
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

/// The 64 stored values of one Q6_K vector pair: low nibbles of `ql` with the high bits of
/// `qh` for the first 32 values of the group, high nibbles for the next 32. `odd`: the
/// group's bits are 4..8 of `qh`, not 0..4.
#[inline(always)]
unsafe fn q6k_unpack(
    ql: __m256i,
    qh: __m256i,
    odd: bool,
    low: __m256i,
    bits45: __m256i,
) -> (__m256i, __m256i) {
    let (h_low, h_high) = if odd {
        (
            _mm256_and_si256(qh, bits45),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45),
        )
    } else {
        (
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45),
        )
    };
    let w_low = _mm256_or_si256(_mm256_and_si256(ql, low), h_low);
    let w_high = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql), low), h_high);
    (w_low, w_high)
}

/// The offset correction and the float step of a Q6_K group block.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q6k_finish<const R: usize>(
    block: *const u8,
    x: &[&Q8K; R],
    isum: &[__m256i; R],
    acc: &mut [__m256],
) {
    let scales = block.add(Q6K_SCALES);
    let scale_pairs: [__m256i; 8] =
        std::array::from_fn(|k| pairs_i8(scales.add(16 * k), scales.add(16 * k + 8)));
    let d = halves(block.add(Q6K_D));
    for i in 0..R {
        let sums = x[i].bsums.as_ptr();
        let mut bsum = _mm256_setzero_si256();
        for (k, pair) in scale_pairs.iter().enumerate() {
            let s = _mm256_madd_epi16(*pair, broadcast_pair(sums.add(2 * k)));
            bsum = _mm256_add_epi32(bsum, s);
        }
        let total = _mm256_sub_epi32(isum[i], _mm256_slli_epi32::<5>(bsum));
        let xd = _mm256_set1_ps(x[i].d);
        let t = _mm256_mul_ps(_mm256_mul_ps(xd, d), _mm256_cvtepi32_ps(total));
        acc[i] = _mm256_add_ps(acc[i], t);
    }
}

/// See `portable::q8_0`. Activations must lie in -127..=127 (as `Q8::quantize` makes them):
/// the sign trick below cannot negate -128.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q8_0(
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

/// Adds `w * x` (unsigned weight bytes times signed activation bytes, four per lane) to `acc`.
#[inline(always)]
unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, x)
}

/// Row `i`'s accumulators of every chain ([`chains`]), summed.
#[inline(always)]
unsafe fn sum256<const R: usize>(chains: &[[__m256i; R]; MAX_CHAINS], i: usize) -> __m256i {
    let [a, b, c, d] = chains;
    _mm256_add_epi32(_mm256_add_epi32(a[i], b[i]), _mm256_add_epi32(c[i], d[i]))
}

/// As [`sum256`] for 512-bit accumulators.
#[inline(always)]
unsafe fn sum512<const R: usize>(chains: &[[__m512i; R]; MAX_CHAINS], i: usize) -> __m512i {
    let [a, b, c, d] = chains;
    _mm512_add_epi32(_mm512_add_epi32(a[i], b[i]), _mm512_add_epi32(c[i], d[i]))
}

/// Column scales as `i32` from eight bytes at `p`.
#[inline(always)]
unsafe fn scales_u8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// As [`scales_u8`] for signed bytes.
#[inline(always)]
unsafe fn scales_i8(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// See `portable::q4k`. With VNNI, `dpbusd` sums four products straight into 32 bits, and
/// each sub-block's sum is multiplied by its scale afterwards; the integers are the same.
///
/// # Safety
/// The CPU must have AVX2, F16C, AVX-512 VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
pub(super) unsafe fn q4k_vnni(
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
            let w_low = _mm256_and_si256(packed, low);
            let w_high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
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

/// The mins and the float step of a Q4_K group block, shared by both x86 kernels.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q4k_finish<const R: usize>(
    block: *const u8,
    x: &[&Q8K; R],
    isum: &[__m256i; R],
    acc: &mut [__m256],
) {
    let mins: [__m256i; 4] = [
        pairs_u8(block.add(Q4K_MINS), block.add(Q4K_MINS + 8)),
        pairs_u8(block.add(Q4K_MINS + 16), block.add(Q4K_MINS + 24)),
        pairs_u8(block.add(Q4K_MINS + 32), block.add(Q4K_MINS + 40)),
        pairs_u8(block.add(Q4K_MINS + 48), block.add(Q4K_MINS + 56)),
    ];
    let d = halves(block.add(Q4K_D));
    let dmin = halves(block.add(Q4K_DMIN));
    for i in 0..R {
        let sums = x[i].sums32.as_ptr();
        let mut msum = _mm256_setzero_si256();
        for (jp, mins) in mins.iter().enumerate() {
            let s = _mm256_madd_epi16(*mins, broadcast_pair(sums.add(2 * jp)));
            msum = _mm256_add_epi32(msum, s);
        }
        let xd = _mm256_set1_ps(x[i].d);
        let t1 = _mm256_mul_ps(_mm256_mul_ps(xd, d), _mm256_cvtepi32_ps(isum[i]));
        let t2 = _mm256_mul_ps(_mm256_mul_ps(xd, dmin), _mm256_cvtepi32_ps(msum));
        acc[i] = _mm256_add_ps(acc[i], _mm256_sub_ps(t1, t2));
    }
}

/// See `portable::q6k` and [`q4k_vnni`].
///
/// # Safety
/// The CPU must have AVX2, F16C, AVX-512 VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,f16c,avx512vl,avx512vnni")]
pub(super) unsafe fn q6k_vnni(
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
pub(super) unsafe fn q4k_dual(
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

/// See `portable::q6k`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q6k_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(q6k_tile, TILE, GROUP * 210, groups, blocks, xs, one, two)
}

/// See `portable::q8_0`, for the two groups of a stored pair (AVX2).
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q8_0_dual(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    dual!(q8_0_tile, TILE, GROUP * 34, groups, blocks, xs, one, two)
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
pub(super) unsafe fn q4k_pair(
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    xs: &[Q8K],
    one: &mut [[f32; GROUP]],
    two: &mut [[f32; GROUP]],
) {
    paired!(q4k_pair_tile, Q4K_GROUP_BYTES, groups, blocks, xs, one, two)
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
            let w_low = _mm512_and_si512(packed, low);
            let w_high = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
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
pub(super) unsafe fn q6k_pair(
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

/// [`q8_0`] for two groups at once with VNNI: the signed weights are offset by 128 to be
/// unsigned for `dpbusd`, and 128 times the block's activation sum is taken off again, so
/// the integer is the same as the portable kernel's.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn q8_0_pair(
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
    for i in 0..R {
        let correction = _mm512_set1_epi32(128 * x[i].sum);
        let total = _mm512_sub_epi32(sum512(&isum, i), correction);
        let scale = _mm512_mul_ps(d, _mm512_set1_ps(x[i].d));
        acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(total)));
    }
}

/// `Q8K::quantize` (ggml's `quantize_row_q8_K`) eight values at a time: each value goes
/// through the same operations as in the scalar code, so the bytes are the same (tested,
/// with NaN, infinities and ties).
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_q8k(x: &[f32]) -> Q8K {
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
