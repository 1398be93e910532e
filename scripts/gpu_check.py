"""Run the GPU checks (tests/test_gpu.py, marked ``gpu``) on a CUDA machine.

A thin wrapper of ``python -m pytest -m gpu tests/test_gpu.py -rA``: run it from anywhere as
``python3 scripts/gpu_check.py [PYTEST ARGS]`` (for example ``-k "zero0 or objectives"`` to fit a
short device slot; ``GPU_CASE_TIMEOUT_S`` bounds each case's process). What each check verifies
is in tests/test_gpu.py's docstring. Without CUDA every check is reported as skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return int(pytest.main(["-m", "gpu", "-rA", "--rootdir", str(REPO), str(REPO / "tests" / "test_gpu.py"), *args]))


if __name__ == "__main__":
    sys.exit(main())
