"""The new SPEC §6 objectives through the real pipeline on tiny models (vLLM sampler and teachers, verifier,
buffer, DeepSpeed learner, weight sync, in a local Ray cluster): ``type: vopd`` with Prune-OPD drift control
makes the teachers return their top-k (needs_topk), and the learner's drift and per-domain overlap metrics
reach the driver's step metrics (the ones written to TensorBoard)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import demo_overrides
from tests.test_pipeline_integration import _one_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vopd_pipeline(tiny_demo, ray_cluster, tmp_path_factory):
    from actors.pipeline import Pipeline, load_data
    from actors.placement import release, spawn_actors
    from configs.schema import load_config

    out = tmp_path_factory.mktemp("runs")
    objective = "{type: vopd, top_k: 16, drift: {top_n: 8, severe_consecutive: 4}}"
    cfg = load_config(None, demo_overrides(tiny_demo, **{"run.output_dir": out, "sampler.num_cpus": 0.5,
                                                          "learner.objective": objective}))
    actors = spawn_actors(cfg, load_data(cfg).train)
    pipe = Pipeline(cfg, actors)
    pipe.start()
    yield pipe
    release(actors)


def test_vopd_with_drift_control_trains_a_step_and_reports_drift_and_overlap_per_domain(vopd_pipeline):
    batch, metrics = _one_step(vopd_pipeline)
    assert np.isfinite(metrics["loss"]) and metrics["learner/skipped_nonfinite"] == 0.0
    scored = [s for s in batch.samples if s.teacher_logprobs_T is not None]
    assert scored and all(s.topk_ids_TK is not None and s.topk_ids_TK.shape[1] == 16 for s in scored)
    for d in {s.domain for s in scored}:
        assert 0.0 <= metrics[f"learner/overlap/{d}/topk_overlap"] <= 1.0
        assert 0.0 <= metrics[f"learner/overlap/{d}/shared_mass_teacher"] <= 1.0 + 1e-6
    assert 0.0 <= metrics["learner/drift/event_frac"] <= 1.0
    assert metrics["learner/drift/tokens_saved"] >= 0.0
