"""Data-parallel learner (learner/learner.py): two DeepSpeed ranks as Ray actors must take the
same optimizer step as one learner on the whole batch.

Each rank trains on ``samples[rank::W]`` with the SPEC §1 loss divided by the *global* response
count and multiplied by W, because DeepSpeed averages gradients over the W ranks. If that
scaling were wrong, the W=2 gradient would be a multiple of the W=1 gradient. Gradient
clipping (norm 1) and AdamW's first step (update ≈ lr·sign(g)) both hide a constant gradient
scale, so the parameters cannot catch it (measured: with the ×W removed the W=2 log-probs still
matched W=1 to 1.2e-6): the reported pre-clip gradient norm, taken after DeepSpeed's all-reduce,
is the check on the scale, and the log-probs after the step are the check on the direction.
"""

from __future__ import annotations

import numpy as np
import pytest

from buffers.records import TrainSample
from tests.builders import DEMO_VOCAB, random_train_batch

pytestmark = pytest.mark.slow

N = 16  # responses in the batch


def _batch():
    return random_train_batch(N, DEMO_VOCAB)


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_demo):
    """One step of a W=1 learner and of a W=2 group on the same batch; log-probs before and after."""
    import json

    import ray

    from configs.schema import LearnerConfig, PolicyGradientTerm, ReverseKLTopK
    from learner.concurrency import CONCURRENCY_GROUPS
    from learner.learner import Learner

    student = str(tiny_demo / "student")
    assert json.loads((tiny_demo / "student" / "config.json").read_text())["vocab_size"] == DEMO_VOCAB
    # A budget of 24 tokens (prompt+response lengths 5..14): W=1 accumulates 9 micro-batches; the two
    # W=2 ranks plan 5 each, rank 1 with 4 real + 1 empty, so accumulation over a step-dependent count
    # and the empty micro-batch (a dummy forward + zero loss) both count.
    cfg = LearnerConfig(max_tokens_per_micro_batch=24, lr=1e-3, num_cpus=1,
                        objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm()))
    # Learner has control-plane methods in a concurrency group: Ray needs the groups declared.
    actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Learner).options(num_cpus=1)
    kw = dict(seed=0, total_steps=10)
    single = actor.remote(student, cfg, rank=0, world_size=1, **kw)
    ranks = [actor.remote(student, cfg, rank=r, world_size=2, **kw) for r in (0, 1)]
    try:
        a1 = ray.get(single.dist_address.remote(), timeout=120)
        a2 = ray.get(ranks[0].dist_address.remote(), timeout=120)
        ray.get([single.init_engine.remote(*a1)] + [r.init_engine.remote(*a2) for r in ranks], timeout=600)

        batch = _batch()
        samples = batch.samples
        before = ray.get([h.compute_logprobs.remote(samples) for h in [single, *ranks]], timeout=300)
        metrics = ray.get([h.train_step.remote(batch) for h in [single, *ranks]], timeout=600)
        after = ray.get([h.compute_logprobs.remote(samples) for h in [single, *ranks]], timeout=300)
        flat = lambda per_sample: np.concatenate(per_sample)  # noqa: E731
        yield {
            "before": [flat(x) for x in before],  # [W=1, rank 0, rank 1]
            "after": [flat(x) for x in after],
            "single": metrics[0],
            "ranks": metrics[1:],
        }
    finally:
        for h in [single, *ranks]:
            ray.kill(h)


def test_all_learners_start_from_the_same_student(runs):
    b1, b_r0, b_r1 = runs["before"]
    assert np.array_equal(b1, b_r0) and np.array_equal(b_r0, b_r1)


def test_two_dp_ranks_hold_identical_parameters_after_a_step(runs):
    _, r0, r1 = runs["after"]
    np.testing.assert_allclose(r0, r1, rtol=0, atol=1e-6)


def test_two_dp_ranks_take_the_same_step_as_one_learner_on_the_whole_batch(runs):
    before, (single, r0, r1) = runs["before"][0], runs["after"]
    # Premise: the step moves the log-probs far more than the tolerance, so equality means something.
    assert np.max(np.abs(single - before)) > 1e-3
    np.testing.assert_allclose(r0, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r1, single, rtol=0, atol=1e-5)


def test_dp_gradient_norm_equals_one_learners_so_the_loss_scaling_cancels_deepspeed_averaging(runs):
    g1 = runs["single"]["grad_norm"]
    assert g1 > 0
    for m in runs["ranks"]:
        assert m["grad_norm"] == pytest.approx(g1, rel=1e-5)


