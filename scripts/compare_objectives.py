"""The OPD family on one bench: every objective and teacher variant on the demo, same steps, same seeds.

    python scripts/compare_objectives.py [--steps 40] [--seeds 0 1] [--only NAME ...] [--out compare_objectives.json]
                                         [--merge]

Each variant is configs/demo.yaml (math + reversal, the demo's tiny models, η = 0) with the overrides
listed in ``VARIANTS`` and nothing else changed: no variant is tuned beyond its documented default. The
first pair answers the Uni-OPD paper's question with the same objective (the SPEC §1 policy gradient
alone, where the SPEC §4 calibration acts on the whole loss): Uni-OPD (SPEC §3.2 balancing + §4 margin
shift) against vanilla OPD (neither). Every run measures held-out greedy accuracy per domain at
``--steps``/2 and ``--steps`` (the demo's 100 prompts per domain: each figure is ± ~0.05), responses/s
over its training time, and its wall time (actor start-up included). Runs are sequential in this one
process; the table reports the mean over seeds and the per-seed values. Writes ``--out`` and prints a
Markdown table (the README's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see actors/placement.py

_PG = "learner.objective={type: reverse_kl_pg}"
_VANILLA = ["buffer.balance=false", "buffer.calibration=none"]
_TOPK = "top_k: 64, on_masked: true, pg: {weight: 0.1}"  # the demo's top-k settings (64 ≥ the 50-token vocabulary)
_DEMO = {"math": ("math_teacher", "teacher_math", "final_answer"), "reverse": ("reverse_teacher", "teacher_reverse",
                                                                              "answer")}
_PRIVILEGED = "{prompt} ans:{context}"  # the teacher's last user turn: the prompt, then the reference answer


def _flow(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def _train_sources(**extra_by_domain) -> list[dict]:
    """configs/demo.yaml's training sources, each updated with ``extra_by_domain[domain]``."""
    import yaml

    tree = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    return [{**s, **extra_by_domain.get(s["domain"], {})} for s in tree["data"]["train"]]


def _teachers(cache: Path, **more) -> dict:
    return {t: {"path": f"{cache}/{d}", "num_cpus": 0.5} for t, d, _ in _DEMO.values()} | more


def _self_teacher(cache: Path) -> dict:
    """OPSD's privileged student: the current student (follow_student) reading the reference answer."""
    return {"path": f"{cache}/student", "num_cpus": 0.5, "follow_student": True,
            "privileged": {"template": _PRIVILEGED}}


def _with_context() -> str:
    return "data.train=" + _flow(_train_sources(**{d: {"context_key": col} for d, (_, _, col) in _DEMO.items()}))


# name → (what it is, cache dir → overrides of configs/demo.yaml). Each variant at its documented defaults.
VARIANTS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "uniopd_pg": ("Uni-OPD: SPEC §1 policy gradient + §3.2 balancing + §4 margin shift", lambda c: [_PG]),
    "vanilla_pg": ("vanilla OPD: SPEC §1 policy gradient, no balancing, no calibration", lambda c: [_PG, *_VANILLA]),
    "uniopd_fkl": ("Uni-OPD, the demo's objective: forward_kl_topk + 0.1 × §1 term (balanced, shifted)",
                   lambda c: []),
    "vanilla_fkl": ("vanilla OPD, the demo's objective (no balancing, no calibration)", lambda c: _VANILLA),
    "reverse_kl_topk": ("reverse KL over the teacher's top-k + tail, + 0.1 × §1 term",
                        lambda c: [f"learner.objective={{type: reverse_kl_topk, {_TOPK}}}"]),
    "jsd": ("generalised JSD β = 0.5 (GKD), + 0.1 × §1 term",
            lambda c: [f"learner.objective={{type: jsd, beta: 0.5, {_TOPK}}}"]),
    "kl_mix": ("α·forward + (1−α)·reverse KL, α = 0.5, + 0.1 × §1 term",
               lambda c: [f"learner.objective={{type: kl_mix, alpha: 0.5, {_TOPK}}}"]),
    "vopd": ("SPEC §1 term with the vOPD baseline b_t = −KL(π_S‖π_T) (top-32)", lambda c: ["learner.objective=vopd"]),
    "prune_drift": ("SPEC §1 term with Prune-OPD drift control (top-16 overlap < 0.7)",
                    lambda c: ["learner.objective={type: reverse_kl_pg, drift: {}}"]),
    "extrapolated": ("G-OPD / ExOPD λ = 1.25 on the SPEC §1 term, π_ref = the initial student",
                     lambda c: ["learner.objective={type: extrapolated, lam: 1.25}",
                                "teachers=" + _flow(_teachers(c, reference={"path": f"{c}/student",
                                                                            "num_cpus": 0.5}))]),
    "multi_teacher": ("each domain scored by both teachers, confidence-weighted (softmax(c/τ), τ = 1)",
                      lambda c: ["domains.math.teacher=[math_teacher, reverse_teacher]",
                                 "domains.reverse.teacher=[reverse_teacher, math_teacher]"]),
    "opsd": ("self-distillation: the current student reading the reference answer is the teacher (SPEC §1 term)",
             lambda c: [_PG, _with_context(), "teachers=" + _flow({"self": _self_teacher(c)}),
                        "domains.math.teacher=self", "domains.reverse.teacher=self"]),
    "dopd": ("DOPD: each token routed between the domain teacher and the privileged student (SPEC §1 term)",
             lambda c: [_PG, _with_context(), "teachers=" + _flow(_teachers(c, self=_self_teacher(c))),
                        "domains.math.routing={type: dopd, student: self}",
                        "domains.reverse.routing={type: dopd, student: self}"]),
    "aligned_prompts": ("the demo's objective (as uniopd_fkl) on teacher-aligned prompts: the half of each "
                        "domain's training prompts with the largest teacher-minus-student confidence "
                        "(scripts/select_prompts.py, n = 4)",
                        lambda c: [f"data.train={_flow(_selection_sources(c))}"]),
    "cache": ("offline teacher cache (Lightning OPD): the SFT responses scored once, no live teacher",
              lambda c: [f"data.train={_flow(_cache_sources(c))}",
                         "teachers=" + _flow({t: {"type": "cache", "path": f"{c}/compare_cache/{d}"}
                                              for d, (t, _, _) in _DEMO.items()})]),
}


