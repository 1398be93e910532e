"""Offline difficulty-aware balancing (SPEC §3.1), before training.

    python scripts/balance_offline.py [CONFIG] [key=value ...] [--k 16] [--out DIR]

Samples k responses per training prompt with the current student through the same
sampler actors as training (temperature 1.0), grades them with the same verifier,
and writes to ``--out`` (default ``<run_dir>/offline_balance``):

- ``pass_rates.jsonl``: id, domain, pass rate, k;
- ``train_balanced.jsonl``: the dataset with middle-difficulty prompts duplicated
  (duplicates get ids ``<id>#dup<j>``; nothing is deleted);
- the pass-rate histogram per domain, before and after, printed.

Point ``data.train`` at the balanced file to train on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("uniopd")


def histogram_table(rates_by_domain: dict[str, list[float]], bins: int) -> str:
    from buffers.balance import pass_rate_histogram

    head = "domain    " + " ".join(f"{i / bins:>5.1f}" for i in range(bins)) + "   total"
    rows = [head]
    for d, rates in sorted(rates_by_domain.items()):
        h = pass_rate_histogram(rates, bins)
        rows.append(f"{d:<10}" + " ".join(f"{c:>5d}" for c in h) + f"   {sum(h):>5d}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--k", type=int, default=16, help="samples per prompt (SPEC §3.1: 16)")
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--max-copies", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from configs.schema import ConfigError, check_paths, load_config

    try:
        cfg = load_config(args.config, [*args.overrides, f"sampler.n={args.k}", "sampler.temperature=1.0"])
        if cfg.demo.prepare:
            from demo.prepare import prepare

            prepare(cfg.demo.cache_dir, recipe=cfg.demo.recipe)
        check_paths(cfg)
    except ConfigError as e:
        log.error("%s", e)
        return 2

    import ray

    from actors.placement import _remote
    from actors.sampler import Sampler
    from actors.verifier import Verifier
    from buffers.balance import rebalance_by_difficulty
    from actors.pipeline import load_data
    from buffers.dataset import as_prompts

    # every training source, rendered as the run renders it (chat template, system prompt, template)
    prompts = as_prompts(load_data(cfg).train)
    if args.limit:
        prompts = prompts[: args.limit]
    out = Path(args.out) if args.out else cfg.run_dir / "offline_balance"
    out.mkdir(parents=True, exist_ok=True)

    ray.init(address=cfg.run.ray_address) if cfg.run.ray_address else ray.init(
        num_cpus=cfg.run.num_cpus, include_dashboard=False)
    try:
        s = cfg.sampler
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib)}
        samplers = [_remote(Sampler, s.num_cpus, s.num_gpus, env).remote(cfg.student.path, s, rank=i,
                                                                         seed=cfg.run.seed)
                    for i in range(s.num_samplers)]
        verifier = _remote(Verifier, cfg.verifier.num_cpus).remote(cfg.domains)
        chunk = 64
        refs = []
        for i in range(0, len(prompts), chunk):
            sampler = samplers[(i // chunk) % len(samplers)]
            refs.append(verifier.verify.remote(sampler.generate.remote(prompts[i : i + chunk])))
        correct: dict[str, list[bool]] = defaultdict(list)
        for verified in ray.get(refs):
            for v in verified:
                correct[v.rollout.prompt.id].append(v.correct)
    finally:
        ray.shutdown()

    rates = {p.id: sum(correct[p.id]) / len(correct[p.id]) for p in prompts}
    with (out / "pass_rates.jsonl").open("w") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "domain": p.domain, "pass_rate": rates[p.id], "k": args.k}) + "\n")
    ids = rebalance_by_difficulty([(p.id, p.domain, rates[p.id]) for p in prompts], bins=args.bins,
                                  max_copies=args.max_copies, rng=random.Random(cfg.run.seed))
    by_id = {p.id: p for p in prompts}
    copies: Counter[str] = Counter()
    before, after = defaultdict(list), defaultdict(list)
    for p in prompts:
        before[p.domain].append(rates[p.id])
    with (out / "train_balanced.jsonl").open("w") as f:
        for pid in ids:
            p = by_id[pid]
            j = copies[pid]
            copies[pid] += 1
            # canonical columns (id, domain, prompt, answer, tests, entry_point): load it with
            # `data.train=<file>` and the same data settings as the original sources
            row = {k: v for k, v in vars(p).items() if k not in ("uid", "epoch", "prompt_ids", "source")
                   and v is not None}
            row["id"] = pid if j == 0 else f"{pid}#dup{j}"
            f.write(json.dumps(row) + "\n")
            after[p.domain].append(rates[pid])
    print(f"pass-rate histogram before ({len(prompts)} prompts, k={args.k}):")
    print(histogram_table(before, args.bins))
    print(f"after ({len(ids)} prompts):")
    print(histogram_table(after, args.bins))
    print(f"wrote {out / 'pass_rates.jsonl'} and {out / 'train_balanced.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
