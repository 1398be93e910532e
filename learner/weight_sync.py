"""Learner → vLLM weight updates through vLLM's own weight-transfer API.

vLLM (0.32) owns the update lifecycle on the inference side: an engine created with
``weight_transfer_config`` exposes ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``, each worker (every tensor-parallel rank) holds a
``WeightTransferEngine`` that receives checkpoint-format tensors and loads them layer by layer,
and ``vllm.distributed.weight_transfer`` has the matching trainer-side engines. On GPUs we use
vLLM's ``nccl`` engines unchanged. This module holds only what vLLM does not provide:

- ``gloo``: a CPU transport with the same two halves (``GlooWeightTransferEngine`` on the
  worker, ``GlooTrainerWeightTransferEngine`` on the trainer), registered in vLLM's
  ``WeightTransferEngineFactory`` / ``WeightTransferTrainerFactory`` (``register()``; also a
  ``vllm.general_plugins`` entry point, so worker processes of a multiprocess engine have it).
  The CPU tests therefore drive the control path a cluster uses. Buckets of at most
  ``bucket_mb`` are broadcast one at a time and loaded before the next arrives: no full copy
  of the model exists on the receiver.
- ``DeepSpeedSource``: the learner's parameters as a vLLM ``WeightSource``, in the sampler's
  dtype; under ZeRO-3 each parameter is gathered (a collective on every learner rank) and
  copied before its partition is released.
- ``SamplerDrivenClient``: the trainer engines drive four calls on the inference side. The
  handshake (``init_weight_transfer_engine``) is sent to every sampler from here, each with its
  own ``rank_offset`` (vLLM's Ray client would send every engine the same one). The three
  update calls are made by the samplers themselves, in one actor task ordered by the driver
  after the sampler's generate call in progress (``Sampler.receive_weights``): a Ray actor runs
  calls of different callers in any order, and a generate slipping between ``start`` and
  ``finish`` would run on half-loaded weights.
- ``WeightSyncGroup``: a standalone gloo group (own TCPStore) whose every wait has a deadline;
  expiry raises ``WeightSyncTimeout`` naming the weight sync and the stage, never a hang.
"""

from __future__ import annotations

import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

log = logging.getLogger(__name__)


class WeightSyncTimeout(RuntimeError):
    pass


