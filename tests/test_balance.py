"""SPEC §3 data balancing against hand-computed numbers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from buffers.balance import balance_group, pass_rate_histogram, rebalance_by_difficulty

# --- §3.2 online correctness-aware balancing ---------------------------------


def _kept(correct: list[bool], keep: list[bool]) -> tuple[int, int]:
    """(kept correct, kept incorrect)."""
    n_c = sum(1 for c, k in zip(correct, keep) if c and k)
    n_i = sum(1 for c, k in zip(correct, keep) if not c and k)
    return n_c, n_i


def test_balance_ratio_one_masks_correct_majority_down_to_one() -> None:
    correct = [True, True, True, False]
    keep = balance_group(correct, 1.0, random.Random(0))
    # n_c=3 > 1·1 → k_c = max(1, floor(1 + 0.5)) = 1.
    assert _kept(correct, keep) == (1, 1)
    assert keep[3] is True  # the minority response is never masked


def test_balance_ratio_one_masks_incorrect_majority() -> None:
    correct = [False, True, False, False, True, False]
    keep = balance_group(correct, 1.0, random.Random(0))
    # n_c=2 < 1·4 → k_i = max(1, min(4, floor(2/1 + 0.5))) = 2.
    assert _kept(correct, keep) == (2, 2)
    assert keep[1] and keep[4]


def test_balance_ratio_one_leaves_even_group_unchanged() -> None:
    assert balance_group([True, False, False, True], 1.0, random.Random(0)) == [True] * 4


def test_balance_ratio_half_keeps_two_of_four_correct() -> None:
    correct = [True] * 4 + [False] * 4
    keep = balance_group(correct, 0.5, random.Random(1))
    # n_c=4 > 0.5·4=2 → k_c = floor(2.5) = 2.
    assert _kept(correct, keep) == (2, 4)


def test_balance_ratio_half_keeps_two_incorrect_for_one_correct() -> None:
    correct = [True] + [False] * 4
    keep = balance_group(correct, 0.5, random.Random(1))
    # n_c=1 < 0.5·4=2 → k_i = floor(1/0.5 + 0.5) = 2.
    assert _kept(correct, keep) == (1, 2)


def test_balance_ratio_two_keeps_two_of_four_incorrect() -> None:
    correct = [True] * 4 + [False] * 4
    keep = balance_group(correct, 2.0, random.Random(2))
    # n_c=4 < 2·4=8 → k_i = floor(4/2 + 0.5) = 2.
    assert _kept(correct, keep) == (4, 2)


def test_balance_ratio_two_keeps_four_of_five_correct() -> None:
    correct = [True] * 5 + [False] * 2
    keep = balance_group(correct, 2.0, random.Random(2))
    # n_c=5 > 2·2=4 → k_c = floor(4.5) = 4.
    assert _kept(correct, keep) == (4, 2)


def test_balance_ratio_two_leaves_exact_ratio_unchanged() -> None:
    assert balance_group([True] * 4 + [False] * 2, 2.0, random.Random(0)) == [True] * 6


def test_balance_always_keeps_at_least_one_majority_response() -> None:
    correct = [True] * 7 + [False]
    keep = balance_group(correct, 0.25, random.Random(3))
    # r·n_i = 0.25 → floor(0.75) = 0, raised to 1.
    assert _kept(correct, keep) == (1, 1)
    keep = balance_group([True] + [False] * 7, 1.5, random.Random(3))
    # 1/1.5 + 0.5 = 1.1667 → 1 incorrect kept.
    assert _kept([True] + [False] * 7, keep) == (1, 1)


def test_balance_rounds_kept_count_half_up() -> None:
    correct = [True] * 7 + [False] * 2
    # n_c=7 > 0.75·2=1.5 → k_c = floor(1.5 + 0.5) = 2 (not 1).
    assert _kept(correct, balance_group(correct, 0.75, random.Random(0))) == (2, 2)
    correct = [True] * 2 + [False] * 4
    # n_c=2 < 0.75·4=3 → k_i = floor(2/0.75 + 0.5) = floor(3.17) = 3.
    assert _kept(correct, balance_group(correct, 0.75, random.Random(0))) == (2, 3)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_balance_leaves_single_outcome_groups_unchanged(ratio: float) -> None:
    assert balance_group([True] * 5, ratio, random.Random(0)) == [True] * 5
    assert balance_group([False] * 5, ratio, random.Random(0)) == [True] * 5
    assert balance_group([], ratio, random.Random(0)) == []


def test_balance_same_seed_gives_same_mask_and_seeds_vary_the_choice() -> None:
    correct = [True] * 6 + [False] * 2
    a = balance_group(correct, 1.0, random.Random(123))
    b = balance_group(correct, 1.0, random.Random(123))
    assert a == b
    masks = {tuple(balance_group(correct, 1.0, random.Random(seed))) for seed in range(30)}
    assert len(masks) > 1
    for mask in masks:
        assert _kept(correct, list(mask)) == (2, 2)


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan")])
def test_balance_rejects_non_positive_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        balance_group([True, False], ratio, random.Random(0))


# --- §3.1 offline difficulty-aware balancing ----------------------------------


def test_histogram_uses_equal_bins_and_puts_one_in_last_bin() -> None:
    rates = [0.0, 0.05, 0.1, 0.45, 0.99, 1.0]
    assert pass_rate_histogram(rates) == [2, 1, 0, 0, 1, 0, 0, 0, 0, 2]
    assert pass_rate_histogram([0.0, 0.25, 0.5, 0.75, 1.0], bins=4) == [1, 1, 1, 2]


def test_histogram_rejects_rates_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="1.5"):
        pass_rate_histogram([0.2, 1.5])


def _u_shaped() -> list[tuple[str, str, float]]:
    items = [(f"hard{i}", "math", 0.0) for i in range(10)]
    items += [(f"mid{i}", "math", 0.45) for i in range(2)]
    items += [(f"easy{i}", "math", 1.0) for i in range(8)]
    return items


def test_rebalance_u_shape_caps_middle_prompts_at_four_copies() -> None:
    out = rebalance_by_difficulty(_u_shaped(), rng=random.Random(0))
    counts = Counter(out)
    # target = max(10, 8) = 10; the middle bin needs 8 more but 2 prompts × 3 extra = 6.
    assert len(out) == 26
    assert counts["mid0"] == 4 and counts["mid1"] == 4
    assert all(counts[f"hard{i}"] == 1 for i in range(10))
    assert all(counts[f"easy{i}"] == 1 for i in range(8))


def test_rebalance_respects_a_smaller_copy_cap() -> None:
    out = rebalance_by_difficulty(_u_shaped(), max_copies=2, rng=random.Random(0))
    assert len(out) == 22
    assert Counter(out)["mid0"] == 2


def test_rebalance_spreads_duplicates_round_robin_up_to_target() -> None:
    items = [(f"hard{i}", "math", 0.0) for i in range(10)] + [(f"m{i}", "math", 0.5) for i in range(3)]
    out = rebalance_by_difficulty(items, rng=random.Random(5))
    counts = Counter(out)
    # target 10: the bin grows 3 → 10 (7 extra) spread as 3 + 2 + 2 extra.
    assert sorted(counts[f"m{i}"] for i in range(3)) == [3, 3, 4]
    assert len(out) == 20


def test_rebalance_leaves_middle_bins_at_or_above_target_and_empty_bins_alone() -> None:
    items = [("a", "math", 0.0), ("b", "math", 1.0)] + [(f"m{i}", "math", 0.35) for i in range(3)]
    out = rebalance_by_difficulty(items, rng=random.Random(0))
    assert Counter(out) == Counter({"a": 1, "b": 1, "m0": 1, "m1": 1, "m2": 1})


def test_rebalance_targets_each_domain_separately() -> None:
    items = _u_shaped()
    # code: extremes 1 and 1 → target 1; its one middle prompt is not duplicated.
    items += [("c_hard", "code", 0.0), ("c_mid", "code", 0.5), ("c_easy", "code", 1.0)]
    # chat: mirrored-J, 6 at 1.0 → target 6 for a single middle prompt, capped at 4.
    items += [(f"t_easy{i}", "chat", 1.0) for i in range(6)] + [("t_mid", "chat", 0.8)]
    counts = Counter(rebalance_by_difficulty(items, rng=random.Random(0)))
    assert counts["c_mid"] == 1
    assert counts["t_mid"] == 4
    assert counts["mid0"] == 4
    assert sum(counts.values()) == 26 + 3 + 7 + 3


def test_rebalance_is_deterministic_per_seed_and_shuffles() -> None:
    items = _u_shaped()
    a = rebalance_by_difficulty(items, rng=random.Random(7))
    assert a == rebalance_by_difficulty(items, rng=random.Random(7))
    assert a != sorted(a) and a[:10] != [f"hard{i}" for i in range(10)]


def test_rebalance_rejects_duplicate_prompt_ids() -> None:
    with pytest.raises(ValueError, match="p1"):
        rebalance_by_difficulty([("p1", "math", 0.0), ("p1", "math", 0.5)], rng=random.Random(0))
