"""The buffer's handling of truncated responses (each ``buffer.truncated`` choice), prompts the engine
refused, and the teacher circuit breaker — against hand-built groups."""

from __future__ import annotations

import numpy as np
import pytest

from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, VerifiedRollout
from buffers.replay import ReplayBuffer, TeacherFailureError
from configs.schema import BufferConfig, MarginShift, NoCalibration


def _group(prompt: Prompt, spec: list[tuple[bool, str, float]], teacher="t", status="ok") -> list[ScoredRollout]:
    """One response per (correct, finish_reason, teacher log-prob per token); behaviour log-prob −1,
    2 tokens each, so each response's distillation return G is (teacher lp + 1)."""
    out = []
    for j, (correct, finish, t_lp) in enumerate(spec):
        r = Rollout(prompt, j, [1, 2], [3, 4] if finish != "refused" else [], np.full(2, -1.0, np.float32), 0,
                    "x", finish)
        score = TeacherScore(np.full(2, t_lp, np.float32)) if status == "ok" else None
        out.append(ScoredRollout(VerifiedRollout(r, correct, "match" if correct else "mismatch"), score, teacher, status))
    return out


def _buffer(n: int, **cfg) -> tuple[ReplayBuffer, Prompt]:
    cfg.setdefault("calibration", NoCalibration())
    buf = ReplayBuffer([Prompt("q", "math", "p")], BufferConfig(**cfg), group_size=n, prompts_per_step=1)
    (p,) = buf.admit(1)
    return buf, p


# correct, truncated-correct (impossible to grade as such in practice, but the rule must not care),
# truncated-incorrect, incorrect
SPEC = [(True, "stop", -1.0), (True, "length", -1.0), (False, "length", -3.0), (False, "stop", -3.0)]


def test_truncated_mask_leaves_them_out_of_balancing_calibration_and_loss():
    buf, p = _buffer(4, truncated="mask", balance=True,
                     calibration=MarginShift(statistic="mean", direction="both", delta=3.0))
    buf.add(_group(p, SPEC))
    batch = buf.get_batch()
    w = [s.weight for s in batch.samples]
    ex = [s.excluded for s in batch.samples]
    assert ex == [False, True, True, False] and w[1] == w[2] == 0.0
    # balancing saw one correct and one incorrect (the two complete ones): nothing to mask
    assert w[0] == w[3] == 1.0
    # calibration saw only the complete ones: G+ = 0, G− = −2, gap 2 < δ = 3, shift s = 1 split ±0.5
    assert [s.advantage_shift for s in batch.samples] == [0.5, 0.0, 0.0, -0.5]
    assert batch.n_responses_total == 4  # still in the SPEC §1 denominator
    m = buf.last_batch_metrics()
    assert m["rollout/truncated_frac"] == 0.5 and m["rollout/excluded_frac"] == 0.5


def test_truncated_incorrect_grades_them_incorrect():
    buf, p = _buffer(4, truncated="incorrect", balance=False)
    buf.add(_group(p, SPEC))
    batch = buf.get_batch()
    assert [s.correct for s in batch.samples] == [True, False, False, False]
    assert [s.weight for s in batch.samples] == [1.0] * 4 and not any(s.excluded for s in batch.samples)


def test_truncated_incorrect_feeds_balancing_as_incorrect():
    buf, p = _buffer(4, truncated="incorrect", balance=True)
    # as graded: 3 correct, 1 incorrect → r = 1 keeps 1 correct; with the truncated correct counted
    # incorrect: 2 and 2 → nothing masked
    buf.add(_group(p, [(True, "stop", -1), (True, "stop", -1), (True, "length", -1), (False, "stop", -3)]))
    assert [s.weight for s in buf.get_batch().samples] == [1.0] * 4


def test_truncated_keep_treats_them_like_any_other():
    buf, p = _buffer(4, truncated="keep", balance=False)
    buf.add(_group(p, SPEC))
    batch = buf.get_batch()
    assert [s.correct for s in batch.samples] == [True, True, False, False]
    assert not any(s.excluded for s in batch.samples)


def test_refused_prompt_drops_its_group_and_is_counted():
    buf, p = _buffer(2)
    buf.add(_group(p, [(False, "refused", 0.0), (False, "refused", 0.0)]))
    assert buf.num_ready() == 0 and buf.counters["refused_prompts"] == 1
    assert buf.get_accounting()[-1].outcome == "dropped_refused" and not buf.running
    assert buf.capacity() == 1  # the admission slot is free again


def test_teacher_circuit_breaker_trips_past_the_fraction_of_the_window():
    buf = ReplayBuffer([Prompt(f"q{i}", "math", "p") for i in range(100)],
                       BufferConfig(teacher_failure_window=20, teacher_max_failed_frac=0.1, max_lag=100),
                       group_size=1, prompts_per_step=100)
    prompts = buf.admit(100)
    # 2 failures in 20 is exactly 10%: allowed; healthy responses push them out of the window
    for i, p in enumerate(prompts[:40]):
        buf.add(_group(p, [(True, "stop", -1.0)], status="failed" if i in (3, 9) else "ok"))
    # a third failure inside one window of 20 is over the limit: the run stops, naming the teacher
    buf.add(_group(prompts[40], [(True, "stop", -1.0)], status="failed"))
    buf.add(_group(prompts[41], [(True, "stop", -1.0)], status="failed"))
    with pytest.raises(TeacherFailureError, match=r"teacher 't' failed on 3 of its last 20 responses"):
        buf.add(_group(prompts[42], [(True, "stop", -1.0)], status="failed"))


def test_circuit_breaker_counts_each_teacher_apart():
    buf = ReplayBuffer([Prompt(f"q{i}", "math", "p") for i in range(10)],
                       BufferConfig(teacher_failure_window=4, teacher_max_failed_frac=0.25, max_lag=100),
                       group_size=1, prompts_per_step=10)
    ps = buf.admit(10)
    buf.add(_group(ps[0], [(True, "stop", -1.0)], teacher="a", status="failed"))
    buf.add(_group(ps[1], [(True, "stop", -1.0)], teacher="b", status="failed"))
    with pytest.raises(TeacherFailureError, match="teacher 'b'"):
        buf.add(_group(ps[2], [(True, "stop", -1.0)], teacher="b", status="failed"))


def test_accounting_lines_are_typed_and_survive_a_checkpoint(tmp_path):
    from typing import get_args

    from buffers.records import Accounted, Outcome

    buf, p = _buffer(2)
    buf.add(_group(p, [(True, "stop", -1.0), (False, "stop", -3.0)]))
    assert buf.get_batch() is not None
    assert buf.get_accounting() == [Accounted("q", p.uid, p.epoch, "trained")]
    assert {o for *_, o in buf.get_accounting()} <= set(get_args(Outcome))  # still unpacks as a 4-tuple
    buf.save(str(tmp_path / "buffer.pkl"))
    again = ReplayBuffer([Prompt("q", "math", "p")], BufferConfig(calibration=NoCalibration()), group_size=2,
                         prompts_per_step=1)
    again.load(str(tmp_path / "buffer.pkl"))
    assert again.get_accounting() == buf.get_accounting()
    assert all(isinstance(a, Accounted) for a in again.get_accounting())