# -- bucket plan ----------------------------------------------------------------------------
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
    single parameter gets a bucket of its own). Sender and receivers compute it from the same
    parameter list, so only the list travels."""
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- a gloo group with deadlines ------------------------------------------------------------
class WeightSyncGroup:
    """One member of a standalone broadcast group (rank 0 sends, the others receive)."""

    def __init__(self, *, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout)
            # The process group waits for every peer's address in the store: a peer that reached
            # the store but never created its group times out here, not in TCPStore.
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        except Exception as e:  # noqa: BLE001 - re-raised with the stage named
            raise WeightSyncTimeout(
                f"weight sync: rank {rank} could not join the group at {master_addr}:{master_port} "
                f"within {timeout_s}s ({e}); check that every sampler and learner rank 0 started"
            ) from e

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

    def send(self, buckets: list[Bucket], pairs: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Rank 0: broadcast every bucket, filled from ``pairs`` in plan order; returns bytes sent.
        One bucket is alive at a time."""
        sent = 0
        for i, b in enumerate(buckets):
            parts = []
            for p in b.params:
                name, t = next(pairs)
                if name != p.name or tuple(t.shape) != p.shape:
                    raise ValueError(f"weight sync: the learner yielded {name} {tuple(t.shape)} where the plan "
                                     f"has {p.name} {p.shape}; parameters must come in metadata order")
                parts.append(t.detach().reshape(-1).to(getattr(torch, b.dtype)))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            del parts
            self._wait(self.pg.broadcast(flat, 0), f"broadcast of bucket {i}/{len(buckets)}")
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, buckets: list[Bucket]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks > 0: receive buckets in order; yields each bucket's (name, view) pairs (the
        caller loads them before asking for the next bucket, which reuses no memory of this one)."""
        for i, b in enumerate(buckets):
            flat = torch.empty(b.numel, dtype=getattr(torch, b.dtype))
            self._wait(self.pg.broadcast(flat, 0), f"receive of bucket {i}/{len(buckets)}")
            off, views = 0, []
            for p in b.params:
                views.append((p.name, flat[off: off + p.numel].view(p.shape)))
                off += p.numel
            yield views

    def close(self) -> None:
        self.pg = None


# -- the gloo engine pair (vLLM interfaces) ---------------------------------------------------
@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side of the handshake: the group's address, this engine's first rank, the wire
    bucket size and the deadline of every wait."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_mb: float = 64.0
    timeout_s: float = 120.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One update: the parameters in send order (the same fields as vLLM's NCCL update info)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(f"names ({len(self.names)}), dtype_names ({len(self.dtype_names)}) and shapes "
                             f"({len(self.shapes)}) must have one entry per parameter")

    def specs(self) -> list[ParamSpec]:
        return [ParamSpec(n, tuple(s), d) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """vLLM worker-side engine over gloo: checkpoint-format buckets loaded with the model's own
    ``load_weights`` inside vLLM's layerwise reload (the CPU backend repacks linear weights
    after loading; a plain ``load_weights`` outside the reload lifecycle breaks them)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: WeightSyncGroup | None = None
        self.bucket_mb = 64.0

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_mb = init_info.bucket_mb
        self.group = WeightSyncGroup(master_addr=init_info.master_address, master_port=init_info.master_port,
                                     rank=rank, world_size=init_info.world_size, timeout_s=init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(); gloo on CPU is synchronous.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight sync: update_weights before init_weight_transfer_engine")
        for views in self.group.receive(plan_buckets(update_info.specs(), self.bucket_mb)):
            self.model.load_weights(views)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side of the handshake; ``world_size`` counts the sender and every worker rank."""

    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    bucket_mb: float = 64.0
    timeout_s: float = 120.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer-side gloo engine: the same round trip as vLLM's NCCL trainer engine (start,
    update concurrently with the broadcast, finish), one bucket in memory at a time."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, bucket_mb: float) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_mb = bucket_mb
        self.group: WeightSyncGroup | None = None
        self.bytes_sent = 0

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the gloo trainer engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_mb=init_info.bucket_mb)
        if not engine.is_sender:
            return engine
        worker = GlooWeightTransferInitInfo(master_address=init_info.master_address,
                                            master_port=init_info.master_port, rank_offset=1,
                                            world_size=init_info.world_size, bucket_mb=init_info.bucket_mb,
                                            timeout_s=init_info.timeout_s)
        # The workers block in the rendezvous inside init_weight_transfer_engine: open our end meanwhile.
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(client.init_weight_transfer_engine, asdict(worker))
            engine.group = WeightSyncGroup(master_addr=init_info.master_address, master_port=init_info.master_port,
                                           rank=0, world_size=init_info.world_size, timeout_s=init_info.timeout_s)
            fut.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # ZeRO-3: every rank takes part in each gather
                pass
            return
        assert self.group is not None
        info = GlooWeightTransferUpdateInfo(**update_info_of(meta))
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            fut = exe.submit(self.client.update_weights, asdict(info))
            self.bytes_sent = self.group.send(plan_buckets(info.specs(), self.bucket_mb), iter(self.source))
            fut.result()
        finally:
            exe.shutdown(wait=False)  # a failed broadcast leaves the peer blocked: never join it here
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def register() -> None:
    """Register the gloo engines in vLLM's factories (idempotent; vLLM may load plugins more
    than once per process)."""
    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", GlooTrainerWeightTransferEngine)


# -- the learner's side ---------------------------------------------------------------------
class DeepSpeedSource(WeightSource):
    """The learner's parameters (Hugging Face names) as a vLLM ``WeightSource``, cast to the
    samplers' dtype so the wire carries what the engine holds (bf16 on GPU, not the fp32
    master copy). Under ZeRO-3 each parameter is gathered with ``GatheredParameters`` (a
    collective: every learner rank iterates in the same order) and copied out before its
    partition is released; at most one parameter is gathered at a time."""

    def __init__(self, module: torch.nn.Module, *, dtype: torch.dtype, zero3: bool) -> None:
        self.module, self.dtype, self.zero3 = module, dtype, zero3

    def metadata(self) -> list[ParamMeta]:
        # ZeRO-3 partitions parameters in place (p.shape is then (0,)); ds_shape keeps the full shape.
        return [ParamMeta(n, self.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                for n, p in self.module.named_parameters()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.module.named_parameters():
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.detach().to(self.dtype, copy=True)
            else:
                t = p.detach().to(self.dtype)
            yield name, t if t.is_contiguous() else t.contiguous()


@dataclass
class SamplerDrivenClient:
    """The ``VLLMWeightSyncClient`` the learner's trainer engine drives (see the module docstring).

    ``init_weight_transfer_engine`` reaches every receiver (a Ray actor with that method) with
    its own ``rank_offset`` (1 + the worker ranks before it) and fails within ``timeout_s``
    naming the weight sync. The update calls are made by each receiver in its own task; here they
    only record the last update's info, which receivers get once, at the handshake."""

    receivers: list[Any]
    worker_ranks: list[int]  # workers (TP × PP ranks) per receiver
    timeout_s: float
    update_info: dict[str, Any] = field(default_factory=dict)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        import ray

        offsets, refs = 1, []
        for h, n in zip(self.receivers, self.worker_ranks):
            refs.append(h.init_weight_transfer_engine.remote({**init_info, "rank_offset": offsets}, self.update_info))
            offsets += n
        try:
            ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise WeightSyncTimeout(f"weight sync: the samplers did not join the transfer group within "
                                    f"{self.timeout_s}s") from e

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info) -> None:
        pass

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass


def update_info_of(meta: list[ParamMeta]) -> dict[str, Any]:
    """The per-update info every backend here takes (names, dtypes, shapes), as a plain dict."""
    return {"names": [m.name for m in meta], "dtype_names": [_dtype_name(m.dtype) for m in meta],
            "shapes": [list(m.shape) for m in meta]}


def trainer_init_info(backend: str, *, rank: int, master_address: str, master_port: int, world_size: int,
                      bucket_mb: float, timeout_s: float) -> TrainerInitInfo:
    """The trainer-side init info of ``backend`` (vLLM's NCCL one, or ours for gloo)."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, packed=True,
                                   packed_buffer_size_bytes=int(bucket_mb * 2**20))
    if backend == "gloo":
        return GlooTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, bucket_mb=bucket_mb, timeout_s=timeout_s)
    raise ValueError(f"weight_sync.backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")


def run_with_deadline(fn, timeout_s: float, what: str):
    """Run ``fn`` with a deadline (vLLM's NCCL communicator waits without one): expiry raises
    ``WeightSyncTimeout`` naming ``what``; the stuck thread is abandoned with its group."""
    exe = ThreadPoolExecutor(max_workers=1)
    t0 = time.perf_counter()
    fut = exe.submit(fn)
    try:
        return fut.result(timeout=timeout_s)
    except TimeoutError as e:
        raise WeightSyncTimeout(f"weight sync: {what} did not finish within {timeout_s}s "
                                f"(waited {time.perf_counter() - t0:.0f}s; a sampler is unresponsive or died)") from e
    finally:
        exe.shutdown(wait=False)
