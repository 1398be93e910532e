"""Build the demo's data and tiny models once, offline, and cache them on disk.

Owns the cache: the layout under ``out_dir`` is ``teacher_<domain>/`` per domain and
``student/`` (each a complete HF directory: config, safetensors, tokenizer with chat
template), ``data/{train,heldout}/<domain>/part-00000.parquet``, ``prepare_report.json``
(held-out greedy accuracies graded by the domains' real verifiers, the student's cold-start
attempts, timings) and ``READY`` (written last; holds the settings digest). The dev set and
the SFT pools stay internal.

Invariants: everything is built in a sibling temporary directory and moved into place only
when complete, so a half-written cache is never seen; one preparer per cache (a file lock),
so a concurrent caller waits and then finds ``READY``; a directory this module did not
create is never deleted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from demo.data import PART_FILE, SPLITS, data_path, make_splits, write_dataset
from demo.evaluation import evaluate_greedy
from demo.models import build_model, count_parameters, save_model
from demo.settings import FORMAT_VERSION, PrepareSettings, recipe_settings
from demo.tasks import format_response
from demo.tokenizer import CHAT_TEMPLATE, build_tokenizer, row_prompt_ids, with_prompt_ids
from demo.training import Snapshot, cold_start, train_phase

logger = logging.getLogger(__name__)


READY_FILE = "READY"
REPORT_FILE = "prepare_report.json"


def _ready_digest(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / READY_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(out: Path) -> None:
    """Delete staging dirs left by killed runs (SIGTERM/SIGKILL skip the cleanup)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing stale staging directory %s", path)
            shutil.rmtree(path, ignore_errors=True)


def is_ready(out_dir: str | os.PathLike[str], settings: PrepareSettings) -> bool:
    return _ready_digest(Path(out_dir)) == settings.digest()


def prepare(
    out_dir: str | os.PathLike[str],
    fast: bool = False,
    *,
    recipe: str = "default",
    settings: PrepareSettings | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the demo artefacts of ``recipe`` under ``out_dir``; return the report.

    Returns at once with the cached report when ``READY`` holds the same settings digest.
    ``settings``, when given, replaces the recipe's.
    """
    settings = settings or recipe_settings(recipe, fast)
    out = Path(out_dir).resolve()
    if not force and is_ready(out, settings):
        logger.info("demo artefacts in %s are ready (digest %s)", out, settings.digest())
        return json.loads((out / REPORT_FILE).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    # One preparer per cache: a concurrent caller waits here, then finds READY.
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_ready(out, settings):
            return json.loads((out / REPORT_FILE).read_text())
        return _prepare_locked(out, settings, fast)


def _prepare_locked(out: Path, settings: PrepareSettings, fast: bool) -> dict[str, Any]:
    is_cache = (out / REPORT_FILE).exists() or (out / READY_FILE).exists()
    if out.exists() and any(out.iterdir()) and not is_cache:
        # Never delete a directory this module did not create.
        raise FileExistsError(f"{out} exists, is not empty and is not a demo cache; refusing to overwrite")

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the machine has 2 cores
    t_start = time.perf_counter()
    _remove_dead_staging(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        report = _build(staging, settings, fast)
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        # READY last: its presence (with this digest) is what marks the cache complete.
        (staging / READY_FILE).write_text(json.dumps({"digest": settings.digest(), "fast": fast}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        torch.set_num_threads(threads)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo artefacts written to %s in %.1fs", out, report["wall_seconds"])
    return report


def _build(out: Path, settings: PrepareSettings, fast: bool) -> dict[str, Any]:
    tokenizer = build_tokenizer(settings.domains)
    train, heldout, dev, pool = make_splits(settings)
    for split, rows in (("train", train), ("heldout", heldout)):
        write_dataset(out, split, rows, settings.domains)
    # Encoded once with the pipeline's formatting (encode_prompt); every evaluation uses these.
    heldout, dev = with_prompt_ids(tokenizer, heldout), with_prompt_ids(tokenizer, dev)
    # Templated prompt + reference response + EOS must fit the models' positions.
    longest = max(len(row_prompt_ids(tokenizer, r)) + len(tokenizer(format_response(r["domain"], r["answer"]),
                                                                     add_special_tokens=False)["input_ids"]) + 1
                  for r in [*heldout, *dev, *train])

    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "digest": settings.digest(),
        "fast": fast,
        "settings": dataclasses.asdict(settings),
        "vocab_size": len(tokenizer),
        "chat_template": CHAT_TEMPLATE,
        "longest_sequence_tokens": longest,  # templated prompt + reference response + EOS
        "data": {split: {d: str(data_path(".", split, d) / PART_FILE) for d in settings.domains} for split in SPLITS},
        "counts": {"train": len(train), "heldout": len(heldout), "dev": len(dev),
                   "sft_pool_per_domain": settings.sft_pool_per_domain},
        "models": {},
    }
    if longest > settings.max_position_embeddings:
        raise ValueError(f"the longest templated prompt + response + EOS is {longest} tokens, over "
                         f"max_position_embeddings {settings.max_position_embeddings}")
    # The seeds follow this order: teachers in ``domains`` order, then the student.
    ladder: list[Snapshot] = []
    for k, domain in enumerate(settings.domains):
        t0 = time.perf_counter()
        name = f"teacher_{domain}"
        seed = settings.seed * 1000 + 100 * k
        model = build_model(settings, tokenizer, seed=seed)
        logger.info("training %s (%d params)", name, count_parameters(model))
        record, kept = train_phase(
            name, model, tokenizer, settings.teacher_plan(domain), pool, dev,
            check_every=settings.check_every, seed=seed + 1, max_new_tokens=settings.eval_max_new_tokens,
            replay_prompts=settings.replay_prompts,
        )
        if domain == "math":
            ladder = kept
        t_eval = time.perf_counter()
        accuracy = evaluate_greedy(model, tokenizer, heldout, max_new_tokens=settings.eval_max_new_tokens)
        logger.info("%s held-out greedy accuracy %s", name, accuracy)
        save_model(model, tokenizer, out / name)
        report["models"][name] = {
            "heldout_accuracy": accuracy,
            "init": "scratch",
            "params": count_parameters(model),
            "training": record,
            "eval_seconds": round(time.perf_counter() - t_eval, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    seed = settings.seed * 1000 + 100 * len(settings.domains)
    report["models"]["student"] = cold_start(out, settings, tokenizer, pool, dev, heldout, ladder, seed)
    return report
