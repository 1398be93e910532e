"""SPEC §5 offline teacher cache (Lightning OPD): write it once, train from it without a live teacher.

    SFT data (prompt + response) ──build_cache──▶ <cache>/responses.arrow + cache.json
         (teacher prefill, actors/teacher.py)        (one row per response; identities)

    admit ──▶ CachedTeacher.responses ──▶ sampler.prefill ──▶ verifier ──▶ CachedTeacher.score ──▶ buffer
              (the cached responses,      (the student's        (outcome)    (the cached teacher
               n per prompt)               log-probs, version)                log-probs, top-k)

A row holds the prompt's rendered ids (``prompt_ids``, the student's chat template, as the pipeline
renders them: buffers/dataset.py), the response's ids (its text tokenized alone, EOS appended, as
demo/sft.py trains on it), the teacher's log-prob of every response token and, with ``top_k`` > 0, its top-k
ids and log-probs (flattened T·K), the domain, the prompt id and the response text. The file is Arrow IPC,
uncompressed and memory-mapped when read: a row is a zero-copy slice, so a cache larger than memory costs
page cache, not heap (size ≈ T·(8 + 8K) bytes a response: 16k tokens at top-32 ≈ 4 MB). ``cache.json``
records the teacher's identity, the SFT data's producer (actors/teacher_identity.py) and the top-k;
a teacher other than the producer is refused (configs/teachers.py) unless forced.

Choices the paper leaves open (documented in docs/algorithm.md):
- Rows are keyed by a hash of the rendered prompt ids, so a prompt rendered differently at training time
  (another template) finds nothing (its group is refused and counted) instead of wrong scores.
- A prompt gets ``sampler.n`` responses: its cached ones in turn, starting at epoch × n (repeats when it has
  fewer than n). A response longer than the student's context is cut (finish reason ``length``).
- Behaviour policy (SPEC §2): the student's raw log-probs of the cached tokens at the policy version of
  the prefill. The behaviour weight π_S,old / π_S,version then corrects the policy lag only; it does not
  reweight the teacher-written tokens towards the student's distribution (Lightning OPD trains on the SFT
  rollouts as they are; teacher consistency bounds that gap). The same log-probs give G of SPEC §4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, VerifiedRollout
from configs.teachers import CACHE_META, CacheTeacher, check_consistency, read_cache_meta
from learner.concurrency import CONTROL, ControlPlane

log = logging.getLogger(__name__)

RESPONSES = "responses.arrow"
FORMAT = 1
SCHEMA = pa.schema([
    ("prompt_key", pa.string()), ("prompt_id", pa.string()), ("domain", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.int32())), ("response_text", pa.string()),
    ("teacher_logprobs", pa.list_(pa.float32())), ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float32())),
])


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """The cache's key of a prompt: its rendered token ids (not its id: ids are a data set's choice)."""
    return hashlib.sha1(np.asarray(prompt_ids, dtype=np.int32).tobytes()).hexdigest()


# -- writing --------------------------------------------------------------------------------------
def scored_batch(scored: list[ScoredRollout], top_k: int) -> pa.RecordBatch:
    """Cache rows of scored rollouts (one Arrow record batch; the arrays are concatenated, not listed)."""
    def lists(arrs: list[np.ndarray], typ) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrs])]).astype(np.int32)
        flat = np.concatenate(arrs) if arrs else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(typ.to_pandas_dtype())))

    rs = [s.rollout for s in scored]
    t = [s.teacher for s in scored]
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    return pa.record_batch([
        pa.array([prompt_key(r.prompt_ids) for r in rs]), pa.array([r.prompt.id for r in rs]),
        pa.array([r.prompt.domain for r in rs]),
        lists([np.asarray(r.prompt_ids, np.int32) for r in rs], pa.int32()),
        lists([np.asarray(r.response_ids, np.int32) for r in rs], pa.int32()), pa.array([r.text for r in rs]),
        lists([x.logprobs_T for x in t], pa.float32()),
        lists([x.topk_ids_TK.reshape(-1) if top_k else empty_i for x in t], pa.int32()),
        lists([x.topk_logprobs_TK.reshape(-1) if top_k else empty_f for x in t], pa.float32()),
    ], schema=SCHEMA)


def write_cache(out: str | Path, batches, meta: dict[str, Any]) -> dict[str, Any]:
    """Stream record batches into ``<out>/responses.arrow``, then write ``cache.json`` (last: a cache
    without it is incomplete). Returns the metadata with the row count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE_META).unlink(missing_ok=True)
    rows = 0
    schema = SCHEMA.with_metadata({"uniopd.teacher_cache": json.dumps(meta)})
    with pa.OSFile(str(out / RESPONSES), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b.replace_schema_metadata(schema.metadata))
            rows += b.num_rows
    meta = {**meta, "rows": rows, "format": FORMAT}
    (out / CACHE_META).write_text(json.dumps(meta, indent=1))
    return meta


