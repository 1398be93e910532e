"""The real pipeline on tiny models: vLLM sampler, teachers, verifier, buffer, DeepSpeed
learner and the gloo broadcast, in a local Ray cluster."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import demo_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tiny_demo, ray_cluster, tmp_path_factory):
    from actors.pipeline import Pipeline
    from actors.placement import release, spawn_actors
    from actors.pipeline import load_data
    from configs.schema import load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, demo_overrides(tiny_demo, **{"run.output_dir": out, "sampler.num_samplers": 2,
                                                          "sampler.num_cpus": 0.5, "learner.objective.top_k": 8}))
    actors = spawn_actors(cfg, load_data(cfg).train)
    pipe = Pipeline(cfg, actors)
    pipe.start()
    yield pipe
    release(actors)  # kills the actors and frees their placement groups


def _one_step(pipe):
    """One synchronous step through the driver's own stages: admit → chain → buffer → train → sync."""
    import asyncio

    import ray

    a = pipe.a
    prompts = ray.get(a.buffer.admit.remote(pipe.cfg.data.prompts_per_step))
    assert ray.get(a.buffer.add_chain.remote([p.uid for p in prompts], pipe.produce_on(0, prompts))) is None
    batch_ref, _ = a.buffer.next_batch.remote()
    metrics = asyncio.run(pipe.train_and_sync(batch_ref))
    return ray.get(batch_ref), metrics


def test_step_trains_syncs_and_advances_policy_version(pipeline):
    import ray

    batch, metrics = _one_step(pipeline)
    assert batch is not None and len(batch.samples) == 4 * 4
    assert all(s.policy_version == 0 for s in batch.samples)  # η = 0: lag-0 tokens only
    assert np.isfinite(metrics["loss"])
    assert metrics["weight_sync/bytes"] > 0
    assert pipeline.version == 1
    assert ray.get([s.get_version.remote() for s in pipeline.a.samplers]) == [1, 1]


def test_samplers_match_learner_logprobs_after_sync(pipeline):
    """After a broadcast, every sampler's behaviour log-probs equal the learner's (STACK.md: < 1e-6 fp32)."""
    import ray

    _one_step(pipeline)  # weights change, then are broadcast
    batch, _ = None, None
    a = pipeline.a
    prompts = ray.get(a.buffer.admit.remote(4))
    worst = 0.0
    for sampler in a.samplers:
        rollouts = ray.get(sampler.generate.remote(prompts))
        assert all(r.policy_version == pipeline.version for r in rollouts)
        from buffers.records import TrainSample

        samples = [TrainSample(r.prompt_ids, r.response_ids, r.behaviour_logprobs_T, None, None, None, 0.0, 1.0,
                               r.policy_version, r.prompt.domain, False, r.prompt.id) for r in rollouts]
        learner_lp = ray.get(a.learners[0].compute_logprobs.remote(samples))
        for r, lp in zip(rollouts, learner_lp):
            worst = max(worst, float(np.max(np.abs(lp - r.behaviour_logprobs_T))) if len(lp) else 0.0)
    assert worst < 1e-4, f"sampler/learner log-prob mismatch {worst}"
