"""Several scorers per response, combined into one ``TeacherScore`` before the buffer (SPEC §5
multi-teacher, SPEC §6 ``extrapolated``). Pure numpy; the buffer actor calls ``combine`` when a
chain's scorers have all answered (buffers/actor.py ``add_chain``).

Why one score is enough. With teacher weights w_k (Σ_k w_k = 1) the SPEC §5 advantage is

    Σ_k w_k A_t^(k) = Σ_k w_k (log π_T^(k)(y_t) − log π_S,old(y_t)) = [Σ_k w_k log π_T^(k)(y_t)] − log π_S,old(y_t),

so ℓ_t = Σ_k w_k log π_T^(k)(y_t) stands for log π_T everywhere downstream: the learner's SPEC §1
advantage and its |log π_θ − log π_T| ≥ 10 mask, the SPEC §4 returns G (the mean of A_t) and the
``teacher/<d>/kl`` metric. ℓ_t is not the log-prob of a normalised distribution (a geometric mixture);
nothing downstream needs it to be. The ``extrapolated`` objective (G-OPD) is the same identity with fixed
weights on the domain teacher(s) and the reference π_ref (the initial student):

    λ(log π_T − log π_ref) − (log π_S,old − log π_ref) = [λ ℓ_t + (1 − λ) log π_ref(y_t)] − log π_S,old.

Our choices where the sources leave details open (docs/algorithm.md §5, §6):
- Confidence c_k: teacher k's mean log-prob of the student's tokens in the response (``combine: confidence``),
  w = softmax(c / τ) per response; ``combine: equal`` gives equal weights.
- A teacher call that failed for one of the k: the weights are renormalised over the teachers that
  answered (the softmax is taken over them; the failed one gets w = 0); all failed → the response is
  ``failed`` (SPEC §1: A_t = 0, counted). ``extrapolated`` needs both sides: a failed reference (or no
  teacher) makes the response ``failed`` — falling back to one side would train on π_T alone (λ = 1)
  or, worse, on π_ref alone.
- Top-k (SPEC §6 distribution terms): teachers return different top-k ids, and a mixture's top-k
  cannot be formed from them (each misses the others' tail), so the combined score carries the top-k of
  the response's highest-weight teacher; the distribution term then matches that teacher while the §1
  term follows the mixture.
- The extrapolation cliff ("The Extrapolation Cliff in On-Policy Distillation of Near-Deterministic
  Structured Outputs", Li et al. 2026): see ``lambda_star``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from buffers.records import CliffStats, ScoredRollout, TeacherMix, TeacherScore, VerifiedRollout
from configs.privileged import DOPD_REGIMES
from configs.schema import ConfidenceWeights, EqualWeights, RunConfig, combination_of, reference_of, teacher_names

# Probabilities are kept inside (ε, 1 − ε) before a logit: a teacher that is certain in float32 (log-prob 0)
# would otherwise give an infinite logit.
_PROB_EPS = 1e-7


@dataclass(frozen=True)
class ScoringRule:
    """How one domain's scorers become one score: its teachers (weighted by ``weighting``), then the
    ``reference`` of the extrapolated objective with λ = ``lam``."""

    domain: str
    teachers: tuple[str, ...]
    weighting: ConfidenceWeights | EqualWeights
    top_k: int  # top-k columns the objective reads (0: the combined score carries none)
    reference: str | None = None
    lam: float = 1.0
    cliff_clip: float | None = None  # c of the cliff diagnostic (None: off)

    @property
    def scorers(self) -> tuple[str, ...]:
        """The teachers whose answers ``combine`` takes, in this order."""
        return self.teachers + ((self.reference,) if self.reference else ())

    @property
    def label(self) -> str:
        """The combined score's ``teacher_name`` (its own failure window in the buffer)."""
        return "+".join(self.scorers)


def scoring_rule(cfg: RunConfig, domain: str) -> ScoringRule | None:
    """``domain``'s rule, or None when one teacher scores it alone (the plain SPEC §1 path)."""
    names, ref = teacher_names(cfg.domains[domain].teacher), reference_of(cfg)
    if len(names) == 1 and ref is None:
        return None
    o = cfg.learner.objective
    return ScoringRule(domain, names, combination_of(cfg.domains[domain].combine), o.top_k if cfg.needs_topk else 0, ref,
                       o.lam if ref else 1.0, o.cliff_clip if ref else None)


