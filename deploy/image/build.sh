#!/usr/bin/env bash
# Builds the sibyl runtime image from a binary built on this machine, on the locally made base
# image (deploy/image/make-base.sh, run first when the base is missing). For machines that
# cannot pull from a registry; elsewhere deploy/Dockerfile does the whole build.
#
#   deploy/image/build.sh [--binary PATH] [--tag sibyl:0.1.0] [--keep-debug] [--rebuild-base]
#                         [--cuda]
#
# --cuda makes the GPU variant (default tag sibyl:0.1.0-cuda) from a binary built with
# `--features sibyl-engine/cuda` (docs/gpu.md): it adds the CUDA 13 libraries the binary
# links (cuBLAS, cuRAND, NVRTC, the runtime; about 800 MB) from deploy/gpu/cuda-toolkit.sh's
# wheels. The driver library comes from the node (the NVIDIA container toolkit mounts it).
#
# --binary defaults to target/release/sibyl (under $CARGO_TARGET_DIR if set) (`cargo build --release --bin sibyl`); it must be
# built on Debian 12 (bookworm) or with an older glibc. Its debug info is stripped from the
# copy in the image unless --keep-debug (symbols stay, so backtraces keep function names).
# The build context is a temporary folder holding only the binary and Dockerfile.local.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
binary=${CARGO_TARGET_DIR:-$repo/target}/release/sibyl
tag=${SIBYL_IMAGE:-sibyl:0.1.0}
strip_debug=true
cuda=false
base_args=()
while (($#)); do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    --keep-debug) strip_debug=false ;;
    --rebuild-base) base_args+=(--force) ;;
    --cuda) cuda=true ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

if $cuda && [[ -z ${SIBYL_IMAGE:-} && $tag == sibyl:0.1.0 ]]; then tag=sibyl:0.1.0-cuda; fi

human_size() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }

if [[ ! -x $binary ]]; then
  echo "build.sh: no executable at $binary; build it first: cargo build --release --bin sibyl" >&2
  exit 1
fi

"$here/make-base.sh" "${base_args[@]}"

context=$(mktemp -d "${TMPDIR:-/tmp}/sibyl-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
cp "$here/Dockerfile.local" "$context/Dockerfile"
install -m 0755 "$binary" "$context/sibyl"
if $strip_debug; then
  if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$context/sibyl"
  else
    echo "build.sh: objcopy not found (binutils); the binary keeps its debug info"
  fi
fi
start_args=()
if $cuda; then
  eval "$("$repo/deploy/gpu/cuda-toolkit.sh")"
  mkdir "$context/cuda"
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
      libnvrtc-builtins.so.13.0 libcudart.so.13; do
    cp "$CUDA_ROOT/lib/$lib" "$context/cuda/"
  done
  cat >>"$context/Dockerfile" <<'DOCKERFILE'

# The GPU variant: the CUDA 13 libraries the binary links. The driver's libcuda.so.1 comes
# from the node, mounted by the NVIDIA container toolkit for these capabilities.
COPY cuda/ /usr/local/lib/sibyl-cuda/
ENV LD_LIBRARY_PATH=/usr/local/lib/sibyl-cuda NVIDIA_DRIVER_CAPABILITIES=compute,utility
DOCKERFILE
  # No driver here: the linker's stub stands in for it, so that the binary can start.
  start_args=(-v "$SIBYL_CUDA_LIB_DIR/libcuda.so:/usr/lib/x86_64-linux-gnu/libcuda.so.1:ro")
fi
echo "binary: $binary ($(human_size "$(stat -c %s "$binary")"), in the image $(human_size "$(stat -c %s "$context/sibyl")"))"

echo "== docker build $tag"
start=$SECONDS
version=${tag##*:}
if [[ $version == "$tag" || $version == */* ]]; then version=latest; fi
previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
docker build --tag "$tag" --build-arg "VERSION=$version" "$context"
echo "image built in $((SECONDS - start)) s"
# The image this tag named before, now untagged, goes (unless a container still uses it).
if [[ -n $previous && $previous != "$(docker image inspect -f '{{.Id}}' "$tag")" ]]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi

# The binary must start in the image (its shared libraries are all there).
if ! docker run --rm "${start_args[@]}" "$tag" --version; then
  echo "build.sh: the binary does not start in $tag" >&2
  exit 1
fi

bytes=$(docker image inspect -f '{{.Size}}' "$tag")
echo "image $tag: $(human_size "$bytes") ($bytes bytes)"
