"""Held-out evaluation: greedy accuracy of the student (through the samplers' vLLM engines)
and of each domain's teacher (through its own engine, cached), graded by the verifier."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from actors.placement import Actors
from actors.stage import get
from actors.teacher import TeacherRouter
from buffers.records import Prompt
from configs.schema import RunConfig

log = logging.getLogger("uniopd")


def _by_domain(prompts: list[Prompt]) -> dict[str, list[Prompt]]:
    out: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        out[p.domain].append(p)
    return out


def accuracy(actors: Actors, prompts: list[Prompt], texts: list[str], timeout: float) -> dict[str, float]:
    """Per domain, the fraction of ``texts`` the verifier grades correct for their ``prompts``."""
    ok = get(actors.verifier.grade_many.remote(texts, prompts), "held-out grading", timeout)
    acc: dict[str, list[bool]] = defaultdict(list)
    for p, c in zip(prompts, ok):
        acc[p.domain].append(c)
    return {d: float(np.mean(v)) for d, v in sorted(acc.items())}


def evaluate_student(cfg: RunConfig, actors: Actors, prompts: list[Prompt]) -> dict[str, float]:
    """Greedy held-out accuracy of the student, spread over the samplers' vLLM engines."""
    k = len(actors.samplers)
    parts = [prompts[j::k] for j in range(k)]
    texts_parts = get([s.generate_greedy.remote(p) for s, p in zip(actors.samplers, parts) if p],
                      "held-out evaluation (student)", cfg.run.eval_timeout_s)
    ordered = [p for part in parts if part for p in part]
    texts = [t for part in texts_parts for t in part]
    return accuracy(actors, ordered, texts, cfg.run.call_timeout_s)


def evaluate_teachers(cfg: RunConfig, actors: Actors, router: TeacherRouter, prompts: list[Prompt]) -> dict[str, float]:
    """The bar: each domain's teacher on its held-out prompts, batched through the teacher's own
    vLLM engine, cached per (teacher, held-out set) under ``<output_dir>/.eval_cache``."""
    by_dom = _by_domain(prompts)
    out: dict[str, float] = {}
    todo = []
    for d in sorted(by_dom):
        if cfg.teachers[cfg.teacher_of_domain[d]].type == "cache":
            continue  # an offline cache (SPEC §5) has no model to set a bar with
        path = eval_cache_path(cfg, d, by_dom[d])
        if path.is_file():
            out[d] = json.loads(path.read_text())["accuracy"]
            log.info("teacher bar for %s from cache %s: %.3f", d, path, out[d])
        else:
            todo.append((d, path))
    if todo:
        texts = get([router.pick(d).generate_greedy.remote(by_dom[d]) for d, _ in todo],
                    "held-out evaluation (teachers)", cfg.run.eval_timeout_s)
        for (d, path), t in zip(todo, texts):
            out[d] = accuracy(actors, by_dom[d], t, cfg.run.call_timeout_s)[d]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"domain": d, "teacher": cfg.teacher_of_domain[d], "accuracy": out[d],
                                        "prompts": len(by_dom[d])}))
    return dict(sorted(out.items()))


def eval_cache_path(cfg: RunConfig, domain: str, prompts: list[Prompt]) -> Path:
    """Key: the teacher's weights (file names, sizes, mtimes), the held-out prompts' ids and tokens, the
    generation length and the domain's verifier."""
    teacher = cfg.teachers[cfg.teacher_of_domain[domain]]
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(teacher.path).glob("*")
                     if f.suffix in (".safetensors", ".bin", ".pt"))
    h = hashlib.sha256(json.dumps([str(Path(teacher.path).resolve()), weights, cfg.sampler.max_new_tokens,
                                   cfg.domains[domain].verifier.model_dump(), sorted(cfg.sampler.stop),
                                   [(p.id, p.prompt_ids, p.answer, p.tests) for p in prompts]]).encode())
    return Path(cfg.run.output_dir) / ".eval_cache" / f"{domain}-{h.hexdigest()[:20]}.json"
