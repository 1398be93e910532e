"""Config of privileged-context teachers and DOPD token routing (docs/algorithm.md §5, "Privileged
context"), loaded by configs/schema.py.

- ``teachers.<name>.privileged`` (:class:`PrivilegedPrompt`): the teacher is prompted with the
  student's prompt *plus* privileged context from a dataset column (``data.train[i].context_key``:
  a reference answer, a worked solution) through a template. With ``follow_student`` this is
  on-policy self-distillation (OPSD): the teacher is the student's current weights reading the
  answer key.
- ``domains.<d>.routing`` (:data:`RoutingConfig`): ``none`` (every token's advantage comes from the
  domain's teacher, SPEC §1) or ``dopd``: each token's supervision is routed between the domain's
  (privileged) teacher and a privileged copy of the student by their gap (DOPD, arXiv 2606.30626;
  the rule and what was read of the paper are in actors/dopd.py).

``check_privileged`` holds the cross-section checks (called from ``RunConfig._cross_checks``), so
every combination that cannot run is refused before anything starts, naming the key and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from configs.algorithm import Section, _tagged

if TYPE_CHECKING:
    from configs.schema import RunConfig


class PrivilegedPrompt(Section):
    """How a privileged teacher's prompt is built from the student's (docs/algorithm.md §5)."""

    template: str = Field(
        description="The teacher's last user message: `{prompt}` stands for the student's (after the source's "
        "prompt_template), `{context}` for the row's privileged context (`context_key`). Rendered with the "
        "student tokenizer's chat template and system prompt, like the student's prompt. Example: "
        "'{prompt}\\n\\nA correct solution, for reference:\\n{context}'.")
    overlong: Literal["fail", "skip", "truncate_context"] = Field(
        "fail", description="A privileged prompt that leaves less than `sampler.max_new_tokens` of the teacher's "
        "max_model_len (so a full response could not be scored): `fail` stops the load naming the row, `skip` "
        "drops the row from training (counted), `truncate_context` keeps the context's last tokens (where a "
        "worked solution states its answer) until it fits.")

    @model_validator(mode="after")
    def _placeholders(self) -> PrivilegedPrompt:
        missing = [p for p in ("{prompt}", "{context}") if p not in self.template]
        if missing:
            raise ValueError(f"`privileged.template` is {self.template!r}; it must contain {' and '.join(missing)} "
                             "(`{prompt}`: the student's prompt, `{context}`: the privileged column)")
        return self


Source = Literal["teacher", "student"]


class RegimeRule(Section):
    """Where one DOPD regime's tokens take their advantage from, and how strongly."""

    source: Source = Field(description="`teacher`: A_t = log πT(y|x,c) − log πS,old(y|x); `student`: the "
                           "privileged student's A_t = log πS(y|x,c) − log πS,old(y|x).")
    weight: float = Field(ge=0, description="Multiplies the token's advantage (0 drops its supervision).")


class NoRouting(Section):
    type: Literal["none"] = "none"


class DOPDRouting(Section):
    """DOPD (Dual On-policy Distillation, arXiv 2606.30626) as read here: per token, the gap
    g = |log πT(y|x,c) − log πS(y|x,c)| between the privileged teacher and the privileged student,
    and which of the two gives the token more probability, pick one of four regimes; each regime
    names its advantage source and weight. Defaults and the reading: actors/dopd.py."""

    type: Literal["dopd"] = "dopd"
    student: str = Field(description="The privileged student: a key of `teachers` with `follow_student: true` and "
                         "`privileged` set (the student's current weights reading the context).")
    gap_threshold: float = Field(1.0, ge=0, description="τ in nats: g ≥ τ is a capability gap (the teacher knows "
                                 "more than the student even when both read the context), g < τ an information gap.")
    wide_teacher_ahead: RegimeRule = Field(RegimeRule(source="teacher", weight=1.0),
                                           description="g ≥ τ, teacher's log-prob ≥ privileged student's.")
    wide_student_ahead: RegimeRule = Field(RegimeRule(source="teacher", weight=0.5),
                                           description="g ≥ τ, privileged student's log-prob > teacher's.")
    close_teacher_ahead: RegimeRule = Field(RegimeRule(source="student", weight=0.1),
                                            description="g < τ, teacher's log-prob ≥ privileged student's.")
    close_student_ahead: RegimeRule = Field(RegimeRule(source="student", weight=0.1),
                                            description="g < τ, privileged student's log-prob > teacher's.")

    @property
    def regimes(self) -> tuple[RegimeRule, RegimeRule, RegimeRule, RegimeRule]:
        """In the order of actors/dopd.py's regime codes 0..3."""
        return (self.wide_teacher_ahead, self.wide_student_ahead, self.close_teacher_ahead,
                self.close_student_ahead)


