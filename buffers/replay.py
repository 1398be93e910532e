"""The correctness-balanced replay buffer (an actor): admission, grouping, balancing,
calibration, lag control, batches.

Invariants it keeps:
- Admission control (SPEC §2, AReaL's rule): a prompt is handed to a sampler only
  while ``accepted + running < (η + v + 1)·B``; so with η = 0 every trained token
  has lag 0, and in general lag never exceeds η unless something went wrong (a
  response that does arrive with lag > η is dropped and counted).
- A group is released only when all n responses of its prompt are verified and
  scored; online balancing (SPEC §3.2) acts per group, margin calibration (SPEC §4)
  on the batch (``group`` or ``global`` scope).
- Every admitted prompt ends in exactly one outcome in ``accounting``: trained,
  dropped (with its reason) or requeued (then admitted again under a new uid).
"""

from __future__ import annotations

import logging
import pickle
import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass

import numpy as np

from buffers.balance import balance_group
from buffers.calibration import CalibrationSettings, calibrate
from buffers.records import Prompt, ScoredRollout, TrainBatch, TrainSample
from configs.schema import BufferConfig

log = logging.getLogger(__name__)


@dataclass
class _Group:
    prompt: Prompt
    rollouts: list[ScoredRollout]
    keep: list[bool]  # §3.2 balancing


