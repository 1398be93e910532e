"""Atomic run checkpoints: learner (DeepSpeed state), buffer, driver counters, HF export.

Layout under ``<run_dir>/checkpoints/``:

    step_000010/            one complete checkpoint
      learner/              DeepSpeed save_checkpoint (model, optimizer, scheduler, RNG)
      hf/                   the student in Hugging Face format (transformers and vLLM load it)
      buffer.pkl            dataset cursor, ready groups, in-flight prompts, accounting, RNG
      meta.json             step, policy version, driver totals
      COMPLETE              written last
    latest                  name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.tmp-step_N`` and renamed into place only after
``COMPLETE`` is written, so a crash while saving leaves the previous one usable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import ray

log = logging.getLogger("uniopd")

COMPLETE = "COMPLETE"


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_complete(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: ``latest`` if it is complete, else the highest complete step."""
    r = root(run_dir)
    pointer = r / "latest"
    if pointer.is_file():
        cand = r / pointer.read_text().strip()
        if (cand / COMPLETE).is_file():
            return cand
    done = sorted(p for p in r.glob("step_*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def save(run_dir: Path, step: int, version: int, learners: list, buffer, meta: dict, *, keep: int,
         timeout: float, crash_after_learner: bool = False) -> Path:
    r = root(run_dir)
    r.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = r / f".tmp-{name}", r / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    ray.get([lr.save_checkpoint.remote(str(tmp / "learner"), {"step": step}) for lr in learners], timeout=timeout)
    if crash_after_learner:  # fault injection (chaos.crash_in_checkpoint_step): die mid-write
        log.error("chaos: killing the driver while checkpoint %s is half written", name)
        os._exit(17)
    # every rank takes part in the export (ZeRO-3 gathers each parameter); rank 0 writes it
    ray.get([lr.save_hf.remote(str(tmp / "hf")) for lr in learners] + [buffer.save.remote(str(tmp / "buffer.pkl"))],
            timeout=timeout)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "version": version, **meta}, indent=2))
    (tmp / COMPLETE).write_text("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = r / "latest.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, r / "latest")
    for old in sorted(p for p in r.glob("step_*") if (p / COMPLETE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return final


def load_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())
