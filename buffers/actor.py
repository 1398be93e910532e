"""The replay buffer as the pipeline's Ray actor: it owns the waiting, not the driver.

``ReplayBuffer`` (buffers/replay.py) is the synchronous core: admission control, grouping,
in-order release, balancing, calibration, lag checks, accounting. ``BufferActor`` adds the
three waits the driver's loops need, as coroutines of an async Ray actor (one thread, one
event loop: no locks; a call that waits never blocks another):

- ``admit_wait``: prompts as soon as admission control (SPEC §2) allows; a rollout loop
  parks here while the learner is η versions behind;
- ``add_chain``: awaits one rollout chunk's sampler → verifier → teacher chain and adds the
  scored groups (a domain with several scorers: every scorer's answer, combined into one score
  per response by buffers/scoring.py, SPEC §5 / §6 ``extrapolated``). The refs arrive inside a list, so Ray does not resolve them before the
  call starts and a slow chain holds back no other buffer call; a chain whose actor died is
  requeued here (only the prompts whose group did not complete) and reported to the driver;
- ``next_batch``: B released groups, lag-checked, balanced and calibrated, returned as two
  objects: the batch (passed by ref straight to the learner) and its metrics (to the driver).
"""

from __future__ import annotations

import asyncio

import ray

from buffers.records import Prompt, ScoredRollout, TrainBatch
from buffers.replay import ReplayBuffer
from buffers.scoring import ChainRefs, ScorerRefs, combine, with_verdicts
from learner.errors import PartialWeightsError


def _recoverable(e: BaseException | None) -> bool:
    """Whether a chain failed because one of its actors died (Ray restarts it) or a sampler's (or
    following teacher's) weights were partial; the error or any cause Ray chained to it."""
    while e is not None:
        if isinstance(e, (ray.exceptions.RayActorError, PartialWeightsError)):
            return True
        e = getattr(e, "cause", None)
    return False


class BufferActor(ReplayBuffer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._open = True
        self._wake: asyncio.Event | None = None

    # -- waiting ----------------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake every waiter (admission, batch): they re-check their condition."""
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    async def _changed(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        await self._wake.wait()

    def open_admission(self) -> None:
        self._open = True

    def close_admission(self) -> None:
        """End of training: parked ``admit_wait`` calls return no prompts, so rollout loops end."""
        self._open = False
        self._notify()

    async def admit_wait(self, max_prompts: int) -> list[Prompt]:
        """Up to ``max_prompts`` prompts, waiting until admission control (SPEC §2) allows at least
        one; ``[]`` once admission is closed."""
        while self._open:
            prompts = self.admit(max_prompts)
            if prompts:
                return prompts
            await self._changed()
        return []

    async def add_chain(self, uids: list[int], scored_refs: list) -> str | None:
        """Add the scored groups of one chunk (one ref per domain, or a ``ScorerRefs`` for a domain with
        several scorers) as each chain finishes.

        Returns None, or what failed when a sampler, verifier or teacher of the chain died or a
        sampler's last weight update failed part-way (``PartialWeightsError``): the chunk's prompts
        whose group did not complete are requeued (then admitted again under a new uid) and the
        driver recovers. Any other error (a bug, too many teacher
        failures) propagates and stops the run."""
        try:
            for ref in scored_refs:
                self.add(await self._scored(ref))
                self._notify()
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            if not _recoverable(e):
                raise
            self.requeue([self.running[u] for u in uids if u in self.running])
            self._notify()
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return None

    async def _scored(self, ref) -> list[ScoredRollout]:
        """One chain's scored rollouts: a teacher's answer, or every scorer's, each counted in its own
        failure window (a teacher that keeps failing still stops the run), then combined; with the
        verifier's verdicts joined in when the chain graded and scored side by side (``ChainRefs``)."""
        if isinstance(ref, ChainRefs):
            scored = await self._scored(ref.scored)
            return with_verdicts(scored, await ref.verified)
        if not isinstance(ref, ScorerRefs):
            return await ref
        answers = [await r for r in ref.refs]
        for scored in answers:
            self._count_teacher_failures(scored)
        return combine(ref.rule, answers)

    @ray.method(num_returns=2)
    async def next_batch(self) -> tuple[TrainBatch, dict[str, float]]:
        """Wait for B released groups; the batch and its metrics (SPEC §7) with the buffer's counters."""
        while len(self.ready) < self.B:
            await self._changed()
        batch = self.get_batch()
        stats = {f"buffer/{k}": float(v) for k, v in self.stats().items()}
        self._notify()
        return batch, {**self.last_batch_metrics(), **stats}

    def set_version(self, version: int) -> None:
        """A completed weight update: admission capacity grows by B (SPEC §2)."""
        super().set_version(version)
        self._notify()
