#!/usr/bin/env bash
# run.sh - what `make run` does after set-up and build: make two seeded demo adapters (once)
# and start the server on 127.0.0.1:8000 with them, printing a curl example first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PORT=${PORT:-8000}
DEMO=models/demo-adapters
mkdir -p "$DEMO"
[ -f "$DEMO/hydra-k3/adapter_config.json" ] ||
    bin/hydrad mkadapter --out "$DEMO/hydra-k3" --base "$MODEL" --seed 1 --r 8 --K 3 --targets q_proj,k_proj,v_proj,o_proj
[ -f "$DEMO/lora-qv/adapter_config.json" ] ||
    bin/hydrad mkadapter --out "$DEMO/lora-qv" --base "$MODEL" --seed 2 --r 8 --K 1 --targets q_proj,v_proj
cat <<MSG
hydrad: serving $MODEL on http://127.0.0.1:$PORT with adapters hydra-k3 and lora-qv. Try:
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"hydra-k3","messages":[{"role":"user","content":"Write a haiku about the sea."}],"max_tokens":64}'
  curl -s http://127.0.0.1:$PORT/v1/adapters
MSG
exec bin/hydrad serve -m "$MODEL" --port "$PORT" --served-model-name SmolLM2-135M-Instruct \
    --adapter hydra-k3="$DEMO/hydra-k3" --adapter lora-qv="$DEMO/lora-qv" --adapter-root "$DEMO"
