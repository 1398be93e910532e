"""Where every actor runs and with what resources: the one place that turns config
into Ray placement groups and ``ray.remote(...)`` options.

Actors are plain classes elsewhere (unit tests build them without Ray); they are
made remote here, with CPUs/GPUs from the config, so the whole pipeline fits the
logical CPUs declared (STACK.md: an actor that cannot be scheduled waits forever).

Placement (``bundle_plan``, printed by ``--dry-run``): every vLLM engine (a sampler,
a teacher replica) gets a placement group of one bundle holding its
``tensor_parallel_size`` GPUs — a bundle never spans nodes, so an engine's TP
shards share a node and its NVLink — and vLLM's multiprocess executor inside the
actor runs one worker per GPU. The learner ranks share one placement group, one
bundle per rank, packed onto as few nodes as fit (DeepSpeed's collectives are
fastest within a node). Groups are reserved before any actor starts; a cluster
that cannot hold one fails with the group and the cluster's free resources named,
instead of an actor waiting forever. The verifier and the buffer are CPU-only and
placed by Ray (the buffer on the driver's node).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from actors.sampler import Sampler
from actors.teacher import Teacher
from actors.teacher_cache import CachedTeacher
from actors.verifier import Verifier
from buffers.records import Prompt
from buffers.actor import BufferActor
from buffers.replay import PromptSource
from configs.schema import CacheTeacher, RunConfig
from learner.concurrency import CONCURRENCY_GROUPS
from learner.learner import Learner
from learner.logprobs import LogitProcessing

# vLLM on CPU runs in-process inside the actor (STACK.md: 2–3 s start-up instead of 15 s);
# samplers and teachers alike.
_SAMPLER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class BundleSet:
    """One Ray placement group: its name, bundles (resources each) and strategy."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str  # STRICT_PACK: one node; PACK: as few nodes as fit

    def describe(self) -> str:
        b = ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in x.items()) + "}" for x in self.bundles)
        return f"{self.name:<26} {self.strategy:<11} [{b}]"


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def bundle_plan(cfg: RunConfig) -> list[BundleSet]:
    """The placement groups ``spawn_actors`` reserves (see the module docstring)."""
    s, lr = cfg.sampler, cfg.learner
    sets = [BundleSet(f"sampler-{i}", (_bundle(s.num_cpus, s.num_gpus),), "STRICT_PACK")
            for i in range(s.num_samplers)]
    sets += [BundleSet(f"teacher-{name}-{j}", (_bundle(t.num_cpus, t.num_gpus),), "STRICT_PACK")
             for name, t in cfg.teachers.items() for j in range(t.replicas)]
    sets.append(BundleSet("learner", tuple(_bundle(lr.num_cpus, lr.num_gpus) for _ in range(lr.world_size)), "PACK"))
    return sets


def reserve(sets: list[BundleSet], timeout_s: float, prefix: str = "") -> dict[str, Any]:
    """Create and wait for every placement group; name the ones the cluster cannot hold. Ray's
    group names are cluster-wide: ``prefix`` (run name + a random suffix) keeps two runs apart."""
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = {bs.name: placement_group(list(bs.bundles), strategy=bs.strategy, name=f"{prefix}{bs.name}")
              for bs in sets}
    refs = {bs.name: groups[bs.name].ready() for bs in sets}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        missing = [bs.describe() for bs in sets if refs[bs.name] not in ready]
        for g in groups.values():
            remove_placement_group(g)
        raise RuntimeError(
            f"the cluster cannot hold {len(missing)} placement group(s) within {timeout_s:.0f}s: "
            f"{'; '.join(missing)}. Cluster total: {ray.cluster_resources()}; free: {ray.available_resources()}. "
            f"Lower the GPUs/CPUs per role in the config or add nodes (`python scripts/train.py CONFIG --dry-run` "
            f"prints every group).")
    return groups


def _in(group, index: int) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}


def _remote(cls, num_cpus: float, num_gpus: float = 0, env: dict[str, str] | None = None, **opts: Any):
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, **opts}
    # Idle OpenMP threads must sleep, not spin: actors share cores, and a spinning pool in one
    # actor slowed a neighbour's torch step 16× here (0.17 s → 2.8 s). OMP_NUM_THREADS follows
    # the actor's CPU share.
    threads = str(max(1, int(num_cpus)))
    options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": threads,
                                           **(env or {})}}
    if any(getattr(getattr(cls, n), "__ray_concurrency_group__", None) for n in dir(cls) if not n.startswith("__")):
        return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls).options(**options)
    return ray.remote(cls).options(**options)


