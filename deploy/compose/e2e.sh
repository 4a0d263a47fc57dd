#!/usr/bin/env bash
# End-to-end test of the container deployment: builds the image, starts compose.yaml (gateway,
# verifier, two n-gram drafters, a retrieval drafter), and checks through the gateway's
# published port that
#   1. a chat completion answers over HTTPS (with the run's API key; without it: 401; plain
#      HTTP gets nothing; every role speaks only TLS, with a certificate made for the run, and
#      the roles show each other the run's internal token);
#   2-3. a long greedy generation is identical with speculation off, and with speculation on
#        (streamed) while one drafter is stopped and the other cut off the network
#        mid-generation; the longest wait between streamed pieces is printed;
#   4. the verifier drafts with both drafters again once they are back;
#   5. every role's /metrics passes `promtool check metrics`, and the verifier counts the
#      retrieval drafter as up.
# The cluster is always taken down at the end; on failure every service's logs are printed.
#
#   deploy/compose/e2e.sh
#
# Needs root or the docker group, docker with compose (the plugin or docker-compose), curl,
# python3, openssl, and the binary target/release/sibyl (`cargo build --release --bin sibyl`; `cargo
# test --release` builds it too). A missing model file is fetched into the models folder with
# `sibyl generate` (pip); a missing datastore is built with `sibyl index` from this machine's
# Python standard library (python3's sysconfig stdlib, without tests). promtool comes from Debian's prometheus package, unpacked (not
# installed) into the cache. Environment: SIBYL_E2E_BINARY, SIBYL_IMAGE (sibyl:0.1.0),
# SIBYL_MODELS_DIR (the sibyl model cache), SIBYL_COMPOSE_MODEL (qwen2.5-coder-0.5b),
# SIBYL_E2E_PROJECT (sibyl-e2e), SIBYL_E2E_MAX_TOKENS (400), SIBYL_E2E_HEALTH_TIMEOUT (300 s),
# SIBYL_E2E_CUT_AFTER (0 s after the speculative request's first text),
# SIBYL_E2E_RECOVERY_TIMEOUT (30 s), SIBYL_E2E_COMPOSE_OVERRIDE (an extra compose file).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
project=${SIBYL_E2E_PROJECT:-sibyl-e2e}
binary=${SIBYL_E2E_BINARY:-${CARGO_TARGET_DIR:-$repo/target}/release/sibyl}
export SIBYL_IMAGE=${SIBYL_IMAGE:-sibyl:0.1.0}
export SIBYL_COMPOSE_MODEL=${SIBYL_COMPOSE_MODEL:-qwen2.5-coder-0.5b}
export SIBYL_MODELS_DIR=${SIBYL_MODELS_DIR:-${SIBYL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sibyl/models}}
max_tokens=${SIBYL_E2E_MAX_TOKENS:-400}
health_timeout=${SIBYL_E2E_HEALTH_TIMEOUT:-300}
recovery_timeout=${SIBYL_E2E_RECOVERY_TIMEOUT:-30}
cut_after=${SIBYL_E2E_CUT_AFTER:-0}
services=(gateway verifier drafter-ngram-a drafter-ngram-b drafter-retrieval)

log() { printf '== %s\n' "$*"; }
fail() { printf 'e2e: FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# Seconds since a `now` value, one decimal.
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
human_size() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }

for tool in docker curl python3 awk numfmt openssl; do
  command -v "$tool" >/dev/null || fail "needs $tool"
done
if docker compose version >/dev/null 2>&1; then
  compose_command=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose_command=(docker-compose)
else
  fail "needs docker compose (the plugin) or docker-compose"
fi
compose_files=(-f "$here/compose.yaml")
if [[ -n ${SIBYL_E2E_COMPOSE_OVERRIDE:-} ]]; then
  compose_files+=(-f "$SIBYL_E2E_COMPOSE_OVERRIDE")
