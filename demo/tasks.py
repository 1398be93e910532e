"""The demo's synthetic, verifiable domains: problem generators and the rows they make.

Owns what a problem of each domain is and what a perfect response to it looks like:

* ``math``: 3-digit addition, question ``"123+456="``, response ``"\\boxed{579}"``
  (graded by ``actors.verifiers.math``);
* ``reverse``: reverse a lowercase string of length 4-8, prompt ``"rev:abcde="``, response
  ``"edcba"`` (``actors.verifiers.exact``);
* ``code``: a HumanEval-style stub ``'def f(x):\\n "add 3 mul 2 sub 4"\\n'`` completed by
  ``" return ((x+3)*2)-4"``, run against ``def check(candidate)`` tests by the sandboxed
  ``actors.verifiers.code``.

A row here is the internal, canonical form every other module of the package reads (``id``,
``domain``, ``prompt`` text, ``answer``; code rows add ``tests`` and ``entry_point``);
``demo.data`` writes it in its domain's public Parquet shape. Invariant: the generators are
pure functions of the ``random.Random`` they are given, so a seed fixes the data.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any


# The default recipe's domains (configs/demo.yaml); ``PrepareSettings.code()`` swaps
# reverse for code (configs/demo_code.yaml).
DEFAULT_DOMAINS: tuple[str, ...] = ("math", "reverse")


def make_math_problem(rng: random.Random) -> tuple[str, str]:
    """3-digit addition: (question, reference answer), e.g. ("123+456=", "579")."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}=", str(a + b)


def make_reverse_problem(rng: random.Random) -> tuple[str, str]:
    """Reversal of a random lowercase string of length 4-8: ("rev:abcde=", "edcba")."""
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
    return f"rev:{s}=", s[::-1]


CODE_OPS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*"}
CODE_ENTRY_POINT = "f"
# The argument's name varies (any letter but the function's): with ``x`` alone there would
# be only 27 one-op stubs, too few to keep held-out, dev and train prompts disjoint.
CODE_ARG_NAMES = string.ascii_lowercase.replace(CODE_ENTRY_POINT, "")
# Every op is affine, so two inputs pin the function down; a third rejects a non-affine
# completion that happens to agree on two.
CODE_TEST_INPUTS = (0, 1, 5)


def make_code_problem(rng: random.Random) -> tuple[str, str]:
    """A HumanEval-style stub and its reference completion, e.g.
    ('def f(x):\\n "add 3 mul 2 sub 4"\\n', ' return ((x+3)*2)-4').

    1-3 ops (add, sub, mul by a digit 1-9) applied to the argument left to right. The stub
    compiles on its own (its body is the docstring), so ``actors.verifiers.code`` runs
    stub + completion; the completion is fully parenthesized. At most 31 + 19 characters:
    with the chat template's 3 tokens, prompt + response + EOS is at most 54 of the
    models' 64 positions, the response at most 20 tokens.
    """
    arg = rng.choice(CODE_ARG_NAMES)
    ops = [(rng.choice(tuple(CODE_OPS)), rng.randint(1, 9)) for _ in range(rng.randint(1, 3))]
    expr = arg
    for i, (op, k) in enumerate(ops):
        expr = f"{expr}{CODE_OPS[op]}{k}" if i == len(ops) - 1 else f"({expr}{CODE_OPS[op]}{k})"
    doc = " ".join(f"{op} {k}" for op, k in ops)
    return f'def {CODE_ENTRY_POINT}({arg}):\n "{doc}"\n', f" return {expr}"


def code_tests(prompt: str) -> str:
    """HumanEval-style tests of a code stub: ``def check(candidate):`` asserting the
    function's value on ``CODE_TEST_INPUTS``, computed from the ops in its docstring (the
    specification, not the reference completion). The code verifier binds ``candidate``
    to the entry point and runs ``check(candidate)``."""
    words = prompt.split('"')[1].split()
    lines = ["", "", "def check(candidate):"]
    for x in CODE_TEST_INPUTS:
        y = x
        for op, k in zip(words[::2], words[1::2], strict=True):
            y = {"add": y + int(k), "sub": y - int(k), "mul": y * int(k)}[op]
        lines.append(f"    assert candidate({x}) == {y}")
    return "\n".join(lines) + "\n"


def math_difficulty(question: str) -> float:
    """DeepMath-style difficulty (a float; DeepMath rates 1-10): 1 + the number of carries
    of the addition, so 1.0-4.0."""
    a, b = question.rstrip("=").split("+")
    carries, carry = 0, 0
    for da, db in zip(reversed(a), reversed(b), strict=True):
        carry = int(int(da) + int(db) + carry >= 10)
        carries += carry
    return 1.0 + carries


PROBLEM_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": make_math_problem,
    "reverse": make_reverse_problem,
    "code": make_code_problem,
}
# Domains whose SFT pool may repeat a prompt (never a train, held-out or dev one). Unique
# draws would exhaust the 675 one-op code stubs within the first few thousand: the pool
# would hold ~1% one-op stubs where held-out holds ~1/3.
POOL_MAY_REPEAT: frozenset[str] = frozenset({"code"})


def make_row(row_id: str, domain: str, prompt: str, answer: str) -> dict[str, str]:
    """An internal row in canonical form (what the verifiers read): id, domain, prompt (the
    prompt's text) and answer (for code, the reference completion), plus the ``tests`` and
    ``entry_point`` the code verifier runs. ``dataset_record`` turns it into the domain's
    Parquet shape."""
    row = {"id": row_id, "domain": domain, "prompt": prompt, "answer": answer}
    if domain == "code":
        row.update(tests=code_tests(prompt), entry_point=CODE_ENTRY_POINT)
    return row


def prompt_value(domain: str, prompt: str) -> Any:
    """What a Parquet row of ``domain`` holds in its prompt column for the prompt text
    ``prompt``: the string itself (math ``question``, code ``prompt``), or a one-turn chat
    (reverse ``messages``)."""
    if domain == "reverse":
        return [{"role": "user", "content": prompt}]
    return prompt


def format_response(domain: str, answer: str) -> str:
    """The response a perfect model produces for ``answer`` (what the teachers are SFT'd on)."""
    if domain == "math":
        return f"\\boxed{{{answer}}}"
    if domain in ("reverse", "code"):
        return answer
    raise ValueError(f"unknown domain {domain!r}")