def _cache_sources(cache: Path) -> list[dict]:
    return [{**s, "path": f"{cache}/compare_cache/{s['domain']}_sft.jsonl"} for s in _train_sources()]


def build_caches(cache: Path) -> None:
    """The ``cache`` variant's inputs, once: each domain's SFT set (the demo's training prompts with the
    responses its teachers were SFT'd on, demo/tasks.py:format_response; the teacher is recorded as their
    producer) and its teacher cache (top-64, scripts/cache_teacher.py's builder)."""
    import pyarrow.parquet as pq

    from actors.teacher_cache import build_cache
    from actors.teacher_identity import model_identity, read_producer, write_producer
    from configs.schema import DataSource, load_config
    from demo.tasks import format_response

    out = cache / "compare_cache"
    cfg = load_config(None, ["demo.prepare=false"])
    for src in _cache_sources(cache):
        d, sft = src["domain"], Path(src["path"])
        if (out / d / "cache.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        answer = _DEMO[d][2]
        rows = pq.read_table(str(sft.parent.parent / "data/train" / d)).to_pylist()
        sft.write_text("".join(json.dumps({**r, "response": format_response(d, r[answer])}) + "\n" for r in rows))
        write_producer(sft, model_identity(cache / _DEMO[d][1]))
        build_cache(cfg, DataSource.model_validate(src), response_key="response",
                    teacher_path=str(cache / _DEMO[d][1]), out=out / d, top_k=64, producer=read_producer(sft))


def _selection_sources(cache: Path) -> list[dict]:
    return [{**s, "path": f"{cache}/compare_selection/{s['domain']}/selected.parquet"} for s in _train_sources()]


def build_selections(cache: Path) -> None:
    """The ``aligned_prompts`` variant's inputs, once per domain: scripts/select_prompts.py's selection of
    the demo's training prompts (defaults: n = 4, keep 0.5, teacher confidence ≥ 0.5)."""
    from actors.prompt_selection import select_prompts
    from configs.schema import DataSource, load_config

    cfg = load_config(None, ["demo.prepare=false"])
    for src in _train_sources():
        out = cache / "compare_selection" / src["domain"]
        if not (out / "selection.json").is_file():
            select_prompts(cfg, DataSource.model_validate({**src, "path": str(cache / Path(src["path"]).relative_to(
                ".cache/demo"))}), out=out)


STEP_FIELDS = ("samples_per_s", "train_seconds", "steps")


def overrides_for(name: str, seed: int, steps: int, cache: Path, stamp: str) -> list[str]:
    return [*VARIANTS[name][1](cache), f"run.steps={steps}", f"run.eval_every={max(1, steps // 2)}", f"run.seed={seed}",
            f"run.name=cmp-{stamp}-{name}-s{seed}", "run.output_dir=runs/compare", "run.eval_teachers=true",
            "demo.prepare=false"]


def run_one(name: str, seed: int, steps: int, cache: Path, stamp: str) -> dict:
    from actors.pipeline import run
    from configs.schema import load_config

    cfg = load_config(None, overrides_for(name, seed, steps, cache, stamp))
    t0 = time.perf_counter()
    s = run(cfg)
    wall = time.perf_counter() - t0
    at = {c["step"]: c["accuracy"] for c in s["curve"]}
    return {"variant": name, "seed": seed, "wall_s": wall, **{k: s[k] for k in STEP_FIELDS},
            "accuracy_at": {str(k): v for k, v in sorted(at.items())}, "teacher": s["accuracy"].get("teacher", {}),
            "run_dir": str(cfg.run_dir)}


def table(results: list[dict], steps: int) -> str:
    """Markdown: per variant, held-out accuracy per domain at steps/2 and steps (mean over seeds, then
    each seed), responses/s and wall time (means)."""
    marks = [str(max(1, steps // 2)), str(steps)]
    domains = sorted({d for r in results for acc in r["accuracy_at"].values() for d in acc})
    head = ["variant"] + [f"{d} @{m}" for d in domains for m in marks] + ["responses/s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in [n for n in VARIANTS if any(r["variant"] == n for r in results)]:  # VARIANTS' order
        rs = [r for r in results if r["variant"] == name]
        cells = [name]
        for d in domains:
            for m in marks:
                vals = [r["accuracy_at"][m][d] for r in rs if m in r["accuracy_at"]]
                cells.append(f"{statistics.mean(vals):.2f} ({' / '.join(f'{v:.2f}' for v in vals)})" if vals else "–")
        cells.append(f"{statistics.mean(r['samples_per_s'] for r in rs):.0f}")
        cells.append(f"{statistics.mean(r['wall_s'] for r in rs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (accuracy at steps/2 and steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/demo"), help="the demo's models and data")
    ap.add_argument("--out", default="compare_objectives.json")
    ap.add_argument("--merge", action="store_true", help="keep --out's other runs (same --steps); replace the "
                    "variant × seed pairs run now")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("uniopd").setLevel(logging.INFO)
    os.chdir(REPO)
    cache = args.cache_dir.resolve()
    if not (cache / "READY").is_file():
        from demo.prepare import prepare

        print(f"building the demo cache in {cache} (minutes)", flush=True)
        prepare(cache)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = args.only or list(VARIANTS)
    if "cache" in names:
        build_caches(cache)
    if "aligned_prompts" in names:
        build_selections(cache)
    results = []
    out = {"settings": {"steps": args.steps, "seeds": args.seeds, "config": "configs/demo.yaml",
                        "variants": {n: {"what": VARIANTS[n][0], "overrides": VARIANTS[n][1](cache)} for n in names}},
           "loadavg_at_start": os.getloadavg(), "results": results}
    if args.merge and Path(args.out).is_file():  # add to an earlier invocation's file: replace what is re-run
        old = json.loads(Path(args.out).read_text())
        if old["settings"]["steps"] != args.steps:
            raise SystemExit(f"{args.out} holds {old['settings']['steps']}-step runs, not {args.steps}: no --merge")
        rerun = {(n, s) for n in names for s in args.seeds}
        results += [r for r in old["results"] if (r["variant"], r["seed"]) not in rerun]
        out["failed"] = [f for f in old.get("failed", []) if (f["variant"], f["seed"]) not in rerun]
        out["settings"]["variants"] = old["settings"]["variants"] | out["settings"]["variants"]
        out["settings"]["seeds"] = sorted(set(old["settings"]["seeds"]) | set(args.seeds))
        out["invocations"] = [*old.get("invocations", [{"loadavg_at_start": old.get("loadavg_at_start"),
                                                        "notes": old.get("notes")}]),
                              {"only": names, "seeds": args.seeds, "loadavg_at_start": os.getloadavg(),
                               "started": stamp}]
    for seed in args.seeds:  # seed-major: a cut-short invocation still has every variant at the first seed
        for name in names:
            print(f"=== {name} seed {seed}: {VARIANTS[name][0]}", flush=True)
            try:
                results.append(run_one(name, seed, args.steps, cache, stamp))
            except Exception as e:  # one variant's failure is reported, the others still run
                logging.exception("variant %s seed %d failed", name, seed)
                out.setdefault("failed", []).append({"variant": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            Path(args.out).write_text(json.dumps(out, indent=2))  # nothing computed is lost if a later run fails
    print(f"\n{args.steps} steps, seeds {args.seeds}; held-out accuracy: mean (per seed)\n")
    print(table(results, args.steps))
    for f in out.get("failed", []):
        print(f"FAILED {f['variant']} seed {f['seed']}: {f['error'][:300]}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
