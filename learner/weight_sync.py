"""Learner → sampler weight broadcast over one torch.distributed collective.

One code path for both backends: a standalone process group (its own TCPStore,
separate from the learner's data-parallel group) whose rank 0 is learner rank 0
and whose ranks 1..N are the samplers. ``backend`` is ``gloo`` on CPU and ``nccl``
on GPUs; only the device of the staging buffers differs.

Wire format: the parameter list (name, shape, dtype) is agreed once at setup;
each sync flattens the parameters, in that order, into buckets of at most
``bucket_mb`` per dtype and broadcasts each bucket. Receivers unflatten with the
same plan. Every wait has a timeout (``weight_sync.timeout_s``); expiry raises
``WeightSyncTimeout`` naming the stage instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class WeightSyncTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Bucket:
    dtype: str
    params: tuple[ParamSpec, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


def plan_buckets(specs: list[ParamSpec], bucket_mb: float) -> list[Bucket]:
    """Group consecutive same-dtype parameters into buckets of at most ``bucket_mb`` (a larger
    single parameter gets a bucket of its own)."""
    limit = int(bucket_mb * 2**20)
    buckets: list[Bucket] = []
    cur: list[ParamSpec] = []
    cur_bytes = 0
    for s in specs:
        nbytes = s.numel * torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
        if cur and (s.dtype != cur[0].dtype or cur_bytes + nbytes > limit):
            buckets.append(Bucket(cur[0].dtype, tuple(cur)))
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += nbytes
    if cur:
        buckets.append(Bucket(cur[0].dtype, tuple(cur)))
    return buckets


def param_specs(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[ParamSpec]:
    return [ParamSpec(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in named_params]


class WeightSyncGroup:
    """One member of the broadcast group. Rank 0 sends, the others receive."""

    def __init__(
        self, *, backend: str, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight_sync.backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout)
            # The process group waits for every peer's address in the store: a peer that reached
            # the store but never created its group times out here, not in TCPStore.
            if backend == "gloo":
                self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        except Exception as e:  # noqa: BLE001 - re-raised with the stage named
            raise WeightSyncTimeout(
                f"weight sync: rank {rank} could not join the group at {master_addr}:{master_port} "
                f"within {timeout_s}s ({e}); check that every sampler and learner rank 0 started"
            ) from e
        self.backend = backend

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise WeightSyncTimeout(
                f"weight sync: {what} on rank {self.rank} failed or timed out after {self.timeout_s}s "
                f"(a peer is unresponsive or died): {e}"
            ) from e
        if ok is False:
            raise WeightSyncTimeout(f"weight sync: {what} on rank {self.rank} timed out after {self.timeout_s}s")

    def send(self, buckets: list[Bucket], tensors: dict[str, torch.Tensor]) -> int:
        """Rank 0: broadcast every bucket; returns bytes sent."""
        sent = 0
        for i, b in enumerate(buckets):
            flat = torch.cat([tensors[p.name].detach().reshape(-1).to(getattr(torch, b.dtype)) for p in b.params])
            flat = flat.to(self.device)
            self._wait(self.pg.broadcast(flat, 0), f"broadcast of bucket {i}/{len(buckets)}")
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, buckets: list[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks > 0: receive buckets in order, yield (name, tensor) views of each."""
        for i, b in enumerate(buckets):
            flat = torch.empty(b.numel, dtype=getattr(torch, b.dtype), device=self.device)
            self._wait(self.pg.broadcast(flat, 0), f"receive of bucket {i}/{len(buckets)}")
            off = 0
            for p in b.params:
                yield p.name, flat[off : off + p.numel].view(p.shape)
                off += p.numel

    def barrier_ping(self) -> float:
        """A one-element broadcast, to measure latency and check that every peer is there."""
        t = time.perf_counter()
        x = torch.zeros(1, device=self.device)
        self._wait(self.pg.broadcast(x, 0), "ping")
        return time.perf_counter() - t
