use crate::gguf::LoadOptions;
use crate::kernels::{Activations, Isa, Kind, Packed, GROUP};
use crate::parallel::{for_each_chunk_mut, for_each_range, DisjointWrites};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// Output columns handled by one parallel work item.
const COLUMNS_PER_TASK: usize = 16;

/// The unit in which sibyl's kernels split groups of interleaved columns over threads: a
/// stored pair (`kernels::Packed`) is never split.
const GROUPS_PER_TASK: usize = 2;

/// A weight matrix of `rows` outputs by `cols` inputs, stored as quantized blocks, row-major.
///
/// `matmul` computes every output element with arithmetic that never depends on how many
/// activation rows share the call. Each weight row is read once per call and applied to all
/// activation rows while it is in cache.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

#[derive(Debug, Clone)]
enum Blocks {
    /// Q4_K, Q5_K, Q6_K, Q4_0 and Q8_0 (also what slow types are converted to): sibyl's multi-row
    /// kernels (`crate::kernels`), on the blocks as GGUF stores them.
    Fast(Packed),
    F32(Vec<f32>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
}

macro_rules! with_blocks {
    ($blocks:expr, $b:ident => $body:expr) => {
        match $blocks {
            Blocks::Fast(_) => unreachable!("fast matrices are handled first"),
            Blocks::F32($b) => $body,
            Blocks::Q4_1($b) => $body,
            Blocks::Q5_0($b) => $body,
            Blocks::Q5_1($b) => $body,
            Blocks::Q2K($b) => $body,
            Blocks::Q3K($b) => $body,
        }
    };
}

/// Copies raw little-endian block bytes into typed blocks. `None` if the length is not a
/// whole number of blocks.
pub(crate) fn typed<T: GgmlType>(bytes: &[u8]) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if size == 0 || !bytes.len().is_multiple_of(size) {
        return None;
    }
    let count = bytes.len() / size;
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: candle's block types are `repr(C)` plain data (integers, f16, byte arrays)
    // for which every bit pattern is valid; the destination holds exactly `bytes.len()`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len());
    }
    Some(blocks)
}

fn to_q8_0<T: GgmlType>(blocks: &[T], rows: usize, cols: usize) -> Vec<u8> {
    let per_row = cols / T::BLCK_SIZE;
    let mut row = vec![0f32; cols];
    let mut out = vec![BlockQ8_0::zeros(); rows * cols / 32];
    for r in 0..rows {
        T::to_float(&blocks[r * per_row..(r + 1) * per_row], &mut row);
        BlockQ8_0::from_float(&row, &mut out[r * cols / 32..(r + 1) * cols / 32]);
    }
    as_bytes(&out).to_vec()
}

fn kind_of(dtype: GgmlDType) -> Option<Kind> {
    match dtype {
        GgmlDType::Q4K => Some(Kind::Q4K),
        GgmlDType::Q5K => Some(Kind::Q5K),
        GgmlDType::Q6K => Some(Kind::Q6K),
        GgmlDType::Q4_0 => Some(Kind::Q4_0),
        GgmlDType::Q8_0 => Some(Kind::Q8_0),
        _ => None,
    }
}

