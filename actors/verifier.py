"""Verifier actor: gives every response an outcome, correct or incorrect.

Pluggable per domain (``domains.<d>.verifier.type``): ``math`` (``\\boxed{...}``
extraction and math-verify equivalence), ``exact`` (exact string match) and
``code`` (the program runs against the problem's tests in a sandbox). A grader
that raises makes the response incorrect with the reason recorded: no result
counts as incorrect (SPEC notation), and the run goes on.

Within one call (``verify``, ``grade_many``) responses whose verdict depends on the
same inputs are graded once: a group of n samples often repeats a response, and a code
verdict costs a sandbox run (~70 ms CPU). The verdict stays the grader's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Callable

from buffers.records import Prompt, Rollout, VerifiedRollout
from configs.schema import CodeVerifier, DomainConfig

log = logging.getLogger(__name__)

GradeFn = Callable[[str, dict], tuple[bool, str]]  # (response, row fields) → (correct, reason)
KeyFn = Callable[[str, dict], Hashable]  # (response, row fields) → what the verdict depends on


@dataclass(frozen=True)
class Grader:
    """A domain's grading rule, and the inputs its verdict is a function of: two responses
    with equal keys get the same verdict, so one grading serves both."""

    grade: GradeFn
    key: KeyFn


def _answer_key(response: str, row: dict) -> Hashable:
    return response, row.get("answer")


def build_grader(kind) -> Grader:
    if kind.type == "math":
        from actors.verifiers.math import grade

        return Grader(grade, _answer_key)
    if kind.type == "exact":
        from actors.verifiers.exact import grade

        return Grader(grade, _answer_key)
    if kind.type == "code":
        from actors.verifiers.code import SandboxLimits, grade, grading_inputs

        assert isinstance(kind, CodeVerifier)
        limits = SandboxLimits(wall_seconds=kind.wall_seconds, memory_bytes=kind.memory_mb * 2**20)
        # (solution source, prompt, tests, entry point): responses that differ only outside
        # the program (prose around a fenced block) share a sandbox run too.
        return Grader(lambda response, row: grade(response, row, limits=limits), grading_inputs)
    raise ValueError(f"unknown verifier type {kind.type!r}")


class Verifier:
    def __init__(self, domains: dict[str, DomainConfig]) -> None:
        self.graders = {d: build_grader(c.verifier) for d, c in domains.items()}
        self.busy_s = 0.0

    def grade_text(self, text: str, prompt: Prompt) -> tuple[bool, str]:
        try:
            return self.graders[prompt.domain].grade(text, vars(prompt))
        except Exception as e:  # noqa: BLE001 - a grader crash is an incorrect response, not a dead run
            log.warning("verifier for %s raised on prompt %s: %s", prompt.domain, prompt.id, e)
            return False, f"verifier_error: {type(e).__name__}"

    def _key(self, text: str, prompt: Prompt) -> Hashable | None:
        try:
            key = prompt.domain, self.graders[prompt.domain].key(text, vars(prompt))
            hash(key)
            return key
        except Exception:  # noqa: BLE001 - no key: graded on its own (grade_text reports the error)
            return None

    def _grade_all(self, texts: list[str], prompts: list[Prompt]) -> list[tuple[bool, str]]:
        """``grade_text`` of each pair; a pair whose key was seen earlier in the call reuses
        that verdict."""
        seen: dict[Hashable, tuple[bool, str]] = {}
        out = []
        for text, prompt in zip(texts, prompts, strict=True):
            key = self._key(text, prompt)
            if key is not None and key in seen:
                out.append(seen[key])
                continue
            verdict = self.grade_text(text, prompt)
            if key is not None:
                seen[key] = verdict
            out.append(verdict)
        return out

    def verify(self, rollouts: list[Rollout]) -> list[VerifiedRollout]:
        t0 = time.perf_counter()
        verdicts = self._grade_all([r.text for r in rollouts], [r.prompt for r in rollouts])
        out = [VerifiedRollout(r, *v) for r, v in zip(rollouts, verdicts, strict=True)]
        self.busy_s += time.perf_counter() - t0
        return out

    def grade_many(self, texts: list[str], prompts: list[Prompt]) -> list[bool]:
        return [ok for ok, _ in self._grade_all(texts, prompts)]

    def ready(self) -> bool:
        return True
