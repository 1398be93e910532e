"""Math grading reads only the answer part of a thinking model's response (after </think>)."""

from actors.verifiers.math import answer_part, grade

ROW = {"answer": "579"}


def test_answer_after_think_is_graded_and_the_reasoning_is_not():
    assert grade("<think>maybe \\boxed{578}? no.</think>The sum is \\boxed{579}.", ROW)[0]
    assert not grade("<think>it is \\boxed{579}</think>I think \\boxed{578}.", ROW)[0]


def test_unclosed_think_block_has_no_answer():
    ok, reason = grade("<think>\\boxed{579} and still thinking", ROW)
    assert not ok and "never closed" in reason
    assert answer_part("<think>x") is None


def test_plain_response_is_all_answer():
    assert grade("\\boxed{579}", ROW)[0] and answer_part("abc") == "abc"
