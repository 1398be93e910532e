"""SPEC §1, §2, §6 loss math checked against numbers computed by hand.

Every expected value below is written out (with its derivation in a comment)
rather than recomputed with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learner.objectives import (
    TOPK_OBJECTIVES,
    behaviour_weights,
    distill_advantage,
    gather_logprobs,
    mismatch_kl,
    per_response_mean,
    pg_loss_per_response,
    combine_terms,
    reduce_over_batch,
    topk_divergence,
    topk_divergence_from_logprobs,
    vopd_baseline,
)


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


def _pg_inputs(ratios: list[float], advs: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One response whose per-token ratios ρ = exp(logp − old) are the given values."""
    old = _t([-1.0] * len(ratios))
    logp = (old + torch.log(_t(ratios))).requires_grad_(True)
    return logp, old, _t(advs), torch.ones_like(old)


# --------------------------------------------------------------------------- log-probs, advantage


def test_gather_logprobs_matches_log_softmax_gather() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, ids), expected)


def test_gather_logprobs_hand_value_and_float32_from_bf16() -> None:
    # logits (0, ln 3) -> softmax (1/4, 3/4); token 1 -> ln 0.75 = -0.287682
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    out = gather_logprobs(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-0.287682, abs=5e-3)  # bf16 input precision


def test_distill_advantage_is_teacher_minus_old_and_detached() -> None:
    teacher = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    adv = distill_advantage(teacher, old)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, _t([0.5, -2.0]))


# --------------------------------------------------------------------------- SPEC §1 PG loss


