"""Greedy evaluation of the demo's models, graded by the domains' real verifiers.

Owns the accuracy figures of ``prepare_report.json`` and the dev checks of the SFT runs:
greedy completions of prompt ids (``demo.tokenizer.row_prompt_ids``, the pipeline's
encoding), batched by prompt length so no padding enters the model and the result equals
an unbatched run (and vLLM's), then graded by ``actors.verifiers`` (math, exact, the code
sandbox), or for dev checks by the cheaper ``grade_dev_row``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.verifiers import code as code_verifier
from actors.verifiers import exact as exact_verifier
from actors.verifiers import math as math_verifier
from demo.tokenizer import row_prompt_ids


GradeFn = Callable[[str, Mapping[str, Any]], "tuple[bool, str] | bool"]


VERIFIERS: dict[str, Callable[[str, Mapping[str, Any]], tuple[bool, str]]] = {
    "math": math_verifier.grade,
    "reverse": exact_verifier.grade,
    "code": code_verifier.grade,  # sandboxed: ~80 ms CPU alone, ~20 ms in a batch (grade_rows)
}


def grade_row(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """Grade a response with the verifier of ``row["domain"]`` (what the report uses)."""
    return VERIFIERS[row["domain"]](response, row)


def grade_rows(responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[tuple[bool, str]]:
    """``grade_row`` of every (response, row); code responses graded together in the
    sandbox (``code_verifier.grade_many``: 32 programs a sandbox, two at a time)."""
    verdicts: list[tuple[bool, str] | None] = [None] * len(rows)
    code_idx = [i for i, row in enumerate(rows) if row["domain"] == "code"]
    if code_idx:
        graded = code_verifier.grade_many([(responses[i], rows[i]) for i in code_idx])
        for i, verdict in zip(code_idx, graded, strict=True):
            verdicts[i] = verdict
    for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
        if verdicts[i] is None:
            verdicts[i] = grade_row(response, row)
    return verdicts  # type: ignore[return-value]


def grade_dev_row(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """The early-stopping grader: ``grade_row``, except that a code response is compared
    with the reference completion as a string instead of being run in the sandbox.

    A dev check every few steps would otherwise cost more than the training (100 programs,
    ~7 s CPU and ~40 s wall on the loaded 2-core machine). Equal to the reference implies
    passing the tests, so code's dev accuracy is a lower bound of the verifier's; the
    held-out accuracies of the report always come from ``grade_row``.
    """
    if row["domain"] == "code":
        ok = response == row["answer"]  # not stripped: the leading space is the indentation
        return ok, "the reference completion" if ok else "not the reference completion"
    return grade_row(response, row)


def grade_math(response: str, answer: str) -> bool:
    """Last ``\\boxed{...}`` of ``response`` equals ``answer`` (math_verify, then string)."""
    return math_verifier.grade(response, {"answer": answer})[0]


def grade_exact(response: str, answer: str) -> bool:
    """Stripped ``response`` equals ``answer``."""
    return exact_verifier.grade(response, {"answer": answer})[0]


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of prompts given as token ids (``encode_prompt``'s), as text after
    the prompt with special tokens dropped, in input order.

    Prompts are batched by token length, so no padding ever enters the model and the
    result matches an unbatched run (and vLLM's) exactly.
    """
    was_training = model.training
    model.eval()
    encoded = [list(ids) for ids in prompt_ids]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(encoded)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for length, idxs in sorted(by_len.items()):
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            texts = tokenizer.batch_decode(gen[:, length:], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
    model.train(was_training)
    return out


def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    grade_fn: GradeFn | None = None,
    *,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """Greedy accuracy per ``row["domain"]`` on the rows' prompt ids (``row_prompt_ids``).
    ``grade_fn(response, row)`` returns a bool or a (correct, reason) tuple; by default the
    domains' real verifiers grade (``grade_rows``: code in the sandbox, in batches)."""
    responses = generate_greedy(model, tokenizer, [row_prompt_ids(tokenizer, r) for r in rows],
                                max_new_tokens=max_new_tokens)
    if grade_fn is None:
        verdicts: list[Any] = grade_rows(responses, rows)
    else:
        verdicts = [grade_fn(response, row) for response, row in zip(responses, rows, strict=True)]
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for row, verdict in zip(rows, verdicts, strict=True):
        ok = verdict[0] if isinstance(verdict, tuple) else bool(verdict)
        total[row["domain"]] += 1
        correct[row["domain"]] += int(ok)
    return {d: correct[d] / total[d] for d in sorted(total)}
