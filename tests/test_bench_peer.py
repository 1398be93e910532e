"""``bench_peer.crossing_time``: where a held-out curve first reaches a target, interpolated between the two
evaluations around the crossing; ``SnapshotGrid``: at which step ends each system keeps a copy of its weights
(hand-computed numbers)."""

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


def test_copies_every_fine_mark_then_every_coarse_one_once_per_step():
    from scripts.bench_peer import SnapshotGrid

    g = SnapshotGrid(every_s=5, fine_every_s=0.5, fine_until_s=2)
    # step ends (training s) -> whether a copy is kept: marks 0.5, 1.0, 1.5, 2.0, then 5, 10, 15
    ends = [0.3, 0.6, 0.9, 1.4, 2.3, 2.9, 4.99, 5.01, 9.0, 16.0, 17.0]
    kept = [t for t in ends if g.due(t)]
    # 0.6 (mark 0.5), 1.4 (1.0), 2.3 (1.5 and 2.0 at once: one copy), 5.01 (5), 16.0 (10 and 15: one copy)
    assert kept == [0.6, 1.4, 2.3, 5.01, 16.0]
    assert g.next == 20


def test_without_a_fine_grid_every_coarse_mark():
    from scripts.bench_peer import SnapshotGrid

    g = SnapshotGrid(every_s=5)
    assert [t for t in (4.0, 5.0, 6.0, 10.2, 14.9, 15.0) if g.due(t)] == [5.0, 10.2, 15.0]
