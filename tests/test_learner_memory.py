"""The memory-bounded learner (learner/logprobs.py, learner/learner.py): the chunked lm_head gives the
same log-probs, SPEC §6 divergences, loss and gradients as the full-logits path it replaced, and the
token-budget plan gives every rank the same number of micro-batches.

The old full-logits path is kept here, in ``_reference_loss``, as the reference (it is no longer in
the product): B×L×V logits from the model, gathered at response positions, then the full-vocabulary
``gather_logprobs`` / ``topk_divergence`` of learner/objectives.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from buffers.records import TrainSample
from configs.schema import LearnerConfig, PolicyGradientTerm, ReverseKLTopK, TopKObjective
from learner import objectives as obj
from learner.batch import LearnerBatch, collate, plan_micro_batches
from learner.learner import Learner
from learner.logprobs import ResponseLogprobModel, chunked_logprobs

V = 61  # a prime: no chunk size used below divides a row count by accident


def _tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=0, attn_implementation="eager")
    return Qwen3ForCausalLM(cfg).float()


# ------------------------------------------------------------------ chunked log-probs and divergences


def _hand_inputs(N=10, H=8, J=5, bias=True):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = torch.randn(V, H, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    ids = torch.randint(0, V, (N, J), generator=g)
    return h, w, b, ids


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])  # 3 and 7 do not divide N = 10
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_logprobs_equal_full_log_softmax_values_and_gradients(chunk, bias):
    h, w, b, ids = _hand_inputs(bias=bias)
    up = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))  # arbitrary upstream gradient
    params = [x for x in (h, w, b) if x is not None]
    ref = torch.log_softmax(F.linear(h, w, b), dim=-1).gather(-1, ids)
    ref_grads = torch.autograd.grad((ref * up).sum(), params)
    out = chunked_logprobs(h, w, b, ids, chunk)
    grads = torch.autograd.grad((out * up).sum(), params)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_topk_divergence_equals_full_logits_divergence(chunk, kind, beta):
    """SPEC §6 top-k + tail divergence: from the chunked top-k log-probs vs from B×T×V logits,
    values and gradients w.r.t. the hidden states and the lm_head weight (padding included)."""
    B, T, K, H = 2, 5, 4, 8
    gen = torch.Generator().manual_seed(3)
    h_BTH = torch.randn(B, T, H, generator=gen).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 0.7).requires_grad_()
    t_ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    t_lp = torch.log(torch.distributions.Dirichlet(torch.ones(K + 1)).sample((B, T))[..., :K])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)

    ref_BT = obj.topk_divergence(F.linear(h_BTH, w), t_ids, t_lp, mask, kind=kind, beta=beta)
    ref_grads = torch.autograd.grad(ref_BT.sum(), (h_BTH, w))

    rows, t = (mask > 0).nonzero(as_tuple=True)
    lp_NK = chunked_logprobs(h_BTH[rows, t], w, None, t_ids[rows, t], chunk)
    s_BTK = lp_NK.new_zeros((B, T, K)).index_put((rows, t), lp_NK)
    got_BT = obj.topk_divergence_from_logprobs(s_BTK, t_lp, mask, kind=kind, beta=beta)
    grads = torch.autograd.grad(got_BT.sum(), (h_BTH, w))
    torch.testing.assert_close(got_BT, ref_BT, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_logprobs_keep_no_vocabulary_wide_tensor_for_backward():
    """What the backward pass holds is O(N·H + N·J), not O(N·V): the logits are recomputed."""
    h, w, b, ids = _hand_inputs(N=40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        chunked_logprobs(h, w, b, ids, 8)
    assert saved and all(x.numel() < 40 * V for x in saved if x is not w and x is not b)


# ------------------------------------------------------------------ token-budget plan


def _check_plan(plan, lengths, W, budget, cap=None):
    assert len(plan) == W
    assert len({len(p) for p in plan}) == 1  # the same number of micro-batches (backward calls) on every rank
    seen = sorted(i for p in plan for mb in p for i in mb)
    assert seen == list(range(len(lengths)))  # every response exactly once
    for mb in (mb for p in plan for mb in p if len(mb) > 1):  # only a lone response may exceed the budget
        assert len(mb) * max(lengths[i] for i in mb) <= budget
        assert cap is None or len(mb) <= cap


@pytest.mark.parametrize("W", [1, 2, 3])
def test_plan_gives_every_rank_the_same_number_of_micro_batches_with_uneven_lengths(W):
    rng = np.random.default_rng(W)
    lengths = [int(x) for x in rng.integers(5, 300, size=23)] + [2000, 1500]  # skewed: two long ones
    for budget in (256, 600, 4096):
        plan = plan_micro_batches(lengths, W, budget)
        _check_plan(plan, lengths, W, budget)
        assert plan == plan_micro_batches(lengths, W, budget)  # deterministic: ranks agree without talking


def test_plan_pads_ranks_with_less_work_with_empty_micro_batches():
    # W=3, budget 150: rank 0 gets 100 and 10 (padded 2 × 100 > 150: two micro-batches), ranks 1 and 2
    # one response each, so they run one empty micro-batch to match rank 0's two backward passes.
    lengths = [100, 100, 100, 10]
    plan = plan_micro_batches(lengths, 3, 150)
    _check_plan(plan, lengths, 3, 150)
    assert plan == [[[0], [3]], [[1], []], [[2], []]]


def test_plan_gives_a_response_longer_than_the_budget_its_own_micro_batch():
    lengths = [50, 5000, 40, 30]
    plan = plan_micro_batches(lengths, 1, 128)
    _check_plan(plan, lengths, 1, 128)
    assert [1] in plan[0]
    assert all(1 not in mb or len(mb) == 1 for mb in plan[0])


def test_plan_respects_the_response_cap_and_an_empty_batch_still_gives_one_micro_batch():
    plan = plan_micro_batches([10] * 9, 1, 10_000, max_responses=4)
    _check_plan(plan, [10] * 9, 1, 10_000, cap=4)
    assert [len(mb) for mb in plan[0]] == [4, 4, 1]
    assert plan_micro_batches([], 2, 100) == [[[]], [[]]]


def test_plan_balances_tokens_across_ranks():
    lengths = [400, 300, 200, 100, 100, 100, 100]
    loads = [sum(lengths[i] for mb in p for i in mb) for p in plan_micro_batches(lengths, 2, 10_000)]
    assert max(loads) - min(loads) <= 100


# ------------------------------------------------------------------ the learner's loss vs the old path


def _samples(K=4, n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P, T = 2 + i % 3, 1 + (i * 3) % 6
        ids = np.stack([rng.choice(np.arange(1, V), size=K, replace=False) for _ in range(T)])
        lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=T)[:, :K]), axis=1)[:, ::-1]
        out.append(TrainSample(
            prompt_ids=[int(x) for x in rng.integers(1, V, P)], response_ids=[int(x) for x in rng.integers(1, V, T)],
            behaviour_logprobs_T=rng.uniform(-4.5, -3.0, T).astype(np.float32),
            teacher_logprobs_T=None if i == 2 else rng.uniform(-4.0, -3.0, T).astype(np.float32),
            topk_ids_TK=None if i == 2 else ids.astype(np.int32),
            topk_logprobs_TK=None if i == 2 else np.ascontiguousarray(lp, np.float32),
            advantage_shift=0.1 if i % 3 == 0 else 0.0, weight=0.0 if i == 4 else 1.0, policy_version=0,
            domain="math", correct=bool(i % 2), prompt_id=f"p{i}", excluded=i == 5))
    return out


def test_collate_gives_a_typed_batch_aligned_on_response_tokens_with_top_k_capped_at_the_teachers():
    samples = _samples(K=3)
    b = collate(samples, 0, 8)  # 8 asked, the teacher returned 3
    assert isinstance(b, LearnerBatch) and b.top_k == 3 and b.topk_ids_BTK.shape[-1] == 3
    s = samples[1]
    P, T = len(s.prompt_ids), len(s.response_ids)
    assert b.ids_BL[1, : P + T].tolist() == s.prompt_ids + s.response_ids and b.attn_BL[1].sum() == P + T
    assert b.pos_BT[1, :T].tolist() == list(range(P - 1, P - 1 + T))  # the output at P−1+t predicts token t
    assert b.resp_BT[1, :T].tolist() == s.response_ids and b.mask_BT[1].sum() == T
    assert (b.has_teacher_B[2], b.has_topk_B[2], b.weight_B[4], b.excluded_B[5]) == (0, 0, 0, 1)
    assert torch.equal(b.topk_ids_BTK[1, :T], torch.from_numpy(s.topk_ids_TK.astype(np.int64)))
    assert collate(samples, 0, 0).topk_ids_BTK is None and collate(samples, 0, 0).top_k == 0
    moved = b.to("cpu")
    assert moved.ids_BL.dtype == torch.long and torch.equal(moved.shift_B, b.shift_B)


def _reference_loss(model, cfg: LearnerConfig, samples, n_total, W=1):
    """The learner's loss as computed before the chunked head: full logits at every position."""
    o, imp = cfg.objective, cfg.importance
    dist = o if isinstance(o, TopKObjective) else None
    b = collate(samples, 0, dist.top_k if dist else 0)
    logits_BLV = model(input_ids=b.ids_BL, attention_mask=b.attn_BL).logits
    logits_BTV = logits_BLV.float().gather(1, b.pos_BT[..., None].expand(-1, -1, logits_BLV.shape[-1]))
    mask = b.mask_BT
    logp = obj.gather_logprobs(logits_BTV, b.resp_BT)
    old = logp.detach()
    pg_B = None
    if o.pg is not None:
        has_t = b.has_teacher_B[:, None]
        teacher = torch.where(has_t > 0, b.teacher_BT, old)
        adv = (obj.distill_advantage(teacher, old) + b.shift_B[:, None]) * has_t
        w_BT = obj.behaviour_weights(old, b.behave_BT, mask, mode=imp.type, tis_upper=imp.upper)
        pg_B, _ = obj.pg_loss_per_response(logp, old, adv, mask, eps_low=o.pg.eps_low, eps_high=o.pg.eps_high,
                                           teacher_logp_BT=teacher, mask_threshold=o.pg.mask_threshold, weight_BT=w_BT)
    dist_B = None
    if dist:
        kw = {"kind": {"reverse_kl_topk": "reverse_kl", "forward_kl_topk": "forward_kl", "jsd": "jsd"}[dist.type]}
        if dist.type == "jsd":
            kw["beta"] = dist.beta
        tok_BT = obj.topk_divergence(logits_BTV, b.topk_ids_BTK, b.topk_lp_BTK, mask * b.has_topk_B[:, None],
                                     **kw)
        dist_B = obj.per_response_mean(tok_BT, mask * b.has_topk_B[:, None])
    return obj.combine_terms(pg_B, dist_B, b.weight_B, n_total, pg_weight=o.pg.weight if o.pg else 0.0,
                             dist_weight=dist.weight if dist else 0.0, dist_on_masked=dist.on_masked if dist else False,
                             excluded_B=b.excluded_B) * W


