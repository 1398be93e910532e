"""Math answer verifier: the last ``\\boxed{...}`` of a response against a reference answer.

Owns the grading rule for the ``math`` domain (shared by the demo data preparation and
the verifier actor): look only at the answer part of a thinking model's response (after
``</think>`` when present), extract the content of the *last* ``\\boxed{...}`` (brace-matched,
so ``\\boxed{\\frac{1}{2}}`` works), then compare it with the reference answer with
``math_verify`` (``verify(parse(gold), parse(pred))``), falling back to exact string
equality when ``math_verify`` cannot parse either side.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from math_verify import parse, verify

from buffers.records import Verdict

logger = logging.getLogger(__name__)

BOXED = "\\boxed{"
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
# math_verify enforces its timeouts with signal.alarm, which raises in any thread but the
# main one (Ray runs threaded actors and async actors off the main thread).
_TIMEOUT_S = 5


def extract_last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` in ``text``; None if absent or unclosed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    i = start + len(BOXED)
    depth = 1
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def answers_match(pred: str, gold: str) -> bool:
    """math_verify equivalence of two answer strings, or plain equality if unparseable."""
    pred, gold = pred.strip(), gold.strip()
    if pred == gold:
        return True
    # Fast path for plain decimals (most synthetic and many real answers): exact rational
    # comparison in microseconds instead of a sympy parse (~4 ms, the verifier's hot spot).
    if _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gold):
        return Fraction(pred) == Fraction(gold)
    timeout = _timeout()
    # Wrapping in $...$ makes math_verify read the strings as LaTeX math; bare numbers parse too.
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False  # string equality (checked above) is the fallback
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


THINK_END = "</think>"


def answer_part(response: str) -> str | None:
    """What a thinking model answers: the text after its last ``</think>``; a response that opened a
    ``<think>`` block and never closed it has no answer yet (None); anything else is all answer."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    if "<think>" in response:
        return None
    return response


def verdict(response: str, answer: str) -> Verdict:
    """Grade the answer part of ``response`` (after ``</think>``) against the reference ``answer``."""
    gold = str(answer)
    part = answer_part(response)
    if part is None:
        return Verdict(False, "unclosed_think", "the response never closed its <think> block")
    boxed = extract_last_boxed(part)
    if boxed is None:
        return Verdict(False, "no_boxed", "no complete \\boxed{...} in response")
    if answers_match(boxed, gold):
        return Verdict(True, "match", f"boxed answer {boxed!r} matches {gold!r}")
    return Verdict(False, "mismatch", f"boxed answer {boxed!r} != {gold!r}")


def grade(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """``(correct, detail)`` of :func:`verdict` against ``row["answer"]``: the pair the demo's
    preparation tools read (the verifier actor uses the typed :func:`verdict`)."""
    v = verdict(response, row["answer"])
    return v.correct, v.detail