@dataclass(frozen=True)
class ScorerRefs:
    """One chain's answers from every scorer of ``rule`` (one Ray ref each, in ``rule.scorers`` order, each
    resolving to the scorer's ``list[ScoredRollout]`` for the same verified rollouts). Travels to the
    buffer inside ``add_chain``'s list, so Ray hands the refs over unresolved."""

    rule: ScoringRule
    refs: list


@dataclass(frozen=True)
class ChainRefs:
    """One chain's two answers for the same rollouts, computed side by side: the verifier's verdicts (a ref to
    ``list[VerifiedRollout]``) and the teachers' scores (a ref to ``list[ScoredRollout]``, or a ``ScorerRefs``).
    The teacher does not need the outcome, so it scores while the verifier grades, and a chain takes
    max(verify, score) instead of their sum (a code sandbox's seconds no longer delay the teacher's prefill);
    the buffer joins the two with ``with_verdicts``."""

    verified: object
    scored: object


def _responses(items: list[ScoredRollout] | list[VerifiedRollout]) -> list[tuple[int, int]]:
    """Which responses a list holds, in order: (prompt uid, sample index) of each."""
    return [(x.rollout.prompt.uid, x.rollout.sample_idx) for x in items]


def with_verdicts(scored: list[ScoredRollout], verified: list[VerifiedRollout]) -> list[ScoredRollout]:
    """Each scored rollout with the verifier's verdict in place of its ``unverified`` mark. Raises if the two
    lists do not hold the same responses in the same order (both came from one generate ref: a bug)."""
    if _responses(scored) != _responses(verified):
        raise RuntimeError(f"the verifier and the teacher answered for different responses ({len(verified)} "
                           f"verdicts, {len(scored)} scores)")
    return [replace(s, verified=v) for s, v in zip(scored, verified)]


def teacher_weights(confidence_K: np.ndarray, answered_K: np.ndarray,
                    weighting: ConfidenceWeights | EqualWeights) -> np.ndarray:
    """SPEC §5: w_k = softmax_k(c_k / τ) over the teachers that answered (0 for the others; all 0 when
    none did). ``equal``: 1 / (number that answered)."""
    answered_K = np.asarray(answered_K, dtype=bool)
    if not answered_K.any():
        return np.zeros(len(answered_K))
    # a non-finite confidence (a −inf log-prob somewhere) weighs nothing, unless all are non-finite
    c_K = np.nan_to_num(np.asarray(confidence_K, dtype=np.float64), nan=-1e30, neginf=-1e30, posinf=0.0)
    z_K = np.zeros(len(answered_K)) if isinstance(weighting, EqualWeights) else c_K / weighting.temperature
    z_K = np.where(answered_K, z_K - z_K[answered_K].max(), -np.inf)
    e_K = np.exp(z_K)
    return e_K / e_K.sum()


def _confidence(s: ScoredRollout) -> float:
    """c_k: the teacher's mean log-prob of the response's tokens (0 for an empty response or a failure)."""
    if s.teacher is None or s.teacher.logprobs_T.size == 0:
        return 0.0
    return float(np.mean(s.teacher.logprobs_T, dtype=np.float64))


