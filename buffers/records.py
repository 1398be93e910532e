"""Typed records that travel between the stages of the pipeline.

    Prompt ──sampler──▶ Rollout ──verifier──▶ VerifiedRollout ──teacher──▶ ScoredRollout
           ──buffer (balance §3.2, calibration §4, lag §2)──▶ TrainBatch ──▶ learner

A verdict's reason is a ``Reason`` literal (its human detail beside it); every admitted
prompt ends in one ``Accounted`` line whose ``outcome`` is an ``Outcome`` literal.

Every response carries the policy version it was sampled under, so lag is always
computable downstream. Token-level arrays are numpy (cheap to pickle through the
Ray object store); shapes are in the names: ``_T`` response tokens, ``_TK`` top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import numpy as np

TeacherStatus = Literal["ok", "failed"]
# vLLM's finish reasons, plus "refused": the engine would not take the prompt (too long, say);
# such a prompt fails on its own and its group is dropped, the run goes on (buffers/replay.py).
FinishReason = Literal["stop", "length", "abort", "refused"]


@dataclass(frozen=True)
class Prompt:
    """One dataset record. ``uid`` is unique per admission (a prompt id may recur across epochs).

    ``prompt`` is the prompt's own text as the verifier reads it (a code stub, a question: the
    last user message, without template); ``prompt_ids`` are the tokens the student is
    conditioned on, rendered once at load by ``buffers/formatting.py`` (chat template, system
    prompt, prompt template). Samplers, teachers and evaluation all use ``prompt_ids``."""

    id: str
    domain: str
    prompt: str
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    uid: int = -1
    epoch: int = 0  # the source pass it belongs to (kept when it is requeued)
    prompt_ids: tuple[int, ...] = ()
    source: str = ""
    # (teacher name, its prompt ids) for each privileged teacher that scores this prompt: the
    # student's prompt with privileged context (docs/algorithm.md §5, buffers/formatting.py)
    teacher_prompt_ids: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def prompt_ids_for(self, teacher: str) -> tuple[int, ...] | None:
        """The privileged prompt ids of ``teacher``, or None when it has none for this prompt."""
        return next((ids for name, ids in self.teacher_prompt_ids if name == teacher), None)


@dataclass(frozen=True)
class Rollout:
    """One sampled response with the behaviour policy's per-token log-probs (SPEC §2)."""

    prompt: Prompt
    sample_idx: int
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs_T: np.ndarray
    policy_version: int
    text: str
    finish_reason: FinishReason
    sampler_rank: int = 0
    # "prefill": a cached response (SPEC §5 offline cache) the student scored by a prefill: its log-probs
    # are raw (no temperature / top-p), and the learner compares raw with raw (actors/teacher_cache.py)
    behaviour: Literal["sampled", "prefill"] = "sampled"

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)

    @property
    def truncated(self) -> bool:
        """Cut at ``sampler.max_new_tokens`` (or the context) before the model stopped."""
        return self.finish_reason == "length"


# Why a verifier gave its verdict; the human detail (the answers compared, the failing assert)
# travels beside it. No result counts as incorrect (SPEC notation).
Reason = Literal[
    # math and exact: the (boxed) answer equals the reference, or not
    "match", "mismatch",
    # math: no complete \boxed{...} in the answer part; a <think> block never closed (no answer yet)
    "no_boxed", "unclosed_think",
    # code: actors/verifiers/code.py's own reasons (its CodeResult.reason), kept as they are
    "passed", "failed", "error", "syntax_error", "timeout", "memory", "crashed", "no_code", "no_tests",
    "unsupported", "harness_error",
    # any domain: the grader raised (the response is incorrect, the run goes on)
    "verifier_error",
    # not graded yet: a teacher scores a chain's rollouts while the verifier grades them (actors/pipeline.py),
    # and the buffer puts the verifier's verdict in its place (``with_verdicts``); never reaches a group
    "unverified",
]
REASONS: frozenset[str] = frozenset(get_args(Reason))


@dataclass(frozen=True)
class Verdict:
    """A grader's answer for one response."""

    correct: bool
    reason: Reason
    detail: str = ""  # for people: what was compared, what failed


@dataclass(frozen=True)
class VerifiedRollout:
    rollout: Rollout
    correct: bool
    reason: Reason
    detail: str = ""

    @staticmethod
    def of(r: Rollout | VerifiedRollout) -> VerifiedRollout:
        """A verified rollout as it is; a bare one marked ``unverified`` (scored before its verdict)."""
        return r if isinstance(r, VerifiedRollout) else VerifiedRollout(r, False, "unverified")


