#!/usr/bin/env bash
# Builds the sibyl runtime image from a binary built on this machine, on the locally made base
# image (deploy/image/make-base.sh, run first when the base is missing). For machines that
# cannot pull from a registry; elsewhere deploy/Dockerfile does the whole build.
#
#   deploy/image/build.sh [--binary PATH] [--tag sibyl:0.1.0] [--keep-debug] [--rebuild-base]
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
base_args=()
while (($#)); do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    --keep-debug) strip_debug=false ;;
    --rebuild-base) base_args+=(--force) ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

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
if ! docker run --rm "$tag" --version; then
  echo "build.sh: the binary does not start in $tag" >&2
  exit 1
fi

bytes=$(docker image inspect -f '{{.Size}}' "$tag")
echo "image $tag: $(human_size "$bytes") ($bytes bytes)"
