"""Grading: from a response and a dataset row to a verdict (``passed``, ``failed``, ...).

:func:`extract_code` and :func:`build_solution` turn the response into the solution
program; :func:`precompile_error` rejects one that does not compile without a sandbox run;
:func:`evaluate_many` grades the rest together, up to :data:`MAX_BATCH` programs per
sandbox, each judged by its own judge process whose verdict carries a nonce only the
grader and that judge know (:func:`_judge_outcome` accepts nothing else).
"""

from __future__ import annotations

import __future__
import ast
import hmac
import marshal
import os
import re
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import runner
from .isolation import Isolation, SandboxLimits
from .runner import RunResult, _batch_records, detect_isolation

Reason = Literal[
    "passed",  # the judge ran the tests to the end, with at least one call of the solution
    "failed",  # an assertion (or other error) in the tests
    "error",  # the solution raised, or is missing the entry point, or sent garbage
    "syntax_error",  # the solution does not compile
    "timeout",  # wall-clock or CPU limit
    "memory",  # MemoryError or the memory cgroup's OOM killer
    "crashed",  # the solution process exited or died before the tests were done
    "no_code",  # nothing that looks like code in the response
    "no_tests",  # the tests never called the solution (a dataset problem)
    "unsupported",  # the tests pass a non-data value to the solution (see the package doc)
    "harness_error",  # the sandbox itself failed: a bug or a misconfigured machine
]


@dataclass(frozen=True)
class CodeResult:
    correct: bool
    reason: Reason
    detail: str
    seconds: float


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S)
_CODE_LANGS = {"", "python", "py", "python3", "py3"}


