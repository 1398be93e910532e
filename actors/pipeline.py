"""The driver: wires every actor and runs the Uni-OPD loop, one coroutine per role.

             admit (SPEC §2)                 ┌──▶ verifier (outcome) ──────────────┐
    dataset ──▶ buffer ──prompts──▶ sampler ─┤                                     ├──▶ buffer
                  │   (vLLM, behaviour       └──▶ teacher[d] (prefill log-probs) ──┘    │
                  │    log-probs, version)       per-domain teacher (SPEC §5)           │
                  │◀── balance §3.2 · calibrate §4 · lag check §2 ──────────────────────┘
                  └──TrainBatch──▶ learner (DeepSpeed) ──weights (gloo|nccl)──▶ samplers

Roles, each a loop of ``Pipeline.train_loop``:
- rollout loops (``max_inflight_chunks`` per sampler): admit → generate → (verify ∥ score) →
  add. The buffer parks an admission until SPEC §2 allows it and releases groups in
  admission order; the scored data goes actor to actor as Ray object refs, never through
  this process.
- the trainer loop: next batch → train → weight update → buffer version → metrics.
The first loop that raises ends the run (shutdown in ``finally``); a sampler, verifier or
teacher that dies is restarted by Ray and recovered here (its prompts requeued, the
weight-sync group re-formed). Every wait has a deadline naming its stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from actors import checkpoint
from actors.evaluation import evaluate_student, evaluate_teachers
from actors.metrics import MetricsWriter
from actors.placement import Actors, bundle_plan, release, resource_plan, spawn_actors
from actors.progress import Progress, RunSummary
from actors.stage import StageError, aget, get, wait_ready
from actors.teacher import TeacherRouter
from actors.vocab_check import check_tokenizers
from buffers.dataset import LoadedSource, as_prompts, load_sources
from buffers.formatting import resolve_chat_template
from buffers.records import Prompt
from buffers.scoring import ChainRefs, ScorerRefs, scoring_rule
from configs.schema import (ConfigError, RunConfig, check_paths, combination_of, dump_config, reference_of,
                           teacher_names)

log = logging.getLogger("uniopd")

__all__ = ["Pipeline", "StageError", "describe_plan", "load_data", "run"]


def describe_plan(cfg: RunConfig) -> str:
    lines = [f"run {cfg.run.name!r}: {cfg.run.steps} steps × {cfg.data.prompts_per_step} prompts × "
             f"{cfg.sampler.n} responses, max_lag η={cfg.buffer.max_lag}", "actors:"]
    total_cpu = total_gpu = 0.0
    for role, count, cpu, gpu in resource_plan(cfg):
        lines.append(f"  {role:<22} ×{count}  cpus={cpu:g} gpus={gpu:g}")
        total_cpu += count * cpu
        total_gpu += count * gpu
    lines.append(f"  total                  cpus={total_cpu:g} gpus={total_gpu:g}")
    lines.append("placement groups (one per vLLM engine: its TP GPUs in one bundle, on one node; one for the "
                 "learner ranks):")
    lines += [f"  {bs.describe()}" for bs in bundle_plan(cfg)]
    lines.append("domains → teacher (verifier):")
    for d, c in cfg.domains.items():
        names = teacher_names(c.teacher)
        how = f", {combination_of(c.combine).summary}" if len(names) > 1 else ""
        extra = (" [privileged]" if any(getattr(cfg.teachers[t], "privileged", None) for t in names) else "") + \
            (f" [dopd with privileged student {c.routing.student}, τ={c.routing.gap_threshold:g}]"
             if c.routing.type == "dopd" else "")
        lines.append(f"  {d:<10} → {'+'.join(names):<18} ({c.verifier.type}{how}) "
                     f"{', '.join(cfg.teachers[t].path for t in names)}{extra}")
    if ref := reference_of(cfg):
        lines.append(f"  {'(π_ref)':<10} → {ref:<18} (extrapolated: scores every domain) {cfg.teachers[ref].path}")
    lines.append(f"student: {cfg.student.path}")
    total_w = sum(src.weight for src in cfg.data.train)
    lines.append(f"data (prompts ≤ {cfg.max_prompt_tokens} tokens, chat template "
                 f"{ {None: 'when the tokenizer has one', True: 'on', False: 'off'}[cfg.data.chat_template]}):")
    for src in cfg.data.train:
        dom = src.domain or f"column {src.domain_key!r}"
        lines.append(f"  train   {src.label:<12} {src.weight / total_w:6.1%}  {dom:<10} {src.path}")
    for src in cfg.data.heldout or []:
        lines.append(f"  heldout {src.label:<12}         {src.domain or src.domain_key!s:<10} {src.path}")
    lines.append(f"objective: {cfg.learner.objective.summary}; calibration: {cfg.buffer.calibration.summary}; "
                 f"balance r={cfg.buffer.balance_ratio if cfg.buffer.balance else 'off'}")
    ws, sp = cfg.weight_sync, cfg.sampler
    lines.append(f"weight sync: vLLM weight-transfer API, {ws.backend} engine, buckets of {ws.bucket_mb:g} MB, "
                 f"{ws.timeout_s:g} s deadline, learner rank 0 at {ws.master_addr}")
    lines.append(f"sampling: temperature {sp.temperature:g}, top-p {sp.top_p:g}, top-k {sp.top_k or 'off'}, min-p "
                 f"{sp.min_p:g}; tensor parallel {sp.tensor_parallel_size}, "
                 f"{'eager' if sp.enforce_eager else 'CUDA graphs'}, prefix caching "
                 f"{'on' if sp.enable_prefix_caching else 'off'}")
    return "\n".join(lines)


class Pipeline:
    """The long-lived actors and one loop per role. Built once by ``run``."""

    def __init__(self, cfg: RunConfig, actors: Actors) -> None:
        self.cfg, self.a = cfg, actors
        self.router = TeacherRouter(cfg.teacher_of_domain, actors.teachers)
        self.scoring = {d: scoring_rule(cfg, d) for d in cfg.domains}  # None: one teacher scores alone
        self.timeout = cfg.run.call_timeout_s
        self.version = 0
        self.faults = 0
        self.incarnations: list[str] = []
        self.sync_groups = 0  # weight-sync groups formed so far (a recovery forms a new one)
        self._busy0: tuple[dict[str, float], float] | None = None  # busy seconds by role when the loops began
        self._busy_pending: tuple[list, float] | None = None  # busy-time reads in flight, and when launched
        self._idle = {f"{r}/idle_frac": 0.0 for r in ("sampler", "teacher", "learner")}
        self._sync_lock, self._recover_lock = asyncio.Lock(), asyncio.Lock()

    def _following(self) -> list[tuple[str, object]]:
        """(teacher name, replica) of every teacher that is the student itself (``follow_student``)."""
        return [(name, h) for name, hs in self.a.teachers.items() if self.cfg.teachers[name].follow_student
                for h in hs]

    @property
    def receivers(self) -> list:
        """Every actor whose vLLM engine takes the learner's weights: the samplers, then the
        student-following teachers."""
        return self.a.samplers + [h for _, h in self._following()]

    @property
    def workers(self) -> list:
        """The restartable actors: samplers, teacher replicas, the verifier."""
        return self.a.samplers + [h for hs in self.a.teachers.values() for h in hs] + [self.a.verifier]

    # -- setup ---------------------------------------------------------------------------
    def start(self) -> None:
        a, t = self.a, self.timeout
        get([h.ready.remote() for h in self.workers], "actor start-up (samplers, teachers, verifier)", t)
        addr, port = get(a.learners[0].dist_address.remote(), "learner address", t)
        n_params = get([lr.init_engine.remote(addr, port) for lr in a.learners], "learner DeepSpeed init", t)[0]
        log.info("learner ready: %d parameters, world size %d", n_params, len(a.learners))
        self.incarnations = get([s.incarnation.remote() for s in self.receivers], "sampler identity", t)
        self._join_weight_sync()

    def _join_weight_sync(self) -> None:
        """Every learner rank builds its trainer-side transfer engine; rank 0 opens the group at its
        node's address ("auto") and has every sampler engine's workers (TP ranks) join it."""
        a, ws = self.a, self.cfg.weight_sync
        addr, port = get(a.learners[0].weight_sync_address.remote(ws.master_addr), "weight sync address",
                         self.timeout)
        tp = [self.cfg.sampler.tensor_parallel_size] * len(a.samplers) + \
             [self.cfg.teachers[name].tensor_parallel_size for name, _ in self._following()]
        refs = [lr.init_weight_transfer.remote(self.receivers, tp, ws, self.cfg.sampler.dtype, addr, port)
                for lr in a.learners]
        get(refs, "weight sync group set-up", ws.timeout_s + 30)
        self.sync_groups += 1

    # -- the stages ---------------------------------------------------------------------------
    def produce_on(self, i: int, prompts: list[Prompt]) -> list:
        """Launch sampler i → (verifier ∥ teacher[domain]) chains for ``prompts``, one generate call per
        domain so each chain's rollouts go to one teacher; returns one ``ChainRefs`` per chain (for
        ``buffer.add_chain``) without waiting. The teacher scores the sampler's rollouts while the verifier
        grades them (the prefill does not read the outcome); the buffer joins the verdicts. A domain with
        several scorers (SPEC §5 teachers, the §6 extrapolation reference) sends the rollouts ref to each;
        the buffer combines their answers."""
        by_dom: dict[str, list[Prompt]] = defaultdict(list)
        for p in prompts:
            by_dom[p.domain].append(p)
        refs = []
        for dom, ps in sorted(by_dom.items()):
            teacher, rule = self.router.pick(dom), self.scoring[dom]
            if self.cfg.teachers[self.cfg.teacher_of_domain[dom]].type == "cache":  # SPEC §5 offline cache
                rollouts = self.a.samplers[i].prefill.remote(teacher.responses.remote(ps))
            else:
                rollouts = self.a.samplers[i].generate.remote(ps)
            verified = self.a.verifier.verify.remote(rollouts)
            routing = self.cfg.domains[dom].routing
            if rule is not None:  # several scorers, combined in the buffer (buffers/scoring.py)
                scored = ScorerRefs(rule, [self.router.pick_teacher(t).score.remote(rollouts) for t in rule.scorers])
            elif routing.type == "dopd":  # the privileged student re-scores and routes each token (actors/dopd.py)
                scored = self.router.pick_teacher(routing.student).route.remote(teacher.score.remote(rollouts),
                                                                                routing)
            else:
                scored = teacher.score.remote(rollouts)
            refs.append(ChainRefs(verified, scored))
        return refs

    def send_weights(self, version: int) -> list:
        """Learner rank 0 broadcasts; each receiver takes the weights after its generate call in
        progress (pause at a request boundary, not an in-flight swap: the in-process vLLM engine
        is not thread-safe, and a response generated by one policy version keeps its behaviour
        log-probs and lag exact)."""
        refs = [lr.send_weights.remote(version) for lr in self.a.learners]
        return refs + [s.receive_weights.remote(version) for s in self.receivers]

    async def sync_weights(self) -> dict[str, float]:
        """Send the current version to every receiver. A receiver that died mid-sync is recovered
        (the group re-formed, the weights re-sent); any other failure (the learner, a hang) stops
        the run."""
        async with self._sync_lock:
            group = self.sync_groups
            try:
                return (await aget(self.send_weights(self.version), "weight sync (broadcast learner → samplers)",
                                   self.cfg.weight_sync.timeout_s + 30))[0]
            except StageError as e:
                await aget([lr.ready.remote() for lr in self.a.learners], "learner (after a failed weight sync)",
                           self.timeout)
                failure = str(e)
        # a recovery since this sync began (before this one, or while it waited for the recovery lock: a
        # rollout loop that saw the same dead receiver) already re-sent the current version to everyone
        if self.sync_groups == group and not await self.recover(failure) and self.sync_groups == group:
            raise StageError(failure)
        return {"weight_sync/seconds": 0.0, "weight_sync/bytes": 0.0}

    async def train_and_sync(self, batch_ref) -> dict[str, float]:
        """One learner step on ``batch_ref`` (every rank), then the new weights to every receiver,
        then the buffer's version (which widens admission by B, SPEC §2)."""
        t = time.perf_counter()
        m = _learner_metrics(await aget([lr.train_step.remote(batch_ref) for lr in self.a.learners],
                                        "learner train step", self.timeout))
        m["time/train_s"], t = time.perf_counter() - t, time.perf_counter()
        self.version += 1
        m.update(await self.sync_weights())
        m["time/sync_wait_s"] = time.perf_counter() - t
        await aget(self.a.buffer.set_version.remote(self.version), "buffer version update", self.timeout)
        return m

    # -- one loop per role ----------------------------------------------------------------------
    async def rollout_loop(self, i: int) -> None:
        """admit → generate → (verify ∥ score) → add, on sampler i, until admission closes."""
        cfg = self.cfg
        chunk = cfg.sampler.chunk_prompts or max(1, -(-cfg.data.prompts_per_step // len(self.a.samplers)))
        while prompts := await self.a.buffer.admit_wait.remote(chunk):
            added = self.a.buffer.add_chain.remote([p.uid for p in prompts], self.produce_on(i, prompts))
            failure = await aget(added, f"rollout on sampler {i} (sample → verify and teacher → buffer)",
                                 self.timeout)
            if failure:  # the buffer requeued the chunk's unfinished prompts
                await self.recover(f"rollout on sampler {i}: {failure}")

    async def trainer_loop(self, steps: int, on_step, step: int, stop) -> None:
        """next batch → train → weight update → buffer version → metrics, until ``steps`` or ``stop()``."""
        while step < steps and not (stop is not None and stop()):
            batch_ref, info_ref = self.a.buffer.next_batch.remote()
            t = time.perf_counter()
            info = await aget(info_ref, "buffer (waiting for a batch of data.prompts_per_step complete groups)",
                              self.timeout)
            if step + 1 == steps:  # the last step: no chunk should start that no step trains on
                await aget(self.a.buffer.close_admission.remote(), "buffer", self.timeout)
            alive = self.liveness_refs()  # control-group calls: answered while the step runs, read after it
            m = {**info, "time/batch_wait_s": time.perf_counter() - t, **await self.train_and_sync(batch_ref)}
            step += 1
            t = time.perf_counter()
            await self.check_alive(alive)
            m["time/liveness_s"] = time.perf_counter() - t
            m.update(await self.idle_fractions())
            m["faults/actor_failures"] = float(self.faults)
            on_step(step, m)

    def train_loop(self, steps: int, on_step, start_step: int = 0, stop=None) -> None:
        """Run the loops until the trainer has done ``steps`` steps (or ``stop()`` is true after a step).
        With buffer.max_lag = 0 this is exactly synchronous on-policy training.

        ``on_step(step, metrics)`` is called after each step's weight sync."""
        asyncio.run(self._run_loops(steps, on_step, start_step, stop))

    async def _run_loops(self, steps: int, on_step, start_step: int, stop) -> None:
        self._sync_lock, self._recover_lock = asyncio.Lock(), asyncio.Lock()
        await aget(self.a.buffer.open_admission.remote(), "buffer", self.timeout)
        self._busy0 = (self._busy_by_role(await aget(self._busy_refs(), "busy-time read", self.timeout)),
                       time.perf_counter())
        self._busy_pending = (self._busy_refs(), time.perf_counter())
        trainer = asyncio.create_task(self.trainer_loop(steps, on_step, start_step, stop), name="trainer")
        rollouts = [asyncio.create_task(self.rollout_loop(i), name=f"rollout loop of sampler {i}")
                    for i in range(len(self.a.samplers)) for _ in range(self.cfg.sampler.max_inflight_chunks)]
        try:
            pending = {trainer, *rollouts}
            while trainer in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # the first loop that raises ends the run
        finally:
            # parked admissions return no prompts; chunks still in flight land in the buffer on their own
            # (complete groups are kept, and a checkpoint requeues the prompts of unfinished ones)
            self.a.buffer.close_admission.remote()
            for t in rollouts:
                t.cancel()
            await asyncio.gather(*rollouts, return_exceptions=True)

    # -- health -------------------------------------------------------------------------------
    async def recover(self, what: str) -> bool:
        """After a sampler, verifier or teacher died: wait for Ray to restart it. A restarted receiver
        left the weight-sync group and holds the initial weights, so the group is formed again and
        the current weights are sent before it generates. Returns whether a receiver had restarted."""
        self.faults += 1
        async with self._recover_lock:
            await wait_ready(self.workers, f"restart after failure ({what})", self.timeout)
            async with self._sync_lock:
                now = await aget([s.incarnation.remote() for s in self.receivers], "sampler identity", self.timeout)
                if now == self.incarnations:
                    log.warning("recovered from %s: its prompts were requeued", what)
                    return False
                log.warning("sampler restarted (%s): re-forming the weight-sync group, re-sending version %d",
                            what, self.version)
                self.incarnations = now
                await asyncio.to_thread(self._join_weight_sync)
                await aget(self.send_weights(self.version), "weight sync to a restarted sampler",
                           self.cfg.weight_sync.timeout_s + 30)
                return True

    def liveness_refs(self) -> tuple[list, list]:
        """The calls ``check_alive`` reads: the buffer's and learners' answers, the receivers' incarnations
        (control-group calls, answered while work runs). The trainer sends them as a step starts and reads
        them after its weight sync, so the check costs the learner no idle time (0.019 s a step on the
        peer bench when it was sent after the sync)."""
        a = self.a
        return ([a.buffer.ready_flag.remote()] + [lr.ready.remote() for lr in a.learners],
                [s.incarnation.remote() for s in self.receivers])

    async def check_alive(self, refs: tuple[list, list] | None = None) -> None:
        """The buffer and learner answer, and no weight receiver restarted since the last check
        (``liveness_refs``, sent now unless given). A restarted receiver holds its initial
        weights and left the weight-sync group: it is recovered here. A dead buffer or learner
        stops the run. Teachers and the verifier are not polled: a call to one that died fails,
        its chain is requeued and the actor recovered (``rollout_loop``); polling them cost
        0.4-0.8 s a step on the demo (``Teacher.ready`` waited behind ``score`` for the GIL)."""
        answers, incarnations = refs or self.liveness_refs()
        await aget(answers, "liveness check (buffer, learner)", self.timeout)
        try:
            if await aget(incarnations, "sampler identity", self.timeout) == self.incarnations:
                return
        except StageError as e:
            if not e.actor_died:
                raise
        if refs is not None:
            # sent as the step started: a recovery during its weight sync may already have handled the
            # restart this answer saw (and counted it); ask again before recovering
            return await self.check_alive()
        await self.recover("a sampler restarted")

    def _busy_refs(self) -> list:
        teachers = [h for hs in self.a.teachers.values() for h in hs]
        return [h.busy_seconds.remote() for h in self.a.samplers + teachers + self.a.learners]

    def _busy_by_role(self, vals: list[float]) -> dict[str, float]:
        ns, nt = len(self.a.samplers), sum(len(hs) for hs in self.a.teachers.values())
        return {"sampler": float(np.mean(vals[:ns])), "teacher": float(np.mean(vals[ns: ns + nt])),
                "learner": float(np.mean(vals[ns + nt:]))}

    async def idle_fractions(self) -> dict[str, float]:
        """Per role, the fraction of the loop's wall time its actors spent outside their work methods,
        up to the previous step: this step's reads are launched now and collected at the next, so a
        busy actor's answer never holds up the trainer."""
        prev, self._busy_pending = self._busy_pending, (self._busy_refs(), time.perf_counter())
        try:
            busy = self._busy_by_role(await aget(prev[0], "busy-time read", self.timeout))
        except StageError as e:
            if not e.actor_died:
                raise
            # an actor restarted since the reads were sent (it is recovered elsewhere; its busy time
            # starts again from 0): keep the last fractions, count anew from the next read
            self._busy0 = None
            return self._idle
        if self._busy0 is None:
            self._busy0 = (busy, prev[1])
            return self._idle
        (busy0, t0), wall = self._busy0, prev[1] - self._busy0[1]
        self._idle = {f"{r}/idle_frac": max(0.0, 1.0 - (busy[r] - busy0[r]) / wall) if wall > 0 else 0.0
                      for r in ("sampler", "teacher", "learner")}
        return self._idle


# Each rank reports its share of these (loss terms are already divided by the global response
# count, SPEC §1; tokens are its shard's): the step's value is the sum over ranks.
_SUMMED_OVER_RANKS = ("loss", "pg_loss", "dist_loss", "tokens", "drift/tokens_saved")


def _learner_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank-local learner metrics → one value each: shares are summed, rates and timings averaged (over the
    ranks that report a key: a per-domain metric is absent on a rank whose shard lacks that domain)."""
    keep = ("loss", "mismatch_kl")
    keys = dict.fromkeys(k for r in per_rank for k in r)
    return {k if k in keep else f"learner/{k}": float((np.sum if k in _SUMMED_OVER_RANKS else np.mean)(
        [r[k] for r in per_rank if k in r])) for k in keys}


@dataclass
class RunData:
    """What the run trains and evaluates on, loaded and checked before any actor starts."""

    train: list[LoadedSource]
    heldout: list[Prompt]
    chat_template: bool


def load_data(cfg: RunConfig) -> RunData:
    """Tokenizers compatible (teachers read the student's ids), sources read, rendered with the student's
    chat template and length-checked (buffers/dataset.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.student.path)
    check_tokenizers(cfg.student.path, {n: t.path for n, t in cfg.teachers.items() if t.type == "vllm"},
                     student_tok=tok)
    chat = resolve_chat_template(cfg.data.chat_template, tok, cfg.student.path)
    train = load_sources(cfg, "train", tok, chat)
    heldout = as_prompts(load_sources(cfg, "heldout", tok, chat), cfg.data.heldout_limit)
    return RunData(train, heldout, chat)


def _run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """The run's directory and, when ``run.resume`` names one, its latest complete checkpoint."""
    if not cfg.run.resume:
        return cfg.run_dir, None
    run_dir = Path(cfg.run.resume)
    ckpt = checkpoint.latest_complete(run_dir)
    if ckpt is None:
        raise ConfigError(f"`run.resume` is {cfg.run.resume!r}: no complete checkpoint under "
                          f"{checkpoint.root(run_dir)}; start a new run instead")
    return run_dir, ckpt


@contextlib.contextmanager
def _ray_cluster(cfg: RunConfig, run_dir: Path):
    """Join the cluster under `ray job submit` (RAY_ADDRESS) or ``run.ray_address``; else start a local one.

    Actor output (vLLM, DeepSpeed, transformers) stays in Ray's per-node session logs instead of
    the driver's console; ``<run_dir>/ray_logs`` links to this node's."""
    started = not ray.is_initialized()
    _quiet_ray_logger()
    if started:
        address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    with contextlib.suppress(Exception):  # best effort: a link, not a requirement
        link = run_dir / "ray_logs"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ray._private.worker._global_node.get_logs_dir_path())
    try:
        yield
    finally:
        if started and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
            ray.shutdown()


def _quiet_ray_logger() -> None:
    """Ray's own logger writes to the console; its records go to the run's log file instead."""
    ray_log = logging.getLogger("ray")
    for h in list(ray_log.handlers):
        ray_log.removeHandler(h)
    ray_log.propagate = True


@contextlib.contextmanager
def _log_file(run_dir: Path):
    """Every library's log records (and Python warnings) of this process go to ``<run_dir>/run.log``;
    the console keeps the run's own lines (the ``uniopd`` logger)."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()


def _resume(pipe: Pipeline, ckpt: Path) -> RunSummary:
    """Learner and buffer state from ``ckpt``, the samplers on its policy version; in-flight prompts requeued."""
    meta, a, t = checkpoint.load_meta(ckpt), pipe.a, pipe.timeout
    get([lr.load_checkpoint.remote(str(ckpt / "learner")) for lr in a.learners], "load learner", t)
    requeued = get(a.buffer.load.remote(str(ckpt / "buffer.pkl")), "load buffer", t)
    pipe.version = meta["version"]
    get(pipe.send_weights(pipe.version), "weight sync after resume", pipe.cfg.weight_sync.timeout_s + 30)
    get(a.buffer.set_version.remote(pipe.version), "buffer version", t)
    summary = RunSummary.from_dict(meta["summary"])
    summary.resumed_from_step = meta["step"]
    log.info("resumed from %s: step %d, policy version %d, %d in-flight prompts requeued", ckpt, meta["step"],
             pipe.version, requeued)
    return summary


@contextlib.contextmanager
def _started_pipeline(cfg: RunConfig, data: "RunData", run_dir: Path):
    """Ray, the actors (placement groups reserved first) and the weight-sync group; all released on exit."""
    with _ray_cluster(cfg, run_dir):
        actors = spawn_actors(cfg, data.train)
        try:
            pipe = Pipeline(cfg, actors)
            t = time.perf_counter()
            pipe.start()
            log.info("actors up in %.1fs", time.perf_counter() - t)
            yield pipe
        finally:
            release(actors)


@contextlib.contextmanager
def _logged_plan(cfg: RunConfig, data: "RunData"):
    log.info("plan:\n%s", describe_plan(cfg))
    for src in data.train:
        log.info("data: source %r: %d prompts (weight %g; %d bad rows and %d overlong prompts skipped)", src.label,
                 len(src), src.weight, src.skipped, src.overlong)
    log.info("data: %d held-out prompts; chat template %s", len(data.heldout), "on" if data.chat_template else "off")
    yield


def run(cfg: RunConfig, after_step: Callable[[int, float, Pipeline], None] | None = None) -> dict:
    """Validate inputs, start Ray and the actors, evaluate (or resume), train ``run.steps`` steps,
    finish; returns the run's summary (``RunSummary`` as a dict, also in ``summary.json``).

    ``after_step(step, train_seconds, pipeline)``, when given, is called in the driver after each step's
    bookkeeping, on the training clock (scripts/bench_peer.py saves the student's weights there)."""
    check_paths(cfg)
    data = load_data(cfg)
    run_dir, ckpt = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    with _log_file(run_dir), _logged_plan(cfg, data), _started_pipeline(cfg, data, run_dir) as pipe, \
            contextlib.closing(MetricsWriter(run_dir)) as writer:
        summary = _resume(pipe, ckpt) if ckpt else RunSummary(data={
            src.label: {"prompts": len(src), "skipped_bad_rows": src.skipped, "skipped_overlong": src.overlong}
            for src in data.train})
        evaluate = (lambda: evaluate_student(cfg, pipe.a, data.heldout)) if data.heldout else None
        progress = Progress(cfg, summary, writer, run_dir, evaluate, pipe, after_step)
        if ckpt is None and evaluate:
            if cfg.run.eval_teachers:
                summary.accuracy["teacher"] = progress.excluded(
                    lambda: evaluate_teachers(cfg, pipe.a, pipe.router, data.heldout))
                log.info("held-out accuracy of the teachers: %s", summary.accuracy["teacher"])
            summary.accuracy["before"] = progress.evaluate(0)
        try:
            pipe.train_loop(cfg.run.steps, progress.on_step, start_step=summary.steps, stop=progress.out_of_time)
        except StageError as e:
            last = checkpoint.latest_complete(run_dir)
            hint = (f"resume with `run.resume={run_dir}` (latest checkpoint: {last.name})" if last
                    else "no checkpoint was written yet (set learner.checkpoint_every)")
            raise StageError(f"{e}\nthe run stopped at step {summary.steps}; {hint}") from e
        progress.finish(get(pipe.a.buffer.get_accounting.remote(), "accounting", pipe.timeout))
        return summary.to_dict()
