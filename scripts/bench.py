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
(from Ray's task events) to show where the time goes. Held-out evaluation is switched off: only throughput counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("uniopd")


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


def run_mode(config, overrides, name: str, steps: int, lag: int) -> dict[str, float]:
    from actors.pipeline import run
    from configs.schema import load_config

    cfg = load_config(config, [*overrides, f"buffer.max_lag={lag}", f"run.steps={steps}", "data.heldout=null",
                               f"run.name=bench_{name}", "run.eval_every=0"])
    t0 = time.time()
    s = run(cfg)
    out = {k: s[k] for k in ("samples_per_s", "tokens_per_s", "sampler_idle_frac", "learner_idle_frac",
                             "teacher_idle_frac", "lag_max", "weight_sync_s_mean")}
    return out | {"seconds": s["train_seconds"], "step_s": s["train_seconds"] / steps,
                  "task_s_per_step": task_seconds(t0, time.time(), steps)}


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

    from buffers.dataset import load_prompts
    from configs.schema import check_paths, load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.demo.prepare:
        from scripts.prepare_demo import prepare

        prepare(cfg.demo.cache_dir, recipe=cfg.demo.recipe)
    check_paths(cfg)
    prompts = load_prompts(cfg.data.train, {d: c.verifier.type for d, c in cfg.domains.items()}).prompts
    ray.init(address=cfg.run.ray_address) if cfg.run.ray_address else ray.init(
        num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=False)
    modes: dict[str, dict[str, float]] = {}
    try:
        modes["ceiling"] = measure_ceiling(cfg, prompts, args.steps * cfg.data.prompts_per_step)
        modes["sync"] = run_mode(args.config, args.overrides, "sync", args.steps, 0)
        for lag in args.lags:
            modes[f"async_lag{lag}"] = run_mode(args.config, args.overrides, f"async_lag{lag}", args.steps, lag)
    finally:
        ray.shutdown()
    best = max((m for m in modes if m.startswith("async")), key=lambda m: modes[m]["samples_per_s"], default=None)
    result = {
        "config": str(args.config or "configs/demo.yaml"), "overrides": args.overrides, "steps": args.steps,
        "prompts_per_step": cfg.data.prompts_per_step, "responses_per_prompt": cfg.sampler.n,
        "modes": modes,
        "best_async": best,
        "async_over_sync": modes[best]["samples_per_s"] / modes["sync"]["samples_per_s"] if best else None,
        "async_over_ceiling": modes[best]["samples_per_s"] / modes["ceiling"]["samples_per_s"] if best else None,
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
    if best:
        print(f"async_over_sync = {result['async_over_sync']:.2f}  (best async mode: {best})")
        print(f"async_over_ceiling = {result['async_over_ceiling']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