impl QuantMatrix {
    /// Builds a matrix from GGUF tensor bytes. `None` for a type the engine cannot run or a
    /// width that is not a whole number of blocks.
    pub fn from_bytes(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Option<Self> {
        if !cols.is_multiple_of(dtype.block_size()) {
            return None;
        }
        if let Some(kind) = kind_of(dtype) {
            return Self::fast(kind, rows, cols, bytes);
        }
        let requantize = options.requantize_slow_types && cols.is_multiple_of(32);
        let converted = |bytes: Vec<u8>| Self::fast(Kind::Q8_0, rows, cols, &bytes);
        let blocks = match dtype {
            GgmlDType::F32 => Blocks::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            GgmlDType::F16 => Blocks::F32(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            GgmlDType::BF16 => Blocks::F32(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            GgmlDType::Q4_1 if requantize => {
                return converted(to_q8_0(&typed::<BlockQ4_1>(bytes)?, rows, cols))
            }
            GgmlDType::Q4_1 => Blocks::Q4_1(typed(bytes)?),
            GgmlDType::Q5_0 if requantize => {
                return converted(to_q8_0(&typed::<BlockQ5_0>(bytes)?, rows, cols))
            }
            GgmlDType::Q5_0 => Blocks::Q5_0(typed(bytes)?),
            GgmlDType::Q5_1 if requantize => {
                return converted(to_q8_0(&typed::<BlockQ5_1>(bytes)?, rows, cols))
            }
            GgmlDType::Q5_1 => Blocks::Q5_1(typed(bytes)?),
            GgmlDType::Q2K => Blocks::Q2K(typed(bytes)?),
            GgmlDType::Q3K => Blocks::Q3K(typed(bytes)?),
            _ => return None,
        };
        let matrix = Self { rows, cols, blocks };
        (matrix.stored_len() == rows * cols).then_some(matrix)
    }

    /// A matrix for sibyl's kernels; `None` unless `bytes` holds exactly its blocks.
    fn fast(kind: Kind, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Some(Self {
            rows,
            cols,
            blocks: Blocks::Fast(Packed::new(kind, rows, cols, bytes)?),
        })
    }

    /// Quantizes an f32 matrix (row-major, `rows` x `cols`) to `dtype`; used by the testkit.
    pub fn quantize(dtype: GgmlDType, rows: usize, cols: usize, values: &[f32]) -> Option<Self> {
        fn quantize_as<T: GgmlType>(values: &[f32]) -> Vec<T> {
            let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
            T::from_float(values, &mut blocks);
            blocks
        }
        if values.len() != rows * cols || !cols.is_multiple_of(dtype.block_size()) {
            return None;
        }
        let fast = |kind: Kind, bytes: &[u8]| Self::fast(kind, rows, cols, bytes);
        let blocks = match dtype {
            GgmlDType::F32 => Blocks::F32(values.to_vec()),
            GgmlDType::Q4_0 => {
                return fast(Kind::Q4_0, as_bytes(&quantize_as::<BlockQ4_0>(values)))
            }
            GgmlDType::Q4_1 => Blocks::Q4_1(quantize_as(values)),
            GgmlDType::Q5_0 => Blocks::Q5_0(quantize_as(values)),
            GgmlDType::Q5_1 => Blocks::Q5_1(quantize_as(values)),
            GgmlDType::Q8_0 => {
                return fast(Kind::Q8_0, as_bytes(&quantize_as::<BlockQ8_0>(values)))
            }
            GgmlDType::Q2K => Blocks::Q2K(quantize_as(values)),
            GgmlDType::Q3K => Blocks::Q3K(quantize_as(values)),
            GgmlDType::Q4K => return fast(Kind::Q4K, as_bytes(&quantize_as::<BlockQ4K>(values))),
            GgmlDType::Q5K => return fast(Kind::Q5K, as_bytes(&quantize_as::<BlockQ5K>(values))),
            GgmlDType::Q6K => return fast(Kind::Q6K, as_bytes(&quantize_as::<BlockQ6K>(values))),
            _ => return None,
        };
        Some(Self { rows, cols, blocks })
    }

    /// Values held by blocks outside sibyl's kernels.
    fn stored_len(&self) -> usize {
        with_blocks!(&self.blocks, b => b.len() * block_size_of(b))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage type after load-time conversion.
    pub fn dtype(&self) -> GgmlDType {
        if let Blocks::Fast(packed) = &self.blocks {
            return match packed.kind() {
                Kind::Q4K => GgmlDType::Q4K,
                Kind::Q5K => GgmlDType::Q5K,
                Kind::Q6K => GgmlDType::Q6K,
                Kind::Q4_0 => GgmlDType::Q4_0,
                Kind::Q8_0 => GgmlDType::Q8_0,
            };
        }
        with_blocks!(&self.blocks, b => dtype_of(b))
    }

    /// Bytes of weight data.
    pub fn size_in_bytes(&self) -> usize {
        if let Blocks::Fast(packed) = &self.blocks {
            return packed.size_in_bytes();
        }
        with_blocks!(&self.blocks, b => std::mem::size_of_val(b.as_slice()))
    }

    /// Row `row` as floats (an embedding lookup).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        if let Blocks::Fast(packed) = &self.blocks {
            packed.dequantize_row(row, &mut out);
            return out;
        }
        with_blocks!(&self.blocks, b => {
            let per_row = b.len() / self.rows;
            dequantize_into(&b[row * per_row..(row + 1) * per_row], &mut out)
        });
        out
    }

    /// `out[r * rows + c] = dot(x[r], self[c])` for `m` activation rows of `cols` values.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), candle_core::Error> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        assert_eq!(out.len(), m * self.rows, "output shape");
        if let Blocks::Fast(packed) = &self.blocks {
            let acts = Activations::quantize(packed.kind(), x, self.cols);
            self.matmul_quantized(packed, &acts, m, out);
            return Ok(());
        }
        with_blocks!(&self.blocks, b => matmul_blocks(b, self.rows, self.cols, x, m, out));
        Ok(())
    }
}

impl QuantMatrix {
    /// The product with activations already quantized for this matrix's kernels: each work
    /// item computes whole groups of output columns and writes them straight into `out`.
    fn matmul_quantized(&self, packed: &Packed, acts: &Activations, m: usize, out: &mut [f32]) {
        let isa = Isa::detect();
        let (n, groups) = (self.rows, packed.groups());
        let target = DisjointWrites::new(out);
        for_each_range(groups.div_ceil(GROUPS_PER_TASK), |tasks| {
            let first = tasks.start * GROUPS_PER_TASK;
            let count = (tasks.end * GROUPS_PER_TASK).min(groups) - first;
            packed.dot_groups(isa, first, count, acts, m, |group, first_row, tile| {
                // The last group may be padded past the last column.
                let columns = GROUP.min(n - group * GROUP);
                for (r, values) in tile.iter().enumerate() {
                    let at = (first_row + r) * n + group * GROUP;
                    // SAFETY: each group (so each column) belongs to one work item.
                    unsafe { target.write_all(at, &values[..columns]) };
                }
            });
        });
    }