# -- reading --------------------------------------------------------------------------------------
class CacheReader:
    """The memory-mapped cache and a prompt-key index (built once with numpy: no per-row Python)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_cache_meta(self.path)
        if self.meta is None:
            raise FileNotFoundError(f"{self.path}: no {CACHE_META}; write the cache with scripts/cache_teacher.py")
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path / RESPONSES))).read_all()
        self.top_k = int(self.meta["top_k"])
        keys = self.table.column("prompt_key").to_numpy(zero_copy_only=False)
        uniq, inv = np.unique(keys, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        self._rows = {k: order[bounds[i]:bounds[i + 1]] for i, k in enumerate(uniq)}

    def rows_of(self, prompt_ids: Sequence[int]) -> np.ndarray | None:
        return self._rows.get(prompt_key(prompt_ids))

    def row(self, i: int) -> dict[str, Any]:
        """One response's arrays (zero-copy numpy views into the mapped file)."""
        t = self.table
        out = {c: t.column(c)[int(i)].values.to_numpy(zero_copy_only=False)
               for c in ("response_ids", "teacher_logprobs", "topk_ids", "topk_logprobs")}
        out["text"] = t.column("response_text")[int(i)].as_py()
        return out


class CachedTeacher(ControlPlane):
    """The actor of a ``teachers.<name>: {type: cache}`` (SPEC §5): the cached responses of admitted prompts,
    then their cached teacher scores. Stateless between calls (a row is a function of the prompt, its epoch
    and the sample index), so a restart loses nothing."""

    def __init__(self, name: str, cfg: CacheTeacher, *, group_size: int, top_k: int, max_new_tokens: int,
                 max_model_len: int) -> None:
        self.name, self.n, self.top_k = name, group_size, top_k
        self.max_new_tokens, self.max_model_len = max_new_tokens, max_model_len
        self.reader = CacheReader(cfg.path)
        vocab = self.reader.meta.get("vocab_size") or top_k  # a cache of the whole vocabulary serves any k
        self.top_k = top_k = min(top_k, vocab)
        if top_k > self.reader.top_k:
            raise ValueError(f"teacher {name!r}: the objective needs top-{top_k}, the cache at {cfg.path} holds "
                             f"top-{self.reader.top_k}; rebuild it with --top-k {top_k}")
        self.failures = 0
        self.missing = 0  # prompts refused: not in the cache, or too long for a response

    def _row(self, prompt: Prompt, j: int) -> int | None:
        rows = self.reader.rows_of(prompt.prompt_ids)
        return None if rows is None else int(rows[(prompt.epoch * self.n + j) % len(rows)])

    def _length(self, P: int, T: int) -> int:
        """Response tokens kept: within max_new_tokens and the student's context (a prefill of L tokens
        needs L + 1 ≤ max_model_len, actors/teacher.py)."""
        return max(0, min(T, self.max_new_tokens, self.max_model_len - 1 - P))

    def responses(self, prompts: list[Prompt]) -> list[Rollout]:
        """``group_size`` cached responses per prompt (behaviour log-probs empty: the sampler's prefill
        fills them); a prompt the cache lacks gets refused rollouts (its group is dropped and counted)."""
        t0, out = time.perf_counter(), []
        for p in prompts:
            pids = list(p.prompt_ids)
            for j in range(self.n):
                i = self._row(p, j)
                if i is None or self._length(len(pids), 1) == 0:  # not cached, or no room for a response
                    self.missing += j == 0
                    out.append(Rollout(p, j, pids, [], np.zeros(0, np.float32), -1, "", "refused",
                                       behaviour="prefill"))
                    continue
                row = self.reader.row(i)
                T = len(row["response_ids"])
                keep = self._length(len(pids), T)
                out.append(Rollout(p, j, pids, row["response_ids"][:keep].tolist(), np.zeros(0, np.float32), -1,
                                   row["text"], "stop" if keep == T else "length", behaviour="prefill"))
        if self.missing:
            log.warning("teacher cache %s: %d prompts so far refused (not cached, or too long)", self.name,
                        self.missing)
        self.busy_s += time.perf_counter() - t0
        return out

    def score(self, rollouts: list[Rollout | VerifiedRollout]) -> list[ScoredRollout]:
        """The cached teacher log-probs (and top-k) of each rollout's kept tokens, in input order (the outcome
        is not read: ``Teacher.score``)."""
        t0, out = time.perf_counter(), []
        for v in map(VerifiedRollout.of, rollouts):
            r = v.rollout
            i = self._row(r.prompt, r.sample_idx)
            T = len(r.response_ids)
            if r.finish_reason == "refused" or i is None or T == 0:
                out.append(ScoredRollout(v, TeacherScore(np.zeros(0, np.float32)), self.name, "ok"))
                continue
            row = self.reader.row(i)
            K = self.reader.top_k
            ids_TK = row["topk_ids"].reshape(-1, K)[:T, :self.top_k] if self.top_k else None
            lp_TK = row["topk_logprobs"].reshape(-1, K)[:T, :self.top_k] if self.top_k else None
            out.append(ScoredRollout(v, TeacherScore(row["teacher_logprobs"][:T].astype(np.float32), ids_TK, lp_TK),
                                     self.name, "ok"))
        self.busy_s += time.perf_counter() - t0
        return out

    def generate_greedy(self, prompts: list[Prompt]) -> list[str]:
        raise RuntimeError(f"teacher {self.name!r} is a cache: it has no model to generate with")

    @ray.method(concurrency_group=CONTROL)
    def failure_count(self) -> int:
        return self.failures


