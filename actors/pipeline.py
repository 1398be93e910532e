"""The driver: wires every actor and runs the Uni-OPD loop in one ``run()``.

             admit (SPEC §2)                     per-domain teacher (SPEC §5)
    dataset ──▶ buffer ──prompts──▶ sampler ──▶ verifier ──▶ teacher[d] ──▶ buffer
                  │   (vLLM, behaviour       (outcome)     (prefill log-probs)   │
                  │    log-probs, version)                                       │
                  │◀── balance §3.2 · calibrate §4 · lag check §2 ───────────────┘
                  └──TrainBatch──▶ learner (DeepSpeed) ──weights (gloo|nccl)──▶ samplers

Data moves actor to actor as Ray object refs (sampler → verifier → teacher →
buffer); only prompts (small) and metrics pass through this process. Every wait
has a timeout naming its stage, every step checks that the actors are alive, and
shutdown happens in ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from actors import checkpoint
from actors.metrics import MetricsWriter
from actors.placement import Actors, bundle_plan, release, resource_plan, spawn_actors
from actors.teacher import TeacherRouter
from actors.vocab_check import check_tokenizers
from buffers.dataset import LoadedSource, as_prompts, load_sources
from buffers.formatting import resolve_chat_template
from buffers.records import Prompt
from configs.schema import ConfigError, RunConfig, check_paths, dump_config
from learner.weight_sync import WeightSyncTimeout

log = logging.getLogger("uniopd")


class StageError(RuntimeError):
    """A stage failed or timed out; the message names it. ``actor_died`` tells a dead actor
    (recoverable for samplers and teachers) from a hang."""

    def __init__(self, msg: str, actor_died: bool = False) -> None:
        super().__init__(msg)
        self.actor_died = actor_died


def _get(refs, stage: str, timeout: float):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise StageError(f"{stage}: no answer within {timeout:.0f}s (run.call_timeout_s); "
                         "an actor is hung or the cluster lacks resources") from e
    except ray.exceptions.RayActorError as e:
        raise StageError(f"{stage}: an actor died: {str(e).splitlines()[0]}", actor_died=True) from e
    except ray.exceptions.RayTaskError as e:
        # A collective that timed out or lost a peer (learner/weight_sync.py): a stage failure
        # the driver may recover from (a sampler died mid-sync), not a bug to re-raise as is.
        if isinstance(e.cause, WeightSyncTimeout):
            raise StageError(f"{stage}: {e.cause}") from e
        raise


def _wait_ready(handles: list, stage: str, timeout: float) -> None:
    """Wait until every actor answers ``ready``, giving restarting actors time to come back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get([h.ready.remote() for h in handles], stage, max(1.0, deadline - time.monotonic()))
            return
        except StageError as e:
            if not e.actor_died or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


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
        lines.append(f"  {d:<10} → {c.teacher:<18} ({c.verifier.type}) {cfg.teachers[c.teacher].path}")
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
    """Long-lived actors and the per-step body. Built once by ``run``."""

    def __init__(self, cfg: RunConfig, actors: Actors) -> None:
        self.cfg, self.a = cfg, actors
        self.router = TeacherRouter(cfg.teacher_of_domain, actors.teachers)
        self.timeout = cfg.run.call_timeout_s
        self.version = 0
        self.faults = 0
        self.incarnations: list[str] = []
        self.sync_groups = 0  # weight-sync groups formed so far (a recovery forms a new one)

    def _following(self) -> list[tuple[str, object]]:
        """(teacher name, replica) of every teacher that is the student itself (``follow_student``)."""
        return [(name, h) for name, hs in self.a.teachers.items() if self.cfg.teachers[name].follow_student
                for h in hs]

    @property
    def receivers(self) -> list:
        """Every actor whose vLLM engine takes the learner's weights: the samplers, then the
        student-following teachers."""
        return self.a.samplers + [h for _, h in self._following()]

    # -- setup ---------------------------------------------------------------------------
    def start(self) -> None:
        a, t = self.a, self.timeout
        _get([h.ready.remote() for h in a.samplers + [h for hs in a.teachers.values() for h in hs] + [a.verifier]],
             "actor start-up (samplers, teachers, verifier)", t)
        addr, port = _get(a.learners[0].dist_address.remote(), "learner address", t)
        n_params = _get([lr.init_engine.remote(addr, port) for lr in a.learners], "learner DeepSpeed init", t)[0]
        log.info("learner ready: %d parameters, world size %d", n_params, len(a.learners))
        self.incarnations = _get([s.incarnation.remote() for s in self.receivers], "sampler identity", t)
        self._join_weight_sync()

    def _join_weight_sync(self) -> None:
        """Every learner rank builds its trainer-side transfer engine; rank 0 opens the group at its
        node's address ("auto") and has every sampler engine's workers (TP ranks) join it."""
        a, ws = self.a, self.cfg.weight_sync
        addr, port = _get(a.learners[0].weight_sync_address.remote(ws.master_addr), "weight sync address",
                          self.timeout)
        tp = [self.cfg.sampler.tensor_parallel_size] * len(a.samplers) + \
             [self.cfg.teachers[name].tensor_parallel_size for name, _ in self._following()]
        refs = [lr.init_weight_transfer.remote(self.receivers, tp, ws, self.cfg.sampler.dtype, addr, port)
                for lr in a.learners]
        _get(refs, "weight sync group set-up", ws.timeout_s + 30)
        self.sync_groups += 1

    # -- the stages, each launched without waiting ----------------------------------------
    def produce_on(self, i: int, prompts: list[Prompt]) -> list:
        """sampler i → verifier → teacher[domain] chains; returns the teacher's scored refs.

        One generate call per domain, so each chain's rollouts go to one teacher without
        passing through this process. The caller hands each scored ref to ``buffer.add``
        only once it is ready: Ray runs one caller's actor calls in submission order, so an
        ``add`` waiting on its chain would hold back every later buffer call of this driver
        (``admit``, ``num_ready``, ``get_batch``) until that chain finished. Measured
        before this change (Ray task timeline, η = 2): training never overlapped generation,
        because each step's ``get_batch`` queued behind the adds of the chunks just admitted."""
        a = self.a
        by_dom: dict[str, list[Prompt]] = defaultdict(list)
        for p in prompts:
            by_dom[p.domain].append(p)
        refs = []
        for dom, ps in sorted(by_dom.items()):
            rollouts = a.samplers[i].generate.remote(ps)
            verified = a.verifier.verify.remote(rollouts)
            refs.append(self.router.pick(dom).score.remote(verified))
        return refs

    def produce(self, prompts: list[Prompt]) -> list:
        """Spread ``prompts`` over all samplers and add the results to the buffer (tests and
        evaluation-style calls); returns the buffer.add refs."""
        k = len(self.a.samplers)
        return [self.a.buffer.add.remote(r) for i in range(k) if prompts[i::k]
                for r in self.produce_on(i, prompts[i::k])]

    def launch_train(self, batch_ref) -> list:
        return [lr.train_step.remote(batch_ref) for lr in self.a.learners]

    def launch_sync(self, version: int) -> list:
        """Learner rank 0 broadcasts; each sampler takes the weights after its generate call in
        progress (pause at a request boundary, not an in-flight swap: the in-process vLLM engine
        is not thread-safe, and a response generated by one policy version keeps its behaviour
        log-probs and lag exact)."""
        refs = [lr.send_weights.remote(version) for lr in self.a.learners]
        return refs + [s.receive_weights.remote(version) for s in self.receivers]

    def train_on(self, batch_ref) -> dict[str, float]:
        """Train on one batch and broadcast, waiting for both (the synchronous form)."""
        per_rank = _get(self.launch_train(batch_ref), "learner train step", self.timeout)
        self.version += 1
        res = _get(self.launch_sync(self.version), "weight sync (broadcast learner → samplers)",
                   self.cfg.weight_sync.timeout_s + 30)
        _get(self.a.buffer.set_version.remote(self.version), "buffer version update", self.timeout)
        return {**_learner_metrics(per_rank), **res[0]}

    def busy_seconds(self) -> dict[str, float]:
        a = self.a
        teachers = [h for hs in a.teachers.values() for h in hs]
        vals = _get([h.busy_seconds.remote() for h in a.samplers + teachers + a.learners], "busy-time read",
                    self.timeout)
        ns, nt = len(a.samplers), len(teachers)
        return {"sampler": float(np.mean(vals[:ns])), "teacher": float(np.mean(vals[ns: ns + nt])),
                "learner": float(np.mean(vals[ns + nt:]))}

    # -- the loop ---------------------------------------------------------------------------
    def train_loop(self, steps: int, on_step, start_step: int = 0, stop=None) -> None:
        """Samplers, teachers, buffer and learner run concurrently; the learner trains as soon
        as B groups are ready; admission control in the buffer bounds the lag (SPEC §2).
        With max_lag = 0 this is exactly synchronous on-policy training.

        ``on_step(step, metrics)`` is called after each step's weight sync; the loop also ends when
        ``stop()`` (checked after each step) is true."""
        a, cfg = self.a, self.cfg
        B, N = cfg.data.prompts_per_step, len(a.samplers)
        chunk = cfg.sampler.chunk_prompts or max(1, -(-B // N))
        inflight: list[_Chunk] = []
        train_refs: list = []
        sync_refs: list = []
        step = start_step
        t_train = t_sync = 0.0
        m: dict[str, float] = {}
        busy0, t_loop = self.busy_seconds(), time.perf_counter()
        while step < steps and not (stop is not None and stop()):
            load = [sum(1 for c in inflight if c.sampler == i) for i in range(N)]
            for i in sorted(range(N), key=lambda i: load[i]):  # feed samplers as far as admission allows
                while load[i] < cfg.sampler.max_inflight_chunks:
                    prompts = _get(a.buffer.admit.remote(chunk), "buffer admission", self.timeout)
                    if not prompts:
                        break
                    inflight.append(_Chunk(i, prompts, self.produce_on(i, prompts)))
                    load[i] += 1
            if not train_refs and not sync_refs:
                if _get(a.buffer.num_ready.remote(), "buffer", self.timeout) >= B:
                    batch_ref = a.buffer.get_batch.remote()
                    train_refs, t_train = self.launch_train(batch_ref), time.perf_counter()
            waiting = [r for c in inflight for r in c.waiting()] + train_refs + sync_refs
            if not waiting:
                raise StageError("pipeline stalled: nothing in flight and no batch ready (admission "
                                 "control admits no prompt); check data.prompts_per_step and buffer.max_lag")
            done, _ = ray.wait(waiting, num_returns=1, timeout=self.timeout)
            if not done:
                raise StageError(f"no stage finished within {self.timeout:.0f}s (run.call_timeout_s): "
                                 f"{len(inflight)} rollout chunks, train={bool(train_refs)}, sync={bool(sync_refs)}")
            still, failed = [], []
            in_order = True  # chunks hand over in admission order (see _Chunk.add_ready)
            for c in inflight:
                in_order = in_order and c.add_ready(a.buffer)
                if c.scored or len(ray.wait(c.added, num_returns=len(c.added), timeout=0)[0]) < len(c.added):
                    still.append(c)
                    continue
                try:
                    _get(c.added, f"rollout on sampler {c.sampler} (sample → verify → teacher → buffer)",
                         self.timeout)
                except StageError as e:
                    if not e.actor_died:
                        raise
                    failed.append((c.prompts, str(e)))
            inflight = still
            if failed:
                # a sampler, verifier or teacher died: its chunk goes back to the queue (the buffer
                # only requeues prompts whose group did not complete), Ray restarts the actor
                for prompts, _ in failed:
                    _get(a.buffer.requeue.remote(prompts), "requeue after failure", self.timeout)
                self.recover(failed[0][1])
            if train_refs and len(ray.wait(train_refs, num_returns=len(train_refs), timeout=0)[0]) == len(train_refs):
                m = _learner_metrics(_get(train_refs, "learner train step", self.timeout))
                m["time/train_s"] = time.perf_counter() - t_train
                self.version += 1
                train_refs, sync_refs, t_sync = [], self.launch_sync(self.version), time.perf_counter()
                sync_group = self.sync_groups
            if sync_refs and len(ray.wait(sync_refs, num_returns=len(sync_refs), timeout=0)[0]) == len(sync_refs):
                try:
                    res = _get(sync_refs, "weight sync (broadcast learner → samplers)",
                               cfg.weight_sync.timeout_s + 30)
                except StageError as e:
                    # a sampler that died mid-sync: the group is re-formed and the weights re-sent;
                    # if a recovery already did that since this sync began (a failed rollout was
                    # seen first), the current version is on every sampler; any other sync
                    # failure (the learner, a hang) stops the run
                    _get([lr.ready.remote() for lr in a.learners], "learner (after a failed weight sync)",
                         self.timeout)
                    if self.sync_groups == sync_group and not self.recover(str(e)):
                        raise
                    res = [{"weight_sync/seconds": 0.0, "weight_sync/bytes": 0.0}]
                _get(a.buffer.set_version.remote(self.version), "buffer version update", self.timeout)
                sync_refs = []
                step += 1
                m.update(res[0])
                m["time/sync_wait_s"] = time.perf_counter() - t_sync
                self.check_alive()
                busy, wall = self.busy_seconds(), time.perf_counter() - t_loop
                for role in ("sampler", "teacher", "learner"):
                    m[f"{role}/idle_frac"] = max(0.0, 1.0 - (busy[role] - busy0[role]) / wall)
                m["faults/actor_failures"] = float(self.faults)
                on_step(step, m)

    def recover(self, what: str) -> bool:
        """After a sampler, verifier or teacher died: wait for Ray to restart it. A restarted sampler
        left the weight-sync group and holds the initial weights, so the group is formed again
        and the current weights are broadcast before it generates. Returns whether a sampler
        had restarted."""
        self.faults += 1
        a = self.a
        teachers = [h for hs in a.teachers.values() for h in hs]
        _wait_ready(a.samplers + teachers + [a.verifier], f"restart after failure ({what})", self.timeout)
        now = _get([s.incarnation.remote() for s in self.receivers], "sampler identity", self.timeout)
        if now == self.incarnations:
            log.warning("recovered from %s: its prompts were requeued", what)
            return False
        log.warning("sampler restarted (%s): re-forming the weight-sync group, re-sending version %d",
                    what, self.version)
        self.incarnations = now
        self._join_weight_sync()
        _get(self.launch_sync(self.version), "weight sync to a restarted sampler", self.cfg.weight_sync.timeout_s + 30)
        return True

    def check_alive(self) -> None:
        """Every actor answers. A sampler, teacher or verifier that died is restarted by Ray and
        recovered here; a dead buffer or learner stops the run."""
        a = self.a
        _get([a.buffer.ready_flag.remote()] + [lr.ready.remote() for lr in a.learners], "liveness check (buffer, "
             "learner)", self.timeout)
        teachers = [h for hs in a.teachers.values() for h in hs]
        try:
            _get([h.ready.remote() for h in a.samplers + teachers + [a.verifier]], "liveness check", self.timeout)
            if _get([s.incarnation.remote() for s in self.receivers], "sampler identity", self.timeout) \
                    == self.incarnations:
                return
        except StageError as e:
            if not e.actor_died:
                raise
        self.recover("an actor restarted")

    # -- evaluation --------------------------------------------------------------------------
    def evaluate_student(self, prompts: list[Prompt]) -> dict[str, float]:
        """Greedy held-out accuracy of the student, batched through the samplers' vLLM engines."""
        a = self.a
        k = len(a.samplers)
        parts = [prompts[j::k] for j in range(k)]
        texts_parts = _get([s.generate_greedy.remote(p) for s, p in zip(a.samplers, parts) if p],
                           "held-out evaluation (student)", self.cfg.run.eval_timeout_s)
        ordered = [p for part in parts if part for p in part]
        texts = [t for part in texts_parts for t in part]
        return self._accuracy(ordered, texts)

    def evaluate_teachers(self, prompts: list[Prompt]) -> dict[str, float]:
        """The bar: each domain's teacher on its held-out prompts, batched through the teacher's own
        vLLM engine, cached per (teacher, held-out set) under ``<output_dir>/.eval_cache``."""
        by_dom: dict[str, list[Prompt]] = defaultdict(list)
        for p in prompts:
            by_dom[p.domain].append(p)
        out: dict[str, float] = {}
        todo = []
        for d in sorted(by_dom):
            path = _eval_cache_path(self.cfg, d, by_dom[d])
            if path.is_file():
                out[d] = json.loads(path.read_text())["accuracy"]
                log.info("teacher bar for %s from cache %s: %.3f", d, path, out[d])
            else:
                todo.append((d, path))
        if todo:
            texts = _get([self.router.pick(d).generate_greedy.remote(by_dom[d]) for d, _ in todo],
                         "held-out evaluation (teachers)", self.cfg.run.eval_timeout_s)
            for (d, path), t in zip(todo, texts):
                out[d] = self._accuracy(by_dom[d], t)[d]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"domain": d, "teacher": self.cfg.domains[d].teacher, "accuracy": out[d],
                                            "prompts": len(by_dom[d])}))
        return dict(sorted(out.items()))

    def _accuracy(self, prompts: list[Prompt], texts: list[str]) -> dict[str, float]:
        ok = _get(self.a.verifier.grade_many.remote(texts, prompts), "held-out grading", self.timeout)
        acc: dict[str, list[bool]] = defaultdict(list)
        for p, c in zip(prompts, ok):
            acc[p.domain].append(c)
        return {d: float(np.mean(v)) for d, v in sorted(acc.items())}


