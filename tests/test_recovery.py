"""Nothing lost: actor failures mid-run, a hard-killed driver, a crash while checkpointing,
and a non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, demo_overrides

pytestmark = pytest.mark.slow

TERMINAL = {"trained", "dropped_stale"}


@pytest.fixture(scope="module")
def small_train(tiny_demo, tmp_path_factory) -> Path:
    """32 prompts: 8 steps × 4 prompts is exactly one epoch. One source in the canonical layout
    (id, domain, prompt, answer), made from the demo's DeepMath-style math rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((tiny_demo / "data" / "train" / "math").glob("*.parquet"))[0]).to_pylist()[:32]
    rows = [{"id": f"m{i}", "domain": "math", "prompt": r["question"], "answer": r["final_answer"]}
            for i, r in enumerate(table)]
    p = tmp_path_factory.mktemp("data") / "train32.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _check_epoch_accounted_once(accounting, ids: set[str], epoch: int = 1) -> None:
    """Every prompt of the epoch has exactly one terminal outcome; no admission (uid) has two."""
    per_uid = Counter(uid for _, uid, _, outcome in accounting if outcome in TERMINAL)
    assert max(per_uid.values()) == 1
    per_id = Counter(pid for pid, _, ep, outcome in accounting if ep == epoch and outcome in TERMINAL)
    assert set(per_id) == ids, f"lost: {sorted(ids - set(per_id))}"
    assert max(per_id.values()) == 1, [k for k, v in per_id.items() if v > 1]


def test_killed_sampler_and_teacher_lose_no_prompt(tiny_demo, small_train, ray_cluster, tmp_path):
    import ray

    from actors.pipeline import Pipeline
    from actors.placement import release, spawn_actors
    from actors.pipeline import load_data
    from configs.schema import load_config

    cfg = load_config(None, demo_overrides(tiny_demo, **{
        "data.train": small_train, "run.output_dir": tmp_path, "buffer.max_lag": 1, "sampler.num_samplers": 2,
        "sampler.num_cpus": 0.5, "sampler.chunk_prompts": 1, "weight_sync.timeout_s": 20,
        "chaos.sampler_delay_s": 0.2}))
    actors = spawn_actors(cfg, load_data(cfg).train)
    try:
        pipe = Pipeline(cfg, actors)
        pipe.start()

        def on_step(step, m):
            if step == 2:
                ray.kill(actors.samplers[0], no_restart=False)  # Ray restarts it
            if step == 4:
                ray.kill(actors.teachers["math_teacher"][0], no_restart=False)

        pipe.train_loop(12, on_step)
        assert pipe.faults >= 2
        accounting = ray.get(actors.buffer.get_accounting.remote())
        assert any(o == "requeued" for *_, o in accounting)
        _check_epoch_accounted_once(accounting, {json.loads(x)["id"] for x in small_train.read_text().splitlines()})
        # the restarted sampler holds the learner's current weights
        assert ray.get([s.get_version.remote() for s in actors.samplers]) == [pipe.version] * 2
    finally:
        release(actors)  # kills the actors and frees their placement groups


def _train_cmd(tiny_demo, small_train, out_dir, *extra):
    return [sys.executable, "scripts/train.py", *demo_overrides(tiny_demo, **{
        "data.train": small_train, "run.output_dir": out_dir, "run.name": "r", "run.steps": 8,
        "learner.checkpoint_every": 2, "run.num_cpus": 4}), *extra]


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _logged_steps(run_dir: Path, tag: str = "loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    return sorted({e.step for e in ea.Scalars(tag)})


def test_hard_killed_driver_resumes_without_losing_or_repeating_prompts(tiny_demo, small_train, tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(_train_cmd(tiny_demo, small_train, tmp_path), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        latest = run_dir / "checkpoints" / "latest"
        while not (latest.exists() and latest.read_text() >= "step_000004"):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        _kill_group(proc)  # SIGKILL: no clean shutdown, no final checkpoint
    assert not (run_dir / "summary.json").exists()
    out = subprocess.run(_train_cmd(tiny_demo, small_train, tmp_path, f"run.resume={run_dir}"), cwd=REPO,
                         capture_output=True, text=True, timeout=900, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and 4 <= summary["resumed_from_step"] < 8
    rows = [json.loads(x) for x in (run_dir / "accounting.jsonl").read_text().splitlines()]
    ids = {json.loads(x)["id"] for x in small_train.read_text().splitlines()}
    _check_epoch_accounted_once([(r["id"], r["uid"], r["epoch"], r["outcome"]) for r in rows], ids)
    # the loss curve goes on from the checkpoint: every step 1..8 logged
    assert _logged_steps(run_dir) == list(range(1, 9))


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_demo, small_train, tmp_path):
    run_dir = tmp_path / "r"
    first = subprocess.run(_train_cmd(tiny_demo, small_train, tmp_path, "run.steps=6",
                                      "chaos.crash_in_checkpoint_step=4"),
                           cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert first.returncode == 17, first.stderr[-3000:]
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step_000002"
    assert (ck / ".tmp-step_000004").exists() and not (ck / "step_000004").exists()
    out = subprocess.run(_train_cmd(tiny_demo, small_train, tmp_path, "run.steps=6", f"run.resume={run_dir}"),
                         cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    # the exported student loads with transformers
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary["student_export"]) is not None


def test_nonfinite_loss_skips_the_step_and_keeps_the_weights(tiny_demo):
    from buffers.records import TrainBatch, TrainSample
    from configs.schema import LearnerConfig
    from learner.learner import Learner, free_port

    lr = Learner(str(tiny_demo / "student"), LearnerConfig(micro_batch_size=4), rank=0, world_size=1, seed=0,
                 total_steps=10)
    lr.init_engine("127.0.0.1", free_port())

    def sample(shift):
        return TrainSample([5, 6, 7], [8, 9, 10, 11], np.full(4, -1.0, np.float32), np.full(4, -0.5, np.float32),
                           None, None, shift, 1.0, 0, "math", True, "x")

    before = lr.param_checksum()
    m = lr.train_step(TrainBatch([sample(0.0)] * 4 + [sample(float("nan"))] * 4, 8))
    assert m["skipped_nonfinite"] == 1.0 and lr.param_checksum() == before
    m = lr.train_step(TrainBatch([sample(0.0)] * 8, 8))
    assert m["skipped_nonfinite"] == 0.0 and np.isfinite(m["loss"]) and lr.param_checksum() != before