def test_pg_loss_positive_advantage_above_upper_clip_is_minus_1_28() -> None:
    # ρ = 1.5, A = +1: max(-1.5, -clip(1.5, 0.8, 1.28)) = max(-1.5, -1.28) = -1.28
    logp, old, adv, mask = _pg_inputs([1.5], [1.0])
    loss_B, stats = pg_loss_per_response(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss_B.item() == pytest.approx(-1.28, abs=1e-6)
    assert stats.clip_frac.item() == pytest.approx(1.0)


def test_pg_loss_negative_advantage_below_lower_clip_is_0_8() -> None:
    # ρ = 0.5, A = -1: max(0.5, clip(0.5, 0.8, 1.28)) = max(0.5, 0.8) = 0.8
    logp, old, adv, mask = _pg_inputs([0.5], [-1.0])
    loss_B, stats = pg_loss_per_response(logp, old, adv, mask)
    assert loss_B.item() == pytest.approx(0.8, abs=1e-6)
    assert stats.clip_frac.item() == pytest.approx(1.0)


def test_pg_loss_is_token_mean_and_ignores_padding() -> None:
    # tokens: (ρ=1.5, A=1) -> -1.28 ; (ρ=1.0, A=2) -> -2.0 ; padding with garbage.
    # mean over the 2 real tokens = (-1.28 - 2.0) / 2 = -1.64; clip_frac = 1/2
    old = _t([-1.0, -1.0, -1.0])
    logp = _t([-1.0 + math.log(1.5), -1.0, float("inf")])
    adv = _t([1.0, 2.0, float("nan")])
    mask = _t([1.0, 1.0, 0.0])
    loss_B, stats = pg_loss_per_response(logp, old, adv, mask)
    assert loss_B.item() == pytest.approx(-1.64, abs=1e-6)
    assert stats.clip_frac.item() == pytest.approx(0.5)
    assert stats.masked_token_frac.item() == 0.0


def test_pg_loss_masks_token_whose_teacher_gap_is_exactly_threshold() -> None:
    # |Δ| = |logp - teacher| = 0.5, 10.0 (masked: ≥ 10), 9.5 (kept).
    # ρ = 1 everywhere, A = (1, 100, 3): loss = -(1 + 3) / 2 = -2.0; masked 1 of 3 real tokens.
    logp = _t([-1.0, -12.0, -2.0])
    teacher = _t([-1.5, -2.0, -11.5])
    adv = _t([1.0, 100.0, 3.0])
    mask = torch.ones_like(logp)
    loss_B, stats = pg_loss_per_response(logp, logp.clone(), adv, mask, teacher_logp_BT=teacher, mask_threshold=10.0)
    assert loss_B.item() == pytest.approx(-2.0, abs=1e-6)
    assert stats.masked_token_frac.item() == pytest.approx(1 / 3)
    # Without the teacher the middle token counts: -(1 + 100 + 3) / 3
    loss_nomask, _ = pg_loss_per_response(logp, logp.clone(), adv, mask)
    assert loss_nomask.item() == pytest.approx(-104 / 3, abs=1e-4)


def test_pg_loss_response_with_every_token_masked_is_zero() -> None:
    logp = _t([-1.0, -20.0], [-1.0, -1.0])
    teacher = _t([-15.0, -1.0], [-1.0, -1.0])
    adv = _t([5.0, 5.0], [2.0, 2.0])
    loss_B, stats = pg_loss_per_response(logp, logp.clone(), adv, torch.ones_like(logp), teacher_logp_BT=teacher)
    torch.testing.assert_close(loss_B, torch.tensor([0.0, -2.0]))
    assert stats.masked_token_frac.item() == pytest.approx(0.5)


def test_pg_loss_multiplies_by_behaviour_weight() -> None:
    # ρ = 1, A = (1, 1), w = (5, 0.5): loss = -(5 + 0.5) / 2 = -2.75
    logp = _t([-1.0, -2.0])
    loss_B, _ = pg_loss_per_response(logp, logp.clone(), _t([1.0, 1.0]), torch.ones_like(logp), weight_BT=_t([5.0, 0.5]))
    assert loss_B.item() == pytest.approx(-2.75, abs=1e-6)


def test_pg_gradient_is_minus_rho_A_over_T_unclipped_and_zero_clipped() -> None:
    # T = 4 tokens: (ρ, A) = (1.1, 2) unclipped, (1.5, 1) clipped high, (0.9, -1) unclipped,
    # (0.5, -1) clipped low. d loss / d logp_t = -ρ_t A_t / T on unclipped tokens.
    logp, old, adv, mask = _pg_inputs([1.1, 1.5, 0.9, 0.5], [2.0, 1.0, -1.0, -1.0])
    loss_B, stats = pg_loss_per_response(logp, old, adv, mask)
    loss_B.sum().backward()
    expected = torch.tensor([[-1.1 * 2.0 / 4, 0.0, 0.9 / 4, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats.clip_frac.item() == pytest.approx(0.5)


def test_pg_gradient_does_not_flow_into_old_or_teacher() -> None:
    logp, _, adv, mask = _pg_inputs([1.0], [1.0])
    old = _t([-1.0]).requires_grad_(True)
    teacher = _t([-1.0]).requires_grad_(True)
    loss_B, _ = pg_loss_per_response(logp, old, adv, mask, teacher_logp_BT=teacher)
    loss_B.sum().backward()
    assert old.grad is None and teacher.grad is None


def test_pg_loss_fully_padded_row_is_zero_with_finite_gradient() -> None:
    logp = torch.tensor([[-1.0, -1.0], [float("nan"), float("inf")]], requires_grad=True)
    old = _t([-1.0, -1.0], [float("-inf"), 3.0])
    adv = _t([1.0, 1.0], [float("nan"), float("inf")])
    mask = _t([1.0, 1.0], [0.0, 0.0])
    loss_B, stats = pg_loss_per_response(logp, old, adv, mask, teacher_logp_BT=_t([-1.0, -1.0], [0.0, float("nan")]))
    loss_B.sum().backward()
    torch.testing.assert_close(loss_B, torch.tensor([-1.0, 0.0]))
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1].abs().sum().item() == 0.0
    assert torch.isfinite(stats.clip_frac) and torch.isfinite(stats.masked_token_frac)


def test_per_response_mean_hand_values() -> None:
    x = _t([1.0, 3.0, 100.0], [2.0, float("nan"), float("inf")], [7.0, 7.0, 7.0])
    mask = _t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    torch.testing.assert_close(per_response_mean(x, mask), torch.tensor([2.0, 2.0, 0.0]))


def test_reduce_over_batch_counts_masked_responses_in_denominator() -> None:
    # losses (1, 2, 4), response 2 masked by balancing: (1 + 4) / 3, not (1 + 4) / 2
    out = reduce_over_batch(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0]), n_responses_total=3)
    assert out.item() == pytest.approx(5.0 / 3.0)


def test_reduce_over_batch_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="n_responses_total"):
        reduce_over_batch(torch.tensor([1.0]), torch.tensor([1.0]), n_responses_total=0)


