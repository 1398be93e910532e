"""Outcome-guided margin calibration on the teacher side (SPEC §4): pure functions.

Input: one return G per response (the mean over its tokens of the distillation
advantage A_t, SPEC §4), its verifier outcome and its group id (prompt index).
Output: a constant per response to add to every token advantage of that response
(margin shift) and a keep mask (margin mask: False = zero advantage), plus the
statistics behind the ``margin/*`` metrics (SPEC §7).

Invariant kept: for every calibrated set that has both outcomes, after a shift the
gap c − w equals δ; a greedy mask never removes a class below
max(1, ⌊greedy_min_frac·|class|⌋) responses, so a masked set still has both
outcomes. Sets with a single outcome are never touched. Shift and mask are
exclusive: the settings are one variant of ``configs.schema.CalibrationConfig``
(``none``, ``shift`` or ``mask``, each with only its own keys), used here as is. Every response given counts in the statistics, including
those masked by §3.2 balancing (SPEC §3.2).

Statistics (SPEC §4): ``minmax`` c = min G over S+, w = max G over S− (the paper's
margin); ``mean`` c, w = class means (the released scripts). Adding one constant to
a whole class moves its min, max and mean by that constant, so after a shift of
s = δ − (c − w) the gap is exactly δ in either mode.

Inferred details:

- Greedy mask tie-break: when removing the worst correct and the best incorrect
  would raise the gap equally, the best incorrect is removed (keeps the correct
  responses, which carry the positive signal). Within a class, ties in G go to the
  lowest response index.
- ``n_shifted`` counts sets with gap < δ that the variant acted on (0 for
  ``none``), including greedy sets where the floor allowed no removal.
- ``gap_after`` has one entry per set that still trains after calibration: a set
  dropped whole by ``group_drop`` has no gap afterwards and is left out, so
  ``len(gap_after) == n_sets − (sets dropped)``. With ``none`` it equals
  ``gap_before``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from configs.schema import CalibrationConfig, MarginMask, MarginShift, NoCalibration, Statistic

__all__ = ["CalibrationResult", "calibrate"]

@dataclass
class CalibrationResult:
    """Per-response calibration and per-set statistics."""

    shift: list[float]
    """Per response: constant to add to every token advantage (0 when untouched)."""
    keep: list[bool]
    """Per response: False = removed by the mask (its advantage becomes zero)."""
    gap_before: list[float] = field(default_factory=list)
    """One per calibrated set with both outcomes: c − w before calibration."""
    gap_after: list[float] = field(default_factory=list)
    """One per such set that still trains: c − w among kept responses, after shift."""
    n_sets: int = 0
    """Sets (groups, or the global set) with both outcomes."""
    n_shifted: int = 0
    """Sets with gap < δ that the variant acted on."""


def _stat_c(values: Sequence[float], statistic: Statistic) -> float:
    return min(values) if statistic == "minmax" else sum(values) / len(values)


def _stat_w(values: Sequence[float], statistic: Statistic) -> float:
    return max(values) if statistic == "minmax" else sum(values) / len(values)


def _gap(pos: Sequence[float], neg: Sequence[float], statistic: Statistic) -> float:
    """SPEC §4: c − w."""
    return _stat_c(pos, statistic) - _stat_w(neg, statistic)


def _greedy_removals(
    pos: list[tuple[float, int]],
    neg: list[tuple[float, int]],
    settings: MarginMask,
) -> list[int]:
    """Response indices removed by the greedy margin mask (SPEC §4, release form).

    ``pos``/``neg`` are (G, response index) of the set's correct/incorrect responses.
    """
    stat = settings.statistic
    floor_pos = max(1, math.floor(settings.greedy_min_frac * len(pos)))
    floor_neg = max(1, math.floor(settings.greedy_min_frac * len(neg)))
    # Sort so the worst correct is pos[0] and the best incorrect is neg[-1];
    # the index breaks ties in G towards the lowest response index.
    pos = sorted(pos, key=lambda gi: (gi[0], gi[1]))
    neg = sorted(neg, key=lambda gi: (gi[0], -gi[1]))
    removed: list[int] = []
    gap = _gap([g for g, _ in pos], [g for g, _ in neg], stat)
    while gap < settings.delta:
        gap_drop_pos = (
            _gap([g for g, _ in pos[1:]], [g for g, _ in neg], stat) if len(pos) - 1 >= floor_pos else -math.inf
        )
        gap_drop_neg = (
            _gap([g for g, _ in pos], [g for g, _ in neg[:-1]], stat) if len(neg) - 1 >= floor_neg else -math.inf
        )
        if max(gap_drop_pos, gap_drop_neg) <= gap:
            break
        if gap_drop_neg >= gap_drop_pos:
            removed.append(neg.pop()[1])
            gap = gap_drop_neg
        else:
            removed.append(pos.pop(0)[1])
            gap = gap_drop_pos
    return removed


def calibrate(
    returns: Sequence[float],
    correct: Sequence[bool],
    group_ids: Sequence[int],
    settings: CalibrationConfig,
) -> CalibrationResult:
    """Margin shift / mask for a batch of responses (SPEC §4).

    ``returns[i]`` is G of response i (mean token advantage), ``correct[i]`` its
    outcome, ``group_ids[i]`` its prompt. All responses count in the statistics.
    """
    n = len(returns)
    if len(correct) != n or len(group_ids) != n:
        raise ValueError(
            f"calibrate got {n} returns, {len(correct)} outcomes and {len(group_ids)} group ids; "
            "they must have one entry per response"
        )
    for i, g in enumerate(returns):
        if not math.isfinite(g):
            raise ValueError(f"return of response {i} is {g!r}; returns must be finite")

    result = CalibrationResult(shift=[0.0] * n, keep=[True] * n)
    if settings.scope == "global":
        sets: list[list[int]] = [list(range(n))] if n else []
    else:
        by_group: dict[int, list[int]] = {}
        for i, gid in enumerate(group_ids):
            by_group.setdefault(gid, []).append(i)
        sets = list(by_group.values())

    stat = settings.statistic
    for members in sets:
        pos = [i for i in members if correct[i]]
        neg = [i for i in members if not correct[i]]
        if not pos or not neg:
            continue
        result.n_sets += 1
        gap = _gap([returns[i] for i in pos], [returns[i] for i in neg], stat)
        result.gap_before.append(gap)
        if isinstance(settings, NoCalibration) or gap >= settings.delta:
            result.gap_after.append(gap)
            continue
        result.n_shifted += 1

        if isinstance(settings, MarginShift):
            # SPEC §4 margin shift: s = δ − (c − w), split by direction.
            s = settings.delta - gap
            up = {"correct_up": s, "incorrect_down": 0.0, "both": s / 2}[settings.direction]
            down = s - up
            for i in pos:
                result.shift[i] = up
            for i in neg:
                result.shift[i] = -down
            result.gap_after.append(
                _gap([returns[i] + up for i in pos], [returns[i] - down for i in neg], stat)
            )
        elif settings.form == "group_drop":
            # SPEC §4 margin mask, paper form: the whole set goes.
            for i in members:
                result.keep[i] = False
        else:
            for i in _greedy_removals([(returns[i], i) for i in pos], [(returns[i], i) for i in neg], settings):
                result.keep[i] = False
            result.gap_after.append(
                _gap([returns[i] for i in pos if result.keep[i]], [returns[i] for i in neg if result.keep[i]], stat)
            )
    return result