class ReplayBuffer:
    def __init__(
        self, prompts: list[Prompt], cfg: BufferConfig, *, group_size: int, prompts_per_step: int, seed: int = 0
    ) -> None:
        self.cfg, self.n, self.B = cfg, group_size, prompts_per_step
        self.rng = random.Random(seed)
        self.dataset = list(prompts)
        self.queue: deque[Prompt] = deque()
        self.epoch = 0
        self.next_uid = 0
        self.version = 0
        self.running: dict[int, Prompt] = {}
        self.pending: dict[int, list[ScoredRollout]] = {}
        self.ready: deque[_Group] = deque()
        self.accepted = 0
        self.counters: Counter[str] = Counter()
        self.accounting: list[tuple[str, int, int, str]] = []  # (prompt id, uid, epoch, outcome)
        self._last_metrics: dict[str, float] = {}
        self.calib = CalibrationSettings(
            mode=cfg.calibration.mode,
            direction=cfg.calibration.direction,
            mask_form=cfg.calibration.mask_form,
            statistic=cfg.calibration.statistic,
            scope=cfg.calibration.scope,
            delta=cfg.calibration.delta,
            greedy_min_frac=cfg.calibration.greedy_min_frac,
        )

    # -- admission (SPEC §2) ------------------------------------------------------------------
    def capacity(self) -> int:
        return (self.cfg.max_lag + self.version + 1) * self.B - (self.accepted + len(self.running))

    def admit(self, max_prompts: int) -> list[Prompt]:
        """Up to ``max_prompts`` prompts, as many as admission control allows now."""
        k = max(0, min(max_prompts, self.capacity()))
        out = []
        for _ in range(k):
            if not self.queue:
                self.epoch += 1
                order = [Prompt(**{**p.__dict__, "epoch": self.epoch}) for p in self.dataset]
                self.rng.shuffle(order)
                self.queue.extend(order)
            p = self.queue.popleft()
            p = Prompt(**{**p.__dict__, "uid": self.next_uid})
            self.next_uid += 1
            self.running[p.uid] = p
            out.append(p)
        return out

    def requeue(self, prompts: list[Prompt]) -> None:
        """Prompts whose generation was lost (a dead sampler): back to the front of the queue."""
        for p in prompts:
            if self.running.pop(p.uid, None) is not None:
                self.pending.pop(p.uid, None)
                self.accounting.append((p.id, p.uid, p.epoch, "requeued"))
                self.queue.appendleft(Prompt(**{**p.__dict__, "uid": -1}))
                self.counters["requeued"] += 1

    # -- collection ---------------------------------------------------------------------------
    def add(self, scored: list[ScoredRollout]) -> int:
        """Add scored responses; returns how many groups became complete."""
        done = 0
        for s in scored:
            uid = s.rollout.prompt.uid
            if uid not in self.running:
                self.counters["orphan_responses"] += 1
                continue
            self.pending.setdefault(uid, []).append(s)
            if len(self.pending[uid]) == self.n:
                self._complete(uid)
                done += 1
        return done

    def _complete(self, uid: int) -> None:
        prompt = self.running.pop(uid)
        rollouts = sorted(self.pending.pop(uid), key=lambda s: s.rollout.sample_idx)
        correct = [s.correct for s in rollouts]
        keep = balance_group(correct, self.cfg.balance_ratio, self.rng) if self.cfg.balance else [True] * len(correct)
        self.ready.append(_Group(prompt, rollouts, keep))
        self.accepted += 1

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
                self.accounting.append((g.prompt.id, g.prompt.uid, g.prompt.epoch, "dropped_stale"))
                continue
            kept_groups.append(g)
        self.counters["dropped_stale_responses"] += dropped

        flat = [(gi, s, k) for gi, g in enumerate(kept_groups) for s, k in zip(g.rollouts, g.keep)]
        ok_idx = [i for i, (_, s, _) in enumerate(flat) if s.status == "ok"]
        returns = [flat[i][1].distill_return() for i in ok_idx]
        cres = calibrate(
            returns, [flat[i][1].correct for i in ok_idx], [flat[i][0] for i in ok_idx], self.calib
        )
        shift = [0.0] * len(flat)
        calib_keep = [True] * len(flat)
        for j, i in enumerate(ok_idx):
            shift[i], calib_keep[i] = cres.shift[j], cres.keep[j]

        samples = []
        for i, (gi, s, k) in enumerate(flat):
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
                    weight=1.0 if (k and calib_keep[i]) else 0.0,
                    policy_version=r.policy_version,
                    domain=r.prompt.domain,
                    correct=s.correct,
                    prompt_id=r.prompt.id,
                )
            )
        for g in kept_groups:
            self.accounting.append((g.prompt.id, g.prompt.uid, g.prompt.epoch, "trained"))

        # -- metrics (SPEC §7) --
        n_total = len(samples)
        corr = [s.correct for _, s, _ in flat]
        kept = [smp.weight > 0 for smp in samples]
        m["lag/min"], m["lag/mean"], m["lag/max"] = (min(lags), float(np.mean(lags)), max(lags)) if lags else (0, 0, 0)
        m["lag/dropped"] = dropped
        m["balance/correct_frac_before"] = float(np.mean(corr)) if corr else 0.0
        kc = [c for c, k in zip(corr, kept) if k]
        m["balance/correct_frac_after"] = float(np.mean(kc)) if kc else 0.0
        m["balance/masked_frac"] = 1.0 - float(np.mean([k for _, _, k in flat])) if flat else 0.0
        m["margin/gap_before"] = float(np.mean(cres.gap_before)) if cres.gap_before else 0.0
        m["margin/gap_after"] = float(np.mean(cres.gap_after)) if cres.gap_after else 0.0
        m["margin/shift_mean"] = float(np.mean(np.abs(cres.shift))) if cres.shift else 0.0
        m["margin/groups_shifted_frac"] = cres.n_shifted / cres.n_sets if cres.n_sets else 0.0
        m["margin/sets_mixed_frac"] = cres.n_sets / max(1, len(kept_groups)) if self.calib.scope == "group" else 0.0
        m["margin/responses_masked_frac"] = 1.0 - float(np.mean(cres.keep)) if cres.keep else 0.0
        rc = [ret for ret, j in zip(returns, ok_idx) if flat[j][1].correct]
        ri = [ret for ret, j in zip(returns, ok_idx) if not flat[j][1].correct]
        if rc:
            m["opd/return_correct"] = float(np.mean(rc))
        if ri:
            m["opd/return_incorrect"] = float(np.mean(ri))
        failed = sum(1 for _, s, _ in flat if s.status == "failed")
        m["teacher/failed_responses"] = failed
        self.counters["teacher_failed_responses"] += failed
        by_dom: dict[str, list[ScoredRollout]] = defaultdict(list)
        for _, s, _ in flat:
            by_dom[s.rollout.prompt.domain].append(s)
        for d, ss in by_dom.items():
            m[f"accuracy/train/{d}"] = float(np.mean([s.correct for s in ss]))
            kls = [-s.distill_return() for s in ss if s.status == "ok"]
            if kls:
                # sampled-token estimate of KL(πS ‖ πT) = E_S[log πS − log πT] per token
                m[f"teacher/{d}/kl"] = float(np.mean(kls))
        m["buffer/ready_groups"] = len(self.ready)
        m["batch/responses"], m["batch/tokens"] = float(n_total), float(sum(len(x.response_ids) for x in samples))
        self._last_metrics = m
        return TrainBatch(samples=samples, n_responses_total=n_total, metrics=m,
                          prompt_ids=[g.prompt.id for g in kept_groups])

    def last_batch_metrics(self) -> dict[str, float]:
        """Metrics of the last batch handed out (the batch itself goes straight to the learner)."""
        return dict(self._last_metrics)

    # -- checkpoint ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Everything needed to continue: dataset cursor, ready groups, in-flight prompts, counters,
        accounting, RNG. Partial groups are not saved: their prompts are requeued on load."""
        state = {
            "queue": list(self.queue), "epoch": self.epoch, "next_uid": self.next_uid, "version": self.version,
            "running": list(self.running.values()), "ready": list(self.ready), "accepted": self.accepted,
            "counters": dict(self.counters), "accounting": list(self.accounting), "rng": self.rng.getstate(),
        }
        with open(path, "wb") as f:
            pickle.dump(state, f)

    def load(self, path: str) -> int:
        """Restore a saved state; prompts that were in flight go back to the front of the queue.
        Returns how many were requeued."""
        with open(path, "rb") as f:
            st = pickle.load(f)
        self.queue = deque(st["queue"])
        self.epoch, self.next_uid, self.version = st["epoch"], st["next_uid"], st["version"]
        self.ready, self.accepted = deque(st["ready"]), st["accepted"]
        self.counters, self.accounting = Counter(st["counters"]), list(st["accounting"])
        self.rng.setstate(st["rng"])
        self.running, self.pending = {p.uid: p for p in st["running"]}, {}
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
            "accepted": self.accepted,
            "epoch": self.epoch,
            **{f"count/{k}": v for k, v in self.counters.items()},
        }

    def get_accounting(self) -> list[tuple[str, int, int, str]]:
        return list(self.accounting)

    def ready_flag(self) -> bool:
        return True
