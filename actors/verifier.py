"""Verifier actor: gives every response an outcome, correct or incorrect.

Pluggable per domain (``domains.<d>.verifier.type``): ``math`` (``\\boxed{...}``
extraction and math-verify equivalence), ``exact`` (exact string match) and
``code`` (the program runs against the problem's tests in a sandbox). A grader
that raises makes the response incorrect with reason ``verifier_error``: no result
counts as incorrect (SPEC notation), and the run goes on. Graders take the typed
``Prompt`` record and return a ``Verdict`` whose ``reason`` is one of
``buffers.records.Reason`` (the human detail beside it).

Within one call (``verify``, ``grade_many``) responses whose verdict depends on the
same inputs are graded once: a group of n samples often repeats a response, and a code
verdict costs a sandbox run. The code responses of a call are graded together, in one
sandbox per 32 programs (~20 ms CPU a program instead of ~75 alone). The verdict stays
the grader's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Callable


from learner.concurrency import ControlPlane
from buffers.records import REASONS, Prompt, Rollout, Verdict, VerifiedRollout
from configs.schema import CodeVerifier, DomainConfig, VerifierConfig

log = logging.getLogger(__name__)

GradeFn = Callable[[str, Prompt], Verdict]  # (response, its prompt record) → verdict
KeyFn = Callable[[str, Prompt], Hashable]  # (response, its prompt record) → what the verdict depends on
GradeManyFn = Callable[[list[tuple[str, Prompt]]], list[Verdict]]


@dataclass(frozen=True)
class Grader:
    """A domain's grading rule, and the inputs its verdict is a function of: two responses
    with equal keys get the same verdict, so one grading serves both. ``grade_many``, where
    set, grades a list at once (cheaper than one by one)."""

    grade: GradeFn
    key: KeyFn
    grade_many: GradeManyFn | None = None


def _answer(prompt: Prompt) -> str:
    if prompt.answer is None:
        raise ValueError(f"prompt {prompt.id!r} ({prompt.domain}) has no reference answer; set its source's "
                         "`answer_key` to the column that holds it")
    return prompt.answer


def _answer_key(response: str, prompt: Prompt) -> Hashable:
    return response, prompt.answer


def _code_verdict(result) -> Verdict:
    """actors/verifiers/code.py's ``CodeResult`` as a verdict: its reason as is, its detail on one line."""
    detail = result.detail.replace("\n", " ")
    if len(detail) > 300:
        detail = detail[:297] + "..."
    if result.reason not in REASONS:  # a reason code.py added that records.Reason does not list yet
        return Verdict(False, "verifier_error", f"unknown code verdict {result.reason!r}: {detail}")
    return Verdict(result.correct, result.reason, detail)


def build_grader(kind: VerifierConfig) -> Grader:
    if kind.type == "math":
        from actors.verifiers.math import verdict

        return Grader(lambda response, prompt: verdict(response, _answer(prompt)), _answer_key)
    if kind.type == "exact":
        from actors.verifiers.exact import verdict

        return Grader(lambda response, prompt: verdict(response, _answer(prompt)), _answer_key)
    if kind.type == "code":
        from actors.verifiers.code import SandboxLimits, evaluate, evaluate_many, grading_inputs

        assert isinstance(kind, CodeVerifier)
        limits = SandboxLimits(wall_seconds=kind.wall_seconds, memory_bytes=kind.memory_mb * 2**20)
        # The code verifier reads prompt, tests and entry_point as attributes of the record. The key:
        # (solution source, prompt, tests, entry point): responses that differ only outside the program
        # (prose around a fenced block) share a sandbox run too.
        return Grader(lambda response, prompt: _code_verdict(evaluate(response, prompt, limits)), grading_inputs,
                      lambda items: [_code_verdict(r) for r in evaluate_many(items, limits, parallel=kind.parallel)])
    raise ValueError(f"unknown verifier type {kind.type!r}")


class Verifier(ControlPlane):
    def __init__(self, domains: dict[str, DomainConfig]) -> None:
        self.graders = {d: build_grader(c.verifier) for d, c in domains.items()}
        self.busy_s = 0.0
        self._warm_up(domains)

    def _warm_up(self, domains: dict[str, DomainConfig]) -> None:
        """Grade one symbolic answer per math domain at start-up: math-verify's first parse loads
        sympy's parsers lazily (0.1–0.3 s measured here), which would otherwise land in step 1. Code
        domains are not warmed (that would start a sandbox); a failure here is only logged."""
        t0 = time.perf_counter()
        for d, c in domains.items():
            if c.verifier.type == "math":
                probe = Prompt(id="warm-up", domain=d, prompt="", answer="0.5")
                self.grade_text("\\boxed{\\frac{1}{2}}", probe)
        log.info("verifier: warmed up in %.2fs", time.perf_counter() - t0)

    def grade_text(self, text: str, prompt: Prompt) -> Verdict:
        try:
            return self.graders[prompt.domain].grade(text, prompt)
        except Exception as e:  # noqa: BLE001 - a grader crash is an incorrect response, not a dead run
            log.warning("verifier for %s raised on prompt %s: %s", prompt.domain, prompt.id, e)
            return Verdict(False, "verifier_error", f"{type(e).__name__}: {e}")

    def _key(self, text: str, prompt: Prompt) -> Hashable | None:
        try:
            key = prompt.domain, self.graders[prompt.domain].key(text, prompt)
            hash(key)
            return key
        except Exception:  # noqa: BLE001 - no key: graded on its own (grade_text reports the error)
            return None

    def _grade_all(self, texts: list[str], prompts: list[Prompt]) -> list[Verdict]:
        """``grade_text`` of each pair; a pair whose key was seen earlier in the call reuses
        that verdict; a domain with ``grade_many`` grades its distinct pairs in one go."""
        first: dict[Hashable, int] = {}  # key → index of the pair that is graded
        source = []  # index of the pair whose verdict each pair takes
        for i, (text, prompt) in enumerate(zip(texts, prompts, strict=True)):
            key = self._key(text, prompt)
            if key is None:
                source.append(i)
            else:
                source.append(first.setdefault(key, i))
        graded = sorted(set(source))
        verdicts: dict[int, Verdict] = {}
        for domain in dict.fromkeys(prompts[i].domain for i in graded):
            mine = [i for i in graded if prompts[i].domain == domain]
            many = self.graders[domain].grade_many if domain in self.graders else None
            if many is not None and len(mine) > 1:
                try:
                    out = many([(texts[i], prompts[i]) for i in mine])
                    verdicts.update(zip(mine, out, strict=True))
                    continue
                except Exception as e:  # noqa: BLE001 - fall back to one by one (each error recorded)
                    log.warning("batch grading of %d %s responses raised %s; grading one by one",
                                len(mine), domain, e)
            for i in mine:
                verdicts[i] = self.grade_text(texts[i], prompts[i])
        return [verdicts[j] for j in source]

    def verify(self, rollouts: list[Rollout]) -> list[VerifiedRollout]:
        t0 = time.perf_counter()
        verdicts = self._grade_all([r.text for r in rollouts], [r.prompt for r in rollouts])
        out = [VerifiedRollout(r, v.correct, v.reason, v.detail) for r, v in zip(rollouts, verdicts, strict=True)]
        self.busy_s += time.perf_counter() - t0
        return out

    def grade_many(self, texts: list[str], prompts: list[Prompt]) -> list[bool]:
        return [v.correct for v in self._grade_all(texts, prompts)]
