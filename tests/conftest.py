"""Shared fixtures: tiny demo models (fast preparation), one local Ray cluster per module, and the
skip of tests marked ``gpu`` where no CUDA device is visible (shared builders: tests/builders.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are collected everywhere and reported as skipped, not as errors, where
    ``torch.cuda.is_available()`` is false (torch is imported only when such a test is collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """Demo artefacts from the fast preparation (seconds; accuracy irrelevant)."""
    from demo.prepare import prepare

    out = tmp_path_factory.mktemp("demo_fast")
    prepare(out / "demo", fast=True)
    return out / "demo"


def demo_sources(demo: Path, split: str = "train", config: Path = REPO / "configs" / "demo.yaml") -> str:
    """The demo config's ``data.<split>`` sources with their paths moved into ``demo``, as a YAML
    override value (the tests run the shipped column maps on the fast-prepared data)."""
    import yaml

    tree = yaml.safe_load(config.read_text())
    cache = tree["demo"]["cache_dir"].rstrip("/")
    srcs = [{**s, "path": s["path"].replace(cache, str(demo), 1)} for s in tree["data"][split]]
    return yaml.safe_dump(srcs, default_flow_style=True, width=10**6).strip()


def demo_overrides(demo: Path, **extra) -> list[str]:
    o = {
        "demo.prepare": "false",
        "data.train": demo_sources(demo, "train"),
        "data.heldout": demo_sources(demo, "heldout"),
        "student.path": str(demo / "student"),
        "teachers.math_teacher.path": str(demo / "teacher_math"),
        "teachers.reverse_teacher.path": str(demo / "teacher_reverse"),
        "data.heldout_limit": "8",
        "data.prompts_per_step": "4",
        "sampler.n": "4",
    }
    o.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster per test module, shut down after it: a second Ray head on the machine
    (tests/test_ray_job_submit.py starts one) finds no job agent while another cluster runs."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