class _Chunk:
    """One admitted chunk of prompts on its way through sampler i → verifier → teacher →
    buffer: ``scored`` holds the teacher refs not yet handed to the buffer, ``added`` the
    ``buffer.add`` refs (see ``Pipeline.produce_on`` for why the hand-over waits)."""

    def __init__(self, sampler: int, prompts: list[Prompt], scored: list) -> None:
        self.sampler, self.prompts, self.scored, self.added = sampler, prompts, list(scored), []

    def waiting(self) -> list:
        return self.scored + self.added

    def add_ready(self, buffer) -> bool:
        """Hand the finished teacher results to the buffer in admission order: the leading
        ones that are done (a failed one too: its add fails with the same actor error, which
        the loop then recovers from). Returns whether all were handed over.

        Order matters for SPEC §2: the buffer batches groups first-come, and admission
        control bounds the lag only if groups become ready in the order they were admitted
        (a later chunk overtaking an earlier one would push the earlier into a later batch)."""
        if self.scored:
            done = set(ray.wait(self.scored, num_returns=len(self.scored), timeout=0)[0])
            k = 0
            while k < len(self.scored) and self.scored[k] in done:
                k += 1
            self.added += [buffer.add.remote(r) for r in self.scored[:k]]
            self.scored = self.scored[k:]
        return not self.scored