def _learner(model, cfg: LearnerConfig, W=1) -> Learner:
    """A Learner whose engine is the bare policy module (no DeepSpeed): _chunk_loss as in training."""
    lr = Learner("unused", cfg, rank=0, world_size=W, seed=0, total_steps=1)
    lr.engine = ResponseLogprobModel(model, chunk_tokens=cfg.logit_chunk_tokens)
    lr.device, lr.pad_id = torch.device("cpu"), 0
    return lr


@pytest.mark.parametrize("objective,chunk", [
    ({"type": "forward_kl_topk", "on_masked": True, "pg": {}}, 3), ({"type": "reverse_kl_topk", "pg": {}}, 5),
    ({"type": "jsd", "beta": 0.3, "pg": {}}, 1000), ({"type": "forward_kl_topk"}, 4)],
    ids=["forward_kl+pg", "reverse_kl+pg", "jsd+pg", "forward_kl_alone"])
def test_learner_loss_and_gradients_equal_the_full_logits_path(objective, chunk):
    model = _tiny_qwen3()
    cfg = LearnerConfig(logit_chunk_tokens=chunk, objective={"weight": 0.5, "top_k": 4, **objective})
    samples, n_total = _samples(), 9  # two responses of the global batch are on "another rank"
    ref = _reference_loss(model, cfg, samples, n_total, W=2)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    lr = _learner(model, cfg, W=2)
    loss, stats, _ = lr._chunk_loss(samples, n_total)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(float(ref.detach())) > 1e-3 and stats["dist_loss"] != 0.0
    assert ("pg_loss" in stats) == (cfg.objective.pg is not None)  # no §1 term unless the objective has one
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_learner_loss_without_the_distribution_term_equals_the_full_logits_path():
    model = _tiny_qwen3(seed=1)
    cfg = LearnerConfig(logit_chunk_tokens=4)
    samples = _samples(seed=1)
    ref = _reference_loss(model, cfg, samples, len(samples))
    loss, stats, _ = _learner(model, cfg)._chunk_loss(samples, len(samples))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert "dist_loss" not in stats


