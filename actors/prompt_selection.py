"""Teacher-aligned prompt selection (Rethinking OPD, arXiv 2604.13016): keep the prompts where the teacher
is confident and the student is not, measured at the states the student itself visits.

    prompts ──Sampler.generate (n each)──▶ <out>/responses.arrow   (on disk, memory-mapped: prompt row,
       │                                                            prompt ids, response ids)
       ├──student prefill, top-1 (actors/teacher.py)──▶ c_S(q)
       ├──teacher prefill, top-1 (the domain's teacher)──▶ c_T(q)
       └──select: c_T ≥ min_teacher_confidence, then the `keep` share with the largest c_T − c_S
             ──▶ <out>/selected.parquet (the source's own columns) + scores.parquet + selection.json

Confidence of a model at a state is its modal probability max_v π(v | q, y_<t); a prompt's confidence is
the mean over every response position of its n sampled responses (token-weighted). The paper proposes the
selection without a fixed score; this is our reading of "prompts where the teacher is confident and the
student is not", chosen because (a) it is read at student-visited states, where OPD's signal lives (the
paper's mechanism section), (b) it needs only top-1 prompt log-probs, a prefill per model, never a
B×T×V tensor (vocabulary 151,936 costs vLLM one log-softmax per position, as scoring does), and
(c) it is independent of the reference answer, so it works on prompt sets without solutions.

One engine lives at a time, each in its own spawned process (student sampler, then student scorer, then
each teacher), so a 32B teacher gets the whole node; the responses go to disk between phases and the scores are accumulated per prompt
in numpy arrays, so memory is O(prompts), not O(prompts × n × T). A response a model fails to score
(too long, engine error) is counted and left out of that prompt's mean; a prompt with no scored tokens
is never selected and is counted in ``selection.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from buffers.records import Prompt, Rollout

log = logging.getLogger(__name__)

RESPONSES = "responses.arrow"
SELECTED = "selected.parquet"
SCORES = "scores.parquet"
META = "selection.json"
_ROWS = 10_000  # source rows rendered per slice
_SCHEMA = pa.schema([("prompt_row", pa.int32()), ("prompt_ids", pa.list_(pa.int32())),
                     ("response_ids", pa.list_(pa.int32()))])


# -- the math -------------------------------------------------------------------------------------
class ConfidenceSums:
    """Per-prompt running sums of modal probabilities and token counts (one model)."""

    def __init__(self, n_prompts: int) -> None:
        self.sum = np.zeros(n_prompts, np.float64)
        self.tokens = np.zeros(n_prompts, np.int64)
        self.failed = 0  # responses the model could not score

    def add(self, prompt_row: int, top1_logprobs_T: np.ndarray) -> None:
        self.sum[prompt_row] += float(np.exp(np.asarray(top1_logprobs_T, np.float64)).sum())
        self.tokens[prompt_row] += len(top1_logprobs_T)

    def mean(self) -> np.ndarray:
        """Mean modal probability per prompt (NaN where no token was scored)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tokens > 0, self.sum / np.maximum(self.tokens, 1), np.nan)


def select(c_teacher: np.ndarray, c_student: np.ndarray, *, keep: float, min_teacher_confidence: float) -> np.ndarray:
    """Indices of the selected prompts, best first: those with c_T ≥ ``min_teacher_confidence`` (and both
    scores defined), then the ceil(keep × eligible) with the largest gap c_T − c_S (ties: input order)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    gap = c_teacher - c_student
    eligible = np.flatnonzero(np.isfinite(gap) & (c_teacher >= min_teacher_confidence))
    order = eligible[np.argsort(-gap[eligible], kind="stable")]
    return order[: int(np.ceil(keep * len(eligible)))]


# -- the passes -----------------------------------------------------------------------------------
@dataclass
class SourceRows:
    """The source's valid prompts and where each came from (file index, row index in that file)."""

    prompts: list[Prompt]
    where: list[tuple[int, int]]
    tables: list[Any]  # one ``datasets.Dataset`` per file, the source's own columns
    names: list[str]  # each file's path (or the hub split), for messages
    skipped: int
    tokenizer: Any  # the student's, as loaded for rendering