# -- the student's side: a prefill on a sampler ----------------------------------------------------
def prefill_logprobs(llm, rollouts: list[Rollout]) -> list[np.ndarray]:
    """Raw log π(y_t | q, y_<t) of each rollout's response under ``llm`` (one batched prefill; vLLM's
    prompt log-probs with k = 0 hold exactly one entry, the actual token, per position: actors/teacher.py)."""
    from vllm import SamplingParams, TokensPrompt

    if not rollouts:
        return []
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(r.prompt_ids) + list(r.response_ids)) for r in rollouts],
                        params, use_tqdm=False)
    res = []
    for r, o in zip(rollouts, outs, strict=True):
        flat, P = o.prompt_logprobs, len(r.prompt_ids)
        s0 = flat.start_indices[P]
        ids = np.asarray(flat.token_ids[s0:], dtype=np.int64)
        if not np.array_equal(ids, np.asarray(r.response_ids, dtype=np.int64)):
            raise RuntimeError("vLLM prompt log-probs are not aligned with the cached response tokens")
        res.append(np.asarray(flat.logprobs[s0:], dtype=np.float32))
    return res


def with_behaviour(rollouts: list[Rollout], logprobs: list[np.ndarray], version: int, rank: int) -> list[Rollout]:
    """The rollouts with the student's prefill log-probs and policy version (refused ones unchanged but
    versioned, so lag stays computable)."""
    it = iter(logprobs)
    return [dataclasses.replace(r, policy_version=version, sampler_rank=rank,
                                behaviour_logprobs_T=next(it) if r.response_ids else r.behaviour_logprobs_T)
            for r in rollouts]


