"""Student/teacher top-k agreement at the student-visited states: SPEC §6 Prune-OPD drift control and the
"Rethinking OPD" overlap diagnostics. Pure torch, no model, no Ray.

What this module owns (docs/algorithm.md §6, "Drift control" and "Overlap diagnostics"):

- ``topn_overlap``: overlap_t = |topN_S ∩ topN_T| / N per position, the student's N likeliest ids over the
  whole vocabulary (from the learner's chunked head, learner/logprobs.py: never a positions × vocabulary
  tensor) against the teacher's N likeliest among its returned top-k;
- ``drift_control``: drift events, the per-token weight and the truncated training window of Prune-OPD
  (arXiv 2605.07804) as ``configs.algorithm.DriftControl`` specifies them, with the tokens saved;
- ``overlap_metrics``: per domain, the top-k overlap and the probability mass of the shared top-k set under
  the student and under the teacher;
- token-weighted means across micro-batches: a chunk reports ``name#sum`` and ``name#n`` (additive), and
  ``token_means`` turns them into ``name`` once the step is done.

Invariants: every loop is over a few domains, never over positions (cumulative sums and cummax do the
per-token state); padded positions count nowhere (0 events, weight at no drift, outside nothing); all
outputs are detached.

Shape suffixes: B responses, T response tokens (padded), K teacher top-k, M student top ids, N = top_n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from configs.algorithm import DriftControl

__all__ = ["DriftOutcome", "drift_control", "overlap_metrics", "shared_topk", "token_means", "topn_overlap"]


def _teacher_top(teacher_ids_BTK: Tensor, teacher_lp_BTK: Tensor, n: int) -> Tensor:
    """The teacher's n likeliest ids among its returned top-k (ranked by log-prob, whatever order they came in)."""
    idx_BTn = teacher_lp_BTK.topk(min(n, teacher_lp_BTK.shape[-1]), dim=-1).indices
    return teacher_ids_BTK.gather(-1, idx_BTn)


def _member(ids_BTK: Tensor, set_BTM: Tensor) -> Tensor:
    """``ids_BTK[b, t, k] ∈ set_BTM[b, t, :]``, by sorting and binary search (B×T×(K+M) memory, not B×T×K×M)."""
    sorted_BTM = set_BTM.sort(dim=-1).values.contiguous()
    pos_BTK = torch.searchsorted(sorted_BTM, ids_BTK.contiguous()).clamp(max=sorted_BTM.shape[-1] - 1)
    return sorted_BTM.gather(-1, pos_BTK) == ids_BTK


@torch.no_grad()
def topn_overlap(student_top_BTM: Tensor, teacher_ids_BTK: Tensor, teacher_lp_BTK: Tensor, n: int) -> Tensor:
    """SPEC §6: overlap_t = |topN_S ∩ topN_T| / N, N = min(n, K, M). ``student_top_BTM`` holds the student's
    likeliest ids, likeliest first (``torch.topk`` order, as the chunked head returns them)."""
    n = min(n, teacher_ids_BTK.shape[-1], student_top_BTM.shape[-1])
    t_top_BTn = _teacher_top(teacher_ids_BTK.long(), teacher_lp_BTK.float(), n)
    return _member(t_top_BTn, student_top_BTM[..., :n].long()).float().sum(-1) / n