@dataclass
class Actors:
    samplers: list
    teachers: dict[str, list]  # teacher name → replicas
    verifier: Any
    buffer: Any
    learners: list
    groups: dict[str, Any]  # placement groups by BundleSet name (removed at shutdown)

    def all(self) -> list:
        return [*self.samplers, *(h for hs in self.teachers.values() for h in hs), self.verifier, self.buffer,
                *self.learners]


def resource_plan(cfg: RunConfig) -> list[tuple[str, int, float, float]]:
    """(role, count, cpus each, gpus each) — what ``--dry-run`` prints."""
    plan = [("sampler", cfg.sampler.num_samplers, cfg.sampler.num_cpus, cfg.sampler.num_gpus)]
    for name, t in cfg.teachers.items():
        plan.append((f"teacher:{name}", t.replicas, t.num_cpus, t.num_gpus))
    plan += [("verifier", 1, cfg.verifier.num_cpus, 0), ("buffer", 1, cfg.buffer.num_cpus, 0),
             ("learner", cfg.learner.world_size, cfg.learner.num_cpus, cfg.learner.num_gpus)]
    return plan


def _on_this_node() -> dict[str, Any]:
    """Pin an actor to the driver's node: the buffer memory-maps the sources' Arrow files that the
    driver's load wrote to this node's ``datasets`` cache (buffers/dataset.py)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def spawn_actors(cfg: RunConfig, train_sources: Sequence[PromptSource] | list[Prompt]) -> Actors:
    s = cfg.sampler
    pg = reserve(bundle_plan(cfg), cfg.run.call_timeout_s, prefix=f"{cfg.run.name}-{uuid.uuid4().hex[:8]}/")
    env = {**_SAMPLER_ENV, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
    samplers = [
        _remote(Sampler, s.num_cpus, s.num_gpus, env, max_restarts=2, **_in(pg[f"sampler-{i}"], 0)).remote(
            cfg.student.path, s, rank=i, seed=cfg.run.seed, chaos_delay_s=cfg.chaos.sampler_delay_s,
            weight_backend=cfg.weight_sync.backend)
        for i in range(s.num_samplers)
    ]
    top_k = cfg.teacher_top_k
    teachers = {
        name: [_remote(CachedTeacher, t.num_cpus, max_restarts=2, **_in(pg[f"teacher-{name}-0"], 0)).remote(
            name, t, group_size=s.n, top_k=top_k, max_new_tokens=s.max_new_tokens, max_model_len=s.max_model_len)]
        if isinstance(t, CacheTeacher) else [_remote(Teacher, t.num_cpus, t.num_gpus, {**_SAMPLER_ENV, "VLLM_CPU_KVCACHE_SPACE": str(t.kv_cache_gib)},
                       max_restarts=2, **_in(pg[f"teacher-{name}-{j}"], 0)).remote(
            name, t, top_k=top_k, max_model_len=t.max_model_len or s.max_model_len, max_new_tokens=s.max_new_tokens,
            chaos_delay_s=cfg.chaos.teacher_delay_s, seed=cfg.run.seed + j, weight_backend=cfg.weight_sync.backend)
            for j in range(t.replicas)]
        for name, t in cfg.teachers.items()
    }
    verifier = _remote(Verifier, cfg.verifier.num_cpus, max_restarts=2).remote(cfg.domains)
    buffer = _remote(BufferActor, cfg.buffer.num_cpus, **_on_this_node()).remote(
        train_sources, cfg.buffer, group_size=s.n, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.run.seed)
    learners = [
        _remote(Learner, cfg.learner.num_cpus, cfg.learner.num_gpus, **_in(pg["learner"], r)).remote(
            cfg.student.path, cfg.learner, rank=r, world_size=cfg.learner.world_size, seed=cfg.run.seed,
            total_steps=cfg.run.steps, processing=LogitProcessing(s.temperature, s.top_k, s.top_p, s.min_p))
        for r in range(cfg.learner.world_size)
    ]
    return Actors(samplers, teachers, verifier, buffer, learners, pg)


def release(actors: Actors) -> None:
    """Kill every actor and remove the placement groups."""
    from ray.util.placement_group import remove_placement_group

    for h in actors.all():
        ray.kill(h, no_restart=True)
    for g in actors.groups.values():
        remove_placement_group(g)
