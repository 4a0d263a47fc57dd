//! The kernels in plain Rust, one output element at a time: the reference the vector code
//! must match bit for bit, and what runs on CPUs without AVX2.

use super::packed_layout::*;
use super::GroupBlocks;
use super::{q4k_accumulate, q6k_accumulate, q8_0_accumulate, GROUP, Q8, Q8K, QK8_0, QK_K};

/// `out[r][c]` for a group of Q4_K rows (`blocks` group blocks) and `out.len()` activation
/// rows, `xs` holding `blocks` blocks per row.
pub(super) fn q4k(group: GroupBlocks<'_>, blocks: usize, xs: &[Q8K], out: &mut [[f32; GROUP]]) {
    k4(group, blocks, xs, out, q4k_value)
}

/// As [`q4k`], for Q5_K rows: the same scales, mins and float step, values 0..32.
pub(super) fn q5k(group: GroupBlocks<'_>, blocks: usize, xs: &[Q8K], out: &mut [[f32; GROUP]]) {
    k4(group, blocks, xs, out, q5k_value)
}

/// Q4_K's product, its weights' values read by `value` (Q4_K's or Q5_K's).
fn k4(
    group: GroupBlocks<'_>,
    blocks: usize,
    xs: &[Q8K],
    out: &mut [[f32; GROUP]],
    value: fn(&[u8], usize, usize) -> u8,
) {
    for (r, row) in out.iter_mut().enumerate() {
        for (c, acc) in row.iter_mut().enumerate() {
            *acc = 0.0;
            for (b, block) in (0..blocks).map(|b| (b, group.block(b))) {
                let x = &xs[r * blocks + b];
                let (mut isum, mut msum) = (0i32, 0i32);
                for j in 0..8 {
                    let dot: i32 = (32 * j..32 * j + 32)
                        .map(|v| value(block, c, v) as i32 * x.qs[v] as i32)
                        .sum();
                    isum += block[Q4K_SCALES + 8 * j + c] as i32 * dot;
                    msum += block[Q4K_MINS + 8 * j + c] as i32 * x.sums32[j] as i32;
                }
                let (d, dmin) = (d(block, Q4K_D, c), d(block, Q4K_DMIN, c));
                *acc = q4k_accumulate(*acc, x.d, d, dmin, isum, msum);
            }
        }
    }
}

/// As [`q4k`], for Q6_K rows.
pub(super) fn q6k(group: GroupBlocks<'_>, blocks: usize, xs: &[Q8K], out: &mut [[f32; GROUP]]) {
    for (r, row) in out.iter_mut().enumerate() {
        for (c, acc) in row.iter_mut().enumerate() {
            *acc = 0.0;
            for (b, block) in (0..blocks).map(|b| (b, group.block(b))) {
                let x = &xs[r * blocks + b];
                let (mut isum, mut bsum) = (0i32, 0i32);
                for s in 0..QK_K / 16 {
                    let scale = block[Q6K_SCALES + 8 * s + c] as i8 as i32;
                    let dot: i32 = (16 * s..16 * s + 16)
                        .map(|v| q6k_value(block, c, v) as i32 * x.qs[v] as i32)
                        .sum();
                    isum += scale * dot;
                    bsum += scale * x.bsums[s] as i32;
                }
                *acc = q6k_accumulate(*acc, x.d, d(block, Q6K_D, c), isum, bsum);
            }
        }
    }
}

/// As [`q4k`], for Q4_0 rows (with Q8_0's activations and float step).
pub(super) fn q4_0(group: GroupBlocks<'_>, blocks: usize, xs: &[Q8], out: &mut [[f32; GROUP]]) {
    for (r, row) in out.iter_mut().enumerate() {
        for (c, acc) in row.iter_mut().enumerate() {
            *acc = 0.0;
            for (b, block) in (0..blocks).map(|b| (b, group.block(b))) {
                let x = &xs[r * blocks + b];
                let stored: i32 = (0..QK8_0)
                    .map(|v| q4_0_value(block, c, v) as i32 * x.qs[v] as i32)
                    .sum();
                let isum = stored - 8 * x.sum;
                *acc = q8_0_accumulate(*acc, x.d, d(block, Q40_D, c), isum);
            }
        }
    }
}

/// As [`q4k`], for Q8_0 rows.
pub(super) fn q8_0(group: GroupBlocks<'_>, blocks: usize, xs: &[Q8], out: &mut [[f32; GROUP]]) {
    for (r, row) in out.iter_mut().enumerate() {
        for (c, acc) in row.iter_mut().enumerate() {
            *acc = 0.0;
            for (b, block) in (0..blocks).map(|b| (b, group.block(b))) {
                let x = &xs[r * blocks + b];
                let isum: i32 = (0..QK8_0)
                    .map(|v| q8_value(block, c, v) as i32 * x.qs[v] as i32)
                    .sum();
                *acc = q8_0_accumulate(*acc, x.d, d(block, Q8_D, c), isum);
            }
        }
    }
}
