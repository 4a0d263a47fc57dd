#!/bin/bash
# Times the refusal of each prompt in the current directory through `sibyl serve`, 3 runs
# each, for each binary given: ./run.sh OLD_SIBYL NEW_SIBYL
for bin in "$@"; do
  $bin serve --http-addr 127.0.0.1:18080 --grpc-addr 127.0.0.1:18051 > serve.log 2>&1 &
  pid=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:18080/health >/dev/null && break; sleep 1; done
  echo "== $bin"
  for f in letters64k letters70k letters100k letters200k letters340k words110k words200k \
      words300k indent120k indent300k code200k code3m chat-letters100k xsp1200k xsp2m nlsp2m \
      cyr200k greekword300k han300k; do
    route=completions; [[ $f == chat-* ]] && route=chat/completions
    line="$f:"
    for r in 1 2 3; do
      out=$(curl -s -o resp -w '%{http_code} %{time_total}' -H 'content-type: application/json' \
        --data-binary @$f.json http://127.0.0.1:18080/v1/$route)
      line="$line $(echo $out | awk '{printf "%s %.1fms", $1, $2*1000}')"
    done
    echo "$line | $(head -c 110 resp | sed 's/.*"message":"//')"
  done
  kill $pid; wait $pid 2>/dev/null
done
