#!/usr/bin/env bash
# The main job of README's quickstart: sets up .venv, then runs the end-to-end demo on the embedded default
# (build, train both stages, export, reload through remote code, judge held-out images).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=${HF_HOME:-$PWD/outputs/hf_home}
exec .venv/bin/safe-llava demo "$@"