# Each rank reports its share of these (loss terms are already divided by the global response
# count, SPEC §1; tokens are its shard's): the step's value is the sum over ranks.
_SUMMED_OVER_RANKS = ("loss", "pg_loss", "dist_loss", "tokens")


def _learner_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank-local learner metrics → one value each: shares are summed, rates and timings averaged."""
    keep = ("loss", "mismatch_kl")
    return {k if k in keep else f"learner/{k}":
            float((np.sum if k in _SUMMED_OVER_RANKS else np.mean)([r[k] for r in per_rank])) for k in per_rank[0]}


def _eval_cache_path(cfg: RunConfig, domain: str, prompts: list[Prompt]) -> Path:
    """Key: the teacher's weights (file names, sizes, mtimes), the held-out prompts' ids and tokens, the
    generation length and the domain's verifier."""
    teacher = cfg.teachers[cfg.domains[domain].teacher]
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(teacher.path).glob("*")
                     if f.suffix in (".safetensors", ".bin", ".pt"))
    h = hashlib.sha256(json.dumps([str(Path(teacher.path).resolve()), weights, cfg.sampler.max_new_tokens,
                                   cfg.domains[domain].verifier.model_dump(), sorted(cfg.sampler.stop),
                                   [(p.id, p.prompt_ids, p.answer, p.tests) for p in prompts]]).encode())
    return Path(cfg.run.output_dir) / ".eval_cache" / f"{domain}-{h.hexdigest()[:20]}.json"


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
    check_tokenizers(cfg.student.path, {n: t.path for n, t in cfg.teachers.items()}, student_tok=tok)
    chat = resolve_chat_template(cfg.data.chat_template, tok, cfg.student.path)
    train = load_sources(cfg, "train", tok, chat)
    heldout = as_prompts(load_sources(cfg, "heldout", tok, chat), cfg.data.heldout_limit)
    return RunData(train, heldout, chat)


