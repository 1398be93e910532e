"""Verifier actor: gives every response an outcome, correct or incorrect.

Pluggable per domain (``domains.<d>.verifier.type``): ``math`` (``\\boxed{...}``
extraction and math-verify equivalence), ``exact`` (exact string match) and
``code`` (the program runs against the problem's tests in a sandbox). A grader
that raises makes the response incorrect with the reason recorded: no result
counts as incorrect (SPEC notation), and the run goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from buffers.records import Prompt, Rollout, VerifiedRollout
from configs.schema import CodeVerifier, DomainConfig

log = logging.getLogger(__name__)

GradeFn = Callable[[str, dict], tuple[bool, str]]  # (response, row fields) → (correct, reason)


def build_grader(kind) -> GradeFn:
    if kind.type == "math":
        from actors.verifiers.math import grade

        return grade
    if kind.type == "exact":
        from actors.verifiers.exact import grade

        return grade
    if kind.type == "code":
        from actors.verifiers.code import SandboxLimits, grade

        assert isinstance(kind, CodeVerifier)
        limits = SandboxLimits(wall_seconds=kind.wall_seconds, memory_bytes=kind.memory_mb * 2**20)
        return lambda response, row: grade(response, row, limits=limits)
    raise ValueError(f"unknown verifier type {kind.type!r}")


class Verifier:
    def __init__(self, domains: dict[str, DomainConfig]) -> None:
        self.graders = {d: build_grader(c.verifier) for d, c in domains.items()}
        self.busy_s = 0.0

    def grade_text(self, text: str, prompt: Prompt) -> tuple[bool, str]:
        try:
            return self.graders[prompt.domain](text, vars(prompt))
        except Exception as e:  # noqa: BLE001 - a grader crash is an incorrect response, not a dead run
            log.warning("verifier for %s raised on prompt %s: %s", prompt.domain, prompt.id, e)
            return False, f"verifier_error: {type(e).__name__}"

    def verify(self, rollouts: list[Rollout]) -> list[VerifiedRollout]:
        t0 = time.perf_counter()
        out = [VerifiedRollout(r, *self.grade_text(r.text, r.prompt)) for r in rollouts]
        self.busy_s += time.perf_counter() - t0
        return out

    def grade_many(self, texts: list[str], prompts: list[Prompt]) -> list[bool]:
        return [self.grade_text(t, p)[0] for t, p in zip(texts, prompts)]

    def ready(self) -> bool:
        return True
