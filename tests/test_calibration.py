"""SPEC §4 outcome-guided margin calibration against hand-computed numbers."""

from __future__ import annotations

import pytest

from buffers.calibration import calibrate
from configs.schema import BufferConfig, MarginMask, MarginShift, NoCalibration

T, F = True, False


def _one_group(pos: list[float], neg: list[float]) -> tuple[list[float], list[bool], list[int]]:
    returns = pos + neg
    return returns, [T] * len(pos) + [F] * len(neg), [0] * len(returns)


# --- margin shift --------------------------------------------------------------


def test_margin_shift_both_restores_gap_to_delta() -> None:
    # c = mean(0.1, 0.3) = 0.2, w = mean(0.2, 0.4) = 0.3, gap = -0.1, s = 0.5.
    r = calibrate(*_one_group([0.1, 0.3], [0.2, 0.4]), MarginShift())
    assert r.shift == pytest.approx([0.25, 0.25, -0.25, -0.25])
    assert r.keep == [T] * 4
    assert r.gap_before == pytest.approx([-0.1])
    assert r.gap_after == pytest.approx([0.4])
    assert (r.n_sets, r.n_shifted) == (1, 1)


def test_margin_shift_correct_up_moves_only_correct() -> None:
    r = calibrate(*_one_group([0.1, 0.3], [0.2, 0.4]), MarginShift(direction="correct_up"))
    assert r.shift == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert r.gap_after == pytest.approx([0.4])


def test_margin_shift_incorrect_down_moves_only_incorrect() -> None:
    r = calibrate(*_one_group([0.1, 0.3], [0.2, 0.4]), MarginShift(direction="incorrect_down"))
    assert r.shift == pytest.approx([0.0, 0.0, -0.5, -0.5])
    assert r.gap_after == pytest.approx([0.4])


def test_margin_shift_minmax_uses_worst_correct_and_best_incorrect() -> None:
    # minmax: c = min(0.1, 0.5) = 0.1, w = max(0.0, 0.3) = 0.3, gap = -0.2, s = 0.6.
    data = _one_group([0.1, 0.5], [0.0, 0.3])
    r = calibrate(*data, MarginShift(statistic="minmax"))
    assert r.gap_before == pytest.approx([-0.2])
    assert r.shift == pytest.approx([0.3, 0.3, -0.3, -0.3])
    assert r.gap_after == pytest.approx([0.4])
    # mean on the same data: c = 0.3, w = 0.15, gap = 0.15, s = 0.25.
    r = calibrate(*data, MarginShift(statistic="mean"))
    assert r.gap_before == pytest.approx([0.15])
    assert r.shift == pytest.approx([0.125, 0.125, -0.125, -0.125])
    assert r.gap_after == pytest.approx([0.4])


def test_margin_shift_leaves_gap_already_at_least_delta_untouched() -> None:
    r = calibrate(*_one_group([0.9, 0.7], [0.1, 0.3]), MarginShift())
    # c = 0.8, w = 0.2, gap 0.6 >= 0.4.
    assert r.shift == [0.0] * 4
    assert r.gap_before == pytest.approx([0.6])
    assert r.gap_after == pytest.approx([0.6])
    assert (r.n_sets, r.n_shifted) == (1, 0)


def test_single_outcome_groups_are_untouched_and_not_counted() -> None:
    returns = [0.0, 0.0, 1.0, 1.0]
    correct = [T, T, F, F]
    groups = [0, 0, 1, 1]
    for settings in (
        MarginShift(),
        MarginMask(),
        MarginMask(form="group_drop"),
    ):
        r = calibrate(returns, correct, groups, settings)
        assert r.shift == [0.0] * 4
        assert r.keep == [T] * 4
        assert (r.gap_before, r.gap_after, r.n_sets, r.n_shifted) == ([], [], 0, 0)
    r = calibrate([0.1, 0.2], [T, T], [0, 1], MarginShift(scope="global"))
    assert (r.shift, r.n_sets) == ([0.0, 0.0], 0)


def _two_groups() -> tuple[list[float], list[bool], list[int]]:
    # group 0: correct 1.0, incorrect 0.0 (gap 1.0); group 1: correct 0.0, incorrect 0.1 (gap -0.1).
    return [1.0, 0.0, 0.0, 0.1], [T, F, T, F], [0, 0, 1, 1]