def test_dp_rank_losses_add_up_to_the_single_learner_global_loss(runs):
    """train_step reports each rank's share of the SPEC §1 global loss (already divided by the
    global response count); summed over ranks it is the one-learner loss."""
    single, ranks = runs["single"], runs["ranks"]
    assert abs(single["loss"]) > 1e-4
    for key in ("loss", "pg_loss", "dist_loss"):
        assert sum(m[key] for m in ranks) == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


def test_reported_step_loss_of_two_ranks_equals_the_single_learner_loss(runs):
    from actors.pipeline import _learner_metrics

    one, two = _learner_metrics([runs["single"]]), _learner_metrics(runs["ranks"])
    for key in ("loss", "learner/pg_loss", "learner/dist_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def zero3(ray_cluster, tiny_demo, runs, tmp_path_factory):
    """A W=2 ZeRO-3 group: what it would send to samplers, one step on the batch of ``runs``, then
    the stepped weights sent to a vLLM sampler through the weight-transfer API and exported with
    ``save_hf``."""
    import ray

    from actors.sampler import Sampler
    from buffers.records import Prompt
    from configs.schema import LearnerConfig, PolicyGradientTerm, ReverseKLTopK, SamplerConfig, WeightSyncConfig
    from learner.concurrency import CONCURRENCY_GROUPS
    from learner.learner import Learner

    student = str(tiny_demo / "student")
    cfg = LearnerConfig(max_tokens_per_micro_batch=24, lr=1e-3, num_cpus=1, zero_stage=3,
                        objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm()))
    actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Learner).options(num_cpus=1)
    ranks = [actor.remote(student, cfg, rank=r, world_size=2, seed=0, total_steps=10)
             for r in (0, 1)]
    sampler = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Sampler).options(num_cpus=0.5).remote(
        student, SamplerConfig(n=2, max_new_tokens=10, max_model_len=64), rank=0, seed=0)
    try:
        addr = ray.get(ranks[0].dist_address.remote(), timeout=120)
        n_params = ray.get([r.init_engine.remote(*addr) for r in ranks], timeout=600)
        specs = ray.get(ranks[0].transfer_metadata.remote(), timeout=120)
        batch = _batch()
        ray.get([r.train_step.remote(batch) for r in ranks], timeout=600)
        after = ray.get([r.compute_logprobs.remote(batch.samples) for r in ranks], timeout=300)
        # weight transfer: both ranks iterate (each parameter is gathered collectively), rank 0 sends
        ws = WeightSyncConfig(backend="gloo", bucket_mb=0.05, timeout_s=60)
        waddr, wport = ray.get(ranks[0].weight_sync_address.remote("auto"), timeout=60)
        ray.get([r.init_weight_transfer.remote([sampler], [1], ws, "float32", waddr, wport) for r in ranks],
                timeout=120)
        ray.get([r.send_weights.remote(1) for r in ranks] + [sampler.receive_weights.remote(1)], timeout=120)
        prompts = [Prompt(id=f"q{i}", domain="math", prompt="", prompt_ids=tuple(range(4, 8 + i))) for i in range(3)]
        rollouts = [r for r in ray.get(sampler.generate.remote(prompts), timeout=120) if r.response_ids]
        sampled = [TrainSample(r.prompt_ids, r.response_ids, r.behaviour_logprobs_T, None, None, None, 0.0, 1.0, 1,
                               "math", False, r.prompt.id) for r in rollouts]
        sampled_lp = ray.get([r.compute_logprobs.remote(sampled) for r in ranks], timeout=300)
        export = tmp_path_factory.mktemp("zero3_export") / "hf"
        ray.get([r.save_hf.remote(str(export)) for r in ranks], timeout=300)
        yield {"n_params": n_params, "specs": specs, "after": [np.concatenate(x) for x in after], "batch": batch,
               "sampled": sampled, "sampled_lp": sampled_lp, "export": export}
    finally:
        for h in [*ranks, sampler]:
            ray.kill(h)


