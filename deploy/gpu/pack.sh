#!/usr/bin/env bash
# Builds what deploy/gpu/check.sh runs on a GPU machine (which needs no Rust, no internet and
# no model file): the engine's invariance, lossless and batching tests and `device_bench`,
# built here with the cuda feature, stripped and xz-compressed into deploy/gpu/out (about
# 28 MB). Copy the working tree there (or only deploy/gpu) and run deploy/gpu/check.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(deploy/gpu/cuda-toolkit.sh)"
features=(--release --workspace --features sibyl-engine/cuda)
tests=$(cargo test "${features[@]}" --no-run --message-format json \
  --test tree_forward --test lossless --test batched |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    src = m.get("target", {}).get("src_path", "")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (
            "crates/sibyl-engine/tests/" in src or "crates/sibyl-decode/tests/" in src):
        print(m["target"]["name"], m["executable"])
')
cargo build "${features[@]}" --example device_bench
out=deploy/gpu/out
rm -rf "$out" && mkdir -p "$out"
while read -r name path; do cp "$path" "$out/$name"; done <<<"$tests"
cp target/release/examples/device_bench "$out/device_bench"
for binary in "$out"/*; do strip "$binary" && xz -T0 -3 "$binary"; done
ls -l "$out"
