"""``bench_peer.crossing_time``: where a held-out curve first reaches a target, interpolated between the two
evaluations around the crossing (hand-computed numbers)."""

from scripts.bench_peer import crossing_time, first_time


def _curve(*points):
    return [{"train_s": t, "accuracy": a} for t, a in points]


def test_interpolates_between_the_evaluations_around_the_crossing():
    # 0.13 at 0 s, 0.65 at 5.277 s: 0.33 is (0.33 - 0.13) / (0.65 - 0.13) = 0.3846 of the way, at 2.030 s
    assert crossing_time(_curve((0.0, 0.13), (5.277, 0.65)), 0.33) == 2.03
    # the peer of the same invocation: 0.13 → 0.54 at 5.128 s crosses at 0.2 / 0.41 × 5.128 = 2.501 s
    assert crossing_time(_curve((0.0, 0.13), (5.128, 0.54)), 0.33) == 2.501
    # the grid orders them the other way: the peer's evaluation landed 0.15 s earlier
    assert first_time(_curve((0.0, 0.13), (5.128, 0.54)), lambda a: a >= 0.33) == 5.128


def test_a_dip_after_a_crossing_does_not_move_it_and_never_is_none():
    c = _curve((0, 0.2), (5, 0.5), (10, 0.95), (15, 0.8), (20, 0.97))
    assert crossing_time(c, 0.9) == 9.444  # 5 + 0.4 / 0.45 × 5: between 5 s (0.5) and 10 s (0.95)
    assert crossing_time(c, 0.99) is None
    assert crossing_time(c, 0.1) == 0  # already there at the start
