"""The correctness-balanced replay buffer (an actor): admission, grouping, balancing,
calibration, lag control, batches.

Invariants it keeps:
- Admission control (SPEC §2, AReaL's rule): a prompt is handed to a sampler only
  while ``accepted + running < (η + v + 1)·B``; so with η = 0 every trained token
  has lag 0, and in general lag never exceeds η unless something went wrong (a
  response that does arrive with lag > η is dropped and counted).
- A group is released only when all n responses of its prompt are verified and
  scored, and groups are released in admission order: a group that completes before
  an earlier-admitted one is held until that one completes (or is requeued or
  dropped). Admission control bounds the lag only if groups become batchable in the
  order they were admitted; a later group overtaking an earlier one would push the
  earlier into a later batch (SPEC §2). Online balancing (SPEC §3.2) acts per group,
  margin calibration (SPEC §4) on the batch (``group`` or ``global`` scope).
- Every admitted prompt ends in exactly one outcome in ``accounting``: trained,
  dropped (with its reason) or requeued (then admitted again under a new uid).
- Sources mix by weight: each admitted prompt comes from source s with probability
  w_s / Σ w, and each source walks its own shuffled epochs (a small source repeats
  sooner than a large one; none is exhausted).
- Truncated responses (``buffer.truncated``): ``mask`` takes them out of balancing,
  calibration and both loss terms (they stay in the SPEC §1 denominator); ``incorrect``
  grades them incorrect; ``keep`` leaves them be. A group with a prompt the engine
  refused is dropped and counted.
- Teacher failures (SPEC §1: A_t = 0) are counted per teacher over a window of its
  last responses; past ``teacher_max_failed_frac`` the run stops, naming the teacher.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from buffers.balance import balance_group
from buffers.calibration import calibrate
from buffers.records import Accounted, Outcome, Prompt, ScoredRollout, TrainBatch, TrainSample
from buffers.scoring import mix_metrics, routing_metrics
from configs.schema import BufferConfig


class TeacherFailureError(RuntimeError):
    """Too many of a teacher's recent responses failed: the run stops instead of training on zeros."""


class PromptSource(Protocol):
    """What the buffer draws prompts from (``buffers.dataset.LoadedSource``, ``InMemorySource``)."""

    label: str
    weight: float

    def __len__(self) -> int: ...

    def prompt(self, i: int) -> Prompt: ...


@dataclass
class InMemorySource:
    """Prompts already in memory (tests, offline tools)."""

    prompts: list[Prompt]
    label: str = "prompts"
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.prompts)

    def prompt(self, i: int) -> Prompt:
        return self.prompts[i]


@dataclass
class _Cursor:
    """A source's place in its current shuffled epoch (the order is a function of seed and epoch)."""

    epoch: int = 0
    pos: int = 0
    order: np.ndarray | None = None

log = logging.getLogger(__name__)


@dataclass
class _Group:
    prompt: Prompt
    rollouts: list[ScoredRollout]
    keep: list[bool]  # §3.2 balancing
    correct: list[bool]  # the outcome each response counts with (buffer.truncated=incorrect applied)
    excluded: list[bool]  # truncated under buffer.truncated=mask: out of balancing, calibration, loss