# --------------------------------------------------------------------------- SPEC §2 behaviour correction


def test_tis_truncates_e_squared_to_5() -> None:
    # old − behave = (2, 0.5, garbage on padding): w = (e^2 = 7.389 -> 5, e^0.5 = 1.648721, 0)
    old = _t([0.0, 0.0, 50.0])
    behave = _t([-2.0, -0.5, float("nan")])
    mask = _t([1.0, 1.0, 0.0])
    w = behaviour_weights(old, behave, mask, mode="tis", tis_upper=5.0)
    torch.testing.assert_close(w, _t([5.0, 1.648721, 0.0]))


def test_icepop_zeroes_weights_outside_band() -> None:
    # w = (0.4, 0.6, 1.0, 1.9, 2.5) with band [0.5, 2]: (0, 0.6, 1.0, 1.9, 0)
    ws = [0.4, 0.6, 1.0, 1.9, 2.5]
    behave = _t([-1.0] * 5)
    old = behave + torch.log(_t(ws))
    w = behaviour_weights(old, behave, torch.ones_like(old), mode="icepop", icepop_low=0.5, icepop_high=2.0)
    torch.testing.assert_close(w, _t([0.0, 0.6, 1.0, 1.9, 0.0]))


def test_behaviour_weights_none_is_one_on_real_tokens() -> None:
    w = behaviour_weights(_t([0.0, 9.0]), _t([-3.0, 0.0]), _t([1.0, 0.0]), mode="none")
    torch.testing.assert_close(w, _t([1.0, 0.0]))


def test_behaviour_weights_are_detached() -> None:
    old = torch.tensor([[0.0]], requires_grad=True)
    w = behaviour_weights(old, _t([-0.1]), _t([1.0]), mode="tis")
    assert not w.requires_grad


def test_mismatch_kl_k3_hand_value() -> None:
    # log r = (ln 2, 0), padding ignored: mean of (2 − 1 − ln 2, 0) = 0.153426
    old = _t([math.log(2.0), -1.0, 40.0])
    behave = _t([0.0, -1.0, -40.0])
    mask = _t([1.0, 1.0, 0.0])
    assert mismatch_kl(old, behave, mask).item() == pytest.approx(0.153426, abs=1e-6)


def test_mismatch_kl_empty_mask_is_zero() -> None:
    assert mismatch_kl(_t([1.0]), _t([0.0]), _t([0.0])).item() == 0.0


# --------------------------------------------------------------------------- SPEC §6 top-k divergences