def test_compute_logprobs_uses_the_chunked_path_over_several_micro_batches():
    model = _tiny_qwen3(seed=2).eval()
    samples = _samples(seed=2)
    lr = _learner(model, LearnerConfig(logit_chunk_tokens=2, max_tokens_per_micro_batch=12))
    got = lr.compute_logprobs(samples)
    for s, lp in zip(samples, got):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        P = len(s.prompt_ids)
        want = full[P - 1 : P - 1 + len(s.response_ids)].gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        np.testing.assert_allclose(lp, want.numpy(), rtol=0, atol=1e-5)


def test_zero_loss_runs_the_model_and_gives_every_parameter_a_zero_gradient():
    """An empty micro-batch (a rank with less work) still back-propagates through every parameter,
    so the ranks' backward passes (and ZeRO's collectives) line up."""
    model = _tiny_qwen3()
    loss = _learner(model, LearnerConfig())._zero_loss()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert float(loss.detach()) == 0.0
    assert all(g is not None and not g.any() for g in grads)


def test_zero_loss_on_a_nan_output_has_finite_zero_gradients():
    h, w, b, ids = _hand_inputs()
    out = chunked_logprobs(h, w, b, ids, 4)
    out_nan = out.clone()
    out_nan[0, 0] = float("nan")
    lr = Learner("unused", LearnerConfig(), rank=0, world_size=1, seed=0, total_steps=1)
    g = torch.autograd.grad(lr._zero_loss(out_nan), (h, w))
    assert all(torch.isfinite(x).all() and not x.any() for x in g)


