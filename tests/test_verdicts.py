"""Verdicts are typed: every verifier's reason is one of ``buffers.records.Reason``, graders take the
``Prompt`` record, and a grader that raises gives ``verifier_error`` without stopping the call."""

from __future__ import annotations

from typing import get_args

import numpy as np

from actors.verifier import Grader, Verifier
from buffers.records import REASONS, Prompt, Reason, Rollout, Verdict
from configs.schema import DomainConfig, ExactVerifier, MathVerifier


def _rollout(text: str, prompt: Prompt) -> Rollout:
    return Rollout(prompt=prompt, sample_idx=0, prompt_ids=[1], response_ids=[2], behaviour_logprobs_T=np.zeros(1),
                   policy_version=0, text=text, finish_reason="stop")


def _verifier() -> Verifier:
    return Verifier({"math": DomainConfig(teacher="t", verifier=MathVerifier()),
                     "reverse": DomainConfig(teacher="t", verifier=ExactVerifier())})


def test_math_and_exact_verdicts_carry_their_reason_and_the_detail_apart():
    m = Prompt("m", "math", "1+1?", answer="2")
    r = Prompt("r", "reverse", "ab", answer="ba")
    out = _verifier().verify([_rollout(t, p) for t, p in [
        ("\\boxed{2}", m), ("\\boxed{3}", m), ("2", m), ("<think>\\boxed{2}", m), (" ba ", r), ("ab", r)]])
    assert [(v.correct, v.reason) for v in out] == [
        (True, "match"), (False, "mismatch"), (False, "no_boxed"), (False, "unclosed_think"),
        (True, "match"), (False, "mismatch")]
    assert "'3' != '2'" in out[1].detail and "never closed" in out[3].detail


def test_a_grader_that_raises_gives_verifier_error_and_the_rest_are_graded():
    v = _verifier()
    no_answer = Prompt("m0", "math", "1+1?")  # no reference answer: the math grader cannot run
    out = v.verify([_rollout("\\boxed{2}", no_answer), _rollout("\\boxed{2}", Prompt("m1", "math", "q", answer="2"))])
    assert (out[0].correct, out[0].reason) == (False, "verifier_error") and "answer_key" in out[0].detail
    assert (out[1].correct, out[1].reason) == (True, "match")


def test_graders_receive_the_prompt_record():
    seen: list = []
    v = _verifier()
    v.graders["math"] = Grader(lambda text, prompt: seen.append(prompt) or Verdict(True, "match"),
                               lambda text, prompt: text)
    p = Prompt("m", "math", "q", answer="2", uid=7)
    assert v.grade_many(["x"], [p]) == [True]
    assert seen == [p]


def test_code_verifier_reasons_are_all_verdict_reasons():
    from actors.verifiers import code as cv

    assert set(get_args(cv.Reason)) <= REASONS == set(get_args(Reason))
