"""Several scorers per response through the real pipeline (tiny demo models, vLLM teachers, the buffer
actor, the DeepSpeed learner): a two-teacher domain (SPEC §5) and the ``extrapolated`` objective with a
reference teacher at the student's path (SPEC §6), each trained a few steps by the driver's own loops."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests.conftest import demo_overrides

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _pipeline(tiny_demo, tmp_path, **overrides):
    from actors.pipeline import Pipeline, load_data
    from actors.placement import release, spawn_actors
    from configs.schema import load_config

    cfg = load_config(None, demo_overrides(tiny_demo, **{"run.output_dir": tmp_path, **overrides}))
    actors = spawn_actors(cfg, load_data(cfg).train)
    try:
        pipe = Pipeline(cfg, actors)
        pipe.start()
        yield pipe
    finally:
        release(actors)


def _train(pipe, steps: int) -> list[dict[str, float]]:
    seen: list[dict[str, float]] = []
    pipe.train_loop(steps, lambda step, m: seen.append(m))
    assert len(seen) == steps and pipe.version == steps
    assert all(np.isfinite(m["loss"]) for m in seen)
    return seen


def test_two_teacher_domain_trains_with_confidence_weights(tiny_demo, ray_cluster, tmp_path):
    with _pipeline(tiny_demo, tmp_path, **{"domains.math.teacher": "[math_teacher, reverse_teacher]",
                                           "domains.math.combine": "{type: confidence, temperature: 1.0}"}) as pipe:
        seen = _train(pipe, 3)
    with_math = [m for m in seen if "accuracy/train/math" in m]  # a batch of 4 prompts may hold one domain only
    assert with_math
    for m in with_math:
        w = m["teacher/math/weight/math_teacher"], m["teacher/math/weight/reverse_teacher"]
        assert all(0 <= x <= 1 for x in w) and sum(w) == pytest.approx(1.0, abs=1e-6)  # no failures: Σ_k w_k = 1
        assert "teacher/reverse/weight/reverse_teacher" not in m  # one teacher: the plain path
        assert m["teacher/failed_responses"] == 0
    # the math teacher is far more confident on math responses than the reversal teacher (trained on
    # another task), so confidence weighting must lean on it
    assert np.mean([m["teacher/math/weight/math_teacher"] for m in with_math]) > 0.5


def test_extrapolated_trains_and_its_scores_are_the_extrapolated_target(tiny_demo, ray_cluster, tmp_path):
    import asyncio

    import ray

    from buffers.records import Rollout, VerifiedRollout

    student = str(tiny_demo / "student")
    with _pipeline(tiny_demo, tmp_path, **{"learner.objective": "{type: extrapolated, lam: 1.25}",
                                           "teachers.reference": f"{{path: {student}, num_cpus: 0.5}}"}) as pipe:
        seen = _train(pipe, 2)
        # one more step by hand, to hold its batch and rescore it with each teacher apart
        a = pipe.a
        prompts = ray.get(a.buffer.admit.remote(pipe.cfg.data.prompts_per_step))
        assert ray.get(a.buffer.add_chain.remote([p.uid for p in prompts], pipe.produce_on(0, prompts))) is None
        batch_ref, info_ref = a.buffer.next_batch.remote()
        batch, info = ray.get(batch_ref), ray.get(info_ref)
        asyncio.run(pipe.train_and_sync(batch_ref))
        ok = [s for s in batch.samples if s.teacher_logprobs_T is not None and len(s.response_ids)][:6]
        # a teacher reads only the token ids (the prompt record rides along)
        vs = [VerifiedRollout(Rollout(prompts[0], 0, list(s.prompt_ids), list(s.response_ids), s.behaviour_logprobs_T,
                                      0, "", "stop"), s.correct, "match") for s in ok]
        ref = ray.get(pipe.router.pick_teacher("reference").score.remote(vs))
        for s, v, r in zip(ok, vs, ref):
            t = ray.get(pipe.router.pick(s.domain).score.remote([v]))[0]
            want = 1.25 * t.teacher.logprobs_T + (1 - 1.25) * r.teacher.logprobs_T
            np.testing.assert_allclose(s.teacher_logprobs_T, want, atol=1e-4)
    assert ok
    for m in [*seen, info]:
        domains = [d for d in ("math", "reverse") if f"accuracy/train/{d}" in m]
        assert domains
        for d in domains:
            assert 0 < m[f"extrapolation/{d}/teacher_modal_prob"] <= 1
            assert 0 <= m[f"extrapolation/{d}/past_cliff_frac"] <= m[f"extrapolation/{d}/measured_frac"] <= 1
