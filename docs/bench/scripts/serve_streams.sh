#!/bin/bash
# One sibyl serve, then for each set: bench through the gateway at 1 and 4 streams, 3 runs.
# Usage: DATA=folder-holding-humanevalfix.jsonl docs/bench/scripts/serve_streams.sh OUT (from the repository root)
BIN=target/release/sibyl
OUT=$1
mkdir -p $OUT
$BIN serve --grpc-addr 127.0.0.1:18052 --http-addr 127.0.0.1:18080 > $OUT/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 120); do
  if curl -sf -m 60 http://127.0.0.1:18080/v1/completions -H 'content-type: application/json' \
     -d '{"model":"qwen2.5-coder-1.5b","prompt":"def f(","max_tokens":2}' > /dev/null; then break; fi
  sleep 2
done
for SET in python_bugfix rust_bugfix; do
  $BIN bench --gateway http://127.0.0.1:18052 --dataset $DATA/humanevalfix.jsonl \
    --categories $SET --limit 8 --max-tokens 128 --configs plain --concurrency 1,4 --repeat 3 \
    --out $OUT/$SET > $OUT/$SET.log 2>&1
done
kill $SERVE; wait $SERVE
