use crate::gguf::LoadOptions;
use crate::parallel::for_each_chunk_mut;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use std::borrow::Cow;
use std::sync::Arc;

/// Output columns handled by one parallel work item.
const COLUMNS_PER_TASK: usize = 16;

/// Most activation rows per call of candle's tiled kernels. candle switches Q4_K products to
/// AMX tiles from 32 rows on, whose rounding differs; below that, every row goes through the
/// same per-row instruction sequence whatever the row count.
const TILED_ROWS: usize = 16;

/// A weight matrix of `rows` outputs by `cols` inputs, stored as quantized blocks, row-major.
///
/// `matmul` computes every output element with one call of the type's block dot product
/// (candle's kernels) on the row's quantized activations, so an element's value never
/// depends on how many activation rows share the call. Each weight row is read once per
/// call and applied to all activation rows while it is in cache.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

#[derive(Debug, Clone)]
enum Blocks {
    /// Q4_K, Q6_K and Q8_0 on x86-64: candle's quantized tensor, whose CPU product uses
    /// repacked tiles (AVX2, AVX-512 VNNI) that process each activation row alone.
    Tiled(Arc<QTensor>),
    F32(Vec<f32>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

macro_rules! with_blocks {
    ($blocks:expr, $b:ident => $body:expr) => {
        match $blocks {
            Blocks::Tiled(_) => unreachable!("tiled matrices are handled first"),
            Blocks::F32($b) => $body,
            Blocks::Q4_0($b) => $body,
            Blocks::Q4_1($b) => $body,
            Blocks::Q5_0($b) => $body,
            Blocks::Q5_1($b) => $body,
            Blocks::Q8_0($b) => $body,
            Blocks::Q2K($b) => $body,
            Blocks::Q3K($b) => $body,
            Blocks::Q4K($b) => $body,
            Blocks::Q5K($b) => $body,
            Blocks::Q6K($b) => $body,
        }
    };
}

/// Copies raw little-endian block bytes into typed blocks. `None` if the length is not a
/// whole number of blocks.
fn typed<T: GgmlType>(bytes: &[u8]) -> Option<Vec<T>> {
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

fn to_q8_0<T: GgmlType>(blocks: &[T], rows: usize, cols: usize) -> Vec<BlockQ8_0> {
    let per_row = cols / T::BLCK_SIZE;
    let mut row = vec![0f32; cols];
    let mut out = vec![BlockQ8_0::zeros(); rows * cols / 32];
    for r in 0..rows {
        T::to_float(&blocks[r * per_row..(r + 1) * per_row], &mut row);
        BlockQ8_0::from_float(&row, &mut out[r * cols / 32..(r + 1) * cols / 32]);
    }
    out
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
        if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q8_0)
            && Self::tileable(rows, cols)
        {
            let expected = rows * cols / dtype.block_size() * dtype.type_size();
            return (bytes.len() == expected)
                .then(|| Self::tiled(dtype, rows, cols, bytes))
                .flatten();
        }
        let requantize = options.requantize_slow_types && cols.is_multiple_of(32);
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
            GgmlDType::Q4_0 => Blocks::Q4_0(typed(bytes)?),
            GgmlDType::Q4_1 if requantize => {
                Blocks::Q8_0(to_q8_0(&typed::<BlockQ4_1>(bytes)?, rows, cols))
            }
            GgmlDType::Q4_1 => Blocks::Q4_1(typed(bytes)?),
            GgmlDType::Q5_0 if requantize => {
                Blocks::Q8_0(to_q8_0(&typed::<BlockQ5_0>(bytes)?, rows, cols))
            }
            GgmlDType::Q5_0 => Blocks::Q5_0(typed(bytes)?),
            GgmlDType::Q5_1 if requantize => {
                Blocks::Q8_0(to_q8_0(&typed::<BlockQ5_1>(bytes)?, rows, cols))
            }
            GgmlDType::Q5_1 => Blocks::Q5_1(typed(bytes)?),
            GgmlDType::Q8_0 => Blocks::Q8_0(typed(bytes)?),
            GgmlDType::Q2K => Blocks::Q2K(typed(bytes)?),
            GgmlDType::Q3K => Blocks::Q3K(typed(bytes)?),
            GgmlDType::Q4K => Blocks::Q4K(typed(bytes)?),
            GgmlDType::Q5K => Blocks::Q5K(typed(bytes)?),
            GgmlDType::Q6K => Blocks::Q6K(typed(bytes)?),
            GgmlDType::Q8_1 | GgmlDType::Q8K => return None,
        };
        let matrix = Self { rows, cols, blocks };
        // Q8_0 converted from a slow type goes to the tiled kernels too.
        (matrix.stored_len() == rows * cols).then(|| matrix.into_tiled())
    }

    /// Whether candle's tiled kernels take a matrix of this shape: x86-64 (AVX2 or better,
    /// checked by candle at run time), rows in multiples of 16, 256-wide rows.
    fn tileable(rows: usize, cols: usize) -> bool {
        cfg!(target_arch = "x86_64") && rows.is_multiple_of(16) && cols.is_multiple_of(256)
    }

