#!/usr/bin/env bash
# run.sh - what `make run` does after set-up and build: start the server on 127.0.0.1:8000 with the
# two trained demo adapters committed in tests/fixtures/adapters/trained (a HydraLoRA served as
# `hydra`, a plain PEFT LoRA as `lora`; see README "Trained adapters"), printing examples first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PORT=${PORT:-8000}
TRAINED=tests/fixtures/adapters/trained
cat <<MSG
hydrad: serving $MODEL on http://127.0.0.1:$PORT with the trained adapters hydra (HydraLoRA, 4 heads)
and lora (PEFT LoRA). They learned four tasks: reversing a word list, numbers in English words,
name/city/age as JSON, dates in words.
Web console (chat playground, adapters, router and live view): http://127.0.0.1:$PORT/
Or try:
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"hydra","messages":[{"role":"user","content":"Write the date 2024-03-15 in words."}],"temperature":0,"hydra":{"return_router":true}}'
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"lora","messages":[{"role":"user","content":"Write the number 342 in English words."}],"temperature":0}'
  curl -s http://127.0.0.1:$PORT/v1/adapters
MSG
exec bin/hydrad serve -m "$MODEL" --port "$PORT" --served-model-name SmolLM2-135M-Instruct \
    --adapter hydra="$TRAINED/hydra" --adapter lora="$TRAINED/lora" --adapter-root "$TRAINED"
