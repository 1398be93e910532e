"""Loss functions of the learner: pure torch, no model, no Ray (the registry reads a config variant's keys).

What this module owns (sections of docs/algorithm.md in brackets):

- the distillation advantage ``A = log π_T − log π_S,old`` and the clipped
  policy-gradient loss on it, with the |log π_θ − log π_T| ≥ 10 token mask
  and the release's batch reduction whose denominator counts responses masked
  by balancing / calibration  [§1];
- behaviour (sampler) importance weights π_S,old / π_behave, truncated (TIS)
  or band-masked (ICE-POP), and the sampler↔learner mismatch KL  [§2];
- per-token distribution divergences over the teacher's top-k plus one "tail"
  category (forward KL, reverse KL, generalised JSD) and ``TOPK_OBJECTIVES``, the
  registry from a config objective's ``type`` to its divergence  [§6]; ``topk_divergence_from_logprobs`` takes the
  student's top-k log-probs (what the learner's chunked head returns), the
  logits forms gather them from full-vocabulary logits.

Invariants kept by every function here:

- everything is computed in float32, whatever the input dtype;
- padded positions (``mask_BT == 0``) contribute exactly 0 to values *and*
  gradients, whatever garbage the padded inputs hold, so a fully padded row
  gives 0, never NaN;
- advantages and weights are detached constants; only the student's current
  log-probs / logits carry gradient.

Shape suffixes: B responses, T response tokens (padded), V vocabulary,
K teacher top-k. ``mask_BT`` is 1.0 on real response tokens, 0.0 on padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "PGStats",
    "TOPK_OBJECTIVES",
    "behaviour_weights",
    "distill_advantage",
    "gather_logprobs",
    "mismatch_kl",
    "per_response_mean",
    "pg_loss_per_response",
    "reduce_over_batch",
    "topk_divergence",
    "topk_divergence_from_logprobs",
    "vopd_baseline",
]

# exp() of a log-ratio beyond this overflows float32 long before it means
# anything; clamping keeps inf out of products with zero masks (verl does the same).
_MAX_LOG_RATIO = 20.0
# Smallest probability mass given to the top-k "tail" category. When K covers
# (nearly) all the mass, 1 − Σ_K p is float32 rounding noise (can even be < 0);
# flooring it keeps log() finite and its gradient 0 instead of inf/NaN.
_TAIL_MASS_FLOOR = 1e-6
# Teacher log-probs below this are treated as "probability 0": avoids −inf in
# reverse KL when a teacher returns −inf for a top-k slot.
_MIN_TEACHER_LOGP = -1e4

BehaviourWeightMode = Literal["none", "tis", "icepop"]
DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd", "kl_mix"]


# ---------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------


def _logsumexp_rows_BT(logits_BTV: Tensor) -> Tensor:
    """logsumexp over V in float32, one response at a time.

    Looping over B bounds the float32 temporaries of the forward pass to T×V
    instead of B×T×V (matters when the logits are bf16 and V is ~150k).
    """
    return torch.stack([torch.logsumexp(row_TV.float(), dim=-1) for row_TV in logits_BTV])


def gather_logprobs(logits_BTV: Tensor, token_ids_BT: Tensor) -> Tensor:
    """log softmax(logits)[token] for each position, in float32.

    Computed as ``logit[token] − logsumexp(logits)`` so no full B×T×V
    log-softmax tensor is materialised. It still takes the B×T×V logits: the
    learner uses the chunked form of learner/logprobs.py instead, which this
    function is the reference for.
    """
    if logits_BTV.shape[:2] != token_ids_BT.shape:
        raise ValueError(
            f"logits_BTV has leading shape {tuple(logits_BTV.shape[:2])} but token_ids_BT has "
            f"shape {tuple(token_ids_BT.shape)}; they must match (B, T)"
        )
    picked_BT = logits_BTV.gather(-1, token_ids_BT.long().unsqueeze(-1)).squeeze(-1).float()
    return picked_BT - _logsumexp_rows_BT(logits_BTV)


# ---------------------------------------------------------------------------
# SPEC §1: the distillation advantage
# ---------------------------------------------------------------------------


def distill_advantage(teacher_logp_BT: Tensor, old_logp_BT: Tensor) -> Tensor:
    """SPEC §1: ``A_t = log π_T(y_t) − log π_S,old(y_t)``, a detached constant.

    Per-token reverse-KL signal: positive where the teacher likes the student's
    token more than the student does.
    """
    return (teacher_logp_BT.float() - old_logp_BT.float()).detach()


# ---------------------------------------------------------------------------
# SPEC §2: off-policy (behaviour) correction
# ---------------------------------------------------------------------------


def _masked_log_ratio_BT(num_logp_BT: Tensor, den_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``num − den`` on real tokens, 0 on padding, clamped so exp() stays finite."""
    log_ratio_BT = (num_logp_BT.float() - den_logp_BT.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.where(mask_BT > 0, log_ratio_BT, torch.zeros_like(log_ratio_BT))


def behaviour_weights(
    old_logp_BT: Tensor,
    behave_logp_BT: Tensor,
    mask_BT: Tensor,
    *,
    mode: BehaviourWeightMode,
    tis_upper: float = 5.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
) -> Tensor:
    """SPEC §2 importance correction: ``w_t = π_S,old(y_t) / π_behave(y_t)``.

    - ``none``: 1 on every real token (no correction);
    - ``tis``: ``min(w, tis_upper)`` (truncated importance sampling);
    - ``icepop``: ``w`` where ``icepop_low ≤ w ≤ icepop_high``, else 0.

    Padded positions get 0 in every mode. The result is detached: it scales the
    per-token loss, it is not optimised.
    """
    mask_BT = mask_BT.float()
    if mode == "none":
        return mask_BT.clone()
    w_BT = torch.exp(_masked_log_ratio_BT(old_logp_BT, behave_logp_BT, mask_BT)).detach()
    if mode == "tis":
        if tis_upper <= 0:
            raise ValueError(f"tis_upper is {tis_upper}; it must be > 0 (SPEC §2 default 5)")
        w_BT = w_BT.clamp(max=tis_upper)
    elif mode == "icepop":
        if not 0 <= icepop_low <= icepop_high:
            raise ValueError(
                f"icepop band is [{icepop_low}, {icepop_high}]; it needs 0 ≤ icepop_low ≤ icepop_high"
            )
        in_band_BT = (w_BT >= icepop_low) & (w_BT <= icepop_high)
        w_BT = torch.where(in_band_BT, w_BT, torch.zeros_like(w_BT))
    else:
        raise ValueError(f"behaviour weight mode is {mode!r}; it must be one of 'none', 'tis', 'icepop'")
    return w_BT * mask_BT


def mismatch_kl(old_logp_BT: Tensor, behave_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """SPEC §2 metric: token-mean estimate of ``KL(π_behave ‖ π_S,old)``.

    The tokens were sampled from the behaviour policy (the sampler), so the
    unbiased, always non-negative k3 estimator (Schulman, "Approximating KL
    divergence") is ``E_behave[r − 1 − log r]`` with ``r = π_S,old / π_behave``.
    Returns a detached float32 scalar; 0 when the mask is empty.
    """
    mask_BT = mask_BT.float()
    log_r_BT = _masked_log_ratio_BT(old_logp_BT, behave_logp_BT, mask_BT).detach()
    k3_BT = torch.expm1(log_r_BT) - log_r_BT  # r − 1 − log r, accurate for r ≈ 1
    return (k3_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------
# SPEC §1: clipped policy gradient and its reductions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PGStats:
    """Detached float32 scalars describing one ``pg_loss_per_response`` call.

    clip_frac: fraction of loss-carrying tokens on which the clipped branch was
        active (zero gradient): ρ > 1+ε_high with A > 0, or ρ < 1−ε_low with A < 0.
    masked_token_frac: fraction of real tokens dropped by the SPEC §1
        ``|log π_θ − log π_T| ≥ threshold`` mask.
    """

    clip_frac: Tensor
    masked_token_frac: Tensor


def per_response_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``x`` over each response's masked-in tokens; 0 for an empty row.

    Padded entries of ``x`` are ignored even if they are inf/NaN.
    """
    mask_BT = mask_BT.float()
    x_BT = torch.where(mask_BT > 0, x_BT.float(), torch.zeros_like(x_BT, dtype=torch.float32))
    return x_BT.sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1.0)


def pg_loss_per_response(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    teacher_logp_BT: Tensor | None = None,
    mask_threshold: float = 10.0,
    weight_BT: Tensor | None = None,
) -> tuple[Tensor, PGStats]:
    """SPEC §1 clipped policy-gradient loss, one value per response.

    Per token::

        ρ_t = exp(log π_θ − log π_S,old)
        ℓ_t = max(−ρ_t A_t, −clip(ρ_t, 1−ε_low, 1+ε_high) A_t) · w_t

    where ``w_t`` is the SPEC §2 behaviour weight (``weight_BT``; 1 if None).
    If ``teacher_logp_BT`` is given, tokens with
    ``|log π_θ − log π_T| ≥ mask_threshold`` (log π_θ detached) are dropped
    (Uni-OPD release). Each response's loss is the mean of ℓ over its remaining
    tokens (0 if none remain). Only ``logp_BT`` carries gradient.
    """
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"clip range is eps_low={eps_low}, eps_high={eps_high}; need 0 ≤ eps_low < 1, eps_high ≥ 0")
    real_BT = mask_BT.float() > 0
    keep_BT = real_BT
    if teacher_logp_BT is not None:
        gap_BT = (logp_BT.detach().float() - teacher_logp_BT.float()).abs()
        # NaN gaps (garbage teacher numbers) fail `< threshold` and are dropped too.
        keep_BT = real_BT & (gap_BT < mask_threshold)
    keep_f_BT = keep_BT.float()

    adv_BT = torch.where(keep_BT, adv_BT.detach().float(), torch.zeros_like(adv_BT, dtype=torch.float32))
    ratio_BT = torch.exp(_masked_log_ratio_BT(logp_BT, old_logp_BT.detach(), keep_f_BT))
    unclipped_BT = -ratio_BT * adv_BT
    clipped_BT = -ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_BT
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    if weight_BT is not None:
        weight_BT = torch.where(keep_BT, weight_BT.detach().float(), torch.zeros_like(weight_BT, dtype=torch.float32))
        loss_BT = loss_BT * weight_BT

    loss_B = per_response_mean(loss_BT, keep_f_BT)

    with torch.no_grad():
        n_kept = keep_f_BT.sum()
        n_real = real_BT.float().sum()
        clip_active_BT = (clipped_BT > unclipped_BT) & keep_BT
        stats = PGStats(
            clip_frac=clip_active_BT.float().sum() / n_kept.clamp(min=1.0),
            masked_token_frac=(n_real - n_kept) / n_real.clamp(min=1.0),
        )
    return loss_B, stats


def reduce_over_batch(loss_B: Tensor, response_weight_B: Tensor, n_responses_total: int) -> Tensor:
    """SPEC §1 release reduction: ``Σ_b weight_b · loss_b / n_responses_total``.

    ``response_weight_B`` is 0 for responses masked by balancing (§3.2) or
    calibration (§4); ``n_responses_total`` counts *all* responses of the global
    batch, masked ones included, so masking shrinks the gradient scale (the
    release's behaviour, kept on purpose).
    """
    if n_responses_total <= 0:
        raise ValueError(f"n_responses_total is {n_responses_total}; it must be ≥ 1 (responses in the global batch)")
    weighted_B = loss_B.float() * response_weight_B.detach().float()
    return weighted_B.sum() / n_responses_total


def combine_terms(
    pg_B: Tensor | None,
    dist_B: Tensor | None,
    response_weight_B: Tensor,
    n_responses_total: int,
    *,
    pg_weight: float,
    dist_weight: float,
    dist_on_masked: bool,
    excluded_B: Tensor | None = None,
) -> Tensor:
    """The learner's loss: ``pg_weight`` × the SPEC §1 term + ``dist_weight`` × the SPEC §6 term,
    each reduced by :func:`reduce_over_batch` (a term that is None is absent). ``excluded_B`` = 1
    removes a response from both terms whatever ``dist_on_masked`` says (a truncated response under
    ``buffer.truncated=mask``).

    The §3.2/§4 masks (``response_weight_B`` = 0) always remove a response from the §1 term; with
    ``dist_on_masked`` the distribution term still covers it (a per-token supervision, not a
    reward), otherwise it is removed from both. The denominator is the global count either way.
    """
    terms = []
    if pg_B is not None:
        terms.append(pg_weight * reduce_over_batch(pg_B, response_weight_B, n_responses_total))
    if dist_B is not None:
        terms.append(dist_weight * reduce_over_batch(
            dist_B, dist_term_weights(response_weight_B, dist_on_masked, excluded_B), n_responses_total))
    if not terms:
        raise ValueError("combine_terms got neither a SPEC §1 nor a SPEC §6 term; the loss would be empty")
    return sum(terms[1:], terms[0])


def dist_term_weights(response_weight_B: Tensor, dist_on_masked: bool, excluded_B: Tensor | None = None) -> Tensor:
    """The per-response weights of the distribution term (see :func:`combine_terms`)."""
    w = torch.ones_like(response_weight_B) if dist_on_masked else response_weight_B
    return w if excluded_B is None else w * (1 - excluded_B)


# ---------------------------------------------------------------------------
# SPEC §6: distribution matching over the teacher's top-k + tail
# ---------------------------------------------------------------------------


def _tail_logp(topk_logp_BTK: Tensor) -> Tensor:
    """``log(1 − Σ_K p)``, with the mass floored at ``_TAIL_MASS_FLOOR``.

    ``-expm1(logsumexp)`` is the accurate form of ``1 − Σ p`` when Σ p ≈ 1;
    the floor keeps log() finite and, being a clamp, gives zero (not inf or
    NaN) gradient when K covers all the mass.
    """
    tail_mass = -torch.expm1(torch.logsumexp(topk_logp_BTK, dim=-1))
    return torch.log(tail_mass.clamp(min=_TAIL_MASS_FLOOR))


def _kl_over_categories(logp_P: Tensor, logp_Q: Tensor) -> Tensor:
    """``Σ_c P_c (log P_c − log Q_c)`` over the last dim; P_c = 0 terms are 0."""
    p = logp_P.exp()
    terms = torch.where(p > 0, p * (logp_P - logp_Q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def topk_divergence(
    student_logits_BTV: Tensor,
    teacher_topk_ids_BTK: Tensor,
    teacher_topk_logp_BTK: Tensor,
    mask_BT: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
    alpha: float = 0.5,
) -> Tensor:
    """SPEC §6 per-token divergence from full-vocabulary student logits (see
    :func:`topk_divergence_from_logprobs`, which this gathers the student's top-k log-probs for).

    Needs the B×T×V logits: the form for small vocabularies and the reference the learner's
    chunked path (learner/logprobs.py, no B×T×V tensor) is tested against.
    Differentiable in ``student_logits_BTV``; the teacher side is constant.
    """
    real_BTK = (mask_BT.float() > 0).unsqueeze(-1)
    # Padded slots may hold any ids: gather at a harmless one (0) so nothing reads out of range.
    ids_BTK = torch.where(real_BTK, teacher_topk_ids_BTK.long(), 0)
    s_topk_BTK = student_logits_BTV.gather(-1, ids_BTK).float() - _logsumexp_rows_BT(student_logits_BTV).unsqueeze(-1)
    return topk_divergence_from_logprobs(s_topk_BTK, teacher_topk_logp_BTK, mask_BT, kind=kind, beta=beta, alpha=alpha)


def topk_divergence_from_logprobs(
    student_topk_logp_BTK: Tensor,
    teacher_topk_logp_BTK: Tensor,
    mask_BT: Tensor,
    *,
    kind: DivergenceKind,
    beta: float = 0.5,
    alpha: float = 0.5,
) -> Tensor:
    """SPEC §6 per-token divergence between teacher and student over K+1 categories.

    Inputs are both sides' log-probs of the teacher's K top tokens (the student's taken at the
    teacher's ids). Categories: those K tokens, plus one tail category holding the rest of the
    mass (``1 − Σ_K p``, for teacher and student alike).

    - ``forward_kl``: ``Σ p_T (log p_T − log p_S)`` = KL(T ‖ S);
    - ``reverse_kl``: ``Σ p_S (log p_S − log p_T)`` = KL(S ‖ T);
    - ``jsd``: ``β·KL(T ‖ M) + (1−β)·KL(S ‖ M)``, ``M = β p_T + (1−β) p_S``;
      ``β = 0`` is forward KL and ``β = 1`` reverse KL exactly (TRL's GKD
      convention; the mixture formula itself tends to 0 at both ends, so the
      endpoints are special-cased);
    - ``kl_mix``: ``α·KL(T ‖ S) + (1−α)·KL(S ‖ T)`` ("Decoupling KL and Trajectories"): α = 1 is
      forward KL, α = 0 reverse KL.

    Differentiable in ``student_topk_logp_BTK``; the teacher side is constant.
    Returns float32 ``per_token_BT``, 0 (value and gradient) on padded positions.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta is {beta}; it must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kl_mix alpha is {alpha}; it must lie in [0, 1] (1 = forward KL, 0 = reverse KL)")
    if kind not in ("reverse_kl", "forward_kl", "jsd", "kl_mix"):
        raise ValueError(f"divergence kind is {kind!r}; it must be one of 'reverse_kl', 'forward_kl', 'jsd', 'kl_mix'")
    real_BT = mask_BT.float() > 0
    real_BTK = real_BT.unsqueeze(-1)
    k = teacher_topk_logp_BTK.shape[-1]

    # Padded slots may hold any numbers: replace both sides with a uniform distribution there
    # so neither forward nor backward sees inf/NaN.
    uniform_logp = -math.log(k + 1)
    t_topk_BTK = teacher_topk_logp_BTK.detach().float().clamp(min=_MIN_TEACHER_LOGP)
    t_topk_BTK = torch.where(real_BTK, t_topk_BTK, torch.full_like(t_topk_BTK, uniform_logp))
    s_topk_BTK = student_topk_logp_BTK.float()
    s_topk_BTK = torch.where(real_BTK, s_topk_BTK, torch.full_like(s_topk_BTK, uniform_logp))

    t_BTC = torch.cat([t_topk_BTK, _tail_logp(t_topk_BTK).unsqueeze(-1)], dim=-1)  # C = K + 1
    s_BTC = torch.cat([s_topk_BTK, _tail_logp(s_topk_BTK).unsqueeze(-1)], dim=-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        div_BT = _kl_over_categories(t_BTC, s_BTC)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        div_BT = _kl_over_categories(s_BTC, t_BTC)
    elif kind == "kl_mix":
        div_BT = alpha * _kl_over_categories(t_BTC, s_BTC) + (1.0 - alpha) * _kl_over_categories(s_BTC, t_BTC)
    else:
        mix_BTC = torch.logsumexp(torch.stack([t_BTC + math.log(beta), s_BTC + math.log(1.0 - beta)]), dim=0)
        div_BT = beta * _kl_over_categories(t_BTC, mix_BTC) + (1.0 - beta) * _kl_over_categories(s_BTC, mix_BTC)

    return torch.where(real_BT, div_BT, torch.zeros_like(div_BT))


# SPEC §6 registry: the ``type`` of a top-k objective (a ``configs.algorithm.TopKObjective``
# subclass) → the keyword arguments of ``topk_divergence`` / ``topk_divergence_from_logprobs``
# it stands for, its own keys read from the config variant. A new divergence is its math
# above, one config class and one line here (tests/test_objectives.py checks that every
# top-k variant of the schema has its line).
TOPK_OBJECTIVES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "reverse_kl_topk": lambda o: {"kind": "reverse_kl"},
    "forward_kl_topk": lambda o: {"kind": "forward_kl"},
    "jsd": lambda o: {"kind": "jsd", "beta": o.beta},
    "kl_mix": lambda o: {"kind": "kl_mix", "alpha": o.alpha},
}


def vopd_baseline(student_topk_logp_BTK: Tensor, teacher_topk_logp_BTK: Tensor, mask_BT: Tensor) -> Tensor:
    """SPEC §6 vOPD ("KL for a KL") control variate: ``b_t = −KL(π_S ‖ π_T)`` at each visited state, the
    top-k + tail estimate of :func:`topk_divergence_from_logprobs` (reverse KL over K + 1 categories),
    detached; 0 on padding.

    Why it is a baseline for the SPEC §1 term: ``E_{y∼π_S}[log π_T(y) − log π_S(y)] = −KL(π_S ‖ π_T)``, the
    expected advantage at that state, and it does not depend on the sampled token, so
    ``E[∇log π_S(y)·b_t] = b_t·Σ_y ∇π_S(y) = 0``: subtracting it leaves the expected gradient unchanged and
    centres A_t. The learner passes the student's log-probs at the teacher's ids under π_S,old (the
    detached current parameters), the same numbers the distribution terms read.
    """
    kl_BT = topk_divergence_from_logprobs(student_topk_logp_BTK.detach(), teacher_topk_logp_BTK, mask_BT,
                                          kind="reverse_kl")
    return -kl_BT.detach()