# Names of the regime codes 0..3 (actors/dopd.py), as metrics (``dopd/<domain>/<name>``) report them.
DOPD_REGIMES = ("wide_teacher_ahead", "wide_student_ahead", "close_teacher_ahead", "close_student_ahead")

RoutingConfig = Annotated[NoRouting | DOPDRouting, Field(discriminator="type"), _tagged("none")]


def privileged_domains(cfg: RunConfig) -> dict[str, set[str]]:
    """Privileged teacher name → the domains whose rollouts it scores (as the domain's teacher or as its
    DOPD student): the rows of those domains need the teacher's privileged prompt."""
    from configs.scoring import teacher_names

    out: dict[str, set[str]] = {n: set() for n, t in cfg.teachers.items() if getattr(t, "privileged", None) is not None}
    for d, dom in cfg.domains.items():
        for name in (*teacher_names(dom.teacher), getattr(dom.routing, "student", None)):
            if name in out:
                out[name].add(d)
    return out


def check_privileged(cfg: RunConfig) -> None:
    """Cross-section checks of privileged teachers and DOPD routing; raises ValueError naming the key."""
    from configs.scoring import reference_of

    for d, dom in cfg.domains.items():
        r = dom.routing
        if not isinstance(r, DOPDRouting):
            continue
        key = f"`domains.{d}.routing.student`"
        st = cfg.teachers.get(r.student)
        if st is None:
            raise ValueError(f"{key} is {r.student!r}, which is not a key of `teachers` (known: "
                             f"{sorted(cfg.teachers)}); add the privileged student under `teachers`")
        if not isinstance(dom.teacher, str) or reference_of(cfg) is not None:
            raise ValueError(f"`domains.{d}.routing` is dopd, which routes between one teacher and the privileged "
                             "student, but the domain's score is already a combination (several teachers in "
                             f"`domains.{d}.teacher`, or the `extrapolated` objective's reference); use one of them")
        if r.student == dom.teacher:
            raise ValueError(f"{key} is {r.student!r}, the domain's own teacher; DOPD routes between two "
                             "policies: name a separate follow_student teacher")
        if not getattr(st, "follow_student", False) or getattr(st, "privileged", None) is None:
            raise ValueError(f"{key} is {r.student!r}, which needs `follow_student: true` and a `privileged` "
                             f"template (DOPD's privileged student is the current student reading the context); "
                             f"set teachers.{r.student}.follow_student and teachers.{r.student}.privileged")
        if cfg.needs_topk:
            raise ValueError(f"`domains.{d}.routing` is dopd, which routes the SPEC §1 per-token advantage, but "
                             f"`learner.objective` is {cfg.learner.objective.type!r} (a top-k term from the "
                             "teacher alone would bypass the routing); use learner.objective.type=reverse_kl_pg")
    priv = {d for ds in privileged_domains(cfg).values() for d in ds}
    for i, src in enumerate(cfg.data.train):
        needs = priv if src.domain is None else priv & {src.domain}
        if needs and src.context_key is None:
            raise ValueError(f"`data.train[{i}]` ({src.label}) may feed domain(s) {sorted(needs)}, scored by a "
                             "privileged teacher, but has no `context_key`; set it to the column holding the "
                             "privileged context (a reference answer, a worked solution)")