fi
compose() { "${compose_command[@]}" -p "$project" "${compose_files[@]}" "$@"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/sibyl-e2e.XXXXXX")
cluster_up=false
speculative_pid=
probe_pid=
on_exit() {
  local status=$? pid
  for pid in $speculative_pid $probe_pid; do kill "$pid" 2>/dev/null || true; done
  if $cluster_up; then
    if ((status != 0)); then
      echo "== logs of every service" >&2
      compose logs --no-color >&2 || true
      compose ps >&2 || true
    fi
    log "docker compose down -v"
    compose down -v --remove-orphans >/dev/null 2>&1 || compose down -v --remove-orphans || true
  fi
  rm -rf "$work"
  if ((status != 0)); then echo "e2e: failed (exit $status)" >&2; fi
  exit "$status"
}
trap on_exit EXIT

started=$(now)

# --- image -----------------------------------------------------------------------------------
[[ -x $binary ]] || fail "no sibyl binary at $binary; build it: cargo build --release --bin sibyl"
log "image $SIBYL_IMAGE"
step_start=$(now)
"$repo/deploy/image/build.sh" --binary "$binary" --tag "$SIBYL_IMAGE"
image_seconds=$(since "$step_start")
image_bytes=$(docker image inspect -f '{{.Size}}' "$SIBYL_IMAGE")
base_bytes=$(docker image inspect -f '{{.Size}}' sibyl-base:bookworm)

# --- model -----------------------------------------------------------------------------------
model_file=$SIBYL_MODELS_DIR/$SIBYL_COMPOSE_MODEL.gguf
if [[ ! -f $model_file ]]; then
  log "fetching $SIBYL_COMPOSE_MODEL into $SIBYL_MODELS_DIR"
  SIBYL_CACHE_DIR=$SIBYL_MODELS_DIR "$binary" generate --model "$SIBYL_COMPOSE_MODEL" \
    --max-tokens 1 --prompt hi >/dev/null
  [[ -f $model_file ]] || fail "sibyl generate did not leave $model_file"
fi
# The containers run as uid 65532: the folder and the file must be readable by others.
if [[ -z $(find "$SIBYL_MODELS_DIR" -maxdepth 0 -perm -o=x) || -z $(find "$model_file" -perm -o=r) ]]; then
  fail "$model_file is not readable by uid 65532 (chmod o+x on the folder, o+r on the file)"
fi

# The retrieval drafter's datastore, beside the model, readable by uid 65532 (sibyl index
# writes it 0644).
datastore=$SIBYL_MODELS_DIR/$SIBYL_COMPOSE_MODEL-stdlib.sibyl
if [[ ! -f $datastore ]]; then
  stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  log "indexing $stdlib into $datastore"
  "$binary" index --input "$stdlib" --exclude test,tests,site-packages,__pycache__ \
    --model "$model_file" --output "$datastore"
fi
[[ -n $(find "$datastore" -perm -o=r) ]] || fail "$datastore is not readable by uid 65532 (chmod o+r)"

# --- secrets ---------------------------------------------------------------------------------
# Fresh API key, internal token and certificates for this run, readable by the containers'
# uid 65532.
export SIBYL_COMPOSE_SECRETS=$work/secrets
mkdir -p "$SIBYL_COMPOSE_SECRETS"
api_key="sk-e2e-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
printf '%s\n' "$api_key" >"$SIBYL_COMPOSE_SECRETS/api-keys"
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$SIBYL_COMPOSE_SECRETS/internal-token"
"$repo/deploy/make-tls.sh" "$SIBYL_COMPOSE_SECRETS" "${services[@]}"
chmod 0644 "$SIBYL_COMPOSE_SECRETS"/*
ca=$SIBYL_COMPOSE_SECRETS/ca.crt

# --- cluster ---------------------------------------------------------------------------------
compose down -v --remove-orphans >/dev/null 2>&1 || true
log "docker compose -p $project up -d (models from $SIBYL_MODELS_DIR)"
cluster_up=true
step_start=$(now)
compose up -d

container() { compose ps -q "$1"; }

# Waits until every named service's container is healthy (or running, without a health check).
wait_healthy() {
  local timeout=$1 deadline=$((SECONDS + $1)) service id state pending
  shift
  while :; do
    pending=()
    for service in "$@"; do
      id=$(container "$service")
      [[ -n $id ]] || fail "no container for $service"
      state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
      case $state in
        "running healthy" | "running none") ;;
        running*) pending+=("$service ($state)") ;;
        *) fail "$service is not running ($state)" ;;
      esac
    done
    ((${#pending[@]} == 0)) && return 0
    if ((SECONDS >= deadline)); then
      fail "not healthy after ${timeout} s: ${pending[*]}"
    fi
    sleep 2
  done
}

wait_healthy "$health_timeout" "${services[@]}"
healthy_seconds=$(since "$step_start")
log "all healthy after $healthy_seconds s"

# host:port on 127.0.0.1 of a service's published container port.
published() {
  local address
  address=$(compose port "$1" "$2" | tail -n 1)
  [[ $address == *:* ]] || fail "no published port $2 for $1"
  echo "127.0.0.1:${address##*:}"
}
gateway=$(published gateway 8080)
metrics_gateway=$(published gateway 9090)
metrics_verifier=$(published verifier 9090)
metrics_b=$(published drafter-ngram-b 9090)

cluster_network=$(docker network ls -q --filter "label=com.docker.compose.project=$project" \
  --filter label=com.docker.compose.network=cluster)
[[ -n $cluster_network ]] || cluster_network=${project}_cluster

# A greedy chat completion request body: PROMPT MAX_TOKENS SPECULATION (on|off) MODEL.
chat_body() {
  python3 - "$@" <<'EOF'
import json, sys
prompt, max_tokens, speculation, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
body = {
    "model": model,
    "messages": [{"role": "user", "content": prompt}],
    "temperature": 0,
    "max_tokens": max_tokens,
}
if speculation == "off":
    body["speculation"] = {"enabled": False}
print(json.dumps(body))
EOF
}
# POST BODY_FILE OUT_FILE MAX_SECONDS to the gateway's chat completions; prints the HTTP status.
post_chat() {
  curl -sS -o "$2" -w '%{http_code}' --max-time "$3" -H 'content-type: application/json' \
    --cacert "$ca" -H "authorization: Bearer $api_key" --data-binary "@$1" \
    "https://$gateway/v1/chat/completions"
}
# The text of a chat completion response.
content() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"], end="")' "$1"
}
# completion tokens, accepted and rejected prediction tokens, finish reason.
usage() {
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
u = r.get("usage") or {}
d = u.get("completion_tokens_details") or {}
print(f'{u.get("completion_tokens")} tokens, {d.get("accepted_prediction_tokens")} accepted and '
      f'{d.get("rejected_prediction_tokens")} rejected prediction tokens, finish {r["choices"][0].get("finish_reason")}')
EOF
}
# The sum of a metric's samples (all label sets, or those whose labels contain FILTER) at an
# address's /metrics; empty when it cannot be read.
metric() {
  local text
  text=$(curl -sS --max-time 5 "http://$1/metrics" 2>/dev/null) || return 0
  awk -v name="$2" -v filter="${3:-}" '
    /^#/ { next }
    {
      series = $1; base = series; sub(/\{.*/, "", base)
      if (base == name && (filter == "" || index(series, filter) > 0)) { sum += $2; seen = 1 }
    }
    END { if (seen) printf "%.17g\n", sum }
  ' <<<"$text"
}
# Whether number A > B (empty counts as 0).
greater() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { exit !(a + 0 > b + 0) }'; }