def test_build_policy_applies_attention_kernel_and_gradient_checkpointing_without_changing_the_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_qwen3(seed=3).save_pretrained(tmp_path)
    samples = _samples(seed=3)
    losses, grads = [], []
    for gc in (False, True):
        cfg = LearnerConfig(gradient_checkpointing=gc, attn_implementation="sdpa", logit_chunk_tokens=5,
                            objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm()))
        policy = Learner.build_policy(AutoModelForCausalLM, str(tmp_path), cfg).train()
        assert policy.causal_lm.config._attn_implementation == "sdpa"
        assert policy.causal_lm.is_gradient_checkpointing == gc
        lr = _learner(policy.causal_lm, cfg)
        loss, _, _ = lr._chunk_loss(samples, len(samples))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(policy.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_policy_parameter_names_are_the_hugging_face_names():
    model = _tiny_qwen3()
    policy = ResponseLogprobModel(model, chunk_tokens=8)
    assert [n for n, _ in policy.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(policy.state_dict()) == list(model.state_dict())


def test_policy_refuses_models_that_transform_logits_after_the_head():
    model = _tiny_qwen3()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        ResponseLogprobModel(model, chunk_tokens=8)


def test_lr_schedule_variants_warm_up_then_hold_or_decay_to_the_floor():
    from configs.schema import ConstantLR, CosineLR, LinearLR
    from learner.learner import lr_lambda

    const, cos, lin = (lr_lambda(s, 10) for s in (ConstantLR(warmup_steps=2), CosineLR(warmup_steps=2, min_lr_ratio=0.1),
                                                   LinearLR(warmup_steps=2, min_lr_ratio=0.2)))
    assert [const(i) for i in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0) and cos(6) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1)
    assert lin(2) == pytest.approx(1.0) and lin(6) == pytest.approx(0.6) and lin(10) == pytest.approx(0.2)
