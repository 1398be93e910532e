"""A run's figures and its per-step bookkeeping.

``RunSummary`` is the typed record of a run (``summary.json``, the checkpoint's meta, what
``run()`` returns). ``Progress`` is what the driver calls once per step: it folds the step's
metrics into the totals, writes TensorBoard and one console line, runs the held-out
evaluation when it is due (its time is excluded from training time), and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from actors import checkpoint
from actors.metrics import MetricsWriter
from configs.schema import RunConfig

log = logging.getLogger("uniopd")


@dataclass
class Totals:
    samples: int = 0  # responses trained on
    tokens: int = 0  # response tokens trained on
    seconds: float = 0.0  # wall time of earlier incarnations of this run (before a resume)
    eval_s: float = 0.0  # held-out evaluation time, excluded from training time
    sync_s: list[float] = field(default_factory=list)  # each step's weight-sync seconds


@dataclass
class RunSummary:
    steps: int = 0
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # "teacher", "before", "after" → domain
    data: dict[str, dict[str, int]] = field(default_factory=dict)  # per train source: prompts, skipped rows
    curve: list[dict] = field(default_factory=list)  # [{train_s, step, responses, accuracy}]
    totals: Totals = field(default_factory=Totals)
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    weight_sync_s_mean: float = 0.0
    lag_max: float = 0.0
    actor_failures: int = 0
    sampler_idle_frac: float = 0.0
    learner_idle_frac: float = 0.0
    teacher_idle_frac: float = 0.0
    resumed_from_step: int | None = None
    student_export: str | None = None
    accounting: dict[str, int] = field(default_factory=dict)  # outcome → prompts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSummary":
        known = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known and k != "totals"})
        out.totals = Totals(**d.get("totals", {}))
        return out

    def table(self) -> str:
        """The end-of-run summary for the console (the full record is in summary.json)."""
        rows = [("steps", f"{self.steps}" + (f" (resumed from {self.resumed_from_step})"
                                             if self.resumed_from_step is not None else "")),
                ("responses trained", f"{self.totals.samples} in {self.train_seconds:.1f} s "
                                      f"({self.samples_per_s:.1f}/s, {self.tokens_per_s:.0f} tokens/s)"),
                ("weight sync", f"{self.weight_sync_s_mean * 1e3:.0f} ms mean"),
                ("max lag", f"{self.lag_max:g}"), ("actor failures recovered", f"{self.actor_failures}"),
                ("idle", f"sampler {self.sampler_idle_frac:.0%}, teacher {self.teacher_idle_frac:.0%}, "
                         f"learner {self.learner_idle_frac:.0%}"),
                ("prompts", ", ".join(f"{k} {v}" for k, v in sorted(self.accounting.items())) or "-")]
        domains = sorted({d for acc in self.accuracy.values() for d in acc})
        for d in domains:
            rows.append((f"held-out {d}", "  ".join(f"{k} {self.accuracy[k][d]:.3f}" for k in
                                                   ("teacher", "before", "after") if d in self.accuracy.get(k, {}))))
        if self.student_export:
            rows.append(("student", self.student_export))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


class Progress:
    """Per-step bookkeeping of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, summary: RunSummary, writer: MetricsWriter, run_dir: Path,
                 evaluate: Callable[[], dict[str, float]] | None, pipe,
                 after_step: Callable[[int, float, object], None] | None = None) -> None:
        self.cfg, self.s, self.writer, self.run_dir, self._evaluate, self.pipe, self.after_step = \
            cfg, summary, writer, run_dir, evaluate, pipe, after_step
        self.t0 = time.perf_counter()
        self.seconds0 = summary.totals.seconds
        self.faults0 = summary.actor_failures
        self.next_eval_s = cfg.run.eval_every_s
        self.last_step_s: float | None = None  # training seconds at the last step's end

    def train_seconds(self) -> float:
        """Seconds of this run's training so far, held-out evaluations excluded."""
        return self.seconds0 + time.perf_counter() - self.t0 - self.s.totals.eval_s

    def out_of_time(self) -> bool:
        return self.cfg.run.time_budget_s is not None and self.train_seconds() >= self.cfg.run.time_budget_s

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy now: logged, in TensorBoard and on the accuracy curve."""
        train_s, t = self.train_seconds(), time.perf_counter()
        acc = self._evaluate()
        self.s.curve.append({"train_s": round(train_s, 3), "step": step, "responses": self.s.totals.samples,
                             "accuracy": acc})
        self.s.totals.eval_s += time.perf_counter() - t
        self.writer.write(step, {f"accuracy/heldout/{d}": v for d, v in acc.items()})
        log.info("held-out accuracy at step %d: %s", step, "  ".join(f"{d} {v:.3f}" for d, v in acc.items()))
        return acc

    def _eval_due(self, step: int, elapsed: float) -> bool:
        run = self.cfg.run
        due = (run.eval_every and step % run.eval_every == 0) or (run.eval_every_s and elapsed >= self.next_eval_s)
        if run.eval_every_s:
            while self.next_eval_s <= elapsed:
                self.next_eval_s += run.eval_every_s
        return bool(due) and self._evaluate is not None and step != run.steps and not self.out_of_time()

    def on_step(self, step: int, m: dict[str, float]) -> None:
        s, t = self.s, self.s.totals
        t.samples += int(m.get("batch/responses", 0))
        t.tokens += int(m.get("batch/tokens", 0))
        t.sync_s.append(m.get("weight_sync/seconds", 0.0))
        elapsed = self.last_step_s = self.train_seconds()
        m.update({"throughput/samples_per_s": t.samples / elapsed, "throughput/tokens_per_s": t.tokens / elapsed,
                  "policy/version": self.pipe.version})
        self.writer.write(step, m)
        self.writer.console(step, self.cfg.run.steps, m)
        s.steps = step
        s.sampler_idle_frac, s.learner_idle_frac, s.teacher_idle_frac = \
            m["sampler/idle_frac"], m["learner/idle_frac"], m["teacher/idle_frac"]
        s.lag_max = max(s.lag_max, m.get("lag/max", 0))
        s.actor_failures = self.faults0 + self.pipe.faults
        if self._eval_due(step, elapsed):
            self.evaluate(step)
        k = self.cfg.learner.checkpoint_every
        if k and step % k == 0 and step != self.cfg.run.steps:
            self.save_checkpoint(step)
        if self.after_step is not None:
            self.after_step(step, elapsed, self.pipe)

    def excluded(self, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run ``fn`` (an evaluation) with its time excluded from training time."""
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.s.totals.eval_s += time.perf_counter() - t

    def save_checkpoint(self, step: int) -> None:
        self.s.totals.seconds = self.seconds0 + time.perf_counter() - self.t0
        a = self.pipe.a
        checkpoint.save(self.run_dir, step, self.pipe.version, a.learners, a.buffer, {"summary": self.s.to_dict()},
                        keep=self.cfg.learner.keep_checkpoints, timeout=self.cfg.run.call_timeout_s,
                        crash_after_learner=self.cfg.chaos.crash_in_checkpoint_step == step)

    def finish(self, accounting: list[tuple[str, int, int, str]]) -> None:
        """Final figures, the last evaluation, a checkpoint with the exported student, the accounting
        file and summary.json."""
        s = self.s
        # the clock stops at the last step (the chunks still in flight then land after it)
        s.train_seconds = elapsed = self.train_seconds() if self.last_step_s is None else self.last_step_s
        s.weight_sync_s_mean = float(np.mean(s.totals.sync_s)) if s.totals.sync_s else 0.0
        s.samples_per_s, s.tokens_per_s = s.totals.samples / elapsed, s.totals.tokens / elapsed
        if self._evaluate is not None:
            s.accuracy["after"] = self.evaluate(s.steps)
        self.save_checkpoint(s.steps)  # on clean shutdown
        s.student_export = str(checkpoint.latest_complete(self.run_dir) / "hf")
        counts: dict[str, int] = {}
        with (self.run_dir / "accounting.jsonl").open("w") as f:  # every admitted prompt's outcome
            for pid, uid, epoch, outcome in accounting:
                counts[outcome] = counts.get(outcome, 0) + 1
                f.write(json.dumps({"id": pid, "uid": uid, "epoch": epoch, "outcome": outcome}) + "\n")
        s.accounting = counts
        out = s.to_dict()
        del out["totals"]
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2))