# --- 1. a chat completion ---------------------------------------------------------------------
log "1. chat completion through the gateway ($gateway)"
model=$SIBYL_COMPOSE_MODEL
chat_body "Write a Python function that reverses a string." 48 on "$model" >"$work/hello.json"
step_start=$(now)
code=$(post_chat "$work/hello.json" "$work/hello.out" 300) || fail "chat completion: curl failed"
[[ $code == 200 ]] || fail "chat completion: HTTP $code: $(cat "$work/hello.out")"
text=$(content "$work/hello.out")
[[ -n $text ]] || fail "chat completion: empty text"
echo "HTTP 200 in $(since "$step_start") s: $(usage "$work/hello.out")"
printf '%s\n' "$text" | head -n 5
# Without the key, or with another: 401, with OpenAI's error object.
for header in "x-no-key: 1" "authorization: Bearer sk-not-a-key"; do
  code=$(curl -sS -o "$work/denied.out" -w '%{http_code}' --max-time 10 -H "$header" \
    --cacert "$ca" -H 'content-type: application/json' --data-binary "@$work/hello.json" \
    "https://$gateway/v1/chat/completions") || fail "unauthenticated request: curl failed"
  [[ $code == 401 ]] || fail "a request with \"$header\" got HTTP $code, not 401"
  grep -q invalid_api_key "$work/denied.out" || fail "401 without code invalid_api_key"
