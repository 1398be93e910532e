"""The learner actor: DeepSpeed training of the student and the weight broadcast.

W learner actors form one DeepSpeed data-parallel group (gloo on CPU, NCCL on
GPUs). Every rank sees the whole ``TrainBatch`` and computes the same plan from it
(``plan_micro_batches``, learner/batch.py, which also turns a micro-batch into a typed
``LearnerBatch`` of tensors): its shard, cut into micro-batches of at most
``learner.max_tokens_per_micro_batch`` tokens, and one micro-batch count shared by
all ranks (DeepSpeed needs the same number of backward passes everywhere).
A training step is ``learner.mini_batches`` (M) optimizer steps, one per part of the batch
(``split_mini_batches``: whole prompt groups). π_S,old (SPEC §1) is the policy before the
step's first update — the learner's own recomputation, never the sampler's number: the
first part reads it, detached, from its own forward pass; parts 2..M from a no-grad
forward taken before that update (only when the objective has the §1 term), so the PPO
clip acts on them. M = 1 (the default) is one step per batch, strictly on-policy.
The sampler's log-probs enter only as the behaviour policy of SPEC §2: they are vLLM's
processed log-probs (temperature, min-p, top-k, top-p applied), so the behaviour weight
compares them with the learner's log-probs under the same ``LogitProcessing``, computed without gradient
from the same hidden states; the objectives use the model's own distribution.

Loss (learner/objectives.py, ``learner.objective``): ``pg.weight`` × SPEC §1 clipped policy
gradient on the calibrated advantages + ``weight`` × a SPEC §6 top-k distribution term,
reduced as SPEC §1 says (per response mean, summed, divided by every response of
the global batch, masked ones included).

Memory: the student's log-probs are taken at response positions only, through the
chunked lm_head of learner/logprobs.py, so no micro-batch × sequence × vocabulary
tensor exists; activations scale with the token budget.

Weights go to the samplers through vLLM's weight-transfer API: every rank holds a
trainer engine (vLLM's ``nccl`` one on GPUs, ours for ``gloo``), rank 0 sends
(learner/weight_sync.py).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time

import numpy as np
import torch

from buffers.records import TrainBatch, TrainSample
from configs.schema import (ConstantLR, CosineLR, IcePop, ImportanceConfig, LearnerConfig, LRSchedule, TopKObjective,
                            TruncatedIS, WeightSyncConfig)
from learner import drift as drift_mod
from learner import objectives as obj
from learner.batch import (LearnerBatch, collate, pad_responses, plan_micro_batches, response_positions,
                           split_mini_batches)
from learner.compile import compile_layers
from learner.concurrency import ControlPlane
from learner.logprobs import LogitProcessing, ResponseLogprobModel

log = logging.getLogger(__name__)


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests): loopback
        return "127.0.0.1"


def thread_sched_s() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a core) of the calling thread since it
    started, from the kernel's /proc/thread-self/schedstat; (nan, nan) where that file is absent
    (not Linux, or a kernel without schedstats). A step's wall time minus both is time the thread
    was blocked (a lock, a collective, I/O)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
    except (OSError, ValueError):
        return math.nan, math.nan
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def lr_lambda(schedule: LRSchedule, total_steps: int):
    """``learner.lr_schedule`` as a LambdaLR factor: linear warm-up, then constant, or cosine / linear
    decay to ``min_lr_ratio`` at ``total_steps``."""

    def f(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if isinstance(schedule, ConstantLR):
            return 1.0
        frac = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if isinstance(schedule, CosineLR) else 1.0 - frac
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * decay

    return f


def behaviour_weights(imp: ImportanceConfig, old_logp_BT: torch.Tensor, behave_logp_BT: torch.Tensor,
                      mask_BT: torch.Tensor) -> torch.Tensor:
    """SPEC §2 behaviour weight of every token under ``learner.importance``."""
    if isinstance(imp, TruncatedIS):
        return obj.behaviour_weights(old_logp_BT, behave_logp_BT, mask_BT, mode="tis", tis_upper=imp.upper)
    if isinstance(imp, IcePop):
        return obj.behaviour_weights(old_logp_BT, behave_logp_BT, mask_BT, mode="icepop", icepop_low=imp.low,
                                     icepop_high=imp.high)
    return obj.behaviour_weights(old_logp_BT, behave_logp_BT, mask_BT, mode="none")


class Learner(ControlPlane):
    def __init__(self, model_path: str, cfg: LearnerConfig, *, rank: int, world_size: int, seed: int,
                 total_steps: int, processing: LogitProcessing = LogitProcessing()) -> None:
        self.model_path, self.cfg, self.rank, self.W = model_path, cfg, rank, world_size
        self.processing = processing
        self.seed, self.total_steps = seed, total_steps
        self.engine = None
        self.version = 0
        self.steps_done = 0
        self.skipped_steps = 0
        self.busy_s = 0.0
        self._transfer = None  # the trainer-side weight-transfer engine (vLLM interface)
        self._transfer_bytes = 0

    # -- setup ----------------------------------------------------------------------------
    def dist_address(self) -> tuple[str, int]:
        ip = node_ip()
        return ip, free_port()

    def init_engine(self, master_addr: str, master_port: int) -> int:
        """Initialise DeepSpeed; every rank must call this concurrently. Returns the param count."""
        use_gpu = self.cfg.num_gpus > 0 and torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.W), LOCAL_RANK="0")
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(self.seed)
        policy = self.build_policy(AutoModelForCausalLM, self.model_path, self.cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.compile_s = 0.0
        if self.cfg.compile:
            policy = policy.to(self.device_for(use_gpu))
            self.compile_s = compile_layers(policy, self.pad_id, no_grad=self.cfg.objective.pg is not None
                                            and self.cfg.mini_batches > 1)
            log.info("learner rank %d: decoder layers compiled and warmed up in %.1fs", self.rank, self.compile_s)
            torch.manual_seed(self.seed)  # the warm-up's training-mode passes (dropout) leave the stream as eager's
        if self.cfg.offload_optimizer:  # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised Adam, not torch's
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(policy.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                         adamw_mode=True)
        else:
            # fused: one kernel over all parameters instead of a loop of per-tensor ops (torch's CPU and CUDA
            # kernel; measured on the CPU bench: 1.2 ms against 4.5 ms per optimizer step of the 1M-parameter
            # demo student)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                          fused=True)
        # DeepSpeed steps the scheduler once per optimizer step, M per training step; the schedule counts
        # training steps (warm-up and decay mean the same whatever M is).
        per_step, m = lr_lambda(self.cfg.lr_schedule, self.total_steps), self.cfg.mini_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: per_step(k // m))
        zero: dict = {"stage": self.cfg.zero_stage}
        if self.cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        ds_config = {
            # The number of micro-batches changes from step to step (token budget): train_step marks the
            # accumulation boundary itself, so DeepSpeed's own count stays 1 and scales nothing.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.W,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.cfg.bf16},
            "steps_per_print": 10**9,
        }
        if self.cfg.zero_stage == 3:
            # The chunked head reads lm_head.weight inside the wrapper's forward, not through
            # lm_head's own: ZeRO-3 must gather it for the wrapper (forward and backward).
            deepspeed.zero.register_external_parameter(policy, policy.head.weight)
        n_params = sum(p.numel() for p in policy.parameters())  # before ZeRO-3 partitions them
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=True,
        )
        self.device = self.engine.device
        return n_params

    @staticmethod
    def device_for(use_gpu: bool) -> torch.device:
        """The device DeepSpeed will put this rank's model on (its accelerator's current device)."""
        return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    @staticmethod
    def build_policy(auto_cls, model_path: str, cfg: LearnerConfig) -> ResponseLogprobModel:
        """The student as DeepSpeed trains it: loaded in the training dtype with the configured attention
        kernel, gradient checkpointing if asked, behind the chunked log-prob head."""
        kw = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = auto_cls.from_pretrained(model_path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, **kw)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return ResponseLogprobModel(model, chunk_tokens=cfg.logit_chunk_tokens)

    # -- training -------------------------------------------------------------------------
    def _logprobs(self, b: LearnerBatch, top_k: int, processed: bool = False, top_n: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Student log-probs at every real response token: ``(logp_BTJ, logp_NJ, proc_BT, top_BTn)``, J = 1 +
        top_k ids (the sampled token, then the teacher's top-k); 0 at padded positions. ``proc_BT``: with
        ``processed``, the sampled tokens' log-probs under the samplers' ``LogitProcessing`` (no
        gradient; the same as column 0 when the processing is the identity), else None. ``top_BTn``: with
        ``top_n``, the student's ``top_n`` likeliest ids over the vocabulary (SPEC §6 drift, overlap metrics)."""
        rows, cols, t, ids_NJ = response_positions(b, top_k)
        extra = processed and not self.processing.identity
        out = self.engine(input_ids_BL=b.ids_BL, attention_mask_BL=b.attn_BL, rows_N=rows, cols_N=cols,
                          token_ids_NJ=ids_NJ, processing=self.processing if extra else None, top_n=top_n)
        out = out if isinstance(out, tuple) else (out,)
        logp_NJ, proc_N = out[0], (out[1] if extra else None)
        B, T = b.mask_BT.shape
        logp_BTJ = logp_NJ.new_zeros((B, T, ids_NJ.shape[1])).index_put((rows, t), logp_NJ)
        proc_BT = None
        if processed:
            proc_BT = (logp_BTJ[..., 0].detach() if proc_N is None
                       else proc_N.new_zeros((B, T)).index_put((rows, t), proc_N))
        top_BTn = out[-1].new_zeros((B, T, out[-1].shape[1])).index_put((rows, t), out[-1]) if top_n else None
        return logp_BTJ, logp_NJ, proc_BT, top_BTn

    def _chunk_loss(self, samples: list[TrainSample], n_total: int,
                    old_T: list[tuple[np.ndarray, np.ndarray]] | None = None
                    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """One micro-batch's share of the step loss, its stats, and the model output it came from. ``old_T``:
        per sample, π_S,old's raw and processed log-probs of its tokens from before the step's first update
        (``_old_logprobs``); None: the current parameters are π_S,old (the step's first part)."""
        o = self.cfg.objective
        dist = o if isinstance(o, TopKObjective) else None
        b = collate(samples, self.pad_id, o.top_k).to(self.device)
        top_k = b.top_k  # collate caps it at what the teacher returned
        top_n = (max(top_k if self.cfg.topk_overlap_metrics else 0, o.drift.top_n if o.drift else 0)
                 if top_k else 0)
        logp_BTJ, out_NJ, old_proc, s_top = self._logprobs(b, top_k, processed=True, top_n=top_n)
        mask = b.mask_BT
        logp = logp_BTJ[..., 0]
        old = logp.detach()
        if old_T is not None:
            T = mask.shape[1]
            old = pad_responses([o_raw for o_raw, _ in old_T], T).to(self.device)
            old_proc = pad_responses([o_proc for _, o_proc in old_T], T).to(self.device)
        if b.raw_behave_B is not None and bool(b.raw_behave_B.any()):  # cached responses: raw against raw
            old_proc = torch.where(b.raw_behave_B[:, None] > 0, old, old_proc)
        stats = {"mismatch_kl": float(obj.mismatch_kl(old_proc, b.behave_BT, mask))}
        topk_mask = mask * b.has_topk_B[:, None]
        if top_n and self.cfg.topk_overlap_metrics:  # "Rethinking OPD" diagnostics, per domain
            stats.update(drift_mod.overlap_metrics(s_top, b.topk_ids_BTK, b.topk_lp_BTK, logp_BTJ[..., 1:],
                                                   topk_mask, [x.domain for x in samples]))
        token_w = None
        if o.drift is not None and top_n:  # SPEC §6 Prune-OPD: weights and the truncated window, both terms
            overlap = drift_mod.topn_overlap(s_top, b.topk_ids_BTK, b.topk_lp_BTK, o.drift.top_n)
            d = drift_mod.drift_control(overlap, topk_mask, o.drift)
            mask, topk_mask, token_w = mask * d.window_BT, topk_mask * d.window_BT, d.weight_BT
            stats.update(d.stats)
        pg_B = None
        if o.pg is not None:
            has_t = b.has_teacher_B[:, None]
            # SPEC §1: A_t = log πT − log π_S,old (+ SPEC §4 shift); a failed teacher call gives A_t = 0.
            teacher = torch.where(has_t > 0, b.teacher_BT, old)
            adv = obj.distill_advantage(teacher, old)
            if o.pg.baseline == "vopd" and top_k:  # SPEC §6 vOPD: A_t − b_t, b_t = −KL(π_S,old ‖ π_T) (top-k)
                adv = adv - obj.vopd_baseline(logp_BTJ[..., 1:], b.topk_lp_BTK, topk_mask)
            if b.teacher_w_BT is not None:  # DOPD routing weights (actors/dopd.py), before the §4 shift
                adv = adv * b.teacher_w_BT
            adv = (adv + b.shift_B[:, None]) * has_t
            # SPEC §2: π_S,old / π_behave, both under the samplers' processing (temperature, top-p, ...)
            w_BT = behaviour_weights(self.cfg.importance, old_proc, b.behave_BT, mask)
            w_BT = w_BT if token_w is None else w_BT * token_w
            pg_B, pg_stats = obj.pg_loss_per_response(
                logp, old, adv, mask, eps_low=o.pg.eps_low, eps_high=o.pg.eps_high, teacher_logp_BT=teacher,
                mask_threshold=o.pg.mask_threshold, weight_BT=w_BT)
            stats.update({"pg_loss": float(obj.reduce_over_batch(pg_B.detach(), b.weight_B, n_total)),
                          "clip_frac": float(pg_stats.clip_frac),
                          "masked_token_frac": float(pg_stats.masked_token_frac)})
        dist_B = None
        if dist is not None and top_k:
            dist_mask = topk_mask
            tok_BT = obj.topk_divergence_from_logprobs(logp_BTJ[..., 1:], b.topk_lp_BTK, dist_mask,
                                                       **obj.TOPK_OBJECTIVES[dist.type](dist))
            tok_BT = tok_BT if token_w is None else tok_BT * token_w
            dist_B = obj.per_response_mean(tok_BT, dist_mask)
            dist_w_B = obj.dist_term_weights(b.weight_B, dist.on_masked, b.excluded_B)
            stats["dist_loss"] = float(obj.reduce_over_batch(dist_B.detach(), dist_w_B, n_total))
        if pg_B is None and dist_B is None:  # no §1 term and no top-k returned: nothing to learn from
            return self._zero_loss(out_NJ), stats, out_NJ
        # SPEC §1 reduction over the *global* batch; DeepSpeed averages gradients over W ranks, so ×W.
        loss = obj.combine_terms(pg_B, dist_B, b.weight_B, n_total, pg_weight=o.pg.weight if o.pg else 0.0,
                                 dist_weight=dist.weight if dist else 0.0,
                                 dist_on_masked=dist.on_masked if dist else False,
                                 excluded_B=b.excluded_B) * self.W
        return loss, stats, out_NJ

    def _dummy_sample(self) -> TrainSample:
        """A one-token response, for the forward passes an empty micro-batch still owes its collectives."""
        return TrainSample([self.pad_id], [self.pad_id], np.zeros(1, np.float32), None, None, None, 0.0, 0.0,
                           0, "", False, "")

    def _zero_loss(self, out_NJ: torch.Tensor | None = None) -> torch.Tensor:
        """A loss of exactly 0 whose backward runs the same graph as a real micro-batch's (the same
        parameters, the same order, hence the same ZeRO collectives on every rank). Without ``out_NJ``
        (an empty micro-batch) it first runs the model on a one-token dummy response."""
        if out_NJ is None:
            b = collate([self._dummy_sample()], self.pad_id, 0).to(self.device)
            out_NJ = self._logprobs(b, 0)[1]
        # nan_to_num: a non-finite output contributes a 0 upstream gradient, not NaN·0 = NaN
        return torch.nan_to_num(out_NJ, nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One training step on this rank's share of ``batch``: ``learner.mini_batches`` optimizer steps, one per
        part (``split_mini_batches``). Returns metrics (rank-local): rates averaged over the parts by size,
        counts summed, ``lr`` the last."""
        t0, c0, (on0, wait0) = time.perf_counter(), time.process_time(), thread_sched_s()
        self.engine.train()
        parts = split_mini_batches(batch, self.cfg.mini_batches)
        olds: list[dict[int, tuple[np.ndarray, np.ndarray]] | None] = [None] * len(parts)
        if self.cfg.objective.pg is not None:  # SPEC §1 π_S,old of parts 2..M: before the first update
            olds[1:] = [self._old_logprobs(p) for p in parts[1:]]
        per_part = [self._optimizer_step(p, o) for p, o in zip(parts, olds)]
        agg = _merge_parts(per_part)
        agg = drift_mod.token_means(agg)  # per-token rates (drift, overlap) over the whole shard
        self.steps_done += 1
        self.skipped_steps += int(agg["skipped_nonfinite"])
        dt = time.perf_counter() - t0
        self.busy_s += dt
        on1, wait1 = thread_sched_s()
        # step_cpu_s: every thread of the process; the thread_ pair: this one (the step's compute with one
        # torch thread), on a core and waiting for one: on a shared node, how much of step_s the learner
        # lost to other processes taking its core
        agg.update({"step_s": dt, "step_cpu_s": time.process_time() - c0, "step_thread_cpu_s": on1 - on0,
                    "step_thread_core_wait_s": wait1 - wait0, "optimizer_steps": float(len(parts))})
        return agg

    def _plan(self, part: TrainBatch) -> tuple[list[int], list[list[list[int]]]]:
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in part.samples]
        return lengths, plan_micro_batches(lengths, self.W, self.cfg.max_tokens_per_micro_batch,
                                           self.cfg.micro_batch_size)

    @torch.no_grad()
    def _response_logprobs(self, samples: list[TrainSample], micro_batches: list[list[int]], processed: bool
                           ) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        """No-grad log-probs of the response tokens of ``samples``, micro-batch by micro-batch (the training
        path: token-budget micro-batches, chunked head): per sample index, the raw log-probs and, with
        ``processed``, those under the samplers' ``LogitProcessing`` (SPEC §2), else None. An empty
        micro-batch still runs a one-token forward under ZeRO-3, whose forward gathers weights collectively."""
        out: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for mb in micro_batches:
            if not mb:
                if self.cfg.zero_stage == 3:
                    self._logprobs(collate([self._dummy_sample()], self.pad_id, 0).to(self.device), 0)
                continue
            b = collate([samples[i] for i in mb], self.pad_id, 0).to(self.device)
            logp_BTJ, _, proc_BT, _ = self._logprobs(b, 0, processed=processed)
            raw = logp_BTJ[..., 0].cpu().numpy()
            proc = proc_BT.cpu().numpy() if processed else None
            for row, i in enumerate(mb):
                t = len(samples[i].response_ids)
                out[i] = (raw[row, :t].copy(), None if proc is None else proc[row, :t].copy())
        return out

    def _old_logprobs(self, part: TrainBatch) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """SPEC §1 π_S,old of this rank's share of ``part``, taken before the step's first update: per sample
        index, the raw log-probs of its response tokens and those under the samplers' processing (SPEC §2).
        The part's own micro-batch plan, so every rank runs the same number of forward passes (ZeRO-3
        gathers weights inside each)."""
        return self._response_logprobs(part.samples, self._plan(part)[1][self.rank], processed=True)

    def _optimizer_step(self, part: TrainBatch, old: dict[int, tuple[np.ndarray, np.ndarray]] | None
                        ) -> dict[str, float]:
        """One optimizer step on this rank's share of ``part`` (micro-batches accumulated); its metrics."""
        lengths, plan = self._plan(part)
        chunks = [[part.samples[i] for i in mb] for mb in plan[self.rank]]
        shard = [s for c in chunks for s in c]
        agg: dict[str, float] = {}
        loss_total = 0.0
        grad_norm = None
        nonfinite = False
        for i, (chunk, mb) in enumerate(zip(chunks, plan[self.rank])):
            last = i == len(chunks) - 1
            self.engine.set_gradient_accumulation_boundary(last)  # the plan, not a fixed count, ends the step
            loss = None
            if chunk:
                loss, stats, out_NJ = self._chunk_loss(chunk, part.n_responses_total,
                                                       None if old is None else [old[j] for j in mb])
                if not torch.isfinite(loss.detach()):
                    # never backward a NaN: back-propagate 0 through the same graph; the step is skipped below
                    nonfinite, loss = True, self._zero_loss(out_NJ)
                else:
                    for k, v in stats.items():
                        # loss terms are already divided by the global response count: they add up;
                        # rates (clip fraction, mismatch KL) are averaged by chunk size.
                        wgt = 1.0 if k in _ADDITIVE or "#" in k else len(chunk) / max(1, len(shard))
                        agg[k] = agg.get(k, 0.0) + v * wgt
            if loss is None:  # an empty micro-batch: this rank has less work, the backward count stays equal
                loss = self._zero_loss()
            loss_total += float(loss.detach()) / self.W
            self.engine.backward(loss, scale_wrt_gas=False)
            if last:
                # Only ZeRO-0 still holds full gradients in .grad here (ZeRO-1 moved them into its
                # partitions at the boundary backward): its pre-clip norm is read now, so that a
                # non-finite gradient skips the step.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None] \
                    if self.cfg.zero_stage == 0 else []
                if grads:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                            for g in grads])))
                    nonfinite |= not math.isfinite(grad_norm)
                skip = self._agree_to_skip(nonfinite)
                if skip:
                    self._neutralise_step()
            self.engine.step()
            if last and skip:
                for g in self.optimizer.param_groups:  # the scheduler normally set lr already
                    saved = g.pop("_lr_before_skip", g["lr"])
                    if g["lr"] == 0.0:
                        g["lr"] = saved
        gn = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        padded = sum(len(c) * max(lengths[j] for j in mb) for c, mb in zip(chunks, plan[self.rank]) if c)
        agg.update({"loss": float("nan") if skip else loss_total, "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(gn) if gn is not None else 0.0,
                    "tokens": float(sum(len(s.response_ids) for s in shard)), "skipped_nonfinite": float(skip),
                    "micro_batches": float(len(chunks)), "#responses": float(len(shard)),
                    "pad_frac": 1.0 - sum(lengths[j] for mb in plan[self.rank] for j in mb) / max(1, padded)})
        if skip:
            log.warning("non-finite loss or gradient at step %d: optimizer step skipped, weights kept",
                        self.steps_done)
        return agg

    def _agree_to_skip(self, nonfinite: bool) -> bool:
        """All ranks skip together (one rank's NaN would otherwise split the replicas)."""
        if not self.cfg.skip_nonfinite:
            if nonfinite:
                raise FloatingPointError("non-finite loss or gradient and learner.skip_nonfinite is false")
            return False
        flag = torch.tensor([float(nonfinite)], device=self.device)
        if self.W > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _neutralise_step(self) -> None:
        """Make the coming optimizer step a no-op on the weights: zero gradients (stage 0 holds
        them in .grad; with ZeRO-1/2/3 no non-finite loss was backpropagated) and lr = 0 for this
        step (AdamW's update and weight decay both scale with lr). Moment estimates decay by
        one step; the scheduler restores lr afterwards."""
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        for g in self.optimizer.param_groups:
            g["_lr_before_skip"] = g["lr"]
            g["lr"] = 0.0

    def compute_logprobs(self, samples: list[TrainSample], processed: bool = False) -> list[np.ndarray]:
        """log πθ of each sample's response tokens (for checks against the samplers; ``processed``:
        under the samplers' ``LogitProcessing``, as they report them), through the same token-budget
        micro-batches and chunked head as training. Under ZeRO-3 every rank must call it with the
        same samples (the forward gathers weights collectively)."""
        self.engine.eval()
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        plan = plan_micro_batches(lengths, 1, self.cfg.max_tokens_per_micro_batch, self.cfg.micro_batch_size)[0]
        got = self._response_logprobs(samples, plan, processed)
        return [got[i][1] if processed else got[i][0] for i in range(len(samples))]

    # -- weight sync (vLLM's weight-transfer API; learner/weight_sync.py) ----------------------
    def weight_sync_address(self, master_addr: str) -> tuple[str, int]:
        ip = node_ip() if master_addr == "auto" else master_addr
        return ip, free_port()

    def init_weight_transfer(self, receivers: list, worker_ranks: list[int], cfg: WeightSyncConfig, dtype: str,
                             addr: str, port: int) -> bool:
        """Every rank: build the trainer-side engine of ``cfg.backend`` over this rank's parameters in
        the samplers' ``dtype``; rank 0 opens the group at ``addr:port`` and has every receiver join it
        (``worker_ranks``: engine workers per receiver). A previous group is shut down first (a
        restarted sampler forms a new one)."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from learner import weight_sync as ws

        ws.register()
        if self._transfer is not None:
            self._transfer.shutdown()
            self._transfer = None
        source = ws.DeepSpeedSource(self.engine.module, dtype=getattr(torch, dtype), zero3=self.cfg.zero_stage == 3)
        meta = source.metadata()
        self._transfer_bytes = sum(math.prod(m.shape) * torch.empty((), dtype=m.dtype).element_size() for m in meta)
        client = ws.SamplerDrivenClient(receivers, worker_ranks, cfg.timeout_s, ws.update_info_of(meta))
        info = ws.trainer_init_info(cfg.backend, rank=self.rank, master_address=addr, master_port=port,
                                    world_size=1 + sum(worker_ranks), bucket_mb=cfg.bucket_mb, timeout_s=cfg.timeout_s)
        self._transfer = ws.run_with_deadline(
            lambda: WeightTransferTrainerFactory.trainer_init(info, client=client, source=source),
            cfg.timeout_s + 5, "set-up of the transfer group")
        self._sync_timeout_s = cfg.timeout_s
        return True

    def transfer_metadata(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, full shape, wire dtype) of what ``send_weights`` sends (ZeRO-3: the full shapes)."""
        from learner import weight_sync as ws

        dtype = torch.bfloat16 if self.cfg.bf16 else torch.float32
        meta = ws.DeepSpeedSource(self.engine.module, dtype=dtype, zero3=self.cfg.zero_stage == 3).metadata()
        return [(m.name, tuple(m.shape), str(m.dtype).removeprefix("torch.")) for m in meta]

    def send_weights(self, version: int) -> dict[str, float]:
        """Every rank calls this (ZeRO-3 gathers each parameter collectively); rank 0 streams the
        weights, bucket by bucket, to the samplers, which load them in their ``receive_weights``."""
        from learner import weight_sync as ws

        if self._transfer is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        t0 = time.perf_counter()
        ws.run_with_deadline(self._transfer.send_weights, self._sync_timeout_s, f"sending version {version}")
        self.version = version
        dt = time.perf_counter() - t0
        self.busy_s += dt
        return {"weight_sync/seconds": dt, "weight_sync/bytes": float(self._transfer_bytes if self.rank == 0 else 0)}

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """DeepSpeed state (model, optimizer, scheduler, ZeRO shards) + RNG; every rank calls this."""
        self.engine.save_checkpoint(path, tag="state", client_state={
            **client_state, "torch_rng": torch.get_rng_state(), "version": self.version,
            "steps_done": self.steps_done})

    def load_checkpoint(self, path: str) -> dict:
        load_path, client = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no learner checkpoint under {path}")
        torch.set_rng_state(client["torch_rng"])
        self.version, self.steps_done = client["version"], client["steps_done"]
        return {k: v for k, v in client.items() if k != "torch_rng"}

    def param_checksum(self) -> float:
        """Sum of |θ| over all parameters (to check that a load restored what was saved)."""
        with torch.no_grad():
            return float(sum(p.detach().double().abs().sum() for p in self.engine.module.parameters()))

    def save_hf(self, out_dir: str) -> str:
        """Export the student in Hugging Face format; every rank calls this. Under ZeRO-3 each
        parameter is gathered in turn (a collective) and rank 0 keeps a CPU copy, so no rank holds
        more than one full parameter on the device; rank 0 writes the files."""
        module = self.engine.module
        state = None
        if self.cfg.zero_stage == 3:
            import deepspeed

            state = {}
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        state[name] = p.detach().to("cpu", copy=True)
        if self.rank == 0:
            # module's parameter names are the causal LM's own (ResponseLogprobModel), so the
            # state dict drops straight into save_pretrained
            module.causal_lm.save_pretrained(out_dir, state_dict=state)
            self.tokenizer.save_pretrained(out_dir)
        return out_dir


_ADDITIVE = ("pg_loss", "dist_loss", "drift/tokens_saved")
_COUNTS = ("tokens", "micro_batches", "skipped_nonfinite")


def _merge_parts(per_part: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of a training step's optimizer steps as one: ``name#sum`` / ``name#n`` pairs and counts
    summed, ``lr`` the last part's, every other value (losses, rates, grad norm) the mean over the parts
    weighted by this rank's responses in each."""
    if len(per_part) == 1:
        return {k: v for k, v in per_part[0].items() if k != "#responses"}
    w = [max(1.0, p["#responses"]) for p in per_part]
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for p in per_part for k in p):
        if k == "#responses":
            continue
        if "#" in k or k in _COUNTS:
            out[k] = sum(p.get(k, 0.0) for p in per_part)
        elif k == "lr":
            out[k] = per_part[-1][k]
        else:
            have = [(p[k], wi) for p, wi in zip(per_part, w) if k in p]
            out[k] = sum(v * wi for v, wi in have) / sum(wi for _, wi in have)
    return out
