"""Exact-match verifier: the whole response (whitespace-stripped) must equal the answer.

Owns the grading rule for domains whose answer is a literal string (the demo's
``reverse`` domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buffers.records import Verdict


def verdict(response: str, answer: str) -> Verdict:
    """``response`` (whitespace-stripped) against the reference ``answer``."""
    gold = str(answer).strip()
    pred = response.strip()
    if pred == gold:
        return Verdict(True, "match", "exact match")
    return Verdict(False, "mismatch", f"{pred!r} != {gold!r}")


def grade(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """``(correct, detail)`` of :func:`verdict` against ``row["answer"]`` (the demo's preparation tools)."""
    v = verdict(response, row["answer"])
    return v.correct, v.detail