done
echo "requests without a valid API key: 401"
if curl -sS -o /dev/null --max-time 10 -H "authorization: Bearer $api_key" \
  "http://$gateway/v1/models" 2>/dev/null; then
  fail "the gateway answered plain HTTP"
fi
echo "plain HTTP to the gateway: no answer (TLS only)"

# --- 2. the plain reference -------------------------------------------------------------------
long_prompt="Write a Python class Inventory with twenty methods, add_item_1 through add_item_20. \
Each method takes name and quantity, checks that name is a non-empty string and quantity a \
positive int (raising ValueError otherwise), appends {'name': name, 'quantity': quantity} to \
self.items and returns len(self.items). Write every method out in full, with a docstring; no \
loops and no explanation."
chat_body "$long_prompt" "$max_tokens" off "$model" >"$work/plain.json"
chat_body "$long_prompt" "$max_tokens" on "$model" >"$work/speculative.json"
log "2. plain reference (speculation off, greedy, $max_tokens tokens)"
step_start=$(now)
code=$(post_chat "$work/plain.json" "$work/plain.out" 900) || fail "plain reference: curl failed"
[[ $code == 200 ]] || fail "plain reference: HTTP $code: $(cat "$work/plain.out")"
plain_seconds=$(since "$step_start")
content "$work/plain.out" >"$work/plain.txt"
echo "HTTP 200 in $plain_seconds s: $(usage "$work/plain.out")"

# --- 3. speculation while the drafters go away ------------------------------------------------
log "3. speculative request, streamed; $cut_after s after its first text: stop drafter-ngram-a, disconnect drafter-ngram-b"
# Streams a chat completion (BODY_FILE) from the gateway into TEXT_FILE; prints the status, the
# usage, and the longest wait between two pieces of text, which shows a stalled generation.
# TEXT_FILE.first is written when the first piece of text arrives.
cat >"$work/stream.py" <<'EOF'
import json, ssl, sys, time, urllib.error, urllib.request
url, body_file, text_file, read_timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
api_key, ca_file = sys.argv[5], sys.argv[6]
body = json.load(open(body_file))
body["stream"] = True
body["stream_options"] = {"include_usage": True}
request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {api_key}"})
start = time.monotonic()
pieces, usage, finish, last, gap, gap_at, done = [], {}, None, None, 0.0, 0.0, False
try:
    response = urllib.request.urlopen(request, timeout=read_timeout,
                                      context=ssl.create_default_context(cafile=ca_file))
except urllib.error.HTTPError as error:
    print(f"HTTP {error.code}: {error.read().decode(errors='replace')}")
    sys.exit(1)
with response:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                now = time.monotonic()
                if last is not None and now - last > gap:
                    gap, gap_at = now - last, now - start
                last = now
                pieces.append(piece)
                if len(pieces) == 1:
                    open(text_file + ".first", "w").write(f"{now - start:.2f}\n")
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
open(text_file, "w").write("".join(pieces))
if not done:
    print(f"the stream ended without [DONE] after {len(pieces)} pieces")
    sys.exit(1)
details = usage.get("completion_tokens_details") or {}
print(f"HTTP 200 in {time.monotonic() - start:.1f} s: {usage.get('completion_tokens')} tokens, "
      f"{details.get('accepted_prediction_tokens')} accepted and "
      f"{details.get('rejected_prediction_tokens')} rejected prediction tokens, finish {finish}; "
      f"longest wait between pieces {gap:.2f} s (at {gap_at:.1f} s)")
EOF
# A stalled stream shows as a read timeout: twice the plain request, at least 60 s.
read_timeout=$(awk -v p="$plain_seconds" 'BEGIN { l = 2 * p; if (l < 60) l = 60; printf "%d", l }')
drafter_b=$(container drafter-ngram-b)
step_start=$(now)
python3 "$work/stream.py" "https://$gateway/v1/chat/completions" "$work/speculative.json" \
  "$work/speculative.txt" "$read_timeout" "$api_key" "$ca" >"$work/speculative.out" 2>&1 &
speculative_pid=$!
# The drafters go once generation is under way, whatever this machine's speed (speculation can
# finish the request in a second or two).
while [[ ! -e "$work/speculative.txt.first" ]] && kill -0 "$speculative_pid" 2>/dev/null; do
  sleep 0.05
