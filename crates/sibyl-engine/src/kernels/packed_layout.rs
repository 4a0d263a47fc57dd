//! The interleaved block layouts of [`super::Packed`]: one "group block" holds block `b` of
//! eight weight rows (columns `c` = 0..8 of the output). Four consecutive values of one
//! column are one 32-bit lane, so a 32-byte vector holds four values of each of the eight
//! columns. Offsets are in bytes from the start of the group block.
//!
//! - **Q4_K** (1184 bytes): `d` `[f16; 8]` at [`Q4K_D`], `dmin` at [`Q4K_DMIN`], the 6-bit
//!   scales `[sub-block 8][column 8]` (u8) at [`Q4K_SCALES`], the mins likewise at
//!   [`Q4K_MINS`], then at [`Q4K_QS`] `[g 4][t 8][column 8][i 4]` bytes whose low nibble is
//!   value `64g + 4t + i` and high nibble value `64g + 32 + 4t + i` (exactly the GGUF byte
//!   `qs[32g + 4t + i]`).
//! - **Q5_K** (1440 bytes): Q4_K's layout, the low four bits of each value in its nibbles,
//!   then at [`Q5K_QH`] the fifth bits as `[t 8][column 8][i 4]` bytes (exactly the GGUF
//!   byte `qh[4t + i]`): bit `2g` is the fifth bit of value `64g + 4t + i`, bit `2g + 1` that
//!   of value `64g + 32 + 4t + i`.
//! - **Q6_K** (1680 bytes): `d` at [`Q6K_D`], scales `[16][column 8]` (i8) at
//!   [`Q6K_SCALES`], low four bits at [`Q6K_QL`] laid out like Q4_K's nibbles, high two bits
//!   at [`Q6K_QH`] as `[h 2][t 8][column 8][i 4]` bytes holding, from bit 0 up, the high bits
//!   of values `128h + 4t + i`, `+ 32`, `+ 64`, `+ 96`.
//! - **Q4_0** (144 bytes): `d` at [`Q40_D`], then at [`Q40_QS`] `[t 4][column 8][i 4]`
//!   bytes (exactly the GGUF byte `qs[4t + i]`) whose low nibble is value `4t + i` and high
//!   nibble value `16 + 4t + i`, each the weight plus 8.
//! - **Q8_0** (272 bytes): `d` at [`Q8_D`], then at [`Q8_QS`] `[t 8][column 8][i 4]` signed
//!   bytes, value `4t + i`.

use super::{q4k_scales_mins, q6k_values, GROUP, QK8_0, QK_K};
use half::f16;

pub(crate) const Q4K_D: usize = 0;
pub(crate) const Q4K_DMIN: usize = 16;
pub(crate) const Q4K_SCALES: usize = 32;
pub(crate) const Q4K_MINS: usize = 96;
pub(crate) const Q4K_QS: usize = 160;
pub(crate) const Q4K_GROUP_BYTES: usize = Q4K_QS + 1024;
pub(crate) const Q5K_QH: usize = Q4K_GROUP_BYTES;
pub(crate) const Q5K_GROUP_BYTES: usize = Q5K_QH + 256;
pub(crate) const Q6K_D: usize = 0;
pub(crate) const Q6K_SCALES: usize = 16;
pub(crate) const Q6K_QL: usize = 144;
pub(crate) const Q6K_QH: usize = 1168;
pub(crate) const Q40_D: usize = 0;
pub(crate) const Q40_QS: usize = 16;
pub(crate) const Q8_D: usize = 0;
pub(crate) const Q8_QS: usize = 16;

/// Byte `i` of lane `c` in vector `v` of a 32-byte-per-vector array.
fn lane(v: usize, c: usize, i: usize) -> usize {
    v * 32 + c * 4 + i
}

pub(super) fn pack_q4k(blocks: &[&[u8]; GROUP], out: &mut [u8]) {
    for (c, block) in blocks.iter().enumerate() {
        pack_q4k_column(c, &block[..16], &block[16..144], out);
    }
}