def test_group_scope_shifts_only_the_violating_group() -> None:
    r = calibrate(*_two_groups(), MarginShift(scope="group"))
    # group 1: s = 0.4 - (-0.1) = 0.5 → ±0.25.
    assert r.shift == pytest.approx([0.0, 0.0, 0.25, -0.25])
    assert r.gap_before == pytest.approx([1.0, -0.1])
    assert r.gap_after == pytest.approx([1.0, 0.4])
    assert (r.n_sets, r.n_shifted) == (2, 1)


def test_global_scope_pools_groups_and_can_leave_everything_unshifted() -> None:
    r = calibrate(*_two_groups(), MarginShift(scope="global"))
    # pooled: c = mean(1.0, 0.0) = 0.5, w = mean(0.0, 0.1) = 0.05, gap 0.45 >= 0.4.
    assert r.shift == [0.0] * 4
    assert r.gap_before == pytest.approx([0.45])
    assert (r.n_sets, r.n_shifted) == (1, 0)


def test_global_scope_shifts_every_response_of_a_class_across_groups() -> None:
    # pooled: c = mean(0.2, 0.0) = 0.1, w = mean(0.0, 0.2) = 0.1, gap 0, s = 0.4 → ±0.2.
    r = calibrate([0.2, 0.0, 0.0, 0.2], [T, F, T, F], [0, 0, 1, 1], MarginShift(scope="global"))
    assert r.shift == pytest.approx([0.2, -0.2, 0.2, -0.2])
    assert r.gap_after == pytest.approx([0.4])


def test_balancing_masked_responses_count_in_statistics() -> None:
    # All four responses count, even if balancing zeroed some loss weights upstream.
    r = calibrate([0.0, 0.0, 0.0, 0.8], [T, T, T, F], [3, 3, 3, 3], MarginShift())
    assert r.gap_before == pytest.approx([-0.8])
    assert r.shift == pytest.approx([0.6, 0.6, 0.6, -0.6])


def test_mode_none_reports_gaps_but_changes_nothing() -> None:
    r = calibrate(*_one_group([0.1, 0.3], [0.2, 0.4]), NoCalibration())
    assert r.shift == [0.0] * 4 and r.keep == [T] * 4
    assert r.gap_before == pytest.approx([-0.1]) and r.gap_after == pytest.approx([-0.1])
    assert (r.n_sets, r.n_shifted) == (1, 0)


# --- margin mask ----------------------------------------------------------------


def test_group_drop_removes_whole_violating_group_only() -> None:
    r = calibrate(*_two_groups(), MarginMask(form="group_drop"))
    assert r.keep == [T, T, F, F]
    assert r.shift == [0.0] * 4
    assert r.gap_before == pytest.approx([1.0, -0.1])
    assert r.gap_after == pytest.approx([1.0])  # the dropped group has no gap afterwards
    assert (r.n_sets, r.n_shifted) == (2, 1)


def test_greedy_removes_worst_correct_when_it_raises_gap_more() -> None:
    # mean: c = 0.1, w = 0.2, gap -0.1, δ = 0.15.
    # drop worst correct (-0.5): c = 0.4, gap 0.2; drop best incorrect (0.6): w = 0, gap 0.1.
    # → drop the correct one; 0.2 >= 0.15 stops.
    settings = MarginMask(delta=0.15)
    r = calibrate(*_one_group([0.4, 0.4, -0.5], [0.0, 0.0, 0.6]), settings)
    assert r.keep == [T, T, F, T, T, T]
    assert r.gap_after == pytest.approx([0.2])
    assert r.shift == [0.0] * 6


def test_greedy_removes_best_incorrect_when_it_raises_gap_more() -> None:
    # mean: c = 0.3, w = 0.3, gap 0. dropping a correct (all 0.3) leaves c = 0.3 (no gain);
    # dropping 0.9 gives w = 0, gap 0.3 >= 0.2 → stop.
    settings = MarginMask(delta=0.2)
    r = calibrate(*_one_group([0.3, 0.3, 0.3], [0.0, 0.9, 0.0]), settings)
    assert r.keep == [T, T, T, T, F, T]
    assert r.gap_after == pytest.approx([0.3])


