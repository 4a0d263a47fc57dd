//! Where the target model computes: the CPU (sibyl's own kernels) or a CUDA device (the
//! tensor engine, `crate::tensor`, on candle's CUDA backend).

use crate::EngineError;

/// The device a model is loaded on: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a device: use cpu, cuda or cuda:N");
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Whether this build can compute on CUDA devices (the `cuda` cargo feature).
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// Opens the CUDA device: a build without CUDA, a missing driver or device is an error
    /// here, before any weight is read.
    pub(crate) fn open_cuda(ordinal: usize) -> Result<candle_core::Device, EngineError> {
        if !Self::CUDA_BUILT {
            return Err(EngineError::CudaNotBuilt);
        }
        // A panic in the driver binding is this device's failure, not a malformed file (what
        // `load` makes of other panics).
        std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal))
            .unwrap_or_else(|panic| {
                Err(candle_core::Error::Msg(crate::load::panic_message(
                    panic.as_ref(),
                )))
            })
            .map_err(|source| EngineError::DeviceUnavailable {
                device: Device::Cuda(ordinal),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, device) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("CUDA:3", Device::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Device>(), Ok(device));
            assert_eq!(device.to_string().parse::<Device>(), Ok(device));
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let error = bad.parse::<Device>().unwrap_err();
            assert!(error.contains("cpu, cuda or cuda:N"), "{error}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_says_so() {
        let error = Device::open_cuda(0).unwrap_err();
        assert!(matches!(error, EngineError::CudaNotBuilt));
        assert!(
            error.to_string().contains("--features sibyl-engine/cuda"),
            "{error}"
        );
    }
}