/// Column `c` of Q4_K's part of the layout: `head` is a block's `d`, `dmin` and packed
/// scales (16 bytes, the same in Q4_K and Q5_K), `qs` its 128 bytes of nibbles.
fn pack_q4k_column(c: usize, head: &[u8], qs: &[u8], out: &mut [u8]) {
    out[Q4K_D + 2 * c..][..2].copy_from_slice(&head[0..2]);
    out[Q4K_DMIN + 2 * c..][..2].copy_from_slice(&head[2..4]);
    let (scales, mins) = q4k_scales_mins(&head[4..16]);
    for j in 0..8 {
        out[Q4K_SCALES + 8 * j + c] = scales[j];
        out[Q4K_MINS + 8 * j + c] = mins[j];
    }
    for g in 0..4 {
        for t in 0..8 {
            for i in 0..4 {
                out[Q4K_QS + lane(8 * g + t, c, i)] = qs[32 * g + 4 * t + i];
            }
        }
    }
}

/// GGUF's Q5_K block: `d`, `dmin`, scales (16 bytes), `qh` (32), `qs` (128).
pub(super) fn pack_q5k(blocks: &[&[u8]; GROUP], out: &mut [u8]) {
    for (c, block) in blocks.iter().enumerate() {
        pack_q4k_column(c, &block[..16], &block[48..176], out);
        let qh = &block[16..48];
        for t in 0..8 {
            for i in 0..4 {
                out[Q5K_QH + lane(t, c, i)] = qh[4 * t + i];
            }
        }
    }
}

pub(super) fn pack_q6k(blocks: &[&[u8]; GROUP], out: &mut [u8]) {
    for (c, block) in blocks.iter().enumerate() {
        out[Q6K_D + 2 * c..][..2].copy_from_slice(&block[208..210]);
        for s in 0..16 {
            out[Q6K_SCALES + 8 * s + c] = block[192 + s];
        }
        let v = q6k_values(block);
        for g in 0..4 {
            for t in 0..8 {
                for i in 0..4 {
                    let (low, high) = (v[64 * g + 4 * t + i], v[64 * g + 32 + 4 * t + i]);
                    out[Q6K_QL + lane(8 * g + t, c, i)] = (low & 0xF) | ((high & 0xF) << 4);
                }
            }
        }
        for h in 0..2 {
            for t in 0..8 {
                for i in 0..4 {
                    let at = 128 * h + 4 * t + i;
                    let bits = (v[at] >> 4)
                        | ((v[at + 32] >> 4) << 2)
                        | ((v[at + 64] >> 4) << 4)
                        | ((v[at + 96] >> 4) << 6);
                    out[Q6K_QH + lane(8 * h + t, c, i)] = bits;
                }
            }
        }
    }
}

pub(super) fn pack_q4_0(blocks: &[&[u8]; GROUP], out: &mut [u8]) {
    for (c, block) in blocks.iter().enumerate() {
        out[Q40_D + 2 * c..][..2].copy_from_slice(&block[0..2]);
        for t in 0..4 {
            for i in 0..4 {
                out[Q40_QS + lane(t, c, i)] = block[2 + 4 * t + i];
            }
        }
    }
}

pub(super) fn pack_q8_0(blocks: &[&[u8]; GROUP], out: &mut [u8]) {
    for (c, block) in blocks.iter().enumerate() {
        out[Q8_D + 2 * c..][..2].copy_from_slice(&block[0..2]);
        for t in 0..8 {
            for i in 0..4 {
                out[Q8_QS + lane(t, c, i)] = block[2 + 4 * t + i];
            }
        }
    }
}

/// Column `c` of the eight f16 scales at `at` (`d` or `dmin`), as f32.
pub(crate) fn d(block: &[u8], at: usize, c: usize) -> f32 {
    f16::from_le_bytes([block[at + 2 * c], block[at + 2 * c + 1]]).to_f32()
}