@torch.no_grad()
def shared_topk(student_top_BTM: Tensor, teacher_ids_BTK: Tensor, teacher_lp_BTK: Tensor,
                student_lp_at_teacher_BTK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """"Rethinking OPD" diagnostics at each position: with S = the student's top-K and T = the teacher's
    top-K (K = the teacher's returned k; M ≥ K student ids, the first K used), returns
    ``(|S ∩ T| / K, Σ_{S∩T} p_S, Σ_{S∩T} p_T)``: how many of the likeliest tokens they share, and how much
    of each one's probability that shared set holds. p_S is read at the teacher's ids (the log-probs the
    learner already has), so both masses need only the shared ids' membership."""
    k = teacher_ids_BTK.shape[-1]
    shared_BTK = _member(teacher_ids_BTK.long(), student_top_BTM[..., :k].long()).float()
    overlap_BT = shared_BTK.sum(-1) / k
    mass_s_BT = (student_lp_at_teacher_BTK.detach().float().exp() * shared_BTK).sum(-1)
    mass_t_BT = (teacher_lp_BTK.float().exp() * shared_BTK).sum(-1)
    return overlap_BT, mass_s_BT, mass_t_BT


@dataclass(frozen=True)
class DriftOutcome:
    """What drift control does to one micro-batch: ``weight_BT`` multiplies every token's loss, ``window_BT``
    (1.0 = kept) replaces the loss mask; ``stats`` are ``#sum``/``#n`` pairs and ``drift/tokens_saved``."""

    weight_BT: Tensor
    window_BT: Tensor
    stats: dict[str, float]


@torch.no_grad()
def drift_control(overlap_BT: Tensor, mask_BT: Tensor, cfg: DriftControl) -> DriftOutcome:
    """SPEC §6 Prune-OPD on positions where ``mask_BT`` is 1 (real tokens that have the teacher's top-k):

    - event_t = overlap_t < threshold; e_t = Σ_{s ≤ t} event_s (the event at t counts for t);
    - w_t = clamp(1 − decay·e_t, 0, 1) + offset (or the offset inside the clamp, ``offset_inside_clamp``);
    - severe at t: the run of consecutive events ending at t reaches ``severe_consecutive``, or
      overlap_t < ``severe_overlap``; the window keeps every position up to and including the first
      severe one and drops the rest (``drift/tokens_saved`` counts the dropped real tokens).

    Rows or positions outside ``mask_BT`` get no events, the no-drift weight and stay in the window.
    """
    real_BT = mask_BT.float() > 0
    event_BT = real_BT & (overlap_BT < cfg.threshold)
    e_BT = event_BT.float().cumsum(-1)
    if cfg.offset_inside_clamp:
        weight_BT = (1.0 - cfg.decay * e_BT + cfg.offset).clamp(0.0, 1.0)
    else:
        weight_BT = (1.0 - cfg.decay * e_BT).clamp(0.0, 1.0) + cfg.offset
    severe_BT = torch.zeros_like(real_BT)
    if cfg.severe_consecutive:
        idx_BT = torch.arange(event_BT.shape[-1], device=event_BT.device).expand_as(event_BT)
        # the run of events ending at t: t minus the last non-event position at or before t
        last_calm_BT = torch.where(event_BT, torch.full_like(idx_BT, -1), idx_BT).cummax(dim=-1).values
        severe_BT |= event_BT & (idx_BT - last_calm_BT >= cfg.severe_consecutive)
    if cfg.severe_overlap is not None:
        severe_BT |= real_BT & (overlap_BT < cfg.severe_overlap)
    n_severe_BT = severe_BT.float().cumsum(-1)
    window_BT = (n_severe_BT - severe_BT.float()) == 0  # nothing severe strictly before t
    saved_BT = real_BT & ~window_BT
    n_real = float(real_BT.sum())
    stats = {
        "drift/event_frac#sum": float(event_BT.sum()), "drift/event_frac#n": n_real,
        "drift/weight_mean#sum": float((weight_BT * (real_BT & window_BT)).sum()),
        "drift/weight_mean#n": float((real_BT & window_BT).sum()),
        "drift/truncated_frac#sum": float(saved_BT.any(-1).sum()), "drift/truncated_frac#n": float(real_BT.any(-1).sum()),
        "drift/tokens_saved_frac#sum": float(saved_BT.sum()), "drift/tokens_saved_frac#n": n_real,
        "drift/tokens_saved": float(saved_BT.sum()),
    }
    return DriftOutcome(weight_BT=weight_BT * window_BT, window_BT=window_BT.float(), stats=stats)


@torch.no_grad()
def overlap_metrics(student_top_BTM: Tensor, teacher_ids_BTK: Tensor, teacher_lp_BTK: Tensor,
                    student_lp_at_teacher_BTK: Tensor, mask_BT: Tensor, domains: list[str]) -> dict[str, float]:
    """Per domain d (one loop over the batch's few domains), token sums of :func:`shared_topk` as
    ``overlap/<d>/{topk_overlap,shared_mass_student,shared_mass_teacher}#sum`` with their ``#n``."""
    overlap_BT, mass_s_BT, mass_t_BT = shared_topk(student_top_BTM, teacher_ids_BTK, teacher_lp_BTK,
                                                   student_lp_at_teacher_BTK)
    real_BT = mask_BT.float()
    out: dict[str, float] = {}
    for d in sorted(set(domains)):
        rows_B = torch.tensor([x == d for x in domains], device=real_BT.device)
        m_BT = real_BT * rows_B[:, None]
        n = float(m_BT.sum())
        if n == 0:
            continue
        for name, x_BT in (("topk_overlap", overlap_BT), ("shared_mass_student", mass_s_BT),
                           ("shared_mass_teacher", mass_t_BT)):
            out[f"overlap/{d}/{name}#sum"] = float((x_BT * m_BT).sum())
            out[f"overlap/{d}/{name}#n"] = n
    return out


def token_means(agg: dict[str, float]) -> dict[str, float]:
    """``name#sum`` / ``name#n`` pairs (summed over a step's micro-batches) → ``name``; other keys unchanged."""
    out = {k: v for k, v in agg.items() if "#" not in k}
    for k, v in agg.items():
        if k.endswith("#sum"):
            name = k[: -len("#sum")]
            out[name] = v / max(agg.get(f"{name}#n", 0.0), 1.0)
    return out
