"""SPEC §6 Prune-OPD drift control and the "Rethinking OPD" overlap diagnostics (learner/drift.py), the
student's top-n from the chunked head (learner/logprobs.py), the new objectives' config checks, and a learner
step with each new objective (``vopd``, ``kl_mix``, drift control). Expected numbers are worked out by hand in
the comments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from configs.schema import DriftControl, LearnerConfig
from learner.drift import drift_control, overlap_metrics, shared_topk, token_means, topn_overlap
from learner.learner import Learner
from learner.logprobs import ResponseLogprobModel, chunked_logprobs
from tests.builders import random_train_batch
from tests.test_learner_memory import _tiny_qwen3

# --------------------------------------------------------------------------- overlap and shared mass

# One position. Student's likeliest ids, likeliest first: 5, 3, 1, 7.
# Teacher's returned top-4 ids (3, 9, 5, 2) with p_T = (0.1, 0.4, 0.3, 0.05): ranked 9, 5, 3, 2.
#   N = 2: S = {5, 3}, T = {9, 5}          → |S ∩ T| = 1 → 1/2
#   N = 3: S = {5, 3, 1}, T = {9, 5, 3}    → 2 → 2/3
#   N = 4: S = {5, 3, 1, 7}, T = all four  → {3, 5} → 2/4
# Shared top-4 set {3, 5}: teacher mass 0.1 + 0.3 = 0.4; the student's p at the teacher's ids
# (0.2, 0.01, 0.5, 0.02) gives 0.2 + 0.5 = 0.7.
_S_TOP = torch.tensor([[[5, 3, 1, 7]]])
_T_IDS = torch.tensor([[[3, 9, 5, 2]]])
_T_LP = torch.log(torch.tensor([[[0.1, 0.4, 0.3, 0.05]]]))
_S_LP_AT_T = torch.log(torch.tensor([[[0.2, 0.01, 0.5, 0.02]]]))


@pytest.mark.parametrize(("n", "expected"), [(2, 0.5), (3, 2 / 3), (4, 0.5)])
def test_topn_overlap_by_hand_ranks_the_teacher_by_log_prob(n, expected):
    assert topn_overlap(_S_TOP, _T_IDS, _T_LP, n).item() == pytest.approx(expected)


def test_shared_topk_overlap_and_masses_by_hand():
    overlap, mass_s, mass_t = shared_topk(_S_TOP, _T_IDS, _T_LP, _S_LP_AT_T)
    assert overlap.item() == pytest.approx(0.5)
    assert mass_s.item() == pytest.approx(0.7, abs=1e-6)
    assert mass_t.item() == pytest.approx(0.4, abs=1e-6)


def test_overlap_metrics_are_per_domain_token_sums_that_token_means_turn_into_means():
    # row 0 (math): the hand position twice → overlap 0.5 each; row 1 (code): student top = teacher's ids
    # → overlap 1, masses 0.2+0.01+0.5+0.02 = 0.73 and 0.85; its second position is padding.
    s_top = torch.tensor([[[5, 3, 1, 7], [5, 3, 1, 7]], [[2, 5, 9, 3], [0, 0, 0, 0]]])
    t_ids = _T_IDS.expand(2, 2, 4)
    t_lp, s_lp = _T_LP.expand(2, 2, 4), _S_LP_AT_T.expand(2, 2, 4)
    m = overlap_metrics(s_top, t_ids, t_lp, s_lp, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), ["math", "code"])
    assert m["overlap/math/topk_overlap#sum"] == pytest.approx(1.0) and m["overlap/math/topk_overlap#n"] == 2
    assert m["overlap/code/topk_overlap#n"] == 1
    means = token_means({**m, "pg_loss": 0.3})
    assert means["pg_loss"] == 0.3 and not any("#" in k for k in means)
    assert means["overlap/math/topk_overlap"] == pytest.approx(0.5)
    assert means["overlap/math/shared_mass_student"] == pytest.approx(0.7, abs=1e-6)
    assert means["overlap/code/topk_overlap"] == pytest.approx(1.0)
    assert means["overlap/code/shared_mass_student"] == pytest.approx(0.73, abs=1e-6)
    assert means["overlap/code/shared_mass_teacher"] == pytest.approx(0.85, abs=1e-6)


# --------------------------------------------------------------------------- drift weights and truncation

# Row 0, 8 real tokens, threshold 0.7:
#   overlap  0.9  0.6  0.8  0.5  0.5  0.5  0.9  0.1
#   event     0    1    0    1    1    1    0    1
#   e_t       0    1    1    2    3    4    4    5      (events at positions ≤ t)
#   run       0    1    0    1    2    3    0    1      (consecutive events ending at t)
# Row 1: 3 real tokens (overlap 0.1 each), then padding whose garbage overlap (0.0) must count nowhere.
_OVERLAP = torch.tensor([[0.9, 0.6, 0.8, 0.5, 0.5, 0.5, 0.9, 0.1], [0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]])
_MASK = torch.tensor([[1.0] * 8, [1.0, 1.0, 1.0] + [0.0] * 5])


def test_drift_weights_literal_spec_reading_offset_outside_the_clamp():
    # decay 0.25 (to see the clamp): w = clamp(1 − 0.25·e, 0, 1) + 0.5
    #   row 0: 1.5 1.25 1.25 1.0 0.75 0.5 0.5 0.5;  row 1 (e = 1, 2, 3): 1.25 1.0 0.75, padding e = 3 → 0.75
    out = drift_control(_OVERLAP, _MASK, DriftControl(decay=0.25, severe_consecutive=None))
    torch.testing.assert_close(out.weight_BT[0], torch.tensor([1.5, 1.25, 1.25, 1.0, 0.75, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(out.weight_BT[1, :3], torch.tensor([1.25, 1.0, 0.75]))
    assert out.window_BT.sum().item() == 16  # nothing severe: nothing truncated
    assert out.stats["drift/tokens_saved"] == 0
    assert token_means(out.stats)["drift/event_frac"] == pytest.approx(8 / 11)  # 5 + 3 events over 11 real tokens


def test_drift_weights_spec_defaults_and_offset_inside_the_clamp():
    # SPEC defaults (decay 0.01, offset 0.5 outside): row 0 at e = 5 → 1 − 0.05 + 0.5 = 1.45
    out = drift_control(_OVERLAP, _MASK, DriftControl(severe_consecutive=None))
    assert out.weight_BT[0, 7].item() == pytest.approx(1.45)
    # inside the clamp, decay 0.25: clamp(1.5 − 0.25·e, 0, 1) = 1 1 1 1 0.75 0.5 0.5 0.25
    out = drift_control(_OVERLAP, _MASK, DriftControl(decay=0.25, offset_inside_clamp=True, severe_consecutive=None))
    torch.testing.assert_close(out.weight_BT[0], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.5, 0.25]))


def test_severe_drift_truncates_the_window_after_k_consecutive_events():
    # severe_consecutive 3: row 0's run reaches 3 at position 5 → keep 0..5, drop 6, 7 (2 tokens);
    # row 1's run reaches 3 at position 2, its last real token → nothing real dropped.
    out = drift_control(_OVERLAP, _MASK, DriftControl(decay=0.25, severe_consecutive=3))
    torch.testing.assert_close(out.window_BT[0], torch.tensor([1.0] * 6 + [0.0] * 2))
    torch.testing.assert_close(out.weight_BT[0], torch.tensor([1.5, 1.25, 1.25, 1.0, 0.75, 0.5, 0.0, 0.0]))
    assert out.stats["drift/tokens_saved"] == 2
    means = token_means(out.stats)
    assert means["drift/truncated_frac"] == pytest.approx(0.5)  # 1 of 2 responses lost tokens
    assert means["drift/tokens_saved_frac"] == pytest.approx(2 / 11)
    # weight mean over the kept real tokens: (1.5+1.25+1.25+1+0.75+0.5 + 1.25+1+0.75) / 9
    assert means["drift/weight_mean"] == pytest.approx(9.25 / 9)


def test_severe_drift_by_overlap_floor():
    # severe_overlap 0.55: row 0 first falls below at position 3 → keep 0..3, save 4 tokens;
    # row 1 at position 0 → keep it only, save 2.
    out = drift_control(_OVERLAP, _MASK, DriftControl(severe_consecutive=None, severe_overlap=0.55))
    torch.testing.assert_close(out.window_BT, torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] + [0.0] * 7]))
    assert out.stats["drift/tokens_saved"] == 6


def test_drift_config_needs_a_teacher_top_k_of_at_least_top_n():
    with pytest.raises(ValueError, match="drift.top_n"):
        LearnerConfig(objective={"type": "vopd", "top_k": 8, "drift": {}})
    assert LearnerConfig(objective={"drift": {}}).objective.top_k == 16  # reverse_kl_pg fetches the top-16
    assert LearnerConfig().objective.top_k == 0


# --------------------------------------------------------------------------- student top-n from the chunked head


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_head_top_n_equals_the_full_logits_top_n_and_keeps_the_gradient(chunk):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 8, generator=g).requires_grad_()
    w = torch.randn(61, 8, generator=g).requires_grad_()
    ids = torch.randint(0, 61, (10, 3), generator=g)
    logp, top = chunked_logprobs(h, w, None, ids, chunk, top_n=16)
    full = F.linear(h, w)
    assert torch.equal(top, full.topk(16, dim=1).indices)
    torch.testing.assert_close(logp, torch.log_softmax(full, -1).gather(-1, ids), rtol=0, atol=1e-5)
    (gh,) = torch.autograd.grad(logp.sum(), h)
    (ref,) = torch.autograd.grad(torch.log_softmax(F.linear(h, w), -1).gather(-1, ids).sum(), h)
    torch.testing.assert_close(gh, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- a learner step with each objective


class _Engine:
    """The DeepSpeed engine surface train_step uses, over the bare policy and a torch AdamW (no DeepSpeed)."""

    def __init__(self, module, opt):
        self.module, self.opt, self.boundary = module, opt, False

    def __call__(self, **kw):
        return self.module(**kw)

    def train(self):
        self.module.train()

    def set_gradient_accumulation_boundary(self, last):
        self.boundary = last

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):
        if self.boundary:
            self.opt.step()
            self.opt.zero_grad()

    def get_global_grad_norm(self):
        return None


def _step(objective: dict) -> tuple[dict[str, float], float]:
    model = _tiny_qwen3(seed=4)
    cfg = LearnerConfig(logit_chunk_tokens=7, max_tokens_per_micro_batch=40, objective=objective)
    lr = Learner("unused", cfg, rank=0, world_size=1, seed=0, total_steps=1)
    policy = ResponseLogprobModel(model, chunk_tokens=cfg.logit_chunk_tokens)
    lr.optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    lr.scheduler = torch.optim.lr_scheduler.LambdaLR(lr.optimizer, lambda s: 1.0)
    lr.engine, lr.device, lr.pad_id = _Engine(policy, lr.optimizer), torch.device("cpu"), 0
    before = [p.detach().clone() for p in model.parameters()]
    metrics = lr.train_step(random_train_batch(16, domains=("reverse", "math")))
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before))
    return metrics, moved


@pytest.mark.parametrize("objective", [
    {"type": "vopd", "top_k": 4},
    {"type": "kl_mix", "alpha": 0.3, "top_k": 4, "pg": {"weight": 0.1, "baseline": "vopd"}},
    {"type": "reverse_kl_pg", "drift": {"top_n": 4, "threshold": 0.7, "severe_consecutive": 2}},
    {"type": "forward_kl_topk", "top_k": 4, "pg": {}, "drift": {"top_n": 4, "severe_overlap": 1.0}},
], ids=["vopd", "kl_mix+vopd_pg", "reverse_kl_pg+drift", "forward_kl+pg+drift_truncating"])
def test_a_train_step_runs_with_each_new_objective_and_reports_its_metrics(objective):
    metrics, moved = _step(objective)
    assert math.isfinite(metrics["loss"]) and metrics["skipped_nonfinite"] == 0.0
    assert moved > 0  # the optimizer stepped
    for d in ("reverse", "math"):  # per-domain diagnostics, means in [0, 1]
        for name in ("topk_overlap", "shared_mass_student", "shared_mass_teacher"):
            assert 0.0 <= metrics[f"overlap/{d}/{name}"] <= 1.0 + 1e-6
    assert not any("#" in k for k in metrics)
    if "drift" in objective:
        assert 0.0 <= metrics["drift/event_frac"] <= 1.0
        # overlap < 1.0 is severe: a response keeps tokens only up to its first position whose top-4 differ,
        # so with random teachers nearly every response loses tokens
        if objective["drift"].get("severe_overlap") == 1.0:
            assert metrics["drift/tokens_saved"] > 0.5 * metrics["tokens"]


def test_vopd_baseline_changes_the_step_loss_of_the_pg_term():
    plain, _ = _step({"type": "reverse_kl_pg"})
    vopd, _ = _step({"type": "vopd", "top_k": 4})
    # same model, same batch: only A_t differs, by +KL_t ≥ 0 on every token with top-k, so −ρA falls
    assert vopd["pg_loss"] < plain["pg_loss"] - 1e-3


def test_driver_averages_a_per_domain_metric_over_the_ranks_that_report_it_and_sums_tokens_saved():
    from actors.pipeline import _learner_metrics

    ranks = [{"loss": 1.0, "overlap/math/topk_overlap": 0.4, "drift/tokens_saved": 3.0},
             {"loss": 2.0, "overlap/code/topk_overlap": 0.9, "drift/tokens_saved": 5.0}]
    m = _learner_metrics(ranks)
    assert m["loss"] == 3.0 and m["learner/drift/tokens_saved"] == 8.0
    assert m["learner/overlap/math/topk_overlap"] == pytest.approx(0.4)  # rank 1 has no math response
    assert m["learner/overlap/code/topk_overlap"] == pytest.approx(0.9)
