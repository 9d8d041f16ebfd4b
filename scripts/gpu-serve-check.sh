#!/usr/bin/env bash
# gpu-serve-check.sh - the product path on a GPU machine: `hydrad generate` and `hydrad serve`
# with --device cuda on a synthetic model (mkmodel) and a generated HydraLoRA adapter, through
# HTTP (base and adapter requests, streaming, /v1/adapters, /metrics). Prints what it saw;
# exit 0 only if every step worked. Called by gpu-check.sh; needs only bin/hydrad.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d bin/lib ] && export LD_LIBRARY_PATH="$PWD/bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# carried libraries are for bin/hydrad only: the system curl must not load our older libcurl
curl() { env -u LD_LIBRARY_PATH curl "$@"; }
T=$(mktemp -d)
PORT=${PORT:-8317}
fail=0
step() { echo "== $*"; }
check() { if "$@"; then echo "   ok"; else echo "   FAILED: $*"; fail=1; fi; }

step "mkmodel + mkadapter"
check bin/hydrad mkmodel --shape smollm2-135m --type q4_1 --seed 3 -o "$T/m.gguf"
check bin/hydrad mkadapter --out "$T/ad" --base "$T/m.gguf" --seed 4 --r 8 --K 3 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

for dev in cuda cpu; do
    step "generate --device $dev (32 tokens, greedy)"
    check bin/hydrad generate -m "$T/m.gguf" -p "hello world" -n 32 --ignore-eos --temp 0 --device $dev
    step "generate --device $dev with the adapter"
    check bin/hydrad generate -m "$T/m.gguf" -p "hello world" -n 32 --ignore-eos --temp 0 --device $dev --adapter "$T/ad"
done

step "serve --device cuda"
bin/hydrad serve -m "$T/m.gguf" --device cuda --port "$PORT" --served-model-name base \
    --adapter a1="$T/ad" --adapter-root "$T" > "$T/serve.log" 2>&1 &
SRV=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    sleep 0.2
done
grep -E "ready|backend" "$T/serve.log"
req() { curl -s -m 60 "http://127.0.0.1:$PORT$1" -H 'Content-Type: application/json' ${2:+-d "$2"}; }
for model in base a1; do
    out=$(req /v1/completions "{\"model\":\"$model\",\"prompt\":\"hello\",\"max_tokens\":16,\"temperature\":0,\"ignore_eos\":true}")
    echo "   $model: $(echo "$out" | head -c 300)"
    check grep -q '"completion_tokens":16' <<<"$out"
done
out=$(req /v1/chat/completions '{"model":"a1","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}')
check grep -q 'data: \[DONE\]' <<<"$out"
out=$(req /v1/adapters)
echo "   adapters: $(echo "$out" | head -c 400)"
check grep -q '"resident":true' <<<"$out"
check grep -q 'vllm:num_requests_running' <<<"$(req /metrics)"
kill -TERM "$SRV"; wait "$SRV"; echo "   serve exit status $?"
tail -3 "$T/serve.log"
rm -rf "$T"
echo "gpu-serve-check: $([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
