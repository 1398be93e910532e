"""Build the demo's data and tiny models once, offline, and cache them on disk.

The thin entry point of ``demo.prepare.prepare`` (the package ``demo/`` says what is built
and how). CLI: ``python scripts/prepare_demo.py --out DIR [--recipe {default,code}] [--fast]
[--force]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# Allow ``python scripts/prepare_demo.py`` from the repository root without installing.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

# The package first: it sets OMP_WAIT_POLICY before anything imports torch (demo/__init__.py).
from demo.prepare import prepare  # noqa: E402
from demo.settings import RECIPES  # noqa: E402

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the cache)")
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="default: math + reverse (configs/demo.yaml); code: math + code (configs/demo_code.yaml)")
    parser.add_argument("--fast", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--force", action="store_true", help="rebuild even if READY matches")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise
    report = prepare(args.out, fast=args.fast, recipe=args.recipe, force=args.force)
    summary = {name: m["heldout_accuracy"] for name, m in report["models"].items()}
    logger.info("held-out greedy accuracy: %s; wall %.1fs", json.dumps(summary), report["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
