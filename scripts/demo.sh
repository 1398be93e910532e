#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo: local Ray, CPU, tiny models prepared on first use.
#   bash scripts/demo.sh                              # math + reverse (configs/demo.yaml)
#   bash scripts/demo.sh configs/demo_code.yaml       # math + code, graded in the sandbox
#   bash scripts/demo.sh [CONFIG] key=value ...       # overrides, as for scripts/train.py
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/demo.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
  config=$1
  shift
fi
bash scripts/setup.sh
exec .venv/bin/python scripts/train.py "$config" "$@"
