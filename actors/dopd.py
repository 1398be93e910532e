"""DOPD token routing: each response token takes its advantage from the privileged teacher or from the
privileged student, by their gap (docs/algorithm.md §5, "Privileged context").

What was read. DOPD, "Dual On-policy Distillation" (Li et al., arXiv 2606.30626, June 2026). Only the
abstract and third-party summaries could be read here (not the method section or its code), and they
say: the teacher *and* the student are given the privileged information p (a hint, a reference);
the per-token "privilege advantage gap" is A = |log πT(y_n | x, p, y<n) − log πS(y_n | x, p, y<n)|;
a large gap marks a transferable capability gap, a small one an information-asymmetry gap (what the
student could only mimic by reading p: the "privilege illusion"); tokens fall in four regimes by the
gap and the two policies' relative probabilities, and each regime gets supervision of a different
strength, objective and source ("strong full-vocabulary JS" from the teacher, "light top-K reverse
KL", "weak self-regularization" from the privileged student). The exact regime table, thresholds and
weights were not visible.

What is implemented (our choice, all of it config: ``domains.<d>.routing``, configs/privileged.py).
With t = log πT(y_t | x, c, y<t) (the domain's teacher, normally privileged too), s = log πS(y_t | x,
c, y<t) (the student's current weights reading the context: a ``follow_student`` teacher with a
``privileged`` template) and g = |t − s|, a token's regime is

    0 wide_teacher_ahead   g ≥ τ and t ≥ s   default: teacher, weight 1.0 (strong)
    1 wide_student_ahead   g ≥ τ and t < s   default: teacher, weight 0.5 (light)
    2 close_teacher_ahead  g < τ and t ≥ s   default: student, weight 0.1 (weak self-regularization)
    3 close_student_ahead  g < τ and t < s   default: student, weight 0.1

and its advantage is ``A_t = w_r · (log π_src(y_t) − log πS,old(y_t | x))`` (the learner recomputes
log πS,old without the context; SPEC §4's shift is added after the weight). Every regime keeps the
SPEC §1 sampled-token policy-gradient form: the paper's per-regime objectives (full-vocabulary JS,
top-K reverse KL) would need each policy's distribution at every position, which is what this system
avoids at V = 151,936 (no B×T×V outside the learner's chunked head); routing source and strength is
what is kept. Default τ = 1 nat: a factor e between the two policies' probabilities. A NaN log-prob
falls in regime 3 and is then dropped by SPEC §1's |log πθ − log πT| ≥ 10 mask.
"""

from __future__ import annotations

import numpy as np

from buffers.records import ScoredRollout, TeacherScore
from configs.privileged import DOPD_REGIMES as REGIMES
from configs.privileged import DOPDRouting


def route_tokens(teacher_lp_T: np.ndarray, student_lp_T: np.ndarray, rule: DOPDRouting
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: the routed source's log-prob, the advantage weight and the regime code (0..3, REGIMES)."""
    t = np.asarray(teacher_lp_T, np.float32)
    s = np.asarray(student_lp_T, np.float32)
    if t.shape != s.shape:
        raise ValueError(f"teacher and privileged-student log-probs differ in length: {t.shape} vs {s.shape}")
    diff = t - s
    wide, teacher_ahead = np.abs(diff) >= rule.gap_threshold, diff >= 0
    regime_T = np.where(wide, np.where(teacher_ahead, 0, 1), np.where(teacher_ahead, 2, 3)).astype(np.int8)
    from_teacher = np.array([r.source == "teacher" for r in rule.regimes])[regime_T]
    weight_T = np.array([r.weight for r in rule.regimes], np.float32)[regime_T]
    return np.where(from_teacher, t, s).astype(np.float32), weight_T, regime_T


def combine(by_teacher: list[ScoredRollout], by_student: list[ScoredRollout], rule: DOPDRouting
            ) -> list[ScoredRollout]:
    """The teacher's scores with each token routed against the privileged student's (same rollouts, same
    order). A rollout either failed to score is ``failed`` (A_t = 0, SPEC §1); an empty one is kept as is."""
    out = []
    for a, b in zip(by_teacher, by_student, strict=True):
        if a.status != "ok" or b.status != "ok" or a.teacher is None or b.teacher is None:
            out.append(ScoredRollout(a.verified, None, a.teacher_name, "failed"))
        elif len(a.teacher.logprobs_T) == 0:
            out.append(a)
        else:
            lp_T, w_T, regime_T = route_tokens(a.teacher.logprobs_T, b.teacher.logprobs_T, rule)
            out.append(ScoredRollout(a.verified, TeacherScore(lp_T, weights_T=w_T, regimes_T=regime_T),
                                     a.teacher_name, "ok"))
    return out


def regime_fractions(teacher_lp_T: np.ndarray, student_lp_T: np.ndarray, rule: DOPDRouting) -> dict[str, float]:
    """Share of the tokens in each regime (a diagnostic; empty input gives zeros)."""
    regime_T = route_tokens(teacher_lp_T, student_lp_T, rule)[2]
    n = max(1, regime_T.size)
    return {name: float(np.sum(regime_T == i)) / n for i, name in enumerate(REGIMES)}