done
sleep "$cut_after"
cut_start=$(now)
docker network disconnect "$cluster_network" "$drafter_b"
compose stop -t 1 drafter-ngram-a
echo "drafters cut off at $(since "$step_start") s (took $(since "$cut_start") s)"
kill -0 "$speculative_pid" 2>/dev/null ||
  fail "the speculative request ended before the drafters were cut off: $(tail -n 3 "$work/speculative.out"); raise SIBYL_E2E_MAX_TOKENS"
if ! wait "$speculative_pid"; then
  speculative_pid=
  fail "speculative request: $(tail -n 5 "$work/speculative.out")"
fi
speculative_pid=
speculative_seconds=$(since "$step_start")
cat "$work/speculative.out"
if ! cmp -s "$work/plain.txt" "$work/speculative.txt"; then
  diff -u --label plain --label speculative "$work/plain.txt" "$work/speculative.txt" >&2 || true
  fail "speculative output differs from the plain reference"
fi
echo "identical to the plain reference ($(wc -c <"$work/plain.txt") bytes)"
# Baselines for step 4, taken while both drafters are away.
blocks_b_away=$(metric "$metrics_b" sibyl_drafter_blocks_sent_total)
accepted_away=$(metric "$metrics_verifier" sibyl_verifier_draft_tokens_accepted_total 'drafter="ngram"')

