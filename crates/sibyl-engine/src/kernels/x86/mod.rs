//! The x86-64 kernels on the interleaved layout (`packed_layout`): the 256-bit building
//! blocks both sets use here, the AVX2 set in [`avx2`] and the AVX-512 VNNI set in
//! [`avx512`]. The float step per column is the one of `portable`, lane by lane, so every
//! set gives bit-identical results.

use super::packed_layout::*;
use super::{GROUP, Q8K, QK_K, ROWS_PER_PASS};
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

/// The fifth bits of the Q5_K values in one `qh` vector (`packed_layout`) that go with
/// the nibbles of vector `8g + t`: those of values `64g + 4t + i` (the low nibbles) and of
/// `64g + 32 + 4t + i` (the high ones), each moved to bit 4 of its byte. The 16-bit shifts
/// move no bit that the mask keeps across a byte's edge.
#[inline(always)]
unsafe fn fifth_bits(qh: __m256i, g: usize) -> (__m256i, __m256i) {
    let bit4 = _mm256_set1_epi8(0x10);
    let (low, high) = match g {
        0 => (_mm256_slli_epi16::<4>(qh), _mm256_slli_epi16::<3>(qh)),
        1 => (_mm256_slli_epi16::<2>(qh), _mm256_slli_epi16::<1>(qh)),
        2 => (qh, _mm256_srli_epi16::<1>(qh)),
        _ => (_mm256_srli_epi16::<2>(qh), _mm256_srli_epi16::<3>(qh)),
    };
    (_mm256_and_si256(low, bit4), _mm256_and_si256(high, bit4))
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

/// Row `i`'s accumulators of every chain ([`chains`]), summed.
#[inline(always)]
unsafe fn sum256<const R: usize>(chains: &[[__m256i; R]; MAX_CHAINS], i: usize) -> __m256i {
    let [a, b, c, d] = chains;
    _mm256_add_epi32(_mm256_add_epi32(a[i], b[i]), _mm256_add_epi32(c[i], d[i]))
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

/// The mins and the float step of a Q4_K or Q5_K group block, shared by both x86 kernels.
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

// After the macros above: the sets use them.
mod avx2;
mod avx512;

pub(super) use avx2::{
    q4_0, q4_0_dual, q4k, q4k_dual, q5k, q5k_dual, q6k, q6k_dual, q8_0, q8_0_dual, quantize_q8k,
};
pub(super) use avx512::{
    q4_0_pair, q4k_pair, q4k_vnni, q5k_pair, q5k_vnni, q6k_pair, q6k_vnni, q8_0_pair,
};
