"""Who scores a domain's responses, and how several scores become one (SPEC §5 multi-teacher, SPEC §6
``extrapolated``): the ``domains.<d>.combine`` union and the checks that span ``domains``, ``teachers``
and ``learner.objective`` (called from ``RunConfig``'s cross-checks, before anything starts).

A domain lists one teacher (``teacher: math_teacher``) or several (``teacher: [big, small]``); with
several, ``combine`` says how their per-response weights are made (buffers/scoring.py does it).
The ``extrapolated`` objective adds a reference scorer to every domain. The scorers of a domain, in
the order buffers/scoring.py reads them, are ``scorers_of``: its teachers, then the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from configs.algorithm import ExtrapolatedPG, Section, _tagged

if TYPE_CHECKING:
    from configs.schema import RunConfig


class ConfidenceWeights(Section):
    """SPEC §5 (MAD-OPD without the debate): per response, w_k = softmax_k(c_k / temperature), with c_k
    teacher k's confidence on the response: the mean log-prob it gives the student's tokens (our choice
    among the paper's confidence measures: it needs nothing beyond the SPEC §1 scores)."""

    type: Literal["confidence"] = "confidence"
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="τ of softmax(c_k / τ): small τ "
                               "follows the most confident teacher, large τ tends to equal weights.")

    @property
    def summary(self) -> str:
        return f"confidence-weighted (τ={self.temperature:g})"


class EqualWeights(Section):
    """Every teacher that answered weighs the same (the τ → ∞ limit of ``confidence``; an ablation)."""

    type: Literal["equal"] = "equal"

    @property
    def summary(self) -> str:
        return "equal weights"


TeacherCombination = Annotated[ConfidenceWeights | EqualWeights, Field(discriminator="type"), _tagged("confidence")]


def combination_of(combine: ConfidenceWeights | EqualWeights | None) -> ConfidenceWeights | EqualWeights:
    """``domains.<d>.combine`` with its default (null: confidence weights, τ = 1)."""
    return combine or ConfidenceWeights()


def teacher_names(teacher: str | list[str]) -> tuple[str, ...]:
    """``domains.<d>.teacher`` as a tuple of names (one name or a list)."""
    return (teacher,) if isinstance(teacher, str) else tuple(teacher)


def reference_of(cfg: RunConfig) -> str | None:
    """The teacher serving π_ref of the ``extrapolated`` objective (None for any other objective):
    ``learner.objective.reference``, else the one teacher at ``student.path`` that does not follow it."""
    o = cfg.learner.objective
    if not isinstance(o, ExtrapolatedPG):
        return None
    if o.reference is not None:
        return o.reference
    from pathlib import Path

    student = Path(cfg.student.path).resolve()
    found = sorted(n for n, t in cfg.teachers.items() if Path(t.path).resolve() == student and not t.follow_student)
    if len(found) != 1:
        why = "none has" if not found else f"{found} have"
        raise ValueError(f"`learner.objective.reference` is null, so the reference is the teacher at `student.path` "
                         f"({cfg.student.path}), but {why} that path; add `teachers.reference: {{path: "
                         f"{cfg.student.path}}}` or set `learner.objective.reference` to a key of `teachers`")
    return found[0]


def scorers_of(cfg: RunConfig, domain: str) -> tuple[str, ...]:
    """Every teacher that scores ``domain``'s responses: its teachers, then the reference (if any)."""
    ref = reference_of(cfg)
    return teacher_names(cfg.domains[domain].teacher) + ((ref,) if ref else ())


def check_scoring(cfg: RunConfig) -> None:
    """Teacher lists, ``combine`` and the extrapolation reference are consistent; raises ValueError
    naming the key and the fix."""
    for name, dom in cfg.domains.items():
        names = teacher_names(dom.teacher)
        if not names:
            raise ValueError(f"`domains.{name}.teacher` is an empty list; name one teacher or several")
        if len(set(names)) != len(names):
            raise ValueError(f"`domains.{name}.teacher` lists a teacher twice ({list(names)}); list each once "
                             "(weights come from `combine`, not from repetition)")
        if len(names) == 1 and dom.combine is not None:
            raise ValueError(f"`domains.{name}.combine` is set but the domain has one teacher ({names[0]!r}); "
                             f"remove `combine` or list several teachers in `domains.{name}.teacher`")
        cached = [t for t in names if t in cfg.teachers and cfg.teachers[t].type == "cache"]
        if cached and len(names) > 1:
            raise ValueError(f"`domains.{name}.teacher` lists the cache teacher {cached[0]!r} with others: a cached "
                             "domain trains on the cache's own responses, which the live teachers did not score; "
                             "give the cached domain its one cache teacher")
    ref = reference_of(cfg)
    if ref is None:
        return
    if ref not in cfg.teachers:
        raise ValueError(f"`learner.objective.reference` is {ref!r}, which is not a key of `teachers` (known: "
                         f"{sorted(cfg.teachers)}); add `teachers.{ref}: {{path: {cfg.student.path}}}` or fix the name")
    if cfg.teachers[ref].type == "cache":
        raise ValueError(f"`teachers.{ref}` is the extrapolation reference but is a cache; π_ref must score the "
                         "student's own responses live: serve the initial student with a vLLM teacher entry")
    if cfg.teachers[ref].follow_student:
        raise ValueError(f"`teachers.{ref}` is the extrapolation reference but has `follow_student: true`; π_ref "
                         "is the fixed initial student: set follow_student=false or serve it by another teacher")
    serving = sorted(d for d, c in cfg.domains.items() if ref in teacher_names(c.teacher))
    if serving:
        raise ValueError(f"`learner.objective.reference` {ref!r} is also the teacher of domains {serving}: "
                         "λ log π_T + (1−λ) log π_ref would be π_T itself; give the reference its own entry")
