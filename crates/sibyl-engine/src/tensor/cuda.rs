//! Quantized products on CUDA with fewer launches than one candle product per piece of
//! rows: all rows are rounded to 8 bits at once (row by row, as a piece alone would be),
//! then candle's matrix-vector kernel runs on each piece of at most `per` rows, writing
//! into one output. The same kernels on the same values: the same bits as the pieces
//! multiplied one by one.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use candle_core::cuda_backend::{kernels::ffi, CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Layout, Shape, Storage, Tensor};
use std::ffi::c_void;

/// The elements of a contiguous CUDA tensor, for a kernel of ours to read.
pub(super) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        candle_core::bail!("a CUDA kernel was given a tensor of another device");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a CUDA kernel was given strided rows".into()))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// A tensor of what a kernel of ours wrote.
pub(super) fn tensor(out: CudaSlice<f32>, device: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(out, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

type Launcher = unsafe extern "C" fn(
    *const c_void,
    *const c_void,
    *mut c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *mut c_void,
);

fn launcher(dtype: GgmlDType) -> candle_core::Result<Launcher> {
    use GgmlDType::*;
    Ok(match dtype {
        Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
        Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
        Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
        Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
        Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
        Q2K => ffi::launch_mmvq_gguf_q2_k_f32_plain,
        Q3K => ffi::launch_mmvq_gguf_q3_k_f32_plain,
        Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
        Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
        Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
        other => candle_core::bail!("no CUDA product for {other:?}"),
    })
}

/// candle's padding of a quantized row (`MATRIX_ROW_PADDING`) and its 8-bit blocks.
const ROW_PADDING: usize = 512;
const Q8_1_BLOCK: usize = 32;
const Q8_1_BYTES: usize = 36;

pub(super) fn product(weights: &QTensor, x: &Tensor, per: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weights.shape().dims2()?;
    let (m, k) = x.dims2()?;
    if k != cols {
        candle_core::bail!("product of [{m}, {k}] by a [{rows}, {cols}] matrix");
    }
    let launch = launcher(weights.dtype())?;
    let x = x.contiguous()?;
    let candle_core::Device::Cuda(device) = x.device() else {
        candle_core::bail!("a CUDA product needs a CUDA tensor");
    };
    let stream = device.cuda_stream();
    let raw_stream = stream.cu_stream() as *mut c_void;
    let padded = k.div_ceil(ROW_PADDING) * ROW_PADDING;
    let row_blocks = padded / Q8_1_BLOCK;
    let quantized = device.alloc_zeros::<u8>(m * row_blocks * Q8_1_BYTES)?;
    let out = device.alloc_zeros::<f32>(m * rows)?;
    {
        let (storage, layout) = x.storage_and_layout();
        let input = view::<f32>(&storage, layout)?;
        let (input_ptr, _input_guard) = input.device_ptr(&stream);
        let (quantized_ptr, _quantized_guard) = quantized.device_ptr(&stream);
        let (out_ptr, _out_guard) = out.device_ptr(&stream);
        let weights_ptr = weights.device_ptr()? as *const c_void;
        // SAFETY: every pointer is a live allocation on this stream of the size the
        // launcher reads or writes: `m` rows of `k` inputs, `m` rows of `row_blocks`
        // 8-bit blocks, `m` rows of `rows` outputs, and the matrix of `rows` by `cols`
        // (candle pads its storage for the kernels); all launches are ordered on the
        // stream, and the guards record their use before the buffers can be freed.
        unsafe {
            ffi::launch_mmvq_gguf_quantize_q8_1_f32(
                input_ptr as *const c_void,
                quantized_ptr as *mut c_void,
                k as i32,
                padded as i32,
                m as i32,
                raw_stream,
            );
            for first in (0..m).step_by(per) {
                let count = per.min(m - first);
                launch(
                    weights_ptr,
                    (quantized_ptr as usize + first * row_blocks * Q8_1_BYTES) as *const c_void,
                    (out_ptr as usize + first * rows * std::mem::size_of::<f32>()) as *mut c_void,
                    cols as i32,
                    rows as i32,
                    row_blocks as i32,
                    rows as i32,
                    count as i32,
                    raw_stream,
                );
            }
        }
    }
    Ok(tensor(out, device, (m, rows)))
}
