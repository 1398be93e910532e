"""The SFT runs that make the demo's teachers and cold-start student.

Owns ``train_phase`` (one ``demo.sft.sft`` run with dev checks: early stop, the snapshot
ladder of ``SFTPlan.keep_band``, the check nearest ``SFTPlan.target``, self-replay) and
``cold_start``, the student's retry loop over the math teacher's snapshots until every
domain's held-out accuracy lands in ``PrepareSettings.heldout_band`` (the procedure is
described on ``PrepareSettings``). Invariant: every choice (stop, snapshot, target check)
is made on the dev set; the held-out set only accepts or rejects a whole attempt.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.evaluation import evaluate_greedy, generate_greedy, grade_dev_row
from demo.models import build_model, count_parameters, save_model
from demo.settings import PrepareSettings, SFTPlan
from demo.sft import sft
from demo.tokenizer import encode_prompt

logger = logging.getLogger(__name__)


def mix_pools(
    pool: Mapping[str, Sequence[tuple[Any, str]]],
    domains: Sequence[str],
    weights: Sequence[float] | None = None,
) -> list[tuple[Any, str]]:
    """Concatenate the domains' pairs with counts proportional to ``weights``.

    The highest-weight domain contributes its whole pool; smaller pools (self-replay)
    are cycled to reach their count. ``sft`` samples uniformly, so counts set the shares.
    """
    weights = list(weights) if weights is not None else [1.0] * len(domains)
    if len(weights) != len(domains) or min(weights) <= 0:
        raise ValueError(f"need one positive weight per domain, got {weights} for {domains}")
    top = max(range(len(domains)), key=lambda i: weights[i])
    base = len(pool[domains[top]])
    out: list[tuple[Any, str]] = []
    for domain, weight in zip(domains, weights, strict=True):
        source = pool[domain]
        n = round(base * weight / weights[top])
        out.extend(source[i % len(source)] for i in range(n))
    return out


@dataclass
class Snapshot:
    """A model's weights at one dev check of an SFT run."""

    step: int
    dev_accuracy: dict[str, float]
    state: dict[str, torch.Tensor] = dataclasses.field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "dev_accuracy": self.dev_accuracy}


def target_distance(accuracy: Mapping[str, float], target: float) -> float:
    """How far a set of per-domain accuracies is from ``target``: the largest distance."""
    return max(abs(a - target) for a in accuracy.values())


def band_distance(accuracy: Mapping[str, float], band: tuple[float, float]) -> float:
    """How far per-domain accuracies are outside ``band`` (summed over domains; 0: inside)."""
    lo, hi = band
    return sum(max(0.0, lo - a) + max(0.0, a - hi) for a in accuracy.values())