# Vocab of 3: student logits (0, ln 2, ln 3) -> p_S = (1/6, 2/6, 3/6).
# Teacher top-2 = tokens (2, 0) with p_T = (0.6, 0.3); tail = 0.1 (token 1).
# Student over the same categories: (p_S[2], p_S[0], tail) = (0.5, 1/6, 1/3).
#   forward = 0.6 ln(0.6/0.5) + 0.3 ln(0.3/(1/6)) + 0.1 ln(0.1/(1/3))          = 0.165332
#   reverse = 0.5 ln(0.5/0.6) + (1/6) ln((1/6)/0.3) + (1/3) ln((1/3)/0.1)      = 0.212199
#   M = ½(p_T + p_S) = (0.55, 0.233333, 0.216667)
#   jsd(0.5) = ½ Σ p_T ln(p_T/M) + ½ Σ p_S ln(p_S/M)                           = 0.045071
#   β = 0.25 pins which side gets β (symmetric at 0.5):
#   M = 0.25 p_T + 0.75 p_S = (0.525, 0.2, 0.275)
#   jsd(0.25) = 0.25 Σ p_T ln(p_T/M) + 0.75 Σ p_S ln(p_S/M)                  = 0.032156
#   (the swapped convention would give 0.077784 or 0.078678)
_HAND_FORWARD = 0.165332
_HAND_REVERSE = 0.212199
_HAND_JSD_HALF = 0.045071
_HAND_JSD_QUARTER = 0.032156


def _hand_topk_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]]], requires_grad=True)
    ids = torch.tensor([[[2, 0]]])
    t_logp = torch.log(torch.tensor([[[0.6, 0.3]]]))
    return logits, ids, t_logp, torch.ones(1, 1)


@pytest.mark.parametrize(
    ("kind", "beta", "expected"),
    [
        ("forward_kl", 0.5, _HAND_FORWARD),
        ("reverse_kl", 0.5, _HAND_REVERSE),
        ("jsd", 0.5, _HAND_JSD_HALF),
        ("jsd", 0.25, _HAND_JSD_QUARTER),
    ],
)
def test_topk_divergence_three_token_vocab_by_hand(kind: str, beta: float, expected: float) -> None:
    logits, ids, t_logp, mask = _hand_topk_case()
    out = topk_divergence(logits, ids, t_logp, mask, kind=kind, beta=beta)  # type: ignore[arg-type]
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(expected, abs=1e-5)


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    logits, ids, t_logp, mask = _hand_topk_case()
    at0 = topk_divergence(logits, ids, t_logp, mask, kind="jsd", beta=0.0)
    at1 = topk_divergence(logits, ids, t_logp, mask, kind="jsd", beta=1.0)
    assert at0.item() == pytest.approx(_HAND_FORWARD, abs=1e-5)
    assert at1.item() == pytest.approx(_HAND_REVERSE, abs=1e-5)


def test_topk_with_k_equal_v_is_exact_full_kl_with_finite_gradient() -> None:
    torch.manual_seed(1)
    b, t, v = 2, 3, 5
    s_logits = torch.randn(b, t, v, requires_grad=True)
    t_logp_full = torch.log_softmax(3.0 * torch.randn(b, t, v), -1)
    # teacher lists all V tokens, sorted by probability (as a top-k server would)
    t_topk_logp, ids = t_logp_full.sort(dim=-1, descending=True)
    mask = torch.ones(b, t)

    fwd = topk_divergence(s_logits, ids, t_topk_logp, mask, kind="forward_kl")
    rev = topk_divergence(s_logits, ids, t_topk_logp, mask, kind="reverse_kl")

    ref_logits = s_logits.detach().clone().requires_grad_(True)
    s_logp = torch.log_softmax(ref_logits, -1)
    ref_fwd = F.kl_div(s_logp, t_logp_full, reduction="none", log_target=True).sum(-1)  # KL(T‖S)
    ref_rev = F.kl_div(t_logp_full, s_logp, reduction="none", log_target=True).sum(-1)  # KL(S‖T)
    torch.testing.assert_close(fwd, ref_fwd, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rev, ref_rev, atol=1e-5, rtol=1e-4)

    (fwd.sum() + rev.sum()).backward()
    (ref_fwd.sum() + ref_rev.sum()).backward()
    assert torch.isfinite(s_logits.grad).all()
    torch.testing.assert_close(s_logits.grad, ref_logits.grad, atol=1e-4, rtol=1e-3)