def lambda_star(p_T: np.ndarray, b_T: np.ndarray, clip: float) -> np.ndarray:
    """The critical λ of each position (the extrapolation cliff); NaN where ``b_T`` is NaN (unknown).

    The paper (Li et al. 2026, arXiv 2605.08737) derives a closed-form λ*(p, b, c) in a single-position
    Bernoulli reduction from the teacher's modal probability p, the warm-start (reference) mass b on
    that token and the importance-sampling clip strength c: past λ* "the extrapolated fixed point exits
    the clip-safe region". We could read only its abstract, so this is our reconstruction, with c
    configurable (``learner.objective.cliff_clip``). In the reduction (modal token vs the rest) the
    extrapolated target π_T^λ π_ref^(1−λ) has log-odds λ·logit p + (1 − λ)·logit b. We call it clip-safe
    while its tail mass stays within one clip step of the teacher's, 1 − q_λ ≥ (1 − c)(1 − p); the
    boundary q* = 1 − (1 − c)(1 − p) gives

        λ*(p, b, c) = (logit q* − logit b) / (logit p − logit b)        for p > b,

    and no cliff (λ* = ∞) where p ≤ b (extrapolation then moves mass away from the modal token). λ* > 1
    always, and λ* → 1 as the teacher pulls away from the reference: λ* ≈ 1 − log(1 − c) / (logit p − logit b)
    for small tails. Example: p = 0.9, b = 0.5, c = 0.2 gives λ* = 1.112 (past it at λ = 1.25).
    """
    b_T = np.asarray(b_T, dtype=np.float64)
    p = np.clip(np.asarray(p_T, dtype=np.float64), _PROB_EPS, 1 - _PROB_EPS)
    b = np.clip(b_T, _PROB_EPS, 1 - _PROB_EPS)
    tail = (1 - clip) * (1 - p)  # 1 − q*

    def logit(x: np.ndarray) -> np.ndarray:
        return np.log(x) - np.log1p(-x)

    den = logit(p) - logit(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(den > 0, (np.log1p(-tail) - np.log(tail) - logit(b)) / den, np.inf)
    return np.where(np.isnan(b_T), np.nan, lam)


def cliff_stats(response_ids: list[int], teacher: TeacherScore, reference: TeacherScore, lam: float,
                clip: float) -> CliffStats | None:
    """One response's distance to the cliff (``lambda_star``): p_t is the teacher's modal probability
    (its top-1); b_t is π_ref of that modal token, known where the student sampled it (the reference's
    score of y_t) or where it is the reference's own top-1; other positions are not measured. None when
    the teacher returned no top-1."""
    if teacher.topk_ids_TK is None or teacher.topk_ids_TK.shape[-1] == 0:
        return None
    mode_T = teacher.topk_ids_TK[:, 0]
    p_T = np.exp(teacher.topk_logprobs_TK[:, 0].astype(np.float64))
    b_T = np.where(np.asarray(response_ids) == mode_T, np.exp(reference.logprobs_T.astype(np.float64)), np.nan)
    if reference.topk_ids_TK is not None and reference.topk_ids_TK.shape[-1]:
        ref_top1_T = np.exp(reference.topk_logprobs_TK[:, 0].astype(np.float64))
        b_T = np.where(np.isnan(b_T) & (reference.topk_ids_TK[:, 0] == mode_T), ref_top1_T, b_T)
    gap = lambda_star(p_T, b_T, clip) - lam  # λ*_t − λ, NaN where not measured
    gap = gap[~np.isnan(gap)]
    return CliffStats(tokens=len(p_T), measured=len(gap), past=int((gap <= 0).sum()), modal_prob_sum=float(p_T.sum()),
                      distance=float(gap.min()) if gap.size else math.inf)


def _combine_one(rule: ScoringRule, scored: list[ScoredRollout]) -> ScoredRollout:
    k = len(rule.teachers)
    teach, ref = scored[:k], (scored[k] if rule.reference else None)
    answered = np.array([s.status == "ok" and s.teacher is not None for s in teach])
    w = teacher_weights(np.array([_confidence(s) for s in teach]), answered, rule.weighting)
    verified = scored[0].verified
    if not answered.any() or (ref is not None and (ref.status != "ok" or ref.teacher is None)):
        return ScoredRollout(verified, None, rule.label, "failed", TeacherMix(rule.teachers, tuple(map(float, w))))
    # only w > 0 terms: 0 · (−inf) would be NaN
    lp_T = sum(float(w[i]) * teach[i].teacher.logprobs_T.astype(np.float64) for i in np.flatnonzero(w > 0))
    best = teach[int(np.argmax(w))].teacher
    cliff = None
    if ref is not None:
        if rule.cliff_clip is not None:
            cliff = cliff_stats(verified.rollout.response_ids, best, ref.teacher, rule.lam, rule.cliff_clip)
        lp_T = rule.lam * lp_T + (1 - rule.lam) * ref.teacher.logprobs_T.astype(np.float64)
    top = (best.topk_ids_TK, best.topk_logprobs_TK) if rule.top_k else (None, None)
    return ScoredRollout(verified, TeacherScore(np.asarray(lp_T, dtype=np.float32), *top), rule.label, "ok",
                         TeacherMix(rule.teachers, tuple(map(float, w)), cliff))


def combine(rule: ScoringRule, per_scorer: list[list[ScoredRollout]]) -> list[ScoredRollout]:
    """One ``ScoredRollout`` per response from every scorer's answer (``rule.scorers`` order), each with
    its ``TeacherMix`` (the weights, the cliff diagnostic). Raises if the scorers' lists do not hold the
    same responses in the same order (they all scored one verified ref, so that would be a bug)."""
    if len(per_scorer) != len(rule.scorers):
        raise ValueError(f"{rule.domain}: {len(per_scorer)} answers for scorers {list(rule.scorers)}")
    keys = [_responses(scored) for scored in per_scorer]
    if any(k != keys[0] for k in keys[1:]):
        raise RuntimeError(f"{rule.domain}: scorers {list(rule.scorers)} answered for different responses")
    return [_combine_one(rule, list(one)) for one in zip(*per_scorer)]


def routing_metrics(scored: Iterable[ScoredRollout]) -> dict[str, float]:
    """DOPD (actors/dopd.py), per domain: ``dopd/<d>/<regime>``, the share of the batch's routed tokens in
    each regime (token-weighted over the responses; domains without routing report nothing)."""
    counts: dict[str, np.ndarray] = {}
    for s in scored:
        if s.teacher is None or s.teacher.regimes_T is None:
            continue
        c = counts.setdefault(s.rollout.prompt.domain, np.zeros(len(DOPD_REGIMES), np.int64))
        c += np.bincount(np.asarray(s.teacher.regimes_T, np.int64), minlength=len(DOPD_REGIMES))[:len(DOPD_REGIMES)]
    return {f"dopd/{d}/{name}": float(c[i]) / max(1, int(c.sum())) for d, c in counts.items()
            for i, name in enumerate(DOPD_REGIMES)}


def mix_metrics(scored: Iterable[ScoredRollout]) -> dict[str, float]:
    """Per domain: ``teacher/<d>/weight/<teacher>``, the mean weight of each teacher over the responses
    (0 where it failed); with the cliff diagnostic, ``extrapolation/<d>/``: ``teacher_modal_prob`` (token
    mean of p_t), ``past_cliff_frac`` (tokens with λ ≥ λ*_t, over all tokens), ``measured_frac`` (tokens
    where λ*_t is known) and ``cliff_distance`` (median over responses of min_t λ*_t − λ; < 0: past it)."""
    weights: dict[tuple[str, str], list[float]] = defaultdict(list)
    cliffs: dict[str, list[CliffStats]] = defaultdict(list)
    for s in scored:
        if s.mix is None:
            continue
        d = s.rollout.prompt.domain
        if len(s.mix.teachers) > 1:
            for t, w in zip(s.mix.teachers, s.mix.weights):
                weights[(d, t)].append(w)
        if s.mix.cliff is not None:
            cliffs[d].append(s.mix.cliff)
    m = {f"teacher/{d}/weight/{t}": float(np.mean(ws)) for (d, t), ws in weights.items()}
    for d, cs in cliffs.items():
        tokens = max(1, sum(c.tokens for c in cs))
        m[f"extrapolation/{d}/teacher_modal_prob"] = sum(c.modal_prob_sum for c in cs) / tokens
        m[f"extrapolation/{d}/past_cliff_frac"] = sum(c.past for c in cs) / tokens
        m[f"extrapolation/{d}/measured_frac"] = sum(c.measured for c in cs) / tokens
        finite = [c.distance for c in cs if math.isfinite(c.distance)]
        if finite:
            m[f"extrapolation/{d}/cliff_distance"] = float(np.median(finite))
    return m