# -- building a cache (scripts/cache_teacher.py) ----------------------------------------------------
def sft_rollouts(cfg, src, response_key: str) -> tuple[list[Rollout], int]:
    """The SFT source's rows as rollouts: prompts rendered as the pipeline renders them (the run's student
    tokenizer, chat template, system prompt and template: buffers/dataset.py), each response tokenized on its
    own with EOS appended (demo/sft.py). Returns the rollouts and the rows skipped (bad or overlong)."""
    from actors.prompt_selection import load_rows

    rows = load_rows(cfg, src)
    tok = rows.tokenizer
    for name, raw in zip(rows.names, rows.tables, strict=True):
        if response_key not in raw.column_names:
            raise ValueError(f"{name}: no response column {response_key!r} (columns: {raw.column_names}); "
                             "pass --response-key")
    texts_of = [list(raw[response_key]) for raw in rows.tables]  # lists: the tokenizer refuses a lazy Column
    texts = [texts_of[f][i] for f, i in rows.where]
    bad = next((k for k, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        f, i = rows.where[bad]
        raise ValueError(f"{rows.names[f]}: row {i}: the response column {response_key!r} holds "
                         f"{type(texts[bad]).__name__}, not text; fix the row or pass --response-key")
    resp_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = [Rollout(p, 0, list(p.prompt_ids), list(ids) + eos, np.zeros(0, np.float32), 0, t, "stop")
           for p, ids, t in zip(rows.prompts, resp_ids, texts, strict=True)]
    return out, rows.skipped


def build_cache(cfg, src, *, response_key: str, teacher_path: str, out: str | Path, top_k: int = 0,
                producer: dict[str, Any] | None = None, force: bool = False, batch: int = 64,
                max_model_len: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Score the SFT source's responses once with the teacher (a vLLM prefill, actors/teacher.py) and write
    the cache. Refuses a teacher other than the SFT data's producer unless ``force`` (teacher consistency)."""
    from actors.teacher import Teacher
    from actors.teacher_identity import model_identity
    from configs.schema import TeacherConfig

    teacher = model_identity(teacher_path)
    check_consistency(teacher, producer, force=force, fix="score with the model that produced the SFT data "
                      "(--teacher-path), or pass --force")
    rollouts, skipped = sft_rollouts(cfg, src, response_key)
    max_len = max_model_len or max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    engine = Teacher("cache", TeacherConfig(path=teacher_path, dtype=dtype, micro_batch_size=batch), top_k=top_k,
                     max_model_len=max_len)
    t0 = time.perf_counter()

    def batches():
        for c in range(0, len(rollouts), batch):
            scored = engine.score(rollouts[c:c + batch])
            bad = [s for s in scored if s.status != "ok"]
            if bad:
                raise RuntimeError(f"the teacher could not score {len(bad)} responses (first: prompt "
                                   f"{bad[0].rollout.prompt.id}); see the log above, or raise --max-model-len")
            yield scored_batch(scored, engine.top_k)

    meta = write_cache(out, batches(), {
        "teacher": teacher, "sft_producer": producer, "forced": bool(force and producer), "top_k": engine.top_k,
        "vocab_size": engine.vocab_size, "student": str(Path(cfg.student.path).resolve()), "source": src.model_dump(mode="json"),
        "response_key": response_key, "skipped_rows": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    meta["score_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("cache %s: %d responses scored by %s in %.1fs", out, meta["rows"], teacher_path, meta["score_seconds"])
    return meta