def test_topk_gradient_only_in_student() -> None:
    logits, ids, _, mask = _hand_topk_case()
    t_logp = torch.log(torch.tensor([[[0.6, 0.3]]])).requires_grad_(True)
    topk_divergence(logits, ids, t_logp, mask, kind="jsd").sum().backward()
    assert t_logp.grad is None
    assert logits.grad is not None and logits.grad.abs().sum().item() > 0


def test_topk_divergence_zero_and_finite_on_padded_rows() -> None:
    torch.manual_seed(2)
    s_logits = torch.randn(2, 2, 4, requires_grad=True)
    ids = torch.tensor([[[0, 1], [2, 3]], [[-100, -100], [999, 5]]])  # row 1: padding garbage
    t_logp = torch.tensor([[[-0.5, -1.5], [-0.1, -3.0]], [[float("-inf"), float("nan")], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s_logits.grad = None
        out = topk_divergence(s_logits, ids, t_logp, mask, kind=kind)  # type: ignore[arg-type]
        out.sum().backward()
        assert torch.isfinite(out).all(), kind
        assert (out[1] == 0).all(), kind
        assert (out[0] > 0).all(), kind
        assert torch.isfinite(s_logits.grad).all(), kind
        assert s_logits.grad[1].abs().sum().item() == 0.0, kind


def test_topk_teacher_mass_above_one_from_rounding_gives_no_nan() -> None:
    # teacher top-2 sums to 1.0000001 (rounding); student puts all mass on 2 tokens
    s_logits = torch.tensor([[[30.0, 30.0, -30.0]]], requires_grad=True)
    t_logp = torch.log(torch.tensor([[[0.5000001, 0.5]]]))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s_logits.grad = None
        out = topk_divergence(s_logits, torch.tensor([[[0, 1]]]), t_logp, torch.ones(1, 1), kind=kind)  # type: ignore[arg-type]
        out.sum().backward()
        assert torch.isfinite(out).all() and out.item() == pytest.approx(0.0, abs=1e-5), kind
        assert torch.isfinite(s_logits.grad).all(), kind


def test_every_topk_objective_of_the_config_has_its_registry_line_and_the_hand_values() -> None:
    import typing

    from configs.schema import ForwardKLTopK, JSDTopK, KLMixTopK, ObjectiveConfig, ReverseKLTopK, TopKObjective

    variants = typing.get_args(typing.get_args(ObjectiveConfig)[0])
    topk_types = {v.model_fields["type"].default for v in variants if issubclass(v, TopKObjective)}
    assert set(TOPK_OBJECTIVES) == topk_types == {"reverse_kl_topk", "forward_kl_topk", "jsd", "kl_mix"}
    logits, ids, t_logp, mask = _hand_topk_case()
    for cfg, want in ((ForwardKLTopK(), _HAND_FORWARD), (ReverseKLTopK(), _HAND_REVERSE), (JSDTopK(), _HAND_JSD_HALF),
                      (KLMixTopK(alpha=0.25), _HAND_KL_MIX_QUARTER)):
        got = topk_divergence(logits, ids, t_logp, mask, **TOPK_OBJECTIVES[cfg.type](cfg))
        assert got.item() == pytest.approx(want, abs=1e-5), cfg.type
    # the variant's own key reaches the math: β = 0 is forward KL exactly
    got = topk_divergence(logits, ids, t_logp, mask, **TOPK_OBJECTIVES["jsd"](JSDTopK(beta=0.0)))
    assert got.item() == pytest.approx(_HAND_FORWARD, abs=1e-5)


# kl_mix(α) = α·forward + (1−α)·reverse on the same case ("Decoupling KL and Trajectories"):
#   α = 0.25: 0.25·0.165332 + 0.75·0.212199 = 0.041333 + 0.159149 = 0.200482
#   α = 0.5:  ½(0.165332 + 0.212199)                                = 0.188765
_HAND_KL_MIX_QUARTER = 0.200482


@pytest.mark.parametrize(("alpha", "expected"), [(0.25, _HAND_KL_MIX_QUARTER), (0.5, 0.188765),
                                                 (1.0, _HAND_FORWARD), (0.0, _HAND_REVERSE)])
def test_kl_mix_is_alpha_forward_plus_one_minus_alpha_reverse_by_hand(alpha: float, expected: float) -> None:
    logits, ids, t_logp, mask = _hand_topk_case()
    out = topk_divergence(logits, ids, t_logp, mask, kind="kl_mix", alpha=alpha)
    assert out.item() == pytest.approx(expected, abs=1e-5)
    out.sum().backward()  # the gradient is the same mix of the two directions' gradients
    g_mix = logits.grad.clone()
    grads = []
    for kind in ("forward_kl", "reverse_kl"):
        logits.grad = None
        topk_divergence(logits, ids, t_logp, mask, kind=kind).sum().backward()  # type: ignore[arg-type]
        grads.append(logits.grad.clone())
    torch.testing.assert_close(g_mix, alpha * grads[0] + (1 - alpha) * grads[1])


def test_kl_mix_rejects_alpha_outside_unit_interval() -> None:
    logits, ids, t_logp, mask = _hand_topk_case()
    with pytest.raises(ValueError, match="alpha"):
        topk_divergence(logits, ids, t_logp, mask, kind="kl_mix", alpha=1.5)


# --------------------------------------------------------------------------- SPEC §6 vOPD baseline

# Same case: π_S = (1/6, 2/6, 3/6), teacher top-2 = tokens (2, 0) with p_T = (0.6, 0.3), tail 0.1.
# b = −KL(π_S ‖ π_T) over {2, 0, tail} = −0.212199 (the reverse KL above).
# Sampled token 2: A = ln 0.6 − ln 0.5 = 0.182322, A − b = 0.182322 + 0.212199 = 0.394521.
# Sampled token 0: A = ln 0.3 − ln(1/6) = 0.587787, A − b = 0.799986.


def test_vopd_baseline_is_minus_topk_reverse_kl_by_hand_and_detached() -> None:
    s_lp = torch.log(torch.tensor([[[0.5, 1 / 6], [0.5, 1 / 6]]])).requires_grad_(True)
    t_lp = torch.log(torch.tensor([[[0.6, 0.3], [0.6, 0.3]]]))
    b = vopd_baseline(s_lp, t_lp, torch.tensor([[1.0, 0.0]]))  # second position is padding
    assert not b.requires_grad
    assert b[0, 0].item() == pytest.approx(-0.212199, abs=1e-5)
    assert b[0, 1].item() == 0.0
    adv = distill_advantage(torch.log(torch.tensor([[0.6, 0.3]])), torch.log(torch.tensor([[0.5, 1 / 6]]))) - \
        vopd_baseline(s_lp, t_lp, torch.ones(1, 2))
    torch.testing.assert_close(adv, _t([0.394521, 0.799986]), atol=1e-5, rtol=0)


def _vopd_gradient(n: int, baseline: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over n sampled tokens y ~ π_S of the SPEC §1 loss gradient in the student's logits θ, with the
    advantage A(y) = log π_T(y) − log π_S(y) minus: nothing, the vOPD b (constant in y), or A(y) itself
    (a y-dependent "baseline", which must change the gradient). ρ = 1, so the loss gradient is
    −mean(A'·∇log π_S(y)). Returns (gradient, exact expected gradient Σ_y π_S(y) A(y) ∇log π_S(y) negated)."""
    theta = torch.tensor([0.0, math.log(2.0), math.log(3.0)], requires_grad=True)
    p_T = torch.tensor([0.3, 0.1, 0.6])  # full teacher distribution: its top-2 are tokens 2, 0
    y = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True,
                          generator=torch.Generator().manual_seed(seed))
    logp_all = torch.log_softmax(theta, -1)
    logp = logp_all[y][:, None]  # B = n responses of one token
    old = logp.detach()
    adv = distill_advantage(torch.log(p_T)[y][:, None], old)
    if baseline == "vopd":
        s_topk = logp_all.detach()[torch.tensor([2, 0])].expand(n, 1, 2)
        adv = adv - vopd_baseline(s_topk, torch.log(p_T[torch.tensor([2, 0])]).expand(n, 1, 2), torch.ones(n, 1))
    elif baseline == "y_dependent":
        adv = adv - adv
    loss_B, _ = pg_loss_per_response(logp, old, adv, torch.ones(n, 1))
    (grad,) = torch.autograd.grad(reduce_over_batch(loss_B, torch.ones(n), n), theta)
    p = torch.softmax(theta.detach(), -1)
    a_all = torch.log(p_T) - torch.log(p)
    exact = -(p[:, None] * a_all[:, None] * (torch.eye(3) - p)).sum(0)  # ∇log π(y) = onehot(y) − p
    return grad, exact


def test_vopd_baseline_leaves_the_expected_gradient_unchanged_over_many_samples() -> None:
    n = 200_000
    g_plain, exact = _vopd_gradient(n, "none")
    g_vopd, _ = _vopd_gradient(n, "vopd")
    # same samples: the difference is b·mean(∇log π(y)) = −0.212·(mean onehot(y) − p); its std per
    # coordinate ≤ 0.212·√(0.25/n) ≈ 2.4e-4, so 2e-3 is > 8 standard deviations.
    torch.testing.assert_close(g_vopd, g_plain, atol=2e-3, rtol=0)
    torch.testing.assert_close(g_vopd, exact, atol=5e-3, rtol=0)
    assert exact.abs().max().item() > 0.05  # a real gradient, not ≈ 0 everywhere
    # the test can fail: a baseline that depends on y (here A(y) itself) moves the gradient (to 0)
    g_bad, _ = _vopd_gradient(n, "y_dependent")
    assert (g_bad - g_plain).abs().max().item() > 0.05


def test_vopd_baseline_lowers_the_gradient_variance_on_the_hand_case() -> None:
    # per-sample gradient norms: A − b is centred (E[A − b] = 0 under π_S when top-k covers the mass), so its
    # per-sample gradients are smaller on average here; the SPEC's "lower variance" claim on this case.
    var = {}
    for baseline in ("none", "vopd"):
        grads = torch.stack([_vopd_gradient(1, baseline, seed=s)[0] for s in range(300)])
        var[baseline] = grads.var(0).sum().item()
    assert var["vopd"] < var["none"]


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_topk_divergence_rejects_beta_outside_unit_interval(beta: float) -> None:
    logits, ids, t_logp, mask = _hand_topk_case()
    with pytest.raises(ValueError, match="beta"):
        topk_divergence(logits, ids, t_logp, mask, kind="jsd", beta=beta)


def test_combine_terms_masks_the_pg_term_and_optionally_the_distribution_term() -> None:
    pg, dist = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    w = torch.tensor([1.0, 0.0])  # the second response was masked by balancing
    kw = dict(pg_weight=0.5, dist_weight=1.0)
    # both terms masked: (0.5·1 + 1·3) / 2
    assert float(combine_terms(pg, dist, w, 2, dist_on_masked=False, **kw)) == pytest.approx(1.75)
    # distribution term on every response: 0.5·1/2 + (3 + 5)/2
    assert float(combine_terms(pg, dist, w, 2, dist_on_masked=True, **kw)) == pytest.approx(4.25)
    # no distribution term
    assert float(combine_terms(pg, None, w, 2, dist_on_masked=True, **kw)) == pytest.approx(0.25)
    # no SPEC §1 term (a top-k objective without `pg`): (3 + 5)/2 over every response
    assert float(combine_terms(None, dist, w, 2, dist_on_masked=True, **kw)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="neither"):
        combine_terms(None, None, w, 2, dist_on_masked=True, **kw)