def train_phase(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: SFTPlan,
    pool: Mapping[str, Sequence[tuple[Any, str]]],
    dev_rows: Sequence[Mapping[str, Any]],
    *,
    check_every: int,
    seed: int,
    max_new_tokens: int = 16,
    replay_prompts: int = 2000,
) -> tuple[dict[str, Any], list[Snapshot]]:
    """One SFT run with dev-set checks (``plan.check_every`` overrides ``check_every``);
    return (training record, the snapshots ``plan.keep_band`` kept). With ``plan.target``
    the model ends with the weights of the check nearest the target (``SFTPlan``)."""
    check_every = plan.check_every if plan.check_every is not None else check_every
    stop_domains = tuple(plan.stop_domains or plan.domains)
    eval_domains = set(plan.domains) if plan.target is not None else set(stop_domains)
    dev = [r for r in dev_rows if r["domain"] in eval_domains]
    checks: list[dict[str, Any]] = []
    kept: list[Snapshot] = []
    best: list[Snapshot] = []  # at most one: the check nearest plan.target
    record: dict[str, Any] = {"domains": list(plan.domains)}

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def check(step: int, loss: float | None) -> bool:
        acc = evaluate_greedy(model, tokenizer, dev, grade_dev_row, max_new_tokens=max_new_tokens)
        checks.append({"step": step, **({} if loss is None else {"loss": round(loss, 4)}), "dev_accuracy": acc})
        logger.info("%s step %d%s dev accuracy %s", name, step, "" if loss is None else f" loss {loss:.4f}", acc)
        level = min(acc[d] for d in stop_domains)
        if plan.keep_band is not None and plan.keep_band[0] <= level <= plan.keep_band[1]:
            kept.append(Snapshot(step, acc, state()))
        if plan.target is not None and (
                not best or target_distance(acc, plan.target) < target_distance(best[0].dev_accuracy, plan.target)):
            best[:] = [Snapshot(step, acc, state())]
        return plan.stop_at is not None and level >= plan.stop_at

    sources: dict[str, Sequence[tuple[Any, str]]] = dict(pool)
    for domain in plan.self_replay:
        prompts = [p for p, _ in pool[domain][:replay_prompts]]
        responses = generate_greedy(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts],
                                    max_new_tokens=max_new_tokens)
        sources[domain] = list(zip(prompts, responses, strict=True))
        # How good the replayed targets are (the reference response is the pool's second item).
        correct = sum(r == ref for r, (_, ref) in zip(responses, pool[domain], strict=False))
        record.setdefault("self_replay_accuracy", {})[domain] = correct / max(1, len(prompts))

    wants_checks = plan.stop_at is not None or plan.keep_band is not None or plan.target is not None
    use_checks = check_every > 0 and wants_checks and bool(dev)
    t0 = time.perf_counter()
    losses = sft(
        model, tokenizer, mix_pools(sources, plan.domains, plan.weights),
        steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
        log_every=max(1, plan.steps // 10),
        check_every=check_every if use_checks else 0,
        stop_fn=check if use_checks else None,
        encode_prompt=functools.partial(encode_prompt, tokenizer),
    )
    if plan.target is not None and dev and (not checks or checks[-1]["step"] != len(losses)):
        check(len(losses), None)  # the final weights are a candidate too
    tail = losses[-20:]
    record.update(
        steps_run=len(losses),
        final_loss=round(sum(tail) / len(tail), 4),
        train_seconds=round(time.perf_counter() - t0, 2),
        dev_checks=checks,
    )
    if plan.keep_band is not None:
        record["snapshots"] = [s.summary() for s in kept]
    if best:
        model.load_state_dict(best[0].state)
        record["chosen"] = best[0].summary()
        logger.info("%s keeps the weights of step %d (dev accuracy %s)", name, best[0].step, best[0].dev_accuracy)
    return record, kept


def next_snapshot(
    ladder: Sequence[Snapshot],
    tried: set[int],
    target: float,
    current: Snapshot | None = None,
    math_accuracy: float | None = None,
    band: tuple[float, float] = (0.0, 1.0),
) -> Snapshot | None:
    """The math snapshot the next cold-start attempt starts from (``PrepareSettings``).

    First (``current`` None): the one whose dev math accuracy is nearest ``target``. After
    an attempt from ``current`` ended with held-out math ``math_accuracy``: below the band,
    the nearest untried snapshot with a higher dev accuracy; above it, the nearest lower
    one; inside it (another domain was off), the untried one nearest the target. None when
    there is no such snapshot. Ties go to the earlier step.
    """
    left = [s for s in ladder if s.step not in tried]

    def level(s: Snapshot) -> float:
        return s.dev_accuracy["math"]

    nearest = min(left, key=lambda s: (abs(level(s) - target), s.step), default=None)
    if current is None or math_accuracy is None:
        return nearest
    lo, hi = band
    if math_accuracy < lo:
        return min((s for s in left if level(s) > level(current)), key=lambda s: (level(s), s.step), default=None)
    if math_accuracy > hi:
        return min((s for s in left if level(s) < level(current)), key=lambda s: (-level(s), s.step), default=None)
    return nearest


def cold_start(
    out: Path,
    settings: PrepareSettings,
    tokenizer: PreTrainedTokenizerBase,
    pool: Mapping[str, Sequence[tuple[Any, str]]],
    dev: Sequence[Mapping[str, Any]],
    heldout: Sequence[Mapping[str, Any]],
    ladder: Sequence[Snapshot],
    seed: int,
) -> dict[str, Any]:
    """Train the student (``PrepareSettings``, "Cold start"), save the accepted (or least
    bad) attempt to ``out/student`` and return its report entry."""
    t0 = time.perf_counter()
    plan, band = settings.student, settings.heldout_band
    target = plan.target if plan.target is not None else sum(band) / 2
    use_ladder = settings.student_init != "scratch"
    if use_ladder and not ladder:
        # Fast mode with too few checks, or the math teacher's dev accuracy jumped over the band.
        logger.warning("the math teacher's run kept no snapshot in %s; the student starts from scratch",
                       settings.teacher_math.keep_band)
    tried: set[int] = set()
    snap = next_snapshot(ladder, tried, target) if use_ladder else None
    attempts: list[dict[str, Any]] = []
    best: tuple[float, int, PreTrainedModel, dict[str, float], dict[str, Any], str] | None = None
    for attempt in range(settings.student_attempts if snap is not None else 1):
        t_attempt = time.perf_counter()
        model = build_model(settings, tokenizer, seed=seed)
        init = "scratch"
        if snap is not None:
            model.load_state_dict(snap.state)
            tried.add(snap.step)
            init = settings.student_init
        logger.info("training student, attempt %d (init %s%s)", attempt, init,
                    "" if snap is None else f" at step {snap.step}, dev {snap.dev_accuracy}")
        record, _ = train_phase(
            "student", model, tokenizer, plan, pool, dev,
            check_every=settings.check_every, seed=seed + 1 + attempt,
            max_new_tokens=settings.eval_max_new_tokens, replay_prompts=settings.replay_prompts,
        )
        accuracy = evaluate_greedy(model, tokenizer, heldout, max_new_tokens=settings.eval_max_new_tokens)
        off = band_distance(accuracy, band)
        logger.info("student attempt %d held-out greedy accuracy %s (%s band %s)", attempt, accuracy,
                    "inside" if off == 0 else "outside", band)
        attempts.append({
            "attempt": attempt,
            "init": init,
            "snapshot": None if snap is None else snap.summary(),
            "sft_seed": seed + 1 + attempt,
            "steps_run": record["steps_run"],
            "chosen": record.get("chosen"),
            "heldout_accuracy": accuracy,
            "accepted": off == 0,
            "seconds": round(time.perf_counter() - t_attempt, 2),
        })
        if best is None or off < best[0]:
            best = (off, attempt, model, accuracy, record, init)
        if off == 0:
            break
        nxt = next_snapshot(ladder, tried, target, snap, accuracy.get("math"), band) if snap is not None else None
        if nxt is None:
            logger.warning("no math snapshot left to retry from (held-out math %s, band %s)",
                           accuracy.get("math"), band)
            break
        snap = nxt
    assert best is not None
    off, chosen, model, accuracy, record, init = best
    if off > 0:
        logger.warning("no cold-start attempt landed every domain in %s; keeping attempt %d (%s)",
                       band, chosen, accuracy)
    save_model(model, tokenizer, out / "student")
    return {
        "heldout_accuracy": accuracy,
        "init": init,
        "params": count_parameters(model),
        "training": record,
        "cold_start": {
            "target": target,
            "band": list(band),
            "ladder": [s.summary() for s in ladder],
            "attempts": attempts,
            "attempt": chosen,
            "accepted": off == 0,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
