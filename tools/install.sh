#!/usr/bin/env bash
# Create .venv (or reuse it) and install gradfilter-ops with its test extras.
# torch is pinned first: an unpinned torch on a machine without one pulls a multi-GB CUDA build,
# while 2.13.0 is the build our CI machines carry locally. Set TORCH_SPEC to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo "installed into $(pwd)/.venv"
