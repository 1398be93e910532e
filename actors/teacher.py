"""Teacher actors and per-domain routing (SPEC §1, §5).

A ``Teacher`` holds one teacher model and scores the student's own tokens by a
prefill pass (no generation): log πT(y_t | q, y_<t) for every sampled token and,
when the objective asks for it, the teacher's top-k log-probs at every
student-visited position (SPEC §6). A call that fails returns the rollouts marked
``failed`` (their advantage becomes 0 downstream, SPEC §1) instead of raising, so
one bad batch never kills the run; the failure is counted.

``TeacherRouter`` maps each prompt's domain to its teacher's replicas
(round-robin), validated against the config before any actor starts.
"""

from __future__ import annotations

import itertools
import logging
import random
import time

import numpy as np
import ray

from actors.concurrency import CONTROL
import torch

from buffers.records import Prompt, ScoredRollout, TeacherScore, VerifiedRollout
from configs.schema import TeacherConfig

log = logging.getLogger(__name__)


class Teacher:
    def __init__(self, name: str, cfg: TeacherConfig, *, top_k: int = 0, max_new_tokens: int = 16,
                 chaos_delay_s: float = 0.0, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, int(cfg.num_cpus)) if cfg.num_cpus >= 1 else 1)
        self.name, self.cfg, self.top_k, self.max_new_tokens = name, cfg, top_k, max_new_tokens
        self.device = torch.device("cuda") if cfg.num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=getattr(torch, cfg.dtype)).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.vocab_size = self.model.config.vocab_size
        self.busy_s = 0.0
        self.failures = 0
        self._chaos = (random.Random(seed), chaos_delay_s)

    @torch.no_grad()
    def _score_chunk(self, rollouts: list[VerifiedRollout]) -> list[TeacherScore]:
        seqs = [r.rollout.prompt_ids + r.rollout.response_ids for r in rollouts]
        L = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids_BL = torch.full((len(seqs), L), pad, dtype=torch.long)
        attn_BL = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_BL[i, : len(s)] = torch.tensor(s)
            attn_BL[i, : len(s)] = 1
        logits_BLV = self.model(input_ids=ids_BL.to(self.device), attention_mask=attn_BL.to(self.device)).logits
        logp_BLV = torch.log_softmax(logits_BLV.float(), dim=-1).cpu()
        k = min(self.top_k, self.vocab_size)
        out = []
        for i, r in enumerate(rollouts):
            P, T = len(r.rollout.prompt_ids), len(r.rollout.response_ids)
            # position P-1+t predicts response token t
            pos_TV = logp_BLV[i, P - 1 : P - 1 + T]
            toks = torch.tensor(r.rollout.response_ids, dtype=torch.long)
            lp_T = pos_TV.gather(-1, toks[:, None])[:, 0].numpy().astype(np.float32)
            if k > 0:
                top_lp, top_ids = pos_TV.topk(k, dim=-1)
                out.append(TeacherScore(lp_T, top_ids.numpy().astype(np.int32), top_lp.numpy().astype(np.float32)))
            else:
                out.append(TeacherScore(lp_T))
        return out

    def score(self, rollouts: list[VerifiedRollout]) -> list[ScoredRollout]:
        rng, delay = self._chaos
        if delay:
            time.sleep(rng.uniform(0, delay))  # fault injection (config `chaos`)
        t0 = time.perf_counter()
        try:
            scores: list[TeacherScore] = []
            mb = self.cfg.micro_batch_size
            for i in range(0, len(rollouts), mb):
                scores.extend(self._score_chunk(rollouts[i : i + mb]))
            result = [ScoredRollout(v, s, self.name, "ok") for v, s in zip(rollouts, scores)]
        except Exception:  # noqa: BLE001 - SPEC §1: a failed teacher call zeroes A_t, it does not stop the run
            log.exception("teacher %s failed on a batch of %d rollouts", self.name, len(rollouts))
            self.failures += 1
            result = [ScoredRollout(v, None, self.name, "failed") for v in rollouts]
        self.busy_s += time.perf_counter() - t0
        return result

    @torch.no_grad()
    def generate_greedy(self, prompts: list[Prompt]) -> list[str]:
        """Greedy answers of the teacher itself (the accuracy it sets as the bar)."""
        texts = []
        for p in prompts:
            ids = self.tokenizer(p.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            out = self.model.generate(
                ids,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            texts.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts

    @ray.method(concurrency_group=CONTROL)
    def busy_seconds(self) -> float:
        """Seconds spent working (the driver turns deltas into idle fractions)."""
        return self.busy_s

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> bool:
        return True


class TeacherRouter:
    """Domain → teacher replicas, round-robin over replicas (SPEC §5 per-domain routing)."""

    def __init__(self, teacher_of_domain: dict[str, str], replicas: dict[str, list]) -> None:
        missing = {d: t for d, t in teacher_of_domain.items() if not replicas.get(t)}
        if missing:
            raise ValueError(f"no teacher actors for domains {missing}")
        self.teacher_of_domain = dict(teacher_of_domain)
        self._cycle = {t: itertools.cycle(hs) for t, hs in replicas.items()}
        self.replicas = replicas

    def teacher_name(self, domain: str) -> str:
        return self.teacher_of_domain[domain]

    def pick(self, domain: str):
        return next(self._cycle[self.teacher_of_domain[domain]])
