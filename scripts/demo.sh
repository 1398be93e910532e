#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo: local Ray, CPU, tiny models prepared on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/train.py configs/demo.yaml "$@"