/// Value `v` (0..256) of column `c` in a Q4_K group block: 0..16.
pub(crate) fn q4k_value(block: &[u8], c: usize, v: usize) -> u8 {
    let (g, rest) = (v / 64, v % 64);
    let byte = block[Q4K_QS + lane(8 * g + (rest % 32) / 4, c, rest % 4)];
    if rest < 32 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// Value `v` (0..256) of column `c` in a Q5_K group block: 0..32.
pub(crate) fn q5k_value(block: &[u8], c: usize, v: usize) -> u8 {
    let (g, rest) = (v / 64, v % 64);
    let l = rest % 32;
    let bit = 2 * g + usize::from(rest >= 32);
    let fifth = (block[Q5K_QH + lane(l / 4, c, l % 4)] >> bit) & 1;
    q4k_value(block, c, v) | (fifth << 4)
}

/// Stored value `v` (0..256) of column `c` in a Q6_K group block: 0..64, the weight plus 32.
pub(crate) fn q6k_value(block: &[u8], c: usize, v: usize) -> u8 {
    let (g, rest) = (v / 64, v % 64);
    let (t, i) = ((rest % 32) / 4, rest % 4);
    let low = block[Q6K_QL + lane(8 * g + t, c, i)];
    let low = if rest < 32 { low & 0xF } else { low >> 4 };
    let (h, quarter) = (v / 128, (v % 128) / 32);
    let high = (block[Q6K_QH + lane(8 * h + t, c, i)] >> (2 * quarter)) & 3;
    low | (high << 4)
}

/// Stored value `v` (0..32) of column `c` in a Q4_0 group block: 0..16, the weight plus 8.
pub(crate) fn q4_0_value(block: &[u8], c: usize, v: usize) -> u8 {
    let byte = block[Q40_QS + lane((v % 16) / 4, c, v % 4)];
    if v < 16 {
        byte & 0xF
    } else {
        byte >> 4
    }
}

/// Value `v` (0..32) of column `c` in a Q8_0 group block.
pub(crate) fn q8_value(block: &[u8], c: usize, v: usize) -> i8 {
    block[Q8_QS + lane(v / 4, c, v % 4)] as i8
}

/// Column `c` of a group block as floats, with candle's arithmetic (bit-identical).
pub(super) fn dequantize(kind: super::Kind, block: &[u8], c: usize, out: &mut [f32]) {
    match kind {
        super::Kind::Q4K | super::Kind::Q5K => {
            let value = if kind == super::Kind::Q4K {
                q4k_value
            } else {
                q5k_value
            };
            let (d, dmin) = (d(block, Q4K_D, c), d(block, Q4K_DMIN, c));
            for (v, y) in out.iter_mut().enumerate().take(QK_K) {
                let j = v / 32;
                let scale = d * block[Q4K_SCALES + 8 * j + c] as f32;
                let min = dmin * block[Q4K_MINS + 8 * j + c] as f32;
                *y = scale * value(block, c, v) as f32 - min;
            }
        }
        super::Kind::Q6K => {
            let d = d(block, Q6K_D, c);
            for (v, y) in out.iter_mut().enumerate().take(QK_K) {
                let scale = block[Q6K_SCALES + 8 * (v / 16) + c] as i8;
                *y = d * scale as f32 * (q6k_value(block, c, v) as i8 - 32) as f32;
            }
        }
        super::Kind::Q4_0 => {
            let d = d(block, Q40_D, c);
            for (v, y) in out.iter_mut().enumerate().take(QK8_0) {
                *y = (q4_0_value(block, c, v) as i32 - 8) as f32 * d;
            }
        }
        super::Kind::Q8_0 => {
            let d = d(block, Q8_D, c);
            for (v, y) in out.iter_mut().enumerate().take(QK8_0) {
                *y = d * q8_value(block, c, v) as f32;
            }
        }
    }
}