# --- 4. the drafters come back ----------------------------------------------------------------
log "4. drafters back: start drafter-ngram-a, reconnect drafter-ngram-b"
back_start=$(now)
compose start drafter-ngram-a
# A manual connect must give back the service name, which compose sets as an alias.
docker network connect --alias drafter-ngram-b "$cluster_network" "$drafter_b"
deadline=$((SECONDS + recovery_timeout))
probe_prompt="Write Python functions is_even_1(x) through is_even_8(x), each returning x % 2 == 0. \
Write each out in full."
chat_body "$probe_prompt" 32 on "$model" >"$work/probe.json"
a_seconds= b_seconds= verifier_seconds= probes=0
# Short speculative requests, one after another, while the metrics are read every second.
while :; do
  if [[ -n $probe_pid ]] && ! kill -0 "$probe_pid" 2>/dev/null; then
    wait "$probe_pid" || fail "probe request: curl failed"
    probe_pid=
    code=$(cat "$work/probe.code")
    [[ $code == 200 ]] || fail "probe request: HTTP $code: $(cat "$work/probe.out")"
  fi
  if [[ -z $probe_pid ]]; then
    post_chat "$work/probe.json" "$work/probe.out" 120 >"$work/probe.code" &
    probe_pid=$!
    probes=$((probes + 1))
  fi
  # drafter-ngram-a is a fresh process (its counters start at 0) on a new host port.
  if [[ -z $a_seconds ]] && address=$(compose port drafter-ngram-a 9090 2>/dev/null | tail -n 1) &&
    [[ $address == *:* ]] && greater "$(metric "127.0.0.1:${address##*:}" sibyl_drafter_blocks_sent_total)" 0; then
    a_seconds=$(since "$back_start")
  fi
  if [[ -z $b_seconds ]] &&
    greater "$(metric "$metrics_b" sibyl_drafter_blocks_sent_total)" "$blocks_b_away"; then
    b_seconds=$(since "$back_start")
  fi
  if [[ -z $verifier_seconds ]] &&
    greater "$(metric "$metrics_verifier" sibyl_verifier_draft_tokens_accepted_total 'drafter="ngram"')" "$accepted_away"; then
    verifier_seconds=$(since "$back_start")
  fi
  [[ -n $a_seconds && -n $b_seconds && -n $verifier_seconds ]] && break
  if ((SECONDS >= deadline)); then
    fail "after ${recovery_timeout} s and $probes requests the drafters are not used again: drafter-ngram-a ${a_seconds:-no}, drafter-ngram-b ${b_seconds:-no}, verifier accepting drafts ${verifier_seconds:-no}"
  fi
  sleep 1
done
recovery_seconds=$(since "$back_start")
echo "both drafters used again after $recovery_seconds s ($probes requests): drafter-ngram-a sent blocks at $a_seconds s, drafter-ngram-b at $b_seconds s, the verifier accepted drafts at $verifier_seconds s"
if [[ -n $probe_pid ]]; then
  wait "$probe_pid" || fail "probe request: curl failed"
  probe_pid=
fi

# With no request running, every role should be idle again. A session left open by the cut
# (a peer that vanished without a reset) is reported, not failed: it costs no correctness.
metrics_a=$(published drafter-ngram-a 9090) # a new host port since the restart
idle_deadline=$((SECONDS + 10))
while :; do
  active="gateway $(metric "$metrics_gateway" sibyl_gateway_active_requests), verifier $(metric "$metrics_verifier" sibyl_verifier_active_sessions), drafter-ngram-a $(metric "$metrics_a" sibyl_drafter_active_sessions), drafter-ngram-b $(metric "$metrics_b" sibyl_drafter_active_sessions)"
  [[ $active =~ [1-9] ]] || break
  if ((SECONDS >= idle_deadline)); then
    echo "note: sessions still open with no request running: $active"
    break
  fi
  sleep 1
done

# --- 5. metrics -------------------------------------------------------------------------------
log "5. promtool check metrics"
promtool=$(command -v promtool || true)
if [[ -z $promtool ]]; then
  promtool=${XDG_CACHE_HOME:-$HOME/.cache}/sibyl/tools/promtool
  if [[ ! -x $promtool ]]; then
    # Debian's prometheus package carries promtool; unpacking it starts no Prometheus server.
    mkdir -p "$work/deb" "$(dirname "$promtool")"
    (cd "$work/deb" && { apt-get download prometheus >/dev/null 2>&1 ||
      { apt-get update >/dev/null && apt-get download prometheus >/dev/null; }; }) ||
      fail "cannot download Debian's prometheus package for promtool"
    dpkg -x "$work"/deb/prometheus_*.deb "$work/deb/root"
    install -m 0755 "$work/deb/root/usr/bin/promtool" "$promtool"
  fi
fi
check_metrics() {
  local role=$1 address=$2 file=$work/metrics-$1.txt name
  shift 2
  curl -fsS --max-time 10 "http://$address/metrics" >"$file" || fail "$role: no /metrics at $address"
  "$promtool" check metrics <"$file" || fail "$role: promtool check metrics"
  for name in sibyl_build_info process_resident_memory_bytes "$@"; do
    grep -q "^$name[{ ]" "$file" || fail "$role: no $name in /metrics"
  done
  echo "$role: $(grep -c '^[^#]' "$file") samples, promtool ok"
}
check_metrics gateway "$metrics_gateway" sibyl_gateway_requests_total sibyl_gateway_active_requests sibyl_gateway_verifier_up
check_metrics verifier "$metrics_verifier" sibyl_verifier_generated_tokens_total sibyl_verifier_model_loaded sibyl_verifier_drafter_up
check_metrics drafter-ngram-a "$metrics_a" sibyl_drafter_blocks_sent_total sibyl_drafter_active_sessions
check_metrics drafter-ngram-b "$metrics_b" sibyl_drafter_blocks_sent_total sibyl_drafter_active_sessions
metrics_retrieval=$(published drafter-retrieval 9090)
check_metrics drafter-retrieval "$metrics_retrieval" sibyl_drafter_blocks_sent_total sibyl_drafter_active_sessions
retrieval_up=$(metric "$metrics_verifier" sibyl_verifier_drafter_up 'drafter="retrieval"')
greater "$retrieval_up" 0 || fail "the verifier does not count the retrieval drafter as up ($retrieval_up)"
greater "$(metric "$metrics_retrieval" sibyl_drafter_blocks_sent_total)" 0 ||
  fail "the retrieval drafter sent no draft block"
echo "retrieval drafter up, $(metric "$metrics_retrieval" sibyl_drafter_blocks_sent_total) blocks sent"

# No role crashed (a restart policy would hide it).
for service in "${services[@]}"; do
  restarts=$(docker inspect -f '{{.RestartCount}}' "$(container "$service")")
  ((restarts == 0)) || fail "$service restarted $restarts times"
done

log "summary"
echo "image $SIBYL_IMAGE $(human_size "$image_bytes") (base sibyl-base:bookworm $(human_size "$base_bytes")), built in $image_seconds s"
echo "cluster healthy in $healthy_seconds s"
echo "plain reference $plain_seconds s; speculative with the drafters cut off $cut_after s after its first text: $speculative_seconds s, identical"
echo "drafters used again after $recovery_seconds s"
echo "e2e passed in $(since "$started") s"