def load_rows(cfg, src) -> SourceRows:
    """The source rendered as training renders it (buffers/dataset.py), keeping each row's file and index."""
    from transformers import AutoTokenizer

    from buffers.dataset import _convert_batch, _read_files, _RowSpec, prompt_format, source_files
    from buffers.formatting import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(cfg.student.path)
    chat = resolve_chat_template(cfg.data.chat_template, tok, cfg.student.path)
    verifiers = {d: c.verifier.type for d, c in cfg.domains.items()}
    prompts, where, tables, names, skipped = [], [], [], [], 0
    for f, (name, raw) in enumerate(_read_files(src, source_files(src))):
        spec = _RowSpec(src, prompt_format(cfg, src, chat), verifiers, cfg.max_prompt_tokens,
                        src.id_key is not None and src.id_key in raw.column_names)
        tables.append(raw)
        names.append(name)
        for c in range(0, len(raw), _ROWS):  # slices: a large file is never one Python dict of lists
            idx = list(range(c, min(c + _ROWS, len(raw))))
            rows = _convert_batch(raw[c:c + _ROWS], idx, spec=spec, tokenizer=tok, where=name)
            for j, i in enumerate(idx):
                if rows["_error"][j] is not None or rows["_overlong"][j]:
                    if rows["_error"][j]:
                        log.warning("%s", rows["_error"][j])
                    skipped += 1
                    continue
                prompts.append(Prompt(id=rows["id"][j], domain=rows["domain"][j], prompt=rows["prompt"][j],
                                      answer=rows["answer"][j], tests=rows["tests"][j],
                                      entry_point=rows["entry_point"][j], prompt_ids=tuple(rows["prompt_ids"][j]),
                                      source=src.label))
                where.append((f, i))
    return SourceRows(prompts, where, tables, names, skipped, tok)


