"""Data balancing on the student side (SPEC §3): pure functions, no Ray, no torch.

Owns two decisions:

- **Online correctness-aware balancing** (SPEC §3.2), ``balance_group``: inside one
  finished group that has both outcomes, the majority outcome loses loss weight on
  randomly chosen responses until correct : incorrect ≈ r : 1. Invariant: a group
  with a single outcome is untouched, and a minority response is never masked. The
  mask only zeroes loss weight; masked responses still count in the §4 group
  statistics and in the loss denominator (the caller's job, SPEC §1/§3.2).
- **Offline difficulty-aware balancing** (SPEC §3.1), ``pass_rate_histogram`` and
  ``rebalance_by_difficulty``: per domain, middle-difficulty prompts are duplicated
  towards the count of the fuller extreme bin. Invariant: nothing is deleted; every
  input prompt id appears at least once in the output and at most ``max_copies``
  times.

Inferred details (the paper states only the intent):

- §3.2 rounding: "until correct : incorrect = r : 1" is turned into a kept count by
  rounding half up, ``floor(x + 0.5)``, and at least one majority response is always
  kept (``max(1, ...)``), so a balanced group never loses an outcome. With n_c
  correct and n_i incorrect: if n_c > r·n_i keep k_c = max(1, ⌊r·n_i + ½⌋) correct;
  if n_c < r·n_i keep k_i = max(1, min(n_i, ⌊n_c/r + ½⌋)) incorrect; else nothing.
- §3.1: bin count (10), target (count of the larger extreme bin, i.e. the first or
  last bin) and the per-prompt cap (4 copies in total) are config; duplicates are
  spread round-robin over a bin's prompts in a shuffled order, so copy counts within
  a bin differ by at most one.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

__all__ = ["balance_group", "pass_rate_histogram", "rebalance_by_difficulty"]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def balance_group(correct: Sequence[bool], ratio: float, rng: random.Random) -> list[bool]:
    """Keep-mask for one group (True = keeps its loss weight), SPEC §3.2.

    ``ratio`` r is the target correct : incorrect = r : 1. Only majority-outcome
    responses are ever masked, chosen uniformly at random with ``rng``.
    """
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"`ratio` is {ratio!r}; it must be a finite number > 0 (correct : incorrect = ratio : 1)")
    keep = [True] * len(correct)
    correct_idx = [i for i, c in enumerate(correct) if c]
    incorrect_idx = [i for i, c in enumerate(correct) if not c]
    n_c, n_i = len(correct_idx), len(incorrect_idx)
    if n_c == 0 or n_i == 0:
        return keep

    if n_c > ratio * n_i:
        majority, n_keep = correct_idx, min(n_c, max(1, _round_half_up(ratio * n_i)))
    elif n_c < ratio * n_i:
        majority, n_keep = incorrect_idx, max(1, min(n_i, _round_half_up(n_c / ratio)))
    else:
        return keep

    for i in rng.sample(majority, len(majority) - n_keep):
        keep[i] = False
    return keep


def _bin_index(pass_rate: float, bins: int) -> int:
    # Equal-width bins over [0, 1]; 1.0 belongs to the last bin (closed on the right).
    return min(int(pass_rate * bins), bins - 1)


def _check_pass_rate(pass_rate: float, where: str) -> None:
    if not (0.0 <= pass_rate <= 1.0):
        raise ValueError(f"{where} has pass rate {pass_rate!r}; pass rates must lie in [0, 1]")


def pass_rate_histogram(pass_rates: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of pass rates in ``bins`` equal bins over [0, 1] (SPEC §3.1)."""
    if bins < 1:
        raise ValueError(f"`bins` is {bins}; it must be >= 1")
    counts = [0] * bins
    for k, p in enumerate(pass_rates):
        _check_pass_rate(p, f"entry {k}")
        counts[_bin_index(p, bins)] += 1
    return counts


def rebalance_by_difficulty(
    items: Sequence[tuple[str, str, float]],
    *,
    bins: int = 10,
    max_copies: int = 4,
    rng: random.Random,
) -> list[str]:
    """Prompt ids after per-domain upsampling of middle-difficulty bins (SPEC §3.1).

    ``items`` are ``(prompt_id, domain, pass_rate)``. Per domain: target = max(count
    of first bin, count of last bin); each middle bin with 0 < count < target gains
    duplicates (round-robin over its shuffled prompts) until it reaches target or
    every prompt in it has ``max_copies`` copies. Returns all original ids plus the
    duplicates, all domains together, shuffled with ``rng``.
    """
    if bins < 1:
        raise ValueError(f"`bins` is {bins}; it must be >= 1")
    if max_copies < 1:
        raise ValueError(f"`max_copies` is {max_copies}; it must be >= 1 (1 means no duplication)")

    seen: set[str] = set()
    # dict keeps first-seen domain order, so the result depends only on the input and rng.
    by_domain: dict[str, list[tuple[str, float]]] = {}
    for prompt_id, domain, pass_rate in items:
        if prompt_id in seen:
            raise ValueError(f"prompt id {prompt_id!r} appears more than once; each prompt must be listed once")
        seen.add(prompt_id)
        _check_pass_rate(pass_rate, f"prompt {prompt_id!r}")
        by_domain.setdefault(domain, []).append((prompt_id, pass_rate))

    out: list[str] = [prompt_id for prompt_id, _, _ in items]
    for prompts in by_domain.values():
        bin_members: dict[int, list[str]] = defaultdict(list)
        for prompt_id, pass_rate in prompts:
            bin_members[_bin_index(pass_rate, bins)].append(prompt_id)
        target = max(len(bin_members[0]), len(bin_members[bins - 1]))
        for b in range(1, bins - 1):
            members = bin_members[b]
            count = len(members)
            if count == 0 or count >= target:
                continue
            n_extra = min(target - count, count * (max_copies - 1))
            order = list(members)
            rng.shuffle(order)
            out.extend(order[k % count] for k in range(n_extra))
    rng.shuffle(out)
    return out
