"""The same job through `ray job submit` against a real local head started by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, demo_overrides

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_training_on_a_local_head(tiny_demo, tmp_path):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # a throwaway loopback head; real clusters keep token auth
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _port(), _port()
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    # --block keeps the head in this process group, so the test stops exactly its own cluster
    # (`ray stop` would also kill other Ray instances on the machine).
    head = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        addr = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([str(bindir / "ray"), "job", "list", "--address", addr], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if time.time() > deadline or head.poll() is not None:
                pytest.fail(f"Ray head did not come up: {probe.stderr[-2000:]}\n"
                            f"{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        out_dir = tmp_path / "runs"
        overrides = demo_overrides(tiny_demo, **{"run.steps": 2, "run.output_dir": out_dir, "run.name": "job"})
        agent_deadline = time.time() + 300  # the head's job agent comes up after its dashboard (minutes on a busy machine)
        while True:
            job = subprocess.run(
                [str(bindir / "ray"), "job", "submit", "--address", addr, "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps({"excludes": [".venv", ".cache", "runs", ".git"]}), "--",
                 "python", "scripts/train.py", "configs/demo.yaml", *overrides],
                env=env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in job.stdout + job.stderr or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        summary = json.loads((out_dir / "job" / "summary.json").read_text())
        assert summary["steps"] == 2
        assert set(summary["accuracy"]["after"]) == {"math", "reverse"}
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
