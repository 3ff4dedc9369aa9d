#!/usr/bin/env bash
# The test command of README's quickstart (and of .ci/run): sets up .venv, then runs the whole suite offline.
# VENV/CONSTRAINTS select another environment (see bootstrap.sh); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=${HF_HOME_FOR_TESTS:-$(mktemp -d -t safe-llava-hf-XXXXXX)}
exec "${VENV:-.venv}/bin/python" -m pytest -n 2 --durations=15 "$@" tests
