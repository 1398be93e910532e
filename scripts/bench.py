"""Throughput benchmark: ceiling vs synchronous vs asynchronous, in one invocation.

    python scripts/bench.py [CONFIG] [key=value ...] [--steps 30] [--lags 1 2] [--out bench.json]

On the same config and machine, one after the other in one Ray cluster:
  (a) ceiling: the samplers alone generating the same number of prompts;
  (b) sync:    the full pipeline at max_lag η = 0 (no overlap of generation and training);
  (c) async:   the full pipeline at η = 1, 2 (or ``--lags``).
Prints a table and writes ``bench.json`` with per-mode samples_per_s, tokens_per_s,
sampler_idle_frac, learner_idle_frac, teacher_idle_frac, lag_max, weight_sync_s_mean
and the ratios async_over_sync and async_over_ceiling (the best async mode), all
measured in this run, plus, per pipeline mode, the seconds each actor method ran per step
(from Ray's task events) and how busy this machine's cores were while it trained
(``cpu_busy_frac``, ``cpu_s_per_step``, from /proc/stat) to show where the time goes and
what bounds it. ``sync_cpu_bound`` is the most any overlap could give on this machine: the
synchronous step time over the time its own CPU work takes when spread over every core;
``core_contention`` measures what the cores charge for running work side by side (the same
single-threaded compute, alone and one copy per core), and ``sync_cpu_bound_with_contention``
divides the bound by that factor. That probe's matmuls stay in a core's own caches; the stages do
not, so ``core_contention_student`` runs the same test on the student's own train step (its
weights, optimizer state and activations go through the shared caches and memory), and
``sync_cpu_bound_with_student_contention`` divides the bound by that factor.

``breakdown`` (per pipeline mode) accounts for every core-second of a step: the machine's
cores × step time = idle + the CPU time of every process, sampled from /proc every 0.25 s
and classified by process title (Ray names actor processes ``ray::<Class>``): the CPU of each
role's actor processes (sampler, teacher, learner, verifier, buffer; their own work plus Ray's
serialisation and core-worker threads in them, which /proc cannot tell apart), the driver,
Ray's own processes (raylet, GCS, agents, idle workers) and anything else on the machine
(``other``). The parts add up to cores × step time. ``method_wall`` (not part of the sum) is
the wall time per step inside each role's actor methods (Ray's task events): where it exceeds
the role's CPU, the role was waiting inside its methods (for a core, or in its engine).
``learner_step`` (per pipeline mode) splits the learner's train step from inside it: wall = the
stepping thread's seconds on a core + runnable but waiting for a core (the kernel's schedstat) +
blocked, so a learner slower than its CPU time is shown queued behind other processes or waiting
on something else.
Held-out evaluation is switched off: only throughput counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("uniopd")


class CpuSampler:
    """Samples this machine's busy and total CPU time (/proc/stat, all cores) every
    ``period`` seconds in a thread; :meth:`between` gives busy core-seconds and the busy
    fraction over a wall-clock window. Linux only (elsewhere every figure is None)."""

    def __init__(self, period: float = 0.2) -> None:
        import threading

        self.samples: list[tuple[float, float, float]] = []  # (time.time(), busy s, total s)
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.ok = Path("/proc/stat").exists()
        if self.ok:
            self._thread.start()

    @staticmethod
    def _read() -> tuple[float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
        return (total - idle) / hz, total / hz

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy, total = self._read()
            self.samples.append((time.time(), busy, total))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()

    def between(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """(busy core-seconds, busy fraction of all cores) from the samples nearest inside [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not self.ok or len(inside) < 2:
            return None, None
        (_, b0, c0), (_, b1, c1) = inside[0], inside[-1]
        return b1 - b0, (b1 - b0) / (c1 - c0) if c1 > c0 else None


ROLES = {"Sampler": "sampler", "Teacher": "teacher", "Learner": "learner", "Verifier": "verifier",
         "BufferActor": "buffer"}


def _label(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "driver"
    if title.startswith("ray::"):
        cls = title[5:].split(".", 1)[0].split(" ", 1)[0]
        return ROLES.get(cls, "ray_system")
    if any(k in title for k in ("raylet", "gcs_server", "/ray/", "ray/_private", "ray/dashboard")):
        return "ray_system"
    return "other"


class ProcSampler:
    """Every process's cumulative CPU seconds (user + system, children excluded) and its label,
    every ``period`` seconds in a thread (psutil; Linux and macOS)."""

    def __init__(self, period: float = 0.25) -> None:
        import threading

        self.period = period
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            snap: dict[int, tuple[str, float]] = {}
            for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    t = p.info["cpu_times"]
                    snap[p.info["pid"]] = (_label(p.info["pid"], title), t.user + t.system)
                except Exception:  # noqa: BLE001 - a process that ended between listing and reading
                    continue
            self.samples.append((time.time(), snap))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()

    def cpu_by_label(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per label spent in [t0, t1]: per process, its last reading inside the window
        minus its first (a process born inside the window counts from 0). A process keeps the label
        it had most of the time (an idle Ray worker that became an actor is that actor)."""
        inside = [snap for ts, snap in self.samples if t0 <= ts <= t1]
        if len(inside) < 2:
            return {}
        first, labels, last = inside[0], {}, {}
        for snap in inside:
            for pid, (label, cpu) in snap.items():
                labels.setdefault(pid, []).append(label)
                last[pid] = cpu
        out: dict[str, float] = {}
        for pid, cpu in last.items():
            names = [x for x in labels[pid] if x != "ray_system"] or labels[pid]
            label = max(set(names), key=names.count)
            out[label] = out.get(label, 0.0) + max(0.0, cpu - (first[pid][1] if pid in first else 0.0))
        return out


def breakdown(cpu_by_label: dict[str, float], task_s: dict[str, float], busy: float, steps: int,
              step_s: float, cores: int) -> dict[str, float]:
    """Core-seconds per step, adding up to cores × step_s (see the module docstring)."""
    per_step = {k: v / steps for k, v in cpu_by_label.items()}
    out: dict[str, float] = {}
    for role in ROLES.values():
        out[role] = per_step.pop(role, 0.0)
    out["driver"] = per_step.pop("driver", 0.0)
    out["ray_system"] = per_step.pop("ray_system", 0.0)
    tracked = sum(out.values()) + sum(per_step.values())
    out["other"] = max(0.0, busy / steps - tracked) + per_step.pop("other", 0.0)
    out["idle"] = max(0.0, cores * step_s - busy / steps)
    out["total (cores × step_s)"] = cores * step_s
    for cls, role in ROLES.items():
        out[f"method_wall/{role}"] = sum(v for k, v in task_s.items() if k.startswith(cls + ".")) / steps
    return out


LEARNER_STEP_KEYS = {"learner/step_s": "wall", "learner/step_thread_cpu_s": "on_cpu",
                     "learner/step_thread_core_wait_s": "core_wait"}


def learner_step_times(run_dir: Path) -> dict[str, float]:
    """The learner's own account of its train step (TensorBoard scalars, mean over the run's steps after
    the first, whose one-time set-up is not per-step work): the step's wall seconds; the stepping
    thread's seconds on a core and runnable but waiting for one (/proc/thread-self/schedstat, see
    ``learner.learner.thread_sched_s``); and the rest of the wall time, blocked (a lock, a collective,
    I/O). Where ``core_wait`` is most of wall − on_cpu, the learner was queued behind other processes
    for a core; where ``blocked`` is, it waited on something else."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags().get("scalars", []))
    out = {}
    for tag, name in LEARNER_STEP_KEYS.items():
        vals = [e.value for e in ea.Scalars(tag)][1:] if tag in tags else []
        if vals and all(math.isfinite(v) for v in vals):
            out[name] = sum(vals) / len(vals)
    if len(out) == len(LEARNER_STEP_KEYS):
        out["blocked"] = max(0.0, out["wall"] - out["on_cpu"] - out["core_wait"])
    return out


def measure_ceiling(cfg, prompts, n_prompts: int) -> dict[str, float]:
    """The samplers alone: generate ``n_prompts`` prompts (× n responses), chunks as in training."""
    import ray

    from actors.placement import _SAMPLER_ENV, _remote
    from actors.sampler import Sampler

    s = cfg.sampler
    env = {**_SAMPLER_ENV, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
    samplers = [_remote(Sampler, s.num_cpus, s.num_gpus, env).remote(cfg.student.path, s, rank=i,
                                                                     seed=cfg.run.seed)
                for i in range(s.num_samplers)]
    try:
        ray.get([h.ready.remote() for h in samplers])
        chunk = s.chunk_prompts or max(1, math.ceil(cfg.data.prompts_per_step / len(samplers)))
        # warm-up call, not timed (first-call allocations)
        ray.get([h.generate.remote(prompts[:chunk]) for h in samplers])
        t0 = time.perf_counter()
        refs, k = [], 0
        for i in range(0, n_prompts, chunk):
            part = [prompts[(i + j) % len(prompts)] for j in range(min(chunk, n_prompts - i))]
            refs.append(samplers[k % len(samplers)].generate.remote(part))
            k += 1
        rollouts = [r for out in ray.get(refs) for r in out]
        wall = time.perf_counter() - t0
    finally:
        for h in samplers:
            ray.kill(h)
    tokens = sum(r.num_tokens for r in rollouts)
    return {"samples_per_s": len(rollouts) / wall, "tokens_per_s": tokens / wall, "sampler_idle_frac": 0.0,
            "learner_idle_frac": float("nan"), "teacher_idle_frac": float("nan"), "lag_max": 0,
            "weight_sync_s_mean": 0.0, "seconds": wall}


def training_window(t0: float, t1: float) -> tuple[float, float] | None:
    """Wall-clock span from the first learner step's start to the last one's end in [t0, t1]."""
    import ray

    spans = [(e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in ray.timeline()
             if e.get("ph") == "X" and e.get("cat") == "task::Learner.train_step" and t0 <= e["ts"] / 1e6 <= t1]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


def task_seconds(t0: float, t1: float, steps: int) -> dict[str, float]:
    """Where the time went, from Ray's own task events (``ray.timeline``): for every actor
    method that ran between wall-clock ``t0`` and ``t1``, its summed execution seconds per
    training step. Actor start-up is left out; the final checkpoint is inside the window
    (small at the bench's step counts)."""
    import ray

    per: dict[str, float] = {}
    for e in ray.timeline():
        cat = e.get("cat", "")
        if e.get("ph") != "X" or not cat.startswith("task::") or cat.endswith(("__init__", "init_engine")):
            continue  # start-up is not per-step work
        ts = e["ts"] / 1e6
        if t0 <= ts <= t1:
            per[cat.removeprefix("task::")] = per.get(cat.removeprefix("task::"), 0.0) + e["dur"] / 1e6
    return {k: v / steps for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v / steps >= 1e-3}


def run_mode(config, overrides, name: str, steps: int, lag: int, cpu: CpuSampler,
             procs: ProcSampler) -> dict[str, float]:
    from actors.pipeline import run
    from configs.schema import load_config

    cfg = load_config(config, [*overrides, f"buffer.max_lag={lag}", f"run.steps={steps}", "data.heldout=null",
                               f"run.name=bench_{name}", "run.eval_every=0"])
    t0 = time.time()
    s = run(cfg)
    out = {k: s[k] for k in ("samples_per_s", "tokens_per_s", "sampler_idle_frac", "learner_idle_frac",
                             "teacher_idle_frac", "lag_max", "weight_sync_s_mean")}
    t1 = time.time()
    window = training_window(t0, t1)
    busy, frac = cpu.between(*window) if window else (None, None)
    task_s = task_seconds(*window, 1) if window else {}
    out |= {"seconds": s["train_seconds"], "step_s": s["train_seconds"] / steps,
            "cpu_busy_frac": frac, "cpu_s_per_step": busy / steps if busy is not None else None,
            "task_s_per_step": task_seconds(t0, t1, steps), "learner_step": learner_step_times(cfg.run_dir)}
    if window and busy is not None:
        wall = window[1] - window[0]
        out["breakdown"] = breakdown(procs.cpu_by_label(*window), task_s, busy, steps, wall / steps,
                                     os.cpu_count() or 1)
    return out


def _contention_worker(seconds: float, out, model: tuple[str, int, int] | None = None) -> None:
    """One thread of compute for ``seconds`` of wall time; puts (units of work, CPU seconds) on ``out``.
    Without ``model``: small fp32 matmuls of a 128-wide model that stay in a core's own caches. With
    ``model`` = (path, B, L): one unit is the student's own train step (forward, backward, AdamW) on a
    B × L batch, whose weights, optimizer state and activations (tens of MB for the demo's student)
    go through the caches and memory the cores share, as the pipeline's stages do."""
    import torch

    torch.set_num_threads(1)
    if model is None:
        x, w = torch.randn(512, 128), torch.randn(128, 128)

        def unit() -> None:
            y = x
            for _ in range(20):
                y = torch.tanh(y @ w) * 0.5
    else:
        from transformers import AutoModelForCausalLM

        path, B, L = model
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
        ids = torch.randint(0, lm.config.vocab_size, (B, L))

        def unit() -> None:
            lm(input_ids=ids).logits.logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    unit()  # first-call set-up out of the measurement
    t_end, units, c0 = time.perf_counter() + seconds, 0, time.process_time()
    while time.perf_counter() < t_end:
        unit()
        units += 1
    out.put((units, time.process_time() - c0))


def measure_core_contention(seconds: float = 8.0, model: tuple[str, int, int] | None = None) -> dict[str, float]:
    """CPU seconds per unit of the same single-threaded work, alone and with one copy per core
    running at once: what the cores themselves charge for overlap (shared caches, memory
    bandwidth, a host that maps vCPUs onto hyperthreads), whatever the pipeline does. ``model``:
    the work is the student's train step (``_contention_worker``) instead of cache-resident matmuls."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    per_unit = {}
    for k in (1, os.cpu_count() or 1):
        q = ctx.Queue()
        ps = [ctx.Process(target=_contention_worker, args=(seconds, q, model)) for _ in range(k)]
        for p in ps:
            p.start()
        res = [q.get() for _ in ps]
        for p in ps:
            p.join()
        per_unit[k] = sum(c for _, c in res) / sum(u for u, _ in res)
    alone, together = per_unit[1], per_unit[max(per_unit)]
    return {"cpu_s_per_unit_alone": alone, "cpu_s_per_unit_all_cores": together,
            "contention_factor": together / alone}


def student_probe(cfg) -> tuple[str, int, int] | None:
    """The contention probe's batch: one step's responses at half the sampler's context, capped at 4,096
    tokens; None (no probe) for a student over 50M parameters, whose CPU step would take minutes."""
    c = json.loads((Path(cfg.student.path) / "config.json").read_text())
    h, n, v, i = c.get("hidden_size", 0), c.get("num_hidden_layers", 0), c.get("vocab_size", 0), \
        c.get("intermediate_size", 0)
    if 2 * v * h + n * (4 * h * h + 3 * h * i) > 50e6:
        return None
    B = cfg.data.prompts_per_step * cfg.sampler.n
    L = max(2, cfg.sampler.max_model_len // 2)
    return str(cfg.student.path), max(1, min(B, 4096 // L)), L


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lags", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    import ray

    from actors.pipeline import load_data
    from buffers.dataset import as_prompts
    from configs.schema import check_paths, load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.demo.prepare:
        from demo.prepare import prepare

        prepare(cfg.demo.cache_dir, recipe=cfg.demo.recipe)
    check_paths(cfg)
    prompts = as_prompts(load_data(cfg).train)
    contention = measure_core_contention()
    probe = student_probe(cfg)
    contention_student = measure_core_contention(model=probe) if probe else None
    ray.init(address=cfg.run.ray_address) if cfg.run.ray_address else ray.init(
        num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False)
    modes: dict[str, dict[str, float]] = {}
    cpu, procs = CpuSampler(), ProcSampler()
    try:
        modes["ceiling"] = measure_ceiling(cfg, prompts, args.steps * cfg.data.prompts_per_step)
        modes["sync"] = run_mode(args.config, args.overrides, "sync", args.steps, 0, cpu, procs)
        for lag in args.lags:
            modes[f"async_lag{lag}"] = run_mode(args.config, args.overrides, f"async_lag{lag}", args.steps, lag,
                                                cpu, procs)
    finally:
        cpu.stop()
        procs.stop()
        ray.shutdown()
    cores = os.cpu_count() or 1
    sync = modes["sync"]
    # The sync step's own CPU work, spread perfectly over every core: no overlap can beat it.
    sync_cpu_bound = (sync["step_s"] / (sync["cpu_s_per_step"] / cores)
                      if sync.get("cpu_s_per_step") else None)
    best = max((m for m in modes if m.startswith("async")), key=lambda m: modes[m]["samples_per_s"], default=None)
    result = {
        "config": str(args.config or "configs/demo.yaml"), "overrides": args.overrides, "steps": args.steps,
        "prompts_per_step": cfg.data.prompts_per_step, "responses_per_prompt": cfg.sampler.n,
        "modes": modes,
        "best_async": best,
        "async_over_sync": modes[best]["samples_per_s"] / modes["sync"]["samples_per_s"] if best else None,
        "async_over_ceiling": modes[best]["samples_per_s"] / modes["ceiling"]["samples_per_s"] if best else None,
        "cores": cores,
        "sync_cpu_bound": sync_cpu_bound,
        "core_contention": contention,
        # the same, when every CPU-second of work costs contention_factor once all cores are busy
        "sync_cpu_bound_with_contention": (sync_cpu_bound / contention["contention_factor"]
                                           if sync_cpu_bound else None),
        "core_contention_student": ({**contention_student, "batch": list(probe[1:])} if contention_student
                                    else None),
        "sync_cpu_bound_with_student_contention": (sync_cpu_bound / contention_student["contention_factor"]
                                                   if sync_cpu_bound and contention_student else None),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    cols = ("samples_per_s", "tokens_per_s", "sampler_idle_frac", "teacher_idle_frac", "learner_idle_frac",
            "lag_max", "weight_sync_s_mean")
    print(f"{'mode':<12}" + "".join(f"{c:>20}" for c in cols))
    for name, m in modes.items():
        print(f"{name:<12}" + "".join(f"{m[c]:>20.3f}" for c in cols))
    print("\nactor-method execution seconds per step (Ray task events; a step of the loop is step_s):")
    for name, m in modes.items():
        if "task_s_per_step" in m:
            top = ", ".join(f"{k} {v:.3f}" for k, v in list(m["task_s_per_step"].items())[:8])
            print(f"  {name:<12} step_s {m['step_s']:.3f}: {top}")
    print(f"\nthis machine's {cores} cores while training (/proc/stat):")
    for name, m in modes.items():
        if m.get("cpu_busy_frac") is not None:
            print(f"  {name:<12} busy {m['cpu_busy_frac']:.2f} of all cores, {m['cpu_s_per_step']:.2f} CPU-s per step")
    print("\nthe learner's train step, its own account (seconds per step; on_cpu + core_wait + blocked = wall):")
    for name, m in modes.items():
        if m.get("learner_step"):
            print(f"  {name:<12} " + "  ".join(f"{k} {v:.3f}" for k, v in m["learner_step"].items()))
    rows = [m for m in modes if "breakdown" in modes[m]]
    if rows:
        keys = list(modes[rows[0]]["breakdown"])
        print(f"\nwhere every core-second of a step goes ({cores} cores × step time; CPU-s per step; the "
              "method_wall rows are wall seconds inside each role's methods, not part of the sum):")
        print(f"  {'':<28}" + "".join(f"{m:>14}" for m in rows))
        for k in keys:
            print(f"  {k:<28}" + "".join(f"{modes[m]['breakdown'][k]:>14.3f}" for m in rows))
    if sync_cpu_bound:
        print(f"sync_cpu_bound = {sync_cpu_bound:.2f}  (sync step time / its CPU work spread over {cores} cores: "
              "the most any overlap could give here)")
    print(f"core contention: the same single-threaded work costs {contention['contention_factor']:.2f}× the "
          f"CPU-seconds with all {cores} cores busy as alone")
    if sync_cpu_bound:
        print(f"sync_cpu_bound_with_contention = {result['sync_cpu_bound_with_contention']:.2f}")
    if contention_student:
        print(f"core contention, the student's train step ({probe[1]} x {probe[2]} tokens, 1 thread): "
              f"{contention_student['contention_factor']:.2f}× the CPU-seconds with all {cores} cores busy as alone")
        if sync_cpu_bound:
            print(f"sync_cpu_bound_with_student_contention = {result['sync_cpu_bound_with_student_contention']:.2f}")
    if best:
        print(f"async_over_sync = {result['async_over_sync']:.2f}  (best async mode: {best})")
        print(f"async_over_ceiling = {result['async_over_ceiling']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
