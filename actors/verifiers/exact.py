"""Exact-match verifier: the whole response (whitespace-stripped) must equal the answer.

Owns the grading rule for domains whose answer is a literal string (the demo's
``reverse`` domain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def grade(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """Grade ``response`` against ``row["answer"]``; return (correct, reason)."""
    gold = str(row["answer"]).strip()
    pred = response.strip()
    if pred == gold:
        return True, "exact match"
    return False, f"{pred!r} != {gold!r}"