    /// Products of several matrices with the same `m` activation rows (the attention's q, k
    /// and v, the MLP's gate and up): the rows are quantized once per activation format
    /// (a Q5_K_M layer's Q5_K and Q6_K matrices take the same).
    pub fn matmul_many(
        weights: &[&QuantMatrix],
        x: &[f32],
        m: usize,
    ) -> Result<Vec<Vec<f32>>, candle_core::Error> {
        let mut quantized: Vec<(Kind, Activations)> = Vec::new();
        weights
            .iter()
            .map(|w| {
                let mut out = vec![0f32; m * w.rows];
                match &w.blocks {
                    Blocks::Fast(packed) => {
                        assert_eq!(x.len(), m * w.cols, "activation shape");
                        let kind = packed.kind();
                        let same = |(k, _): &(Kind, Activations)| k.shares_activations(kind);
                        let at = match quantized.iter().position(same) {
                            Some(at) => at,
                            None => {
                                quantized.push((kind, Activations::quantize(kind, x, w.cols)));
                                quantized.len() - 1
                            }
                        };
                        w.matmul_quantized(packed, &quantized[at].1, m, &mut out);
                    }
                    _ => w.matmul(x, m, &mut out)?,
                }
                Ok(out)
            })
            .collect()
    }
}

fn as_bytes<T: GgmlType>(blocks: &[T]) -> &[u8] {
    // SAFETY: plain-data blocks viewed as the bytes they were read from.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

/// Fills `out` (`m` rows of `n` outputs) in parallel over output columns:
/// `dot(c, column)` writes column `c`'s `m` values.
fn by_columns<F>(out: &mut [f32], n: usize, m: usize, dot: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if m == 1 {
        for_each_chunk_mut(out, COLUMNS_PER_TASK, |i, dst| {
            for (j, value) in dst.iter_mut().enumerate() {
                dot(i * COLUMNS_PER_TASK + j, std::slice::from_mut(value));
            }
        });
        return;
    }
    // Column-major while computing: m values per column.
    let mut transposed = vec![0f32; n * m];
    for_each_chunk_mut(&mut transposed, COLUMNS_PER_TASK * m, |i, dst| {
        for (j, column) in dst.chunks_mut(m).enumerate() {
            dot(i * COLUMNS_PER_TASK + j, column);
        }
    });
    for (c, column) in transposed.chunks(m).enumerate() {
        for (r, &value) in column.iter().enumerate() {
            out[r * n + c] = value;
        }
    }
}

fn block_size_of<T: GgmlType>(_: &[T]) -> usize {
    T::BLCK_SIZE
}

fn dtype_of<T: GgmlType>(_: &[T]) -> GgmlDType {
    T::DTYPE
}

fn dequantize_into<T: GgmlType>(blocks: &[T], out: &mut [f32]) {
    T::to_float(blocks, out)
}

fn matmul_blocks<T: GgmlType>(
    weights: &[T],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let k_blocks = k / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); m * k_blocks];
    for r in 0..m {
        T::VecDotType::from_float(
            &x[r * k..(r + 1) * k],
            &mut xq[r * k_blocks..(r + 1) * k_blocks],
        );
    }
    by_columns(out, n, m, |c, column| {
        let w = &weights[c * k_blocks..(c + 1) * k_blocks];
        for (r, value) in column.iter_mut().enumerate() {
            *value = T::vec_dot(k, w, &xq[r * k_blocks..(r + 1) * k_blocks]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn each_output_is_bit_identical_whatever_the_number_of_rows() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
            GgmlDType::F32,
        ] {
            let (n, k) = (48, 512);
            let w = QuantMatrix::quantize(dtype, n, k, &values(n * k, 1)).unwrap();
            let x = values(64 * k, 2);
            let mut all = vec![0f32; 64 * n];
            w.matmul(&x, 64, &mut all).unwrap();
            for r in [0, 1, 17, 31, 32, 63] {
                let mut one = vec![0f32; n];
                w.matmul(&x[r * k..(r + 1) * k], 1, &mut one).unwrap();
                assert_eq!(one, all[r * n..(r + 1) * n], "{dtype:?} row {r}");
            }
        }
    }

    /// sibyl's kernels against candle's own block dot products on the same blocks: the
    /// integer parts are the same, so only float rounding may differ.
    #[test]
    fn kernels_match_candles_dot_products() {
        fn candle_products<T: GgmlType>(
            w: &[T],
            n: usize,
            k: usize,
            x: &[f32],
            m: usize,
        ) -> Vec<f32> {
            let mut out = vec![0f32; m * n];
            matmul_blocks(w, n, k, x, m, &mut out);
            out
        }
        let (n, k, m) = (40, 512, 5);
        let values = values(n * k, 11);
        let x = values_scaled(m * k, 12, 4.0);
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
        ] {
            let ours = QuantMatrix::quantize(dtype, n, k, &values).unwrap();
            let mut out = vec![0f32; m * n];
            ours.matmul(&x, m, &mut out).unwrap();
            let theirs = match dtype {
                GgmlDType::Q4K => candle_products(&quantized::<BlockQ4K>(&values), n, k, &x, m),
                GgmlDType::Q5K => candle_products(&quantized::<BlockQ5K>(&values), n, k, &x, m),
                GgmlDType::Q6K => candle_products(&quantized::<BlockQ6K>(&values), n, k, &x, m),
                GgmlDType::Q4_0 => candle_products(&quantized::<BlockQ4_0>(&values), n, k, &x, m),
                _ => candle_products(&quantized::<BlockQ8_0>(&values), n, k, &x, m),
            };
            for (i, (a, b)) in out.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{dtype:?} {i}: {a} against {b}"
                );
            }
        }
    }

    fn quantized<T: GgmlType>(values: &[f32]) -> Vec<T> {
        let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut blocks);
        blocks
    }

    fn values_scaled(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        values(len, seed).into_iter().map(|v| v * scale).collect()
    }

    #[test]
    fn matmul_matches_a_dequantized_reference() {
        let (n, k, m) = (24, 256, 3);
        let w = QuantMatrix::quantize(GgmlDType::Q8_0, n, k, &values(n * k, 3)).unwrap();
        let x = values(m * k, 4);
        let mut out = vec![0f32; m * n];
        w.matmul(&x, m, &mut out).unwrap();
        for r in 0..m {
            for c in 0..n {
                let row = w.dequantize_row(c);
                let reference: f32 = row
                    .iter()
                    .zip(&x[r * k..(r + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((out[r * n + c] - reference).abs() < 0.05, "{r},{c}");
            }
        }
    }

    #[test]
    fn slow_types_are_requantized_to_q8_0_within_a_small_error() {
        let (n, k) = (8, 64);
        let original = values(n * k, 5);
        let q5 = QuantMatrix::quantize(GgmlDType::Q5_0, n, k, &original).unwrap();
        let mut bytes = Vec::new();
        if let Blocks::Q5_0(blocks) = &q5.blocks {
            // SAFETY: plain-data blocks viewed as bytes, as they lie in a GGUF file.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(
                    blocks.as_ptr() as *const u8,
                    std::mem::size_of_val(blocks.as_slice()),
                )
            });
        }
        let loaded =
            QuantMatrix::from_bytes(GgmlDType::Q5_0, n, k, &bytes, &LoadOptions::default())
                .unwrap();
        assert_eq!(loaded.dtype(), GgmlDType::Q8_0);
        for r in 0..n {
            let a = q5.dequantize_row(r);
            let b = loaded.dequantize_row(r);
            let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= scale / 127.0 + 1e-6);
            }
        }
    }

    #[test]
    fn a_wrong_byte_count_is_refused() {
        assert!(QuantMatrix::from_bytes(
            GgmlDType::Q8_0,
            2,
            64,
            &[0u8; 100],
            &LoadOptions::default()
        )
        .is_none());
        assert!(QuantMatrix::from_bytes(
            GgmlDType::Q8_0,
            2,
            60,
            &[0u8; 136],
            &LoadOptions::default()
        )
        .is_none());
    }
}