class ReplayBuffer:
    def __init__(
        self, sources: Sequence[PromptSource] | list[Prompt], cfg: BufferConfig, *, group_size: int,
        prompts_per_step: int, seed: int = 0
    ) -> None:
        self.cfg, self.n, self.B = cfg, group_size, prompts_per_step
        self.rng = random.Random(seed)
        self.seed = seed
        if sources and isinstance(sources[0], Prompt):
            sources = [InMemorySource(list(sources))]
        self.sources = list(sources)
        self.cursors = [_Cursor() for _ in self.sources]
        self.queue: deque[Prompt] = deque()  # requeued prompts, served before new draws
        self.epoch = 0  # passes started, over all sources
        self.teacher_window: dict[str, deque[bool]] = defaultdict(lambda: deque(maxlen=cfg.teacher_failure_window))
        self.next_uid = 0
        self.version = 0
        self.running: dict[int, Prompt] = {}
        self.pending: dict[int, list[ScoredRollout]] = {}
        self.held: dict[int, _Group] = {}  # complete, waiting for an earlier admission to complete
        self.ready: deque[_Group] = deque()  # released in admission order, batched first-come
        self.accepted = 0
        self.counters: Counter[str] = Counter()
        self.accounting: list[Accounted] = []
        self._last_metrics: dict[str, float] = {}

    def _account(self, prompt: Prompt, outcome: Outcome) -> None:
        self.accounting.append(Accounted(prompt.id, prompt.uid, prompt.epoch, outcome))

    # -- admission (SPEC §2) ------------------------------------------------------------------
    def capacity(self) -> int:
        return (self.cfg.max_lag + self.version + 1) * self.B - (self.accepted + len(self.running))

    def admit(self, max_prompts: int) -> list[Prompt]:
        """Up to ``max_prompts`` prompts, as many as admission control allows now."""
        k = max(0, min(max_prompts, self.capacity()))
        out = []
        for _ in range(k):
            p = self.queue.popleft() if self.queue else self._draw()
            p = replace(p, uid=self.next_uid)
            self.next_uid += 1
            self.running[p.uid] = p
            out.append(p)
        return out

    def _draw(self) -> Prompt:
        """The next prompt of a source chosen by weight (each source in its own shuffled epochs)."""
        s = self.rng.choices(range(len(self.sources)), weights=[src.weight for src in self.sources])[0]
        c, src = self.cursors[s], self.sources[s]
        if c.order is None or c.pos >= len(c.order):
            c.epoch, c.pos = c.epoch + 1, 0
            c.order = self._order(s, c.epoch)
            self.epoch += 1
        i = int(c.order[c.pos])
        c.pos += 1
        return replace(src.prompt(i), epoch=c.epoch)

    def _order(self, s: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, s, epoch]).permutation(len(self.sources[s]))

    def requeue(self, prompts: list[Prompt]) -> None:
        """Prompts whose generation was lost (a dead sampler): back to the front of the queue."""
        for p in reversed(prompts):  # appended at the front: they keep their order
            if self.running.pop(p.uid, None) is not None:
                self.pending.pop(p.uid, None)
                self._account(p, "requeued")
                self.queue.appendleft(replace(p, uid=-1))
                self.counters["requeued"] += 1
        self._release()

    # -- collection ---------------------------------------------------------------------------
    def add(self, scored: list[ScoredRollout]) -> int:
        """Add scored responses; returns how many groups became complete."""
        done = 0
        self._count_teacher_failures(scored)
        for s in scored:
            if s.verified.reason == "unverified":
                raise RuntimeError("a scored rollout reached the buffer without its verdict: a chain that grades "
                                   "and scores side by side must be added as ChainRefs (buffers/scoring.py)")
            uid = s.rollout.prompt.uid
            if uid not in self.running:
                self.counters["orphan_responses"] += 1
                continue
            self.pending.setdefault(uid, []).append(s)
            if len(self.pending[uid]) == self.n:
                self._complete(uid)
                done += 1
        return done

    def _count_teacher_failures(self, scored: list[ScoredRollout]) -> None:
        """SPEC §1 turns a failed teacher call into A_t = 0; past the threshold that is no signal at all."""
        cfg = self.cfg
        for s in scored:
            if s.rollout.finish_reason == "refused":
                continue
            win = self.teacher_window[s.teacher_name]
            win.append(s.status == "failed")
            failed = sum(win)
            if failed > cfg.teacher_max_failed_frac * cfg.teacher_failure_window:
                raise TeacherFailureError(
                    f"teacher {s.teacher_name!r} failed on {failed} of its last {len(win)} responses (limit: "
                    f"{cfg.teacher_max_failed_frac:.0%} of {cfg.teacher_failure_window}); its actor log has the "
                    f"errors. Fix the teacher (path, memory, max_model_len) or raise buffer.teacher_max_failed_frac")

    def _complete(self, uid: int) -> None:
        prompt = self.running.pop(uid)
        rollouts = sorted(self.pending.pop(uid), key=lambda s: s.rollout.sample_idx)
        if any(s.rollout.finish_reason == "refused" for s in rollouts):
            # the engine would not take this prompt (sampler log says why): it fails alone
            self._account(prompt, "dropped_refused")
            self.counters["refused_prompts"] += 1
            self._release()
            return
        mode = self.cfg.truncated
        trunc = [s.rollout.truncated for s in rollouts]
        excluded = [t and mode == "mask" for t in trunc]
        correct = [s.correct and not (t and mode == "incorrect") for s, t in zip(rollouts, trunc)]
        keep = [not e for e in excluded]
        if self.cfg.balance:
            idx = [i for i, e in enumerate(excluded) if not e]
            for i, k in zip(idx, balance_group([correct[i] for i in idx], self.cfg.balance_ratio, self.rng)):
                keep[i] = k
        self.held[uid] = _Group(prompt, rollouts, keep, correct, excluded)
        self.accepted += 1
        self._release()

    def _release(self) -> None:
        """Move complete groups to ``ready`` in admission order: every held group admitted before
        the oldest prompt still running (uids grow with admission; ``running`` keeps that order)."""
        head = next(iter(self.running), None)
        for uid in sorted(self.held):
            if head is not None and uid > head:
                break
            self.ready.append(self.held.pop(uid))

    # -- batches ------------------------------------------------------------------------------
    def num_ready(self) -> int:
        return len(self.ready)

    def get_batch(self) -> TrainBatch | None:
        """B complete groups, lag-checked, balanced and calibrated; None if fewer are ready."""
        if len(self.ready) < self.B:
            return None
        groups = [self.ready.popleft() for _ in range(self.B)]
        m: dict[str, float] = {}
        lags, dropped = [], 0
        kept_groups: list[_Group] = []
        for g in groups:
            glag = [self.version - s.rollout.policy_version for s in g.rollouts]
            lags.extend(glag)
            if max(glag) > self.cfg.max_lag:
                # SPEC §2: responses that still arrive with lag > η are dropped and counted.
                dropped += len(g.rollouts)
                self._account(g.prompt, "dropped_stale")
                continue
            kept_groups.append(g)
        self.counters["dropped_stale_responses"] += dropped

        # (group index, response, balancing keep, counted outcome, excluded by buffer.truncated=mask)
        flat = [(gi, s, k, c, e) for gi, g in enumerate(kept_groups)
                for s, k, c, e in zip(g.rollouts, g.keep, g.correct, g.excluded)]
        ok_idx = [i for i, (_, s, _, _, e) in enumerate(flat) if s.status == "ok" and not e]
        returns = [flat[i][1].distill_return() for i in ok_idx]
        cres = calibrate(
            returns, [flat[i][3] for i in ok_idx], [flat[i][0] for i in ok_idx], self.cfg.calibration
        )
        shift = [0.0] * len(flat)
        calib_keep = [True] * len(flat)
        for j, i in enumerate(ok_idx):
            shift[i], calib_keep[i] = cres.shift[j], cres.keep[j]

        samples = []
        for i, (gi, s, k, c, e) in enumerate(flat):
            r, t = s.rollout, s.teacher
            samples.append(
                TrainSample(
                    prompt_ids=r.prompt_ids,
                    response_ids=r.response_ids,
                    behaviour_logprobs_T=r.behaviour_logprobs_T,
                    teacher_logprobs_T=None if t is None else t.logprobs_T,
                    topk_ids_TK=None if t is None else t.topk_ids_TK,
                    topk_logprobs_TK=None if t is None else t.topk_logprobs_TK,
                    advantage_shift=shift[i],
                    weight=1.0 if (k and calib_keep[i] and not e) else 0.0,
                    policy_version=r.policy_version,
                    domain=r.prompt.domain,
                    correct=c,
                    prompt_id=r.prompt.id,
                    excluded=e,
                    behaviour_raw=r.behaviour == "prefill",
                    teacher_weights_T=None if t is None else t.weights_T,
                )
            )
        for g in kept_groups:
            self._account(g.prompt, "trained")

        # -- metrics (SPEC §7) --
        n_total = len(samples)
        corr = [c for *_, c, _ in flat]
        kept = [smp.weight > 0 for smp in samples]
        m["lag/min"], m["lag/mean"], m["lag/max"] = (min(lags), float(np.mean(lags)), max(lags)) if lags else (0, 0, 0)
        m["lag/dropped"] = dropped
        m["balance/correct_frac_before"] = float(np.mean(corr)) if corr else 0.0
        kc = [c for c, k in zip(corr, kept) if k]
        m["balance/correct_frac_after"] = float(np.mean(kc)) if kc else 0.0
        m["balance/masked_frac"] = 1.0 - float(np.mean([k for _, _, k, _, _ in flat])) if flat else 0.0
        m["rollout/truncated_frac"] = float(np.mean([s.rollout.truncated for _, s, *_ in flat])) if flat else 0.0
        m["rollout/excluded_frac"] = float(np.mean([e for *_, e in flat])) if flat else 0.0
        m["margin/gap_before"] = float(np.mean(cres.gap_before)) if cres.gap_before else 0.0
        m["margin/gap_after"] = float(np.mean(cres.gap_after)) if cres.gap_after else 0.0
        m["margin/shift_mean"] = float(np.mean(np.abs(cres.shift))) if cres.shift else 0.0
        m["margin/groups_shifted_frac"] = cres.n_shifted / cres.n_sets if cres.n_sets else 0.0
        m["margin/sets_mixed_frac"] = (cres.n_sets / max(1, len(kept_groups))
                                       if self.cfg.calibration.scope == "group" else 0.0)
        m["margin/responses_masked_frac"] = 1.0 - float(np.mean(cres.keep)) if cres.keep else 0.0
        rc = [ret for ret, j in zip(returns, ok_idx) if flat[j][3]]
        ri = [ret for ret, j in zip(returns, ok_idx) if not flat[j][3]]
        if rc:
            m["opd/return_correct"] = float(np.mean(rc))
        if ri:
            m["opd/return_incorrect"] = float(np.mean(ri))
        failed = sum(1 for _, s, *_ in flat if s.status == "failed")
        m["teacher/failed_responses"] = failed
        self.counters["teacher_failed_responses"] += failed
        by_dom: dict[str, list[tuple[ScoredRollout, bool]]] = defaultdict(list)
        for _, s, _, c, _ in flat:
            by_dom[s.rollout.prompt.domain].append((s, c))
        for d, ss in by_dom.items():
            m[f"accuracy/train/{d}"] = float(np.mean([c for _, c in ss]))
            kls = [-s.distill_return() for s, _ in ss if s.status == "ok"]
            if kls:
                # sampled-token estimate of KL(πS ‖ πT) = E_S[log πS − log πT] per token
                m[f"teacher/{d}/kl"] = float(np.mean(kls))
        m.update(mix_metrics(s for _, s, *_ in flat))  # SPEC §5 teacher weights, §6 extrapolation cliff
        m.update(routing_metrics(s for _, s, *_ in flat))  # DOPD regime shares
        m["buffer/ready_groups"] = len(self.ready)
        m["batch/responses"], m["batch/tokens"] = float(n_total), float(sum(len(x.response_ids) for x in samples))
        self._last_metrics = m
        return TrainBatch(samples=samples, n_responses_total=n_total, prompt_ids=[g.prompt.id for g in kept_groups])

    def last_batch_metrics(self) -> dict[str, float]:
        """Metrics of the last batch handed out (the batch itself goes straight to the learner)."""
        return dict(self._last_metrics)

    # -- checkpoint ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Everything needed to continue: dataset cursor, ready groups, in-flight prompts, counters,
        accounting, RNG. Partial groups are not saved: their prompts are requeued on load."""
        state = {
            "queue": list(self.queue), "epoch": self.epoch, "next_uid": self.next_uid, "version": self.version,
            "cursors": [(c.epoch, c.pos) for c in self.cursors], "sources": [s.label for s in self.sources],
            "running": list(self.running.values()), "accepted": self.accepted,
            # held groups are released on load: every prompt admitted before them is requeued there
            "ready": list(self.ready) + [self.held[u] for u in sorted(self.held)],
            "counters": dict(self.counters), "accounting": list(self.accounting), "rng": self.rng.getstate(),
        }
        with open(path, "wb") as f:
            pickle.dump(state, f)

    def load(self, path: str) -> int:
        """Restore a saved state; prompts that were in flight go back to the front of the queue.
        Returns how many were requeued."""
        with open(path, "rb") as f:
            st = pickle.load(f)
        if st["sources"] != [s.label for s in self.sources]:
            raise ValueError(f"buffer checkpoint {path} was written for data sources {st['sources']}, this run has "
                             f"{[s.label for s in self.sources]}; resume with the run's own data config")
        self.queue = deque(st["queue"])
        self.epoch, self.next_uid, self.version = st["epoch"], st["next_uid"], st["version"]
        self.cursors = [_Cursor(e, p, self._order(i, e) if e else None) for i, (e, p) in enumerate(st["cursors"])]
        self.ready, self.accepted = deque(st["ready"]), st["accepted"]
        self.counters, self.accounting = Counter(st["counters"]), [Accounted(*a) for a in st["accounting"]]
        self.rng.setstate(st["rng"])
        self.running, self.pending, self.held = {p.uid: p for p in st["running"]}, {}, {}
        lost = list(self.running.values())
        self.requeue(lost)
        return len(lost)

    # -- learner progress ---------------------------------------------------------------------
    def set_version(self, version: int) -> None:
        self.version = version

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running),
            "ready": len(self.ready),
            "held": len(self.held),
            "accepted": self.accepted,
            "epoch": self.epoch,
            **{f"count/{k}": v for k, v in self.counters.items()},
        }

    def get_accounting(self) -> list[Accounted]:
        return list(self.accounting)

    def ready_flag(self) -> bool:
        return True