def run(cfg: RunConfig) -> dict:
    """Validate inputs, start Ray and the actors, train ``run.steps`` steps (resuming from the
    latest complete checkpoint when ``run.resume`` names a run directory), write the summary."""
    check_paths(cfg)
    data = load_data(cfg)
    heldout = data.heldout
    run_dir = Path(cfg.run.resume) if cfg.run.resume else cfg.run_dir
    ckpt = None
    if cfg.run.resume:
        ckpt = checkpoint.latest_complete(run_dir)
        if ckpt is None:
            raise ConfigError(f"`run.resume` is {cfg.run.resume!r}: no complete checkpoint under "
                              f"{checkpoint.root(run_dir)}; start a new run instead")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info("plan:\n%s", describe_plan(cfg))
    for src in data.train:
        log.info("data: source %r: %d prompts (weight %g; %d bad rows and %d overlong prompts skipped)", src.label,
                 len(src), src.weight, src.skipped, src.overlong)
    log.info("data: %d held-out prompts; chat template %s", len(heldout), "on" if data.chat_template else "off")

    started_ray = False
    if not ray.is_initialized():
        # Under `ray job submit`, RAY_ADDRESS points at the cluster: join it instead of starting one.
        address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=True)
            started_ray = True
    actors: Actors | None = None
    writer = MetricsWriter(run_dir)
    try:
        actors = spawn_actors(cfg, data.train)
        pipe = Pipeline(cfg, actors)
        t_setup = time.perf_counter()
        pipe.start()
        log.info("actors up in %.1fs", time.perf_counter() - t_setup)
        summary: dict = {"steps": 0, "accuracy": {}, "data": {
            src.label: {"prompts": len(src), "skipped_bad_rows": src.skipped, "skipped_overlong": src.overlong}
            for src in data.train}}
        start_step = 0
        if ckpt is not None:
            meta = checkpoint.load_meta(ckpt)
            _get([lr.load_checkpoint.remote(str(ckpt / "learner")) for lr in actors.learners], "load learner", pipe.timeout)
            requeued = _get(actors.buffer.load.remote(str(ckpt / "buffer.pkl")), "load buffer", pipe.timeout)
            pipe.version, start_step = meta["version"], meta["step"]
            _get(pipe.launch_sync(pipe.version), "weight sync after resume", cfg.weight_sync.timeout_s + 30)
            _get(actors.buffer.set_version.remote(pipe.version), "buffer version", pipe.timeout)
            summary = meta["summary"]
            summary["resumed_from_step"] = start_step
            log.info("resumed from %s: step %d, policy version %d, %d in-flight prompts requeued", ckpt,
                     start_step, pipe.version, requeued)
        elif heldout:
            if cfg.run.eval_teachers:
                summary["accuracy"]["teacher"] = pipe.evaluate_teachers(heldout)
            summary["accuracy"]["before"] = pipe.evaluate_student(heldout)
            log.info("held-out accuracy: teacher %s, student before %s", summary["accuracy"].get("teacher"),
                     summary["accuracy"]["before"])
            writer.write(0, {f"accuracy/heldout/{d}": v for d, v in summary["accuracy"]["before"].items()})
        totals = summary.setdefault("totals", {"samples": 0, "tokens": 0, "seconds": 0.0, "sync_s": [],
                                               "eval_s": 0.0})
        totals.setdefault("eval_s", 0.0)
        curve = summary.setdefault("curve", [])
        if not curve and "before" in summary["accuracy"]:
            curve.append({"train_s": 0.0, "step": 0, "responses": 0, "accuracy": summary["accuracy"]["before"]})
        t_loop = time.perf_counter()
        seconds0 = totals["seconds"]

        def train_seconds() -> float:
            """Seconds of this run's training so far, held-out evaluations excluded."""
            return seconds0 + time.perf_counter() - t_loop - totals["eval_s"]

        def evaluate(step: int) -> dict[str, float]:
            t = time.perf_counter()
            acc = pipe.evaluate_student(heldout)
            curve.append({"train_s": round(train_seconds(), 3), "step": step, "responses": totals["samples"],
                          "accuracy": acc})
            totals["eval_s"] += time.perf_counter() - t
            return acc

        next_eval_s = [cfg.run.eval_every_s]

        def save_checkpoint(step: int) -> None:
            totals["seconds"] = seconds0 + time.perf_counter() - t_loop
            checkpoint.save(run_dir, step, pipe.version, actors.learners, actors.buffer, {"summary": summary},
                            keep=cfg.learner.keep_checkpoints, timeout=pipe.timeout,
                            crash_after_learner=cfg.chaos.crash_in_checkpoint_step == step)

        def on_step(step: int, m: dict[str, float]) -> None:
            batch_metrics, bstats = _get([actors.buffer.last_batch_metrics.remote(), actors.buffer.stats.remote()],
                                         "buffer metrics", pipe.timeout)
            m.update(batch_metrics)
            totals["samples"] += int(batch_metrics.get("batch/responses", 0))
            totals["tokens"] += int(batch_metrics.get("batch/tokens", 0))
            elapsed = train_seconds()
            m.update({"throughput/samples_per_s": totals["samples"] / elapsed,
                      "throughput/tokens_per_s": totals["tokens"] / elapsed, "policy/version": pipe.version,
                      **{f"buffer/{k}": float(v) for k, v in bstats.items()}})
            due = (cfg.run.eval_every and step % cfg.run.eval_every == 0) or \
                (cfg.run.eval_every_s and elapsed >= next_eval_s[0])
            if due and heldout and step != cfg.run.steps and not out_of_time():
                m.update({f"accuracy/heldout/{d}": v for d, v in evaluate(step).items()})
                while cfg.run.eval_every_s and next_eval_s[0] <= elapsed:
                    next_eval_s[0] += cfg.run.eval_every_s
            writer.write(step, m)
            writer.console(step, cfg.run.steps, m)
            summary["steps"] = step
            for key in ("sampler/idle_frac", "learner/idle_frac", "teacher/idle_frac"):
                summary[key.replace("/", "_")] = m[key]
            summary["lag_max"] = max(summary.get("lag_max", 0), m.get("lag/max", 0))
            summary["actor_failures"] = summary.get("actor_failures", 0) + (pipe.faults - summary.get("_faults", 0))
            summary["_faults"] = pipe.faults
            totals["sync_s"].append(m.get("weight_sync/seconds", 0.0))
            k = cfg.learner.checkpoint_every
            if k and step % k == 0 and step != cfg.run.steps:
                save_checkpoint(step)

        def out_of_time() -> bool:
            return cfg.run.time_budget_s is not None and train_seconds() >= cfg.run.time_budget_s

        try:
            pipe.train_loop(cfg.run.steps, on_step, start_step=start_step, stop=out_of_time)
        except StageError as e:
            last = checkpoint.latest_complete(run_dir)
            hint = (f"resume with `run.resume={run_dir}` (latest checkpoint: {last.name})" if last
                    else "no checkpoint was written yet (set learner.checkpoint_every)")
            raise StageError(f"{e}\nthe run stopped at step {summary['steps']}; {hint}") from e
        elapsed = train_seconds()
        summary["weight_sync_s_mean"] = float(np.mean(totals["sync_s"])) if totals["sync_s"] else 0.0
        summary["samples_per_s"] = totals["samples"] / elapsed
        summary["tokens_per_s"] = totals["tokens"] / elapsed
        summary["train_seconds"] = elapsed
        if heldout:
            summary["accuracy"]["after"] = evaluate(summary["steps"])
            writer.write(summary["steps"], {f"accuracy/heldout/{d}": v for d, v in summary["accuracy"]["after"].items()})
            log.info("held-out accuracy after: %s (teacher %s)", summary["accuracy"]["after"],
                     summary["accuracy"].get("teacher"))
        save_checkpoint(summary["steps"])  # on clean shutdown
        summary["student_export"] = str(checkpoint.latest_complete(run_dir) / "hf")
        accounting = _get(actors.buffer.get_accounting.remote(), "accounting", pipe.timeout)
        summary["accounting"] = _accounting_summary(accounting)
        with (run_dir / "accounting.jsonl").open("w") as f:  # every admitted prompt's outcome
            for pid, uid, epoch, outcome in accounting:
                f.write(json.dumps({"id": pid, "uid": uid, "epoch": epoch, "outcome": outcome}) + "\n")
        (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                          if not k.startswith("_") and k != "totals"}, indent=2))
        return summary
    finally:
        writer.close()
        if actors is not None:
            release(actors)
        if started_ray:
            ray.shutdown()


def _accounting_summary(acc: list[tuple[str, int, int, str]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for *_, outcome in acc:
        out[outcome] += 1
    return dict(out)