def test_zero3_weight_sync_plan_has_the_full_shapes(zero3, tiny_demo):
    """ZeRO-3 partitions parameters in place (p.shape becomes (0,)); the plan the samplers
    receive must still hold the full shapes, or every bucket mismatches (seen on an H100)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_demo / "student"))
    want = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [(name, shape) for name, shape, _ in zero3["specs"]] == want
    assert zero3["n_params"] == [sum(p.numel() for p in model.parameters())] * 2


def test_zero3_ranks_take_the_same_step_as_one_learner(zero3, runs):
    single = runs["after"][0]
    for r in zero3["after"]:
        np.testing.assert_allclose(r, single, rtol=0, atol=1e-5)


def test_zero3_weights_reach_a_vllm_sampler_through_the_transfer_api(zero3):
    """Both ZeRO-3 ranks iterate the DeepSpeedSource (each parameter gathered collectively); the
    sampler's log-probs of its own tokens after the update equal both ranks' (temperature 1)."""
    assert len(zero3["sampled"]) >= 4
    for rank_lp in zero3["sampled_lp"]:
        for got, s in zip(rank_lp, zero3["sampled"]):
            np.testing.assert_allclose(got, s.behaviour_logprobs_T, rtol=0, atol=1e-4)


def test_zero3_export_loads_in_transformers_with_the_learners_log_probs(zero3):
    """save_hf under ZeRO-3 gathers the full parameters (empty shards were written before)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(zero3["export"]), dtype=torch.float32).eval()
    got = []
    with torch.no_grad():
        for s in zero3["batch"].samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            P, T = len(s.prompt_ids), len(s.response_ids)
            got.append(lp[P - 1: P + T - 1].gather(1, torch.tensor(s.response_ids)[:, None])[:, 0].numpy())
    np.testing.assert_allclose(np.concatenate(got), zero3["after"][0], rtol=0, atol=1e-4)


def test_zero3_export_loads_in_vllm_with_the_learners_log_probs(zero3):
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=str(zero3["export"]), dtype="float32", enforce_eager=True, max_model_len=64,
              distributed_executor_backend="uni", enable_prefix_caching=False)
    try:
        samples = zero3["batch"].samples
        outs = llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids + s.response_ids) for s in samples],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        got = []
        for s, o in zip(samples, outs):
            P = len(s.prompt_ids)
            got.append([o.prompt_logprobs[P + t][tok].logprob for t, tok in enumerate(s.response_ids)])
        np.testing.assert_allclose(np.concatenate(got), zero3["after"][0], rtol=0, atol=1e-4)
    finally:
        del llm


@pytest.fixture(scope="module")
def mini2(ray_cluster, tiny_demo, runs):
    """``learner.mini_batches: 2`` on the batch of ``runs``: one learner, and a W=2 ZeRO-3 group (the π_S,old
    pre-pass gathers weights collectively, so an empty micro-batch on one rank must still run a forward)."""
    import ray

    from configs.schema import LearnerConfig, PolicyGradientTerm, ReverseKLTopK
    from learner.batch import plan_micro_batches, split_mini_batches
    from learner.concurrency import CONCURRENCY_GROUPS
    from learner.learner import Learner

    batch = _batch()
    part2 = split_mini_batches(batch, 2)[1]
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in part2.samples]
    # premise: in the second part one rank has an empty micro-batch (the forward it still owes)
    assert any(not mb for mbs in plan_micro_batches(lengths, 2, 16) for mb in mbs)
    student = str(tiny_demo / "student")
    objective = ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm())
    # the module's other actors (``runs``, ``zero3``) still hold 5.5 of the cluster's 6 CPUs
    actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Learner).options(num_cpus=0.1)
    kw = dict(max_tokens_per_micro_batch=16, lr=1e-3, num_cpus=1, objective=objective, mini_batches=2)
    single = actor.remote(student, LearnerConfig(**kw), rank=0, world_size=1, seed=0, total_steps=10)
    ranks = [actor.remote(student, LearnerConfig(**kw, zero_stage=3), rank=r, world_size=2, seed=0, total_steps=10)
             for r in (0, 1)]
    try:
        a1 = ray.get(single.dist_address.remote(), timeout=120)
        a2 = ray.get(ranks[0].dist_address.remote(), timeout=120)
        ray.get([single.init_engine.remote(*a1)] + [r.init_engine.remote(*a2) for r in ranks], timeout=600)
        metrics = ray.get([h.train_step.remote(batch) for h in [single, *ranks]], timeout=600)
        after = ray.get([h.compute_logprobs.remote(batch.samples) for h in [single, *ranks]], timeout=300)
        yield {"metrics": metrics, "after": [np.concatenate(x) for x in after]}
    finally:
        for h in [single, *ranks]:
            ray.kill(h)


def test_two_mini_batches_on_two_zero3_ranks_take_one_learners_two_steps(mini2, runs):
    single, r0, r1 = mini2["after"]
    # premise: the second optimizer step moved the weights beyond the one-step learner of ``runs``
    assert np.max(np.abs(single - runs["after"][0])) > 1e-3
    np.testing.assert_allclose(r0, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r1, single, rtol=0, atol=1e-5)
    for m in mini2["metrics"]:
        assert m["optimizer_steps"] == 2.0 and np.isfinite(m["loss"])
