//! Tree attention on a candle device: the CPU engine's own attention on the CPU, a kernel of
//! sibyl's (`tree_attention.cu`, compiled by NVRTC when first used) on CUDA. Both reduce each
//! (node, head) over its visible keys in an order those keys alone decide.

use crate::attention::{AttendedSequence, HeadLayout};
use candle_core::{CpuStorage, Device, Storage, Tensor};

/// Which new nodes each new node of one sequence sees, in the form each device reads.
pub(super) struct Mask<'a> {
    visible: &'a [Vec<usize>],
    /// `[n][n]` bytes, 1 where node `i` sees node `j` (CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: Option<Tensor>,
}

impl<'a> Mask<'a> {
    pub(super) fn new(visible: &'a [Vec<usize>], device: &Device) -> candle_core::Result<Self> {
        let on_device = if device.is_cpu() {
            None
        } else {
            let n = visible.len();
            let mut bytes = vec![0u8; n * n];
            for (i, seen) in visible.iter().enumerate() {
                for &j in seen {
                    bytes[i * n + j] = 1;
                }
            }
            Some(Tensor::from_vec(bytes, (n, n), device)?)
        };
        Ok(Self { visible, on_device })
    }
}

/// Attention of `q` (`[n, heads * head_dim]`, one sequence's new nodes) over `keys` and
/// `values` (`[prefix + n, kv_heads * head_dim]`: the cache, then the new nodes).
pub(super) fn tree_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: &Mask<'_>,
    prefix: usize,
    layout: HeadLayout,
) -> candle_core::Result<Tensor> {
    match q.device() {
        Device::Cpu => on_cpu(q, keys, values, mask, prefix, layout),
        #[cfg(feature = "cuda")]
        Device::Cuda(device) => cuda::tree_attention(device, q, keys, values, mask, prefix, layout),
        other => candle_core::bail!("tree attention does not run on {other:?}"),
    }
}

fn on_cpu(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: &Mask<'_>,
    prefix: usize,
    layout: HeadLayout,
) -> candle_core::Result<Tensor> {
    let q = q.contiguous()?;
    let n = mask.visible.len();
    let mut out = vec![0f32; n * layout.heads * layout.head_dim];
    {
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = keys.storage_and_layout();
        let (v_storage, v_layout) = values.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) =
            (&*q_storage, &*k_storage, &*v_storage)
        else {
            candle_core::bail!("tree attention on the CPU needs CPU tensors");
        };
        fn slice<'a>(
            storage: &'a CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<&'a [f32]> {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("attention needs contiguous rows".into()))?;
            Ok(&storage.as_slice::<f32>()?[start..end])
        }
        let sequence = AttendedSequence {
            keys: slice(ks, k_layout)?,
            values: slice(vs, v_layout)?,
            prefix_len: prefix,
            visible: mask.visible,
        };
        crate::attention::tree_attention(layout, slice(qs, q_layout)?, &[sequence], &mut out);
    }
    Tensor::from_vec(out, (n, layout.heads * layout.head_dim), &Device::Cpu)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{tensor, view};
    use super::Mask;
    use crate::attention::HeadLayout;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::Tensor;
    use std::sync::OnceLock;

    const SOURCE: &str = include_str!("tree_attention.cu");
    /// Warps per block: `WARPS` in the kernel.
    const WARPS: u32 = 16;
    /// The largest head dimension the kernel holds in registers.
    const MAX_HEAD_DIM: usize = 256;

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            nvrtc::compile_ptx(SOURCE)
                .map(|ptx| ptx.to_src())
                .map_err(|e| format!("compiling the tree attention kernel: {e}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    pub(super) fn tree_attention(
        device: &CudaDevice,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: &Mask<'_>,
        prefix: usize,
        layout: HeadLayout,
    ) -> candle_core::Result<Tensor> {
        if layout.head_dim > MAX_HEAD_DIM {
            candle_core::bail!("head dimension {} is over {MAX_HEAD_DIM}", layout.head_dim);
        }
        let q = q.contiguous()?;
        let n = mask.visible.len();
        let Some(visible) = &mask.on_device else {
            candle_core::bail!("the attention mask is not on the device");
        };
        let func =
            device.get_or_load_custom_func("tree_attention", "sibyl_tree_attention", ptx()?)?;
        let out = device.alloc_zeros::<f32>(n * layout.heads * layout.head_dim)?;
        {
            let (q_storage, q_layout) = q.storage_and_layout();
            let (k_storage, k_layout) = keys.storage_and_layout();
            let (v_storage, v_layout) = values.storage_and_layout();
            let (m_storage, m_layout) = visible.storage_and_layout();
            let (q_view, k_view, v_view) = (
                view::<f32>(&q_storage, q_layout)?,
                view::<f32>(&k_storage, k_layout)?,
                view::<f32>(&v_storage, v_layout)?,
            );
            let m_view = view::<u8>(&m_storage, m_layout)?;
            let (n_arg, prefix_arg) = (n as i32, prefix as i32);
            let (heads, kv_heads, head_dim) = (
                layout.heads as i32,
                layout.kv_heads as i32,
                layout.head_dim as i32,
            );
            let scale = 1f32 / (layout.head_dim as f32).sqrt();
            let mut builder = func.builder();
            builder.arg(&q_view);
            builder.arg(&k_view);
            builder.arg(&v_view);
            builder.arg(&m_view);
            builder.arg(&out);
            builder.arg(&n_arg);
            builder.arg(&prefix_arg);
            builder.arg(&heads);
            builder.arg(&kv_heads);
            builder.arg(&head_dim);
            builder.arg(&scale);
            let config = LaunchConfig {
                grid_dim: (layout.heads as u32, n as u32, 1),
                block_dim: (32, WARPS, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's parameters in type and order; every
            // buffer holds what the kernel reads (`n` nodes, `prefix + n` cached rows, an
            // `n` by `n` mask) and `out` what it writes.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok(tensor(out, device, (n, layout.heads * layout.head_dim)))
    }
}