def test_greedy_alternates_removals_in_order_of_gain() -> None:
    # mean, δ = 0.4: c = (0.5·3 - 0.7)/4 = 0.2, w = 0.8/4 = 0.2, gap 0.
    # step 1: drop -0.7 → gap 0.3 (vs 0.2 by dropping 0.8). step 2: dropping a 0.5 gains nothing,
    # dropping 0.8 → w = 0, gap 0.5 → stop.
    settings = MarginMask()
    r = calibrate(*_one_group([0.5, 0.5, 0.5, -0.7], [0.0, 0.0, 0.0, 0.8]), settings)
    assert r.keep == [T, T, T, F, T, T, T, F]
    assert r.gap_after == pytest.approx([0.5])
    assert (r.n_sets, r.n_shifted) == (1, 1)


def test_greedy_stops_at_class_floor() -> None:
    # minmax, δ = 0.4, floor for 4 correct with frac 0.5 = 2, for 2 incorrect = max(1, 1) = 1.
    # gap = -0.3 - 0.5 = -0.8; dropping 0.5 never changes w = 0.5, so only correct ones go:
    # -0.3 (gap -0.7), -0.2 (gap -0.6); a third would leave 1 < 2 correct → stop.
    settings = MarginMask(statistic="minmax", greedy_min_frac=0.5)
    r = calibrate(*_one_group([-0.3, -0.2, -0.1, 0.0], [0.5, 0.5]), settings)
    assert r.keep == [F, F, T, T, T, T]
    assert r.gap_before == pytest.approx([-0.8])
    assert r.gap_after == pytest.approx([-0.6])


def test_greedy_default_floor_is_one_quarter_of_the_class() -> None:
    # 8 correct → floor 2; the 6 lowest go one by one (each raises the min), the last 2 stay.
    pos = [-0.8, -0.7, -0.6, -0.5, -0.4, -0.3, -0.2, -0.1]
    settings = MarginMask(statistic="minmax")
    r = calibrate(*_one_group(pos, [1.0]), settings)
    assert r.keep == [F] * 6 + [T, T] + [T]
    assert r.gap_after == pytest.approx([-1.2])


def test_greedy_stops_when_no_removal_raises_gap() -> None:
    r = calibrate(*_one_group([0.0, 0.0], [0.1, 0.1]), MarginMask())
    assert r.keep == [T] * 4
    assert r.gap_before == pytest.approx([-0.1]) and r.gap_after == pytest.approx([-0.1])
    assert r.n_shifted == 1


def test_greedy_cannot_remove_from_single_response_classes() -> None:
    r = calibrate(*_two_groups(), MarginMask())
    # group 1 has one response per class: the floor forbids any removal.
    assert r.keep == [T] * 4
    assert r.gap_after == pytest.approx([1.0, -0.1])


# --- validation -------------------------------------------------------------------


def test_calibrate_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 returns, 2 outcomes and 3 group ids"):
        calibrate([0.0, 0.1, 0.2], [T, F], [0, 0, 0], MarginShift())


def test_settings_reject_negative_delta() -> None:
    with pytest.raises(ValueError, match="delta"):
        MarginShift(delta=-0.1)


def test_settings_reject_unknown_type_and_bad_floor() -> None:
    with pytest.raises(ValueError, match="'clip'"):
        BufferConfig(calibration={"type": "clip"})
    with pytest.raises(ValueError, match="greedy_min_frac"):
        MarginMask(greedy_min_frac=1.5)


def test_each_variant_takes_only_its_own_keys() -> None:
    with pytest.raises(ValueError, match="direction"):
        MarginMask(direction="both")  # a shift's key on a mask
    with pytest.raises(ValueError, match="form"):
        MarginShift(form="greedy")
    with pytest.raises(ValueError, match="delta"):
        NoCalibration(delta=0.4)
    with pytest.raises(ValueError, match="greedy_min_frac.*form: greedy"):
        MarginMask(form="group_drop", greedy_min_frac=0.5)
    with pytest.raises(ValueError, match="delta"):
        MarginShift(delta=float("inf"))
    assert BufferConfig(calibration="none").calibration == NoCalibration()
    assert BufferConfig(calibration={"delta": 0.2}).calibration == MarginShift(delta=0.2)  # default variant


def test_calibrate_rejects_non_finite_returns() -> None:
    with pytest.raises(ValueError, match="response 1"):
        calibrate([0.0, float("nan")], [T, F], [0, 0], MarginShift())
