"""Weights into vLLM through vLLM's weight-transfer API (learner/weight_sync.py, actors/sampler.py),
on the control path a cluster uses: a Learner actor's trainer engine opens the group, the Sampler's
engine (built with ``weight_transfer_config``) joins it through ``init_weight_transfer_engine`` and
takes each update with ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``; here
with our gloo engine, registered in vLLM's factories.

At temperature 0.6 and top-p 0.95 (Qwen3's thinking settings) the sampler's behaviour log-probs and
the learner's processed log-probs of the same tokens must agree within 1e-4 after each update
(SPEC §2), the policy version must move once per completed update, and an update that cannot
complete must fail within ``weight_sync.timeout_s``, naming the weight sync. A teacher that is the
student itself (``follow_student``) takes the same updates in the same group.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEMPERATURE, TOP_P = 0.6, 0.95


def _samples(rollouts):
    from buffers.records import TrainSample

    return [TrainSample(r.prompt_ids, r.response_ids, r.behaviour_logprobs_T, None, None, None, 0.0, 1.0,
                        r.policy_version, "math", False, r.prompt.id) for r in rollouts if r.response_ids]


def _max_diff(got, samples) -> float:
    return max(float(np.max(np.abs(g - s.behaviour_logprobs_T))) for g, s in zip(got, samples))


@pytest.fixture(scope="module")
def pair(ray_cluster, tiny_demo):
    import ray

    from actors.sampler import Sampler
    from buffers.records import Prompt
    from configs.schema import LearnerConfig, SamplerConfig, WeightSyncConfig
    from learner.concurrency import CONCURRENCY_GROUPS
    from learner.learner import Learner
    from learner.logprobs import LogitProcessing

    student = str(tiny_demo / "student")
    scfg = SamplerConfig(n=4, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=12, max_model_len=64)
    sampler = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Sampler).options(num_cpus=1).remote(
        student, scfg, rank=0, seed=0, weight_backend="gloo")
    learner = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Learner).options(num_cpus=1).remote(
        student, LearnerConfig(lr=1e-2, num_cpus=1), rank=0, world_size=1, seed=0, total_steps=10,
        processing=LogitProcessing(temperature=TEMPERATURE, top_p=TOP_P))
    ray.get(learner.init_engine.remote(*ray.get(learner.dist_address.remote(), timeout=60)), timeout=600)
    # 0.02 MB buckets: the 4 MB student streams in ~100 of them, one alive at a time on each side
    ws = WeightSyncConfig(backend="gloo", bucket_mb=0.02, timeout_s=60)
    addr, port = ray.get(learner.weight_sync_address.remote("auto"), timeout=60)
    ray.get(learner.init_weight_transfer.remote([sampler], [1], ws, "float32", addr, port), timeout=120)
    prompts = [Prompt(id=f"p{i}", domain="math", prompt="", prompt_ids=tuple(range(5, 9 + i))) for i in range(4)]
    try:
        yield {"sampler": sampler, "learner": learner, "prompts": prompts, "ray": ray}
    finally:
        ray.kill(sampler)
        ray.kill(learner)


def _step(pair):
    """One optimizer step with a large learning rate (the weights move far)."""
    from tests.test_learner_dp import _batch

    pair["ray"].get(pair["learner"].train_step.remote(_batch()), timeout=300)


def _check(pair) -> tuple[float, float]:
    ray, s, lr = pair["ray"], pair["sampler"], pair["learner"]
    samples = _samples(ray.get(s.generate.remote(pair["prompts"]), timeout=300))
    assert len(samples) >= 8
    processed = ray.get(lr.compute_logprobs.remote(samples, processed=True), timeout=300)
    raw = ray.get(lr.compute_logprobs.remote(samples, processed=False), timeout=300)
    return _max_diff(processed, samples), _max_diff(raw, samples)


def test_two_updates_through_vllms_api_keep_behaviour_and_learner_log_probs_equal(pair):
    ray, s, lr = pair["ray"], pair["sampler"], pair["learner"]
    d0, raw0 = _check(pair)
    assert d0 < 1e-4, f"initial weights: processed log-probs differ by {d0}"
    # raw (temperature 1, no nucleus) log-probs are another distribution: the behaviour weight would be off
    assert raw0 > 0.1
    for version in (1, 2):
        _step(pair)
        stale, _ = _check(pair)
        assert stale > 1e-2, "premise: the step moved the learner's log-probs away from the sampler's"
        assert ray.get(s.get_version.remote(), timeout=30) == version - 1
        learner_m, sampler_s = ray.get([lr.send_weights.remote(version), s.receive_weights.remote(version)],
                                       timeout=120)
        assert learner_m["weight_sync/bytes"] > 3e6 and sampler_s > 0
        assert ray.get(s.get_version.remote(), timeout=30) == version  # once per completed update
        d, _ = _check(pair)
        assert d < 1e-4, f"after update {version}: processed log-probs differ by {d}"


def test_an_update_that_cannot_complete_fails_in_time_naming_the_weight_sync(pair):
    """A group with a 4 s deadline; the sampler waits for an update nobody sends. A new group; the
    learner sends one nobody receives. Both must fail in about 4 s, not hang; then a new group
    carries a complete update again."""
    from configs.schema import WeightSyncConfig

    ray, s, lr = pair["ray"], pair["sampler"], pair["learner"]

    def new_group(timeout_s: float) -> None:
        ws = WeightSyncConfig(backend="gloo", bucket_mb=0.02, timeout_s=timeout_s)
        addr, port = ray.get(lr.weight_sync_address.remote("auto"), timeout=60)
        ray.get(lr.init_weight_transfer.remote([s], [1], ws, "float32", addr, port), timeout=60)

    version = ray.get(s.get_version.remote(), timeout=30)
    for who, ref in (("sampler", lambda: s.receive_weights.remote(version + 1)),
                     ("learner", lambda: lr.send_weights.remote(version + 1))):
        new_group(4)
        t0 = time.perf_counter()
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(ref(), timeout=60)
        elapsed = time.perf_counter() - t0
        assert "weight sync" in str(err.value), f"{who}: {err.value}"
        assert 3.5 < elapsed < 20, f"{who}: failed after {elapsed:.1f}s with timeout_s=4"
        assert ray.get(s.get_version.remote(), timeout=30) == version  # a failed update moves nothing

    new_group(60)
    ray.get([lr.send_weights.remote(version + 1), s.receive_weights.remote(version + 1)], timeout=120)
    assert ray.get(s.get_version.remote(), timeout=30) == version + 1
    d, _ = _check(pair)
    assert d < 1e-4, f"after a failed update and a new group: processed log-probs differ by {d}"


def test_a_student_following_teacher_takes_the_updates_with_the_samplers(pair, tiny_demo):
    """Self-distillation: a Teacher with follow_student joins the group next to the sampler (its own
    rank offset) and scores with the updated weights: its log-probs of the sampler's tokens equal the
    learner's raw (temperature-1) ones after each update, and differ before it."""
    from actors.teacher import Teacher
    from buffers.records import VerifiedRollout
    from configs.schema import TeacherConfig, WeightSyncConfig
    from learner.concurrency import CONCURRENCY_GROUPS

    ray, s, lr = pair["ray"], pair["sampler"], pair["learner"]
    teacher = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Teacher).options(num_cpus=0.5).remote(
        "self", TeacherConfig(path=str(tiny_demo / "student"), follow_student=True), max_model_len=64,
        weight_backend="gloo")
    try:
        ws = WeightSyncConfig(backend="gloo", bucket_mb=0.02, timeout_s=60)
        addr, port = ray.get(lr.weight_sync_address.remote("auto"), timeout=60)
        ray.get(lr.init_weight_transfer.remote([s, teacher], [1, 1], ws, "float32", addr, port), timeout=120)
        version = ray.get(s.get_version.remote(), timeout=30)

        def teacher_vs_learner() -> float:
            rollouts = [r for r in ray.get(s.generate.remote(pair["prompts"]), timeout=300) if r.response_ids]
            scored = ray.get(teacher.score.remote([VerifiedRollout(r, False, "") for r in rollouts]), timeout=300)
            raw = ray.get(lr.compute_logprobs.remote(_samples(rollouts)), timeout=300)
            return max(float(np.max(np.abs(sc.teacher.logprobs_T - g))) for sc, g in zip(scored, raw))

        for step in (1, 2):
            v = version + step
            if step == 2:
                _step(pair)
                assert teacher_vs_learner() > 1e-2, "premise: the step moved the learner away from the teacher"
            ray.get([lr.send_weights.remote(v), s.receive_weights.remote(v), teacher.receive_weights.remote(v)],
                    timeout=120)
            assert ray.get([s.get_version.remote(), teacher.get_version.remote()], timeout=30) == [v, v]
            diff = teacher_vs_learner()
            assert diff < 1e-4, f"update {v}: the following teacher's log-probs differ from the learner's by {diff}"
    finally:
        ray.kill(teacher)