@dataclass(frozen=True)
class TeacherScore:
    """Teacher prefill log-probs of the student's own tokens (SPEC §1), optional top-k (SPEC §6)."""

    logprobs_T: np.ndarray
    topk_ids_TK: np.ndarray | None = None
    topk_logprobs_TK: np.ndarray | None = None
    # DOPD routing (actors/dopd.py): each token's advantage weight (None: 1 everywhere); logprobs_T then
    # holds each token's routed source (the privileged teacher's or the privileged student's log-prob)
    weights_T: np.ndarray | None = None
    regimes_T: np.ndarray | None = None  # DOPD: each token's regime code 0..3 (configs/privileged.py DOPD_REGIMES)


@dataclass(frozen=True)
class CliffStats:
    """One response's extrapolation-cliff diagnostic (SPEC §6 ``extrapolated``; buffers/scoring.py):
    token counts and sums, so a batch's figures are exact token means."""

    tokens: int
    measured: int  # positions where π_ref of the teacher's modal token is known
    past: int  # positions with λ ≥ λ*_t (past the cliff)
    modal_prob_sum: float  # Σ_t of the teacher's modal probability
    distance: float  # min_t (λ*_t − λ) over measured positions (inf: no cliff anywhere)


@dataclass(frozen=True)
class TeacherMix:
    """How a ``ScoredRollout``'s one score was combined from several scorers (buffers/scoring.py)."""

    teachers: tuple[str, ...]
    weights: tuple[float, ...]  # w_k of each teacher (0 for one that failed); the reference not included
    cliff: CliffStats | None = None


@dataclass(frozen=True)
class ScoredRollout:
    verified: VerifiedRollout
    teacher: TeacherScore | None
    teacher_name: str
    status: TeacherStatus = "ok"
    mix: TeacherMix | None = None  # set when several scorers were combined (SPEC §5 / §6 extrapolated)

    @property
    def rollout(self) -> Rollout:
        return self.verified.rollout

    @property
    def correct(self) -> bool:
        return self.verified.correct

    def distill_return(self) -> float:
        """G(q, τ) = mean_t (log πT − log π_behave) (SPEC §4, with the sampler's log-probs standing in
        for π_S,old: at lag 0 they agree to < 1e-6 in fp32; the learner recomputes A_t itself)."""
        if self.teacher is None or self.rollout.num_tokens == 0:
            return 0.0
        adv_T = self.teacher.logprobs_T - self.rollout.behaviour_logprobs_T
        return float(np.mean(adv_T if self.teacher.weights_T is None else adv_T * self.teacher.weights_T))


@dataclass(frozen=True)
class TrainSample:
    """One response as the learner sees it: tokens, teacher signal, calibration and balancing outcome."""

    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs_T: np.ndarray
    teacher_logprobs_T: np.ndarray | None  # None: teacher failed → A_t = 0 (SPEC §1)
    topk_ids_TK: np.ndarray | None
    topk_logprobs_TK: np.ndarray | None
    advantage_shift: float  # SPEC §4 margin shift, added to every token's advantage
    weight: float  # 0.0 when masked by balancing (§3.2) or calibration mask (§4)
    policy_version: int
    domain: str
    correct: bool
    prompt_id: str
    excluded: bool = False  # out of both loss terms (a truncated response under buffer.truncated=mask)
    behaviour_raw: bool = False  # behaviour log-probs are raw (a prefill of a cached response), not processed
    teacher_weights_T: np.ndarray | None = None  # DOPD per-token advantage weights (None: 1), actors/dopd.py


@dataclass
class TrainBatch:
    """B complete groups ready for one optimizer step."""

    samples: list[TrainSample]
    n_responses_total: int  # denominator of SPEC §1 reduction (masked responses included)
    prompt_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


# How an admitted prompt ended (the buffer's accounting): trained; its group dropped for lag > η
# (SPEC §2) or because the engine refused the prompt; or requeued after a lost generation (it is
# admitted again under a new uid and ends again).
Outcome = Literal["trained", "dropped_stale", "dropped_refused", "requeued"]


class Accounted(NamedTuple):
    """One line of the buffer's accounting (``accounting.jsonl``): every admitted uid ends in exactly one."""

    prompt_id: str
    uid: int
    epoch: int
    outcome: Outcome
