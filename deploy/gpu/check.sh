#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and its driver: no Rust, internet or model
# file needed (deploy/gpu/pack.sh builds what it runs). Runs the engine's invariance,
# lossless and batching tests with the tensor engine on GPU 0, then device_bench (random
# weights of Qwen2.5-1.5B's shape): step costs by rows and sessions, the CPU engine on this
# machine's cores, and bit-identity of logits. Exits non-zero on any failure or mismatch.
# The CUDA 13 libraries come from the Python environment's nvidia wheels (nvidia-cublas,
# nvidia-curand, nvidia-cuda-nvrtc, nvidia-cuda-runtime) or from LD_LIBRARY_PATH.
set -uo pipefail
cd "$(dirname "$0")/out"
python3 - <<'PY'
import lzma, os
for name in sorted(os.listdir('.')):
    if name.endswith('.xz'):
        with lzma.open(name) as src, open(name[:-3], 'wb') as dst:
            dst.write(src.read())
        os.chmod(name[:-3], 0o755)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
if [ -n "$site" ]; then
  libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
fi
if ldd ./device_bench | grep 'not found'; then
  echo "CUDA libraries missing: put their folders on LD_LIBRARY_PATH" >&2
  exit 1
fi
failed=0
for test in tree_forward lossless batched; do
  echo "== $test, tensor engine on the GPU"
  SIBYL_TEST_DEVICE=cuda timeout 300 "./$test" --test-threads 4 >"$test.log" 2>&1 || failed=1
  grep -E '^test |^test result|panicked' "$test.log"
done
echo "== device_bench"
timeout 300 ./device_bench --device cuda --context "${CONTEXT:-512}" --compare-cpu || failed=1
exit $failed