    /// A Q4_K, Q6_K or Q8_0 matrix held by candle, from its block bytes.
    fn tiled(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype).ok()?;
        let tensor = QTensor::new(storage, (rows, cols)).ok()?;
        Some(Self {
            rows,
            cols,
            blocks: Blocks::Tiled(Arc::new(tensor)),
        })
    }

    /// Moves Q4_K, Q6_K and Q8_0 blocks made here (quantized or converted) into candle's
    /// tiled kernels where the shape allows; other matrices stay as they are.
    fn into_tiled(self) -> Self {
        if !Self::tileable(self.rows, self.cols) {
            return self;
        }
        let bytes: &[u8] = match &self.blocks {
            Blocks::Q4K(b) => as_bytes(b),
            Blocks::Q6K(b) => as_bytes(b),
            Blocks::Q8_0(b) => as_bytes(b),
            _ => return self,
        };
        Self::tiled(self.dtype(), self.rows, self.cols, bytes).unwrap_or(self)
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
        let blocks = match dtype {
            GgmlDType::F32 => Blocks::F32(values.to_vec()),
            GgmlDType::Q4_0 => Blocks::Q4_0(quantize_as(values)),
            GgmlDType::Q4_1 => Blocks::Q4_1(quantize_as(values)),
            GgmlDType::Q5_0 => Blocks::Q5_0(quantize_as(values)),
            GgmlDType::Q5_1 => Blocks::Q5_1(quantize_as(values)),
            GgmlDType::Q8_0 => Blocks::Q8_0(quantize_as(values)),
            GgmlDType::Q2K => Blocks::Q2K(quantize_as(values)),
            GgmlDType::Q3K => Blocks::Q3K(quantize_as(values)),
            GgmlDType::Q4K => Blocks::Q4K(quantize_as(values)),
            GgmlDType::Q5K => Blocks::Q5K(quantize_as(values)),
            GgmlDType::Q6K => Blocks::Q6K(quantize_as(values)),
            _ => return None,
        };
        Some(Self { rows, cols, blocks }.into_tiled())
    }

    /// Values held by untiled blocks.
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
        if let Blocks::Tiled(t) = &self.blocks {
            return t.dtype();
        }
        with_blocks!(&self.blocks, b => dtype_of(b))
    }

    /// Bytes of weight data (candle may keep a second, repacked copy of tiled matrices).
    pub fn size_in_bytes(&self) -> usize {
        if let Blocks::Tiled(t) = &self.blocks {
            return t.storage_size_in_bytes();
        }
        with_blocks!(&self.blocks, b => std::mem::size_of_val(b.as_slice()))
    }

    /// Row `row` as floats (an embedding lookup).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        if let Blocks::Tiled(t) = &self.blocks {
            let dtype = t.dtype();
            let row_bytes = self.cols / dtype.block_size() * dtype.type_size();
            if let Ok(data) = t.data() {
                let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
                match dtype {
                    GgmlDType::Q4K => dequantize_bytes::<BlockQ4K>(bytes, &mut out),
                    GgmlDType::Q6K => dequantize_bytes::<BlockQ6K>(bytes, &mut out),
                    GgmlDType::Q8_0 => dequantize_bytes::<BlockQ8_0>(bytes, &mut out),
                    _ => {}
                }
            }
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
        if let Blocks::Tiled(t) = &self.blocks {
            return matmul_tiled(t, self.cols, x, m, out);
        }
        with_blocks!(&self.blocks, b => matmul_blocks(b, self.rows, self.cols, x, m, out));
        Ok(())
    }
}

fn as_bytes<T: GgmlType>(blocks: &[T]) -> &[u8] {
    // SAFETY: plain-data blocks viewed as the bytes they were read from.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

fn dequantize_bytes<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    if let Some(blocks) = typed::<T>(bytes) {
        T::to_float(&blocks, out)
    }
}

/// candle's product, called so that its kernel choice never depends on the row count:
/// at most [`TILED_ROWS`] rows per call, and a single row padded to two, because candle
/// takes a different (compact, untiled) Q6_K path for exactly one row.
fn matmul_tiled(
    tensor: &QTensor,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<(), candle_core::Error> {
    let n = out.len() / m;
    for (chunk, dst) in x.chunks(TILED_ROWS * k).zip(out.chunks_mut(TILED_ROWS * n)) {
        let rows = chunk.len() / k;
        let input = if rows == 1 {
            Tensor::from_iter(chunk.iter().chain(chunk).copied(), &Device::Cpu)?.reshape((2, k))?
        } else {
            Tensor::from_slice(chunk, (rows, k), &Device::Cpu)?
        };
        let product = input.apply_op1_no_bwd(tensor)?.flatten_all()?;
        let values = product.to_vec1::<f32>()?;
        dst.copy_from_slice(&values[..rows * n]);
    }
    Ok(())
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
    let dot_columns = |first: usize, dst: &mut [f32]| {
        // dst holds columns first.. (column-major: m values per column)
        for (j, column) in dst.chunks_mut(m).enumerate() {
            let c = first + j;
            let w = &weights[c * k_blocks..(c + 1) * k_blocks];
            for (r, value) in column.iter_mut().enumerate() {
                *value = T::vec_dot(k, w, &xq[r * k_blocks..(r + 1) * k_blocks]);
            }
        }
    };
    if m == 1 {
        for_each_chunk_mut(out, COLUMNS_PER_TASK, |i, dst| {
            dot_columns(i * COLUMNS_PER_TASK, dst)
        });
        return;
    }
    let mut transposed = vec![0f32; n * m];
    for_each_chunk_mut(&mut transposed, COLUMNS_PER_TASK * m, |i, dst| {
        dot_columns(i * COLUMNS_PER_TASK, dst)
    });
    for (c, column) in transposed.chunks(m).enumerate() {
        for (r, &value) in column.iter().enumerate() {
            out[r * n + c] = value;
        }
    }
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
