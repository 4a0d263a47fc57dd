#!/usr/bin/env bash
# What building sibyl with `--features cuda` needs, on a machine with no GPU and no CUDA
# installation: the CUDA 13.0 compiler and libraries from PyPI wheels in a virtual
# environment, and a folder the linker reads them from (unversioned names, and a stub of the
# driver library `libcuda.so.1`, whose real copy the GPU machine's driver provides at run
# time). Prints the environment to build with:
#
#   eval "$(deploy/gpu/cuda-toolkit.sh)"
#   cargo build --release --features sibyl-engine/cuda --bin sibyl
#
# CUDA 13.0 matches driver 580: PTX from a newer toolkit may not load on an older driver.
# SIBYL_CUDA_HOME chooses where it goes (default ~/.cache/sibyl/cuda13); CUDA_COMPUTE_CAP the
# GPU generation the kernels are built for (default 90, Hopper); CUDAFORGE_THREADS how many
# nvcc run at once building candle's kernels (default: every CPU; candle's build script
# would use half of them, so on 2 cores it compiled one file at a time, 6 minutes against 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
home="${SIBYL_CUDA_HOME:-$HOME/.cache/sibyl/cuda13}"
[ -x "$home/bin/pip" ] || python3 -m venv "$home" >&2
"$home/bin/pip" install -q --only-binary :all: "nvidia-cuda-nvcc==13.0.88" \
  "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
  "nvidia-curand<11" >&2
site=$("$home/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda="$site/nvidia/cu13"
[ -x "$cuda/bin/nvcc" ] || { echo "no nvcc in $cuda" >&2; exit 1; }

links="$home/link"
mkdir -p "$links"
for lib in cublas cublasLt cudart curand nvrtc; do
  found=$(ls "$cuda/lib/lib$lib.so."* | sort | head -n 1)
  ln -sf "$found" "$links/lib$lib.so"
done

# The driver stub: every driver function cudarc (candle's CUDA binding) declares, each
# answering CUDA_ERROR_UNKNOWN. Only the linker sees it.
version=$(awk '/^name = "cudarc"/ { getline; print $3 }' Cargo.lock | tr -d '"')
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
[ -n "$(ls -d "$registry"/*/"cudarc-$version" 2>/dev/null)" ] ||
  cargo fetch --locked >&2
declarations=$(ls "$registry"/*/"cudarc-$version"/src/driver/sys/mod.rs | head -n 1)
if [ ! -f "$links/libcuda.so" ] || [ "$declarations" -nt "$links/libcuda.so" ]; then
  grep -o 'fn cu[A-Za-z0-9_]*(' "$declarations" | sed 's/^fn //; s/($//' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$links/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c"
fi

cat <<ENV
export PATH="$cuda/bin:\$PATH"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export SIBYL_CUDA_LIB_DIR="$links"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
ENV