def _in_fresh_process(fn, *args, **kw):
    """``fn(*args, **kw)`` in a spawned process: the engine's memory (GPU included) is returned to the
    node when it exits, and each engine reads its own vLLM settings (vLLM caches its environment after
    the first engine of a process starts, so a second one in-process would inherit the first's)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kw).result()


def sample_responses(cfg, prompts: list[Prompt], n: int, out: Path, batch: int) -> int:
    """Phase 1: the student samples n responses per prompt (the run's sampler settings) to disk."""
    from actors.sampler import Sampler

    sampler = Sampler(cfg.student.path, cfg.sampler.model_copy(update={"n": n}), seed=cfg.run.seed)
    rows = 0
    with pa.OSFile(str(out / RESPONSES), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        for c in range(0, len(prompts), batch):
            rolls = [r for r in sampler.generate(prompts[c:c + batch]) if r.response_ids]
            index = {id(p): c + j for j, p in enumerate(prompts[c:c + batch])}
            writer.write_batch(pa.record_batch([
                pa.array([index[id(r.prompt)] for r in rolls], pa.int32()),
                pa.array([list(r.prompt_ids) for r in rolls], pa.list_(pa.int32())),
                pa.array([list(r.response_ids) for r in rolls], pa.list_(pa.int32()))], schema=_SCHEMA))
            rows += len(rolls)
    return rows


def _responses(out: Path, prompts: list[Prompt], batch: int) -> Iterator[tuple[np.ndarray, list[Rollout]]]:
    table = pa.ipc.open_file(pa.memory_map(str(out / RESPONSES))).read_all()
    for c in range(0, table.num_rows, batch):
        part = table.slice(c, batch)
        rows = part.column("prompt_row").to_numpy()
        rs = [Rollout(prompts[int(i)], 0, pids, rids, np.zeros(0, np.float32), 0, "", "stop")
              for i, pids, rids in zip(rows, part.column("prompt_ids").to_pylist(),
                                       part.column("response_ids").to_pylist(), strict=True)]
        yield rows, rs


def confidence(name: str, model_cfg, prompts: list[Prompt], out: Path, *, max_model_len: int,
               batch: int) -> ConfidenceSums:
    """Phases 2–3: one model's top-1 log-prob at every sampled response position, summed per prompt."""
    from actors.teacher import Teacher

    engine = Teacher(name, model_cfg, top_k=1, max_model_len=max_model_len)
    sums = ConfidenceSums(len(prompts))
    for rows, rs in _responses(out, prompts, batch):
        for i, s in zip(rows, engine.score(rs), strict=True):
            if s.status != "ok" or s.teacher is None or s.teacher.topk_logprobs_TK is None:
                sums.failed += 1
                continue
            sums.add(int(i), s.teacher.topk_logprobs_TK[:, 0])
    return sums


def teacher_of(cfg, domain: str, teacher_path: str | None):
    """The live teacher that scores ``domain`` (the first of a list), or ``teacher_path`` for every domain."""
    from configs.schema import TeacherConfig

    if teacher_path:
        return "teacher", TeacherConfig(path=teacher_path)
    names = cfg.domains[domain].teacher
    name = names if isinstance(names, str) else names[0]
    tc = cfg.teachers[name]
    if getattr(tc, "type", "vllm") != "vllm" or getattr(tc, "follow_student", False):
        raise ValueError(f"domain {domain!r}: teacher {name!r} is not a fixed model (a cache, or the student "
                         "itself); teacher-aligned selection needs one: pass --teacher-path")
    return name, tc


def _need_model_dir(key: str, path: str) -> None:
    from configs.schema import model_dir_problem

    if problem := model_dir_problem(key, path):
        raise FileNotFoundError(problem)


def _check_failures(who: str, failed: int, total: int, limit: float = 0.5) -> None:
    """Stop when a model fails on most responses: its confidences would rest on a few survivors."""
    if total and failed > limit * total:
        raise RuntimeError(f"{who} could not score {failed} of {total} sampled responses (see the log above); "
                           "raise its max_model_len or lower sampler.max_new_tokens, then run the selection again")


def select_prompts(cfg, src, *, out: str | Path, n: int = 4, keep: float = 0.5, min_teacher_confidence: float = 0.5,
                   teacher_path: str | None = None, batch: int = 256) -> dict[str, Any]:
    """Run the three passes over ``src`` and write the selection (module docstring); returns its summary."""
    import datasets
    import pyarrow.parquet as pq

    from buffers.dataset import source_files
    from configs.schema import TeacherConfig

    source_files(src)  # a missing path fails here, naming it, before any model is loaded
    _need_model_dir("`student.path`", cfg.student.path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    t0 = time.perf_counter()
    rows = load_rows(cfg, src)
    if not rows.prompts:
        raise ValueError(f"source {src.label!r}: no valid prompt to select from ({rows.skipped} rows skipped)")
    scorers = {d: teacher_of(cfg, d, teacher_path) for d in sorted({p.domain for p in rows.prompts})}
    for name, tc in scorers.values():  # every teacher checked before the student samples
        _need_model_dir("--teacher-path" if teacher_path else f"`teachers.{name}.path`", tc.path)
    sampled = _in_fresh_process(sample_responses, cfg, rows.prompts, n, out, batch)
    max_len = cfg.sampler.max_model_len
    s = cfg.sampler
    student_cfg = TeacherConfig(path=cfg.student.path, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size,
                                gpu_memory_utilization=s.gpu_memory_utilization, kv_cache_gib=s.kv_cache_gib)
    c_s = _in_fresh_process(confidence, "student", student_cfg, rows.prompts, out, max_model_len=max_len, batch=batch)
    _check_failures("the student", c_s.failed, sampled)
    c_t_mean = np.full(len(rows.prompts), np.nan)
    teachers, failed_t = {}, 0
    for d, (name, tc) in scorers.items():
        teachers[d] = {"name": name, "path": tc.path}
        mask = np.array([p.domain == d for p in rows.prompts])
        sums = _in_fresh_process(confidence, name, tc, rows.prompts, out, max_model_len=tc.max_model_len or max_len,
                                 batch=batch)
        c_t_mean[mask] = sums.mean()[mask]
        failed_t += sums.failed
        _check_failures(f"teacher {name!r}", sums.failed, int(mask.sum()) * n)
    c_s_mean = c_s.mean()
    chosen = select(c_t_mean, c_s_mean, keep=keep, min_teacher_confidence=min_teacher_confidence)
    picked = np.zeros(len(rows.prompts), bool)
    picked[chosen] = True
    by_file: dict[int, list[int]] = {}
    for k in sorted(chosen.tolist()):  # the source's row order, not the ranking: training shuffles anyway
        f, i = rows.where[k]
        by_file.setdefault(f, []).append(i)
    parts = [rows.tables[f].select(ix) for f, ix in sorted(by_file.items())]
    if parts:
        datasets.concatenate_datasets(parts).to_parquet(str(out / SELECTED))
    pa_scores = pa.table({"id": [p.id for p in rows.prompts], "domain": [p.domain for p in rows.prompts],
                          "student_confidence": c_s_mean, "teacher_confidence": c_t_mean,
                          "gap": c_t_mean - c_s_mean, "selected": picked})
    pq.write_table(pa_scores, str(out / SCORES))
    unscored = int(np.sum(~np.isfinite(c_t_mean - c_s_mean)))
    meta = {
        "source": src.model_dump(mode="json"), "student": str(cfg.student.path), "teachers": teachers,
        "n": n, "keep": keep, "min_teacher_confidence": min_teacher_confidence,
        "prompts": len(rows.prompts), "skipped_rows": rows.skipped, "responses": sampled,
        "failed_responses": {"student": c_s.failed, "teacher": failed_t}, "unscored_prompts": unscored,
        "eligible": int(np.sum(np.isfinite(c_t_mean - c_s_mean) & (c_t_mean >= min_teacher_confidence))),
        "selected": len(chosen), "selected_path": str(out / SELECTED) if parts else None,
        "mean_confidence": {"student": float(np.nanmean(c_s_mean)), "teacher": float(np.nanmean(c_t_mean)),
                            "student_selected": float(np.nanmean(c_s_mean[chosen])) if len(chosen) else None,
                            "teacher_selected": float(np.nanmean(c_t_mean[chosen])) if len(chosen) else None},
        "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / META).write_text(json.dumps(meta, indent=1))
    (out / RESPONSES).unlink(missing_ok=True)  # scratch: the scores are kept, the samples are not needed
    log.info("selected %d of %d prompts (%d eligible) in %.1fs", meta["selected"], meta["prompts"], meta["eligible"],
             meta["seconds"])
    return meta
