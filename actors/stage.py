"""Waiting on actors with a deadline that names the stage: every wait of the driver goes
through ``get`` (blocking) or ``aget`` (a coroutine of the driver's loops)."""

from __future__ import annotations

import asyncio
import time

import ray

from learner.weight_sync import WeightSyncTimeout


class StageError(RuntimeError):
    """A stage failed or timed out; the message names it. ``actor_died`` tells a dead actor
    (recoverable for samplers, teachers and the verifier) from a hang."""

    def __init__(self, msg: str, actor_died: bool = False) -> None:
        super().__init__(msg)
        self.actor_died = actor_died


def _stage_error(e: BaseException, stage: str, timeout: float) -> BaseException:
    """The StageError for ``e`` raised while waiting on ``stage``, or ``e`` itself (a bug: re-raised as is)."""
    if isinstance(e, (ray.exceptions.GetTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return StageError(f"{stage}: no answer within {timeout:.0f}s (run.call_timeout_s); "
                          "an actor is hung or the cluster lacks resources")
    if isinstance(e, ray.exceptions.RayActorError):
        return StageError(f"{stage}: an actor died: {str(e).splitlines()[0]}", actor_died=True)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, WeightSyncTimeout):
        # A collective that timed out or lost a peer (learner/weight_sync.py): a stage failure
        # the driver may recover from (a sampler died mid-sync), not a bug to re-raise as is.
        return StageError(f"{stage}: {e.cause}")
    return e


def get(refs, stage: str, timeout: float):
    """``ray.get`` with a deadline; failures become a StageError naming ``stage``."""
    try:
        return ray.get(refs, timeout=timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        err = _stage_error(e, stage, timeout)
        if err is e:
            raise
        raise err from e


async def aget(refs, stage: str, timeout: float):
    """The awaitable form of ``get`` (one ref or a list), for the driver's loops."""
    many = isinstance(refs, list)
    fut = asyncio.gather(*(refs if many else [refs]))
    try:
        out = await asyncio.wait_for(fut, timeout)
    except (asyncio.TimeoutError, ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        err = _stage_error(e, stage, timeout)
        if err is e:
            raise
        raise err from e
    finally:
        if fut.done() and not fut.cancelled():
            fut.exception()  # read: a ref cancelled at shutdown is not logged as "exception never retrieved"
    return out if many else out[0]


async def wait_ready(handles: list, stage: str, timeout: float) -> None:
    """Wait until every actor answers ``ready``, giving restarting actors time to come back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await aget([h.ready.remote() for h in handles], stage, max(1.0, deadline - time.monotonic()))
            return
        except StageError as e:
            if not e.actor_died or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
