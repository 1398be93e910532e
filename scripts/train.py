"""Entry point: ``python scripts/train.py [CONFIG] [key=value ...] [--dry-run]``.

Loads and validates the config (nothing starts before that), prepares the demo's
models and data on first use when ``demo.prepare`` is on, then runs the pipeline
(actors/pipeline.py) and writes ``runs/<name>/summary.json``.
"""

from __future__ import annotations

import argparse
import os
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see actors/placement.py

from configs.schema import ConfigError, load_config  # noqa: E402


def console_logger() -> logging.Logger:
    """The run's own lines (plan, one per step, held-out accuracies, the final table) on stderr, never cut
    at the terminal width; other libraries' records go to the run's log file (actors/pipeline.py)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name in ("uniopd", "demo"):  # the run, and the demo's preparation on first use
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    return logging.getLogger("uniopd")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config (default: configs/demo.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=10")
    ap.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit")
    args = ap.parse_args(argv)
    if args.config and "=" in args.config:  # first positional is an override, not a file
        args.overrides.insert(0, args.config)
        args.config = None

    log = console_logger()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        log.error("%s", e)
        return 2

    from actors.pipeline import describe_plan, run

    if args.dry_run:
        from configs.schema import check_paths

        print(describe_plan(cfg))
        if not cfg.demo.prepare:  # the demo builds its paths on first use
            missing = check_paths(cfg, only_existing=True)
            for m in missing:
                print(f"not found on this machine (checked again at launch): {m}")
            if not missing:
                print("paths: every model and data path exists")
        return 0
    if cfg.demo.prepare:
        from demo.prepare import prepare

        prepare(cfg.demo.cache_dir, recipe=cfg.demo.recipe)
    try:
        summary = run(cfg)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; actors shut down")
        return 130
    from actors.progress import RunSummary

    log.info("run finished (summary.json and TensorBoard in %s):\n%s", cfg.run_dir if not cfg.run.resume
             else cfg.run.resume, RunSummary.from_dict(summary).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