def _defines(code: str, name: str | None) -> bool:
    if not name:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code of a response: fenced blocks if any (the last one that defines the entry
    point, else all python blocks joined), else the response itself, untouched (a bare
    completion keeps its indentation)."""
    text = _THINK.sub("", response)
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if not blocks:
        return text
    code_blocks = [body for lang, body in blocks if lang in _CODE_LANGS] or [body for _, body in blocks]
    defining = [b for b in code_blocks if _defines(b, entry_point)]
    if defining:
        return defining[-1]
    return "\n\n".join(code_blocks)


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError):
        return False


def build_solution(response: str, prompt: str, entry_point: str | None) -> str | None:
    """The solution program: ``prompt + completion``; ``prompt`` then the response's own
    definition when it defines the entry point (the prompt's imports and helpers stay); the
    response alone when the prompt is not code. None when the response has no code."""
    code = extract_code(response, entry_point)
    if not code.strip():
        return None
    if not prompt or not _compiles(prompt):  # the prompt is prose (MBPP): the response is the program
        return code
    if _defines(code, entry_point):
        return prompt.rstrip() + "\n\n\n" + code.strip("\n") + "\n"
    return prompt + code  # a completion of the prompt's function


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)


# A solution program shorter than this is compiled in the grader before any sandbox run:
# one that does not compile is a ``syntax_error`` without a sandbox run (~20-80 ms CPU). ``compile`` parses and emits bytecode and runs none of it.
# The bound caps the grader's time on hostile text: the worst case measured on the loaded
# 2-core machine, nested lambdas (superlinear), took 0.5 s at 10 kB and 2.5 s at 20 kB;
# typical solutions are well under 5 kB.
PRECOMPILE_MAX_CHARS = 10_000
_precompile_lock = threading.Lock()


def precompile_error(source: str) -> str | None:
    """The ``SyntaxError`` that the sandbox's solution process would hit on ``source``, or
    None when it compiles, is too long to check here, or fails otherwise (the sandbox
    then decides).

    Sound: it only ever says "incorrect", and only for a program the solution process
    would also fail to compile: the same text (the file is written as UTF-8 with
    ``replace`` and read back with universal newlines), the same file name and the same
    ``annotations`` future flag (inherited from the harness). Warnings are ignored while
    compiling: a grader run with ``-W error`` must not turn a ``SyntaxWarning`` into a
    verdict (the sandbox runs with the default filters). The filters are process-global
    before Python 3.14, so this module's uses are serialized.
    """
    if len(source) >= PRECOMPILE_MAX_CHARS:
        return None
    text = source.encode("utf-8", "replace").decode("utf-8", "surrogateescape")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        with _precompile_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(text, "solution.py", "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    except SyntaxError as e:  # IndentationError and TabError included, as in the judge
        return f"{type(e).__name__} {e}"
    except Exception:  # noqa: BLE001 - RecursionError, MemoryError...: let the sandbox judge
        return None
    return None


def grading_inputs(response: str, row: Any) -> tuple[str | None, str, str, str | None]:
    """(solution source, prompt, tests, entry point): everything a verdict of
    :func:`evaluate` depends on besides the limits. Equal inputs, equal verdicts: a caller
    may grade a repeated tuple once (``actors/verifier.py`` does, per batch)."""
    prompt = _field(row, "prompt") or ""
    tests = _field(row, "tests") or ""
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(tests)
    entry_point = _field(row, "entry_point") or None
    return build_solution(response, prompt, entry_point), prompt, tests, entry_point


MAX_BATCH = 32  # programs per sandbox run (a slot, i.e. two uids, each)


def evaluate(response: str, row: Any, limits: SandboxLimits | None = None, *,
             isolation: Isolation | None = None) -> CodeResult:
    """Run ``response`` against the row's tests in the sandbox; see the module doc.

    A program that does not compile is rejected without a sandbox run
    (:func:`precompile_error`)."""
    return evaluate_many([(response, row)], limits, isolation=isolation, parallel=1)[0]


def evaluate_many(items: list[tuple[str, Any]], limits: SandboxLimits | None = None, *,
                  isolation: Isolation | None = None, parallel: int = 2) -> list[CodeResult]:
    """:func:`evaluate` of every ``(response, row)``, the programs graded together: one
    sandbox (one bwrap, one supervisor) per :data:`MAX_BATCH` programs, ``parallel`` of them
    running at once, each with the isolation and limits of a run of its own (module doc).
    About 10 ms CPU per program instead of ~60 for a sandbox each. ``seconds`` of a result
    is its program's own run time in the batch."""
    limits = limits or SandboxLimits()
    results: list[CodeResult | None] = [None] * len(items)
    todo = []  # (index, source, judge config, nonce)
    for i, (response, row) in enumerate(items):
        t0 = time.perf_counter()
        source, prompt, tests, entry_point = grading_inputs(response, row)
        if source is None:
            results[i] = CodeResult(False, "no_code", "no code in the response", time.perf_counter() - t0)
            continue
        error = precompile_error(source)
        if error is not None:
            results[i] = CodeResult(False, "syntax_error", error, time.perf_counter() - t0)
            continue
        nonce = secrets.token_hex(16)
        cfg = marshal.dumps({"nonce": nonce, "entry_point": entry_point, "prompt": prompt, "tests": tests,
                             "max_message": limits.max_message_bytes})
        todo.append((i, source, cfg, nonce))
    if todo:
        isolation = isolation or detect_isolation()
    parallel = max(1, int(parallel))
    for start in range(0, len(todo), MAX_BATCH):
        part = todo[start : start + MAX_BATCH]
        job = {"mode": "batch", "programs": [{"source": source} for _, source, _, _ in part], "parallel": parallel}
        # every program has its own deadline in the supervisor; this one is the backstop
        wall = -(-len(part) // parallel) * (limits.wall_seconds + 0.5) + 5.0
        raw = runner._run(job, limits, isolation, [cfg for _, _, cfg, _ in part], wall_seconds=wall)
        records = _batch_records(raw.verdict)
        for k, (i, _, _, nonce) in enumerate(part):
            rec = records.get(k)
            if rec is None:  # the batch failed before this program's record
                res = raw.result
                reason: Reason = "timeout" if res.timed_out else "harness_error"
                detail = ("the batch ran over its wall-clock limit" if res.timed_out else
                          res.sandbox_error or f"no record of the program; {res.stderr[-300:]!r}")
                results[i] = CodeResult(False, reason, detail, res.seconds)
                continue
            res = RunResult(returncode=None, stdout=b"", stderr=rec.stderr, timed_out=rec.timed_out,
                            seconds=rec.seconds, oom_killed=raw.oom_killed[k])
            verdict = rec.verdict + f"\nINIT {rec.sol_status} {rec.judge_status}\n".encode()
            reason, detail = _judge_outcome(verdict, nonce, res, limits)
            results[i] = CodeResult(reason == "passed", reason, detail, rec.seconds)
    return results  # type: ignore[return-value]


def _judge_outcome(verdict: bytes, nonce: str, res: RunResult, limits: SandboxLimits) -> tuple[Reason, str]:
    judged: tuple[str, str] | None = None
    sol_status = judge_status = None
    pos = 0
    while pos < len(verdict):
        end = verdict.find(b"\n", pos)
        if end < 0:
            break
        header = verdict[pos:end].split()
        pos = end + 1
        if header[:1] == [b"JUDGE"] and len(header) == 4 and header[3].isdigit():
            body = verdict[pos : pos + int(header[3])]
            pos += int(header[3])
            if hmac.compare_digest(header[1], nonce.encode()):
                judged = (header[2].decode("ascii", "replace"), body.decode("utf-8", "replace"))
        elif header[:1] == [b"INIT"] and len(header) == 3:
            sol_status = int(header[1]) if header[1] != b"-" else None
            judge_status = int(header[2]) if header[2] != b"-" else None
    sol_signal = _signal_of(sol_status)
    tail = res.stderr[-300:].decode("utf-8", "replace").strip()
    if judged is not None and judge_status in (0, None) and judged[0] == "passed":
        return "passed", judged[1]  # written after the tests returned; teardown may have run late
    if res.timed_out:
        return "timeout", f"over the {limits.wall_seconds:g} s wall-clock limit"
    if res.sandbox_error:
        return "harness_error", res.sandbox_error
    if judged is None or judge_status != 0:
        if sol_signal == signal.SIGXCPU:
            return "timeout", "CPU limit"
        if res.oom_killed:
            return "memory", "killed by the memory cgroup"
        return "harness_error", f"the judge gave no verdict (status {judge_status}); {tail}"
    status, detail = judged
    if status == "passed":
        return "passed", detail
    if status == "crashed":
        if sol_signal == signal.SIGXCPU:
            return "timeout", "CPU limit"
        if res.oom_killed:
            return "memory", "killed by the memory cgroup"
        how = (f"killed by {signal.Signals(sol_signal).name}" if sol_signal
               else f"exited with status {os.waitstatus_to_exitcode(sol_status)}" if sol_status is not None else "died")
        return "crashed", f"{detail}: the solution process {how}" + (f"; stderr: {tail}" if tail else "")
    if status in Reason.__args__:  # type: ignore[attr-defined]
        return status, detail  # type: ignore[return-value]
    return "harness_error", f"unknown judge status {status!r}"


def _signal_of(status: int | None) -> int | None:
    if status is None:
        return None
    code = os.waitstatus_to_exitcode(status)
    return -code if code < 0 else None


def grade(response: str, row: Any, limits: SandboxLimits | None = None) -> tuple[bool, str]:
    """Grade a code response against the row's tests; return (correct, reason).

    ``row`` has ``prompt``, ``tests`` and ``entry_point`` (attributes or keys). The reason
    is ``"<Reason>: <detail>"``, e.g. ``"failed: AssertionError at tests.py:3: ..."``.
    """
    return _as_verdict(evaluate(response, row, limits))


def grade_many(items: list[tuple[str, Any]], limits: SandboxLimits | None = None,
               parallel: int = 2) -> list[tuple[bool, str]]:
    """:func:`grade` of every ``(response, row)``, graded together (:func:`evaluate_many`)."""
    return [_as_verdict(r) for r in evaluate_many(items, limits, parallel=parallel)]


def _as_verdict(result: CodeResult) -> tuple[bool, str]:
    detail = result.detail.replace("\n", " ")
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return result.correct, f"{result.reason}: {detail}" if detail else result.reason
