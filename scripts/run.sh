#!/usr/bin/env bash
# run.sh - what `make run` does after set-up and build: a sample chat generation on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
exec bin/hydrad generate -m "$MODEL" --chat -n 128 -p "${PROMPT:-Give me three tips for writing clear C code.}"
