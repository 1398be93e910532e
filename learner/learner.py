"""The learner actor: DeepSpeed training of the student and the weight broadcast.

W learner actors form one DeepSpeed data-parallel group (gloo on CPU, NCCL on
GPUs); each trains on its shard ``samples[rank::W]`` of every ``TrainBatch``.
One optimizer step per batch, so π_S,old (SPEC §1) is the current parameters: the
same forward pass gives log πθ and, detached, log π_S,old — the learner's own
recomputation, never the sampler's number. The sampler's log-probs enter only as
the behaviour policy of SPEC §2.

Loss (learner/objectives.py): ``pg_weight`` × SPEC §1 clipped policy gradient on
the calibrated advantages + ``dist_weight`` × a SPEC §6 top-k distribution term,
reduced as SPEC §1 says (per response mean, summed, divided by every response of
the global batch, masked ones included).

Rank 0 also owns the learner end of the weight-sync group (learner/weight_sync.py).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time

import numpy as np
import ray

from actors.concurrency import CONTROL
import torch

from buffers.records import TrainBatch, TrainSample
from configs.schema import LearnerConfig, WeightSyncConfig
from learner import objectives as obj
from learner.weight_sync import ParamSpec, WeightSyncGroup, plan_buckets

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


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    """Warmup, then constant / cosine / linear decay to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * frac))
        else:
            decay = 1.0 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def collate(samples: list[TrainSample], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences and response-aligned token tensors."""
    B = len(samples)
    # The teacher may return fewer than top_k (top_k > vocab): never pad categories with fake ids.
    top_k = min([top_k] + [s.topk_ids_TK.shape[1] for s in samples if s.topk_ids_TK is not None]) if top_k else 0
    L = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    T = max(1, max(len(s.response_ids) for s in samples))
    ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((B, L), dtype=torch.long)
    pos_BT = torch.zeros((B, T), dtype=torch.long)
    resp_BT = torch.full((B, T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((B, T))
    behave_BT = torch.zeros((B, T))
    teacher_BT = torch.zeros((B, T))
    has_teacher_B = torch.zeros(B)
    shift_B = torch.zeros(B)
    weight_B = torch.zeros(B)
    excluded_B = torch.tensor([float(s.excluded) for s in samples])
    topk_ids = torch.zeros((B, T, top_k), dtype=torch.long) if top_k else None
    topk_lp = torch.zeros((B, T, top_k)) if top_k else None
    has_topk_B = torch.zeros(B)
    for i, s in enumerate(samples):
        P, t = len(s.prompt_ids), len(s.response_ids)
        ids_BL[i, : P + t] = torch.tensor(s.prompt_ids + s.response_ids)
        attn_BL[i, : P + t] = 1
        if t == 0:
            continue
        # logits at position P-1+j predict response token j
        pos_BT[i, :t] = torch.arange(P - 1, P - 1 + t)
        resp_BT[i, :t] = torch.tensor(s.response_ids)
        mask_BT[i, :t] = 1
        behave_BT[i, :t] = torch.from_numpy(np.array(s.behaviour_logprobs_T))
        shift_B[i] = s.advantage_shift
        weight_B[i] = s.weight
        if s.teacher_logprobs_T is not None:
            teacher_BT[i, :t] = torch.from_numpy(np.array(s.teacher_logprobs_T))
            has_teacher_B[i] = 1
        if top_k and s.topk_ids_TK is not None:
            topk_ids[i, :t] = torch.from_numpy(s.topk_ids_TK[:, :top_k].astype(np.int64))
            topk_lp[i, :t] = torch.from_numpy(np.array(s.topk_logprobs_TK[:, :top_k]))
            has_topk_B[i] = 1
    return dict(ids_BL=ids_BL, attn_BL=attn_BL, pos_BT=pos_BT, resp_BT=resp_BT, mask_BT=mask_BT,
                behave_BT=behave_BT, teacher_BT=teacher_BT, has_teacher_B=has_teacher_B, shift_B=shift_B,
                weight_B=weight_B, excluded_B=excluded_B, topk_ids_BTK=topk_ids, topk_lp_BTK=topk_lp, has_topk_B=has_topk_B)


class Learner:
    def __init__(self, model_path: str, cfg: LearnerConfig, *, rank: int, world_size: int, seed: int,
                 total_steps: int, max_responses_per_step: int) -> None:
        self.model_path, self.cfg, self.rank, self.W = model_path, cfg, rank, world_size
        self.seed, self.total_steps = seed, total_steps
        per_rank = math.ceil(max_responses_per_step / world_size)
        # A fixed number of micro-batches per step keeps DeepSpeed's accumulation boundary fixed.
        self.grad_acc = max(1, math.ceil(per_rank / cfg.micro_batch_size))
        self.engine = None
        self.version = 0
        self.steps_done = 0
        self.skipped_steps = 0
        self.busy_s = 0.0
        self._sync: WeightSyncGroup | None = None

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
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id or 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg, self.total_steps))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.grad_acc,
            "train_batch_size": self.grad_acc * self.W,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": self.cfg.bf16},
            "steps_per_print": 10**9,
        }
        n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=True,
        )
        self.device = self.engine.device
        return n_params

    # -- training -------------------------------------------------------------------------
    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        logits_BLV = self.engine(input_ids=batch["ids_BL"].to(dev), attention_mask=batch["attn_BL"].to(dev)).logits
        V = logits_BLV.shape[-1]
        pos = batch["pos_BT"].to(dev)
        return logits_BLV.float().gather(1, pos[..., None].expand(-1, -1, V))

    def _chunk_loss(self, samples: list[TrainSample], n_total: int) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.cfg.objective
        top_k = o.top_k if o.dist_weight > 0 else 0
        b = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
             for k, v in collate(samples, self.pad_id, top_k).items()}
        logits_BTV = self._forward(b)
        mask = b["mask_BT"]
        logp = obj.gather_logprobs(logits_BTV, b["resp_BT"])
        old = logp.detach()
        has_t = b["has_teacher_B"][:, None]
        # SPEC §1: A_t = log πT − log π_S,old (+ SPEC §4 shift); a failed teacher call gives A_t = 0.
        teacher = torch.where(has_t > 0, b["teacher_BT"], old)
        adv = (obj.distill_advantage(teacher, old) + b["shift_B"][:, None]) * has_t
        imp = self.cfg.importance
        w_BT = obj.behaviour_weights(old, b["behave_BT"], mask, mode=imp.mode, tis_upper=imp.tis_upper,
                                     icepop_low=imp.icepop_low, icepop_high=imp.icepop_high)
        pg_B, pg_stats = obj.pg_loss_per_response(
            logp, old, adv, mask, eps_low=o.eps_low, eps_high=o.eps_high, teacher_logp_BT=teacher,
            mask_threshold=o.mask_threshold, weight_BT=w_BT)
        stats = {"pg_loss": float(obj.reduce_over_batch(pg_B.detach(), b["weight_B"], n_total)),
                 "mismatch_kl": float(obj.mismatch_kl(old, b["behave_BT"], mask)),
                 "clip_frac": float(pg_stats.clip_frac),
                 "masked_token_frac": float(pg_stats.masked_token_frac)}
        dist_B = None
        if top_k:
            tok_BT = obj.topk_divergence(logits_BTV, b["topk_ids_BTK"], b["topk_lp_BTK"],
                                         mask * b["has_topk_B"][:, None], kind=_DIST_KIND[o.dist_kind],
                                         beta=o.jsd_beta)
            dist_B = obj.per_response_mean(tok_BT, mask * b["has_topk_B"][:, None])
            dist_w_B = obj.dist_term_weights(b["weight_B"], o.dist_on_masked, b["excluded_B"])
            stats["dist_loss"] = float(obj.reduce_over_batch(dist_B.detach(), dist_w_B, n_total))
        # SPEC §1 reduction over the *global* batch; DeepSpeed averages gradients over W ranks, so ×W.
        loss = obj.combine_terms(pg_B, dist_B, b["weight_B"], n_total, pg_weight=o.pg_weight,
                                 dist_weight=o.dist_weight, dist_on_masked=o.dist_on_masked,
                                 excluded_B=b["excluded_B"]) * self.W
        return loss, stats

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's shard of ``batch``; returns metrics (rank-local)."""
        t0 = time.perf_counter()
        self.engine.train()
        shard = batch.samples[self.rank :: self.W]
        mb = self.cfg.micro_batch_size
        chunks = [shard[i : i + mb] for i in range(0, len(shard), mb)]
        if len(chunks) > self.grad_acc:
            raise ValueError(f"batch of {len(shard)} responses per rank exceeds the planned "
                             f"{self.grad_acc}×{mb}; raise learner.micro_batch_size")
        chunks += [[]] * (self.grad_acc - len(chunks))
        agg: dict[str, float] = {}
        loss_total = 0.0
        grad_norm = None
        nonfinite = False
        for i, chunk in enumerate(chunks):
            loss = None
            if chunk:
                loss, stats = self._chunk_loss(chunk, batch.n_responses_total)
                if not torch.isfinite(loss.detach()):
                    nonfinite, loss = True, None  # never backward a NaN: the step is skipped below
                else:
                    for k, v in stats.items():
                        # loss terms are already divided by the global response count: they add up;
                        # rates (clip fraction, mismatch KL) are averaged by chunk size.
                        wgt = 1.0 if k in _ADDITIVE else len(chunk) / max(1, len(shard))
                        agg[k] = agg.get(k, 0.0) + v * wgt
            if loss is None:  # keep the accumulation boundary fixed: a zero loss touching every parameter
                loss = sum(p.sum() for p in self.engine.module.parameters()) * 0.0
            loss_total += float(loss.detach()) / self.W
            self.engine.backward(loss, scale_wrt_gas=False)
            if i == len(chunks) - 1:
                if self.cfg.zero_stage < 2:
                    grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                            for g in grads])))
                    nonfinite |= not math.isfinite(grad_norm)
                skip = self._agree_to_skip(nonfinite)
                if skip:
                    self._neutralise_step()
            self.engine.step()
            if i == len(chunks) - 1 and skip:
                for g in self.optimizer.param_groups:  # the scheduler normally set lr already
                    saved = g.pop("_lr_before_skip", g["lr"])
                    if g["lr"] == 0.0:
                        g["lr"] = saved
        self.steps_done += 1
        self.skipped_steps += int(skip)
        gn = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        dt = time.perf_counter() - t0
        self.busy_s += dt
        agg.update({"loss": float("nan") if skip else loss_total, "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(gn) if gn is not None else 0.0, "step_s": dt,
                    "tokens": float(sum(len(s.response_ids) for s in shard)), "skipped_nonfinite": float(skip)})
        if skip:
            log.warning("non-finite loss or gradient at step %d: step skipped, weights kept", self.steps_done)
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
        """Make the coming optimizer step a no-op on the weights: zero gradients (stage 0/1 hold
        them in .grad; with ZeRO-2/3 no non-finite loss was backpropagated) and lr = 0 for this
        step (AdamW's update and weight decay both scale with lr). Moment estimates decay by
        one step; the scheduler restores lr afterwards."""
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        for g in self.optimizer.param_groups:
            g["_lr_before_skip"] = g["lr"]
            g["lr"] = 0.0

    @torch.no_grad()
    def compute_logprobs(self, samples: list[TrainSample]) -> list[np.ndarray]:
        """log πθ of each sample's response tokens (for checks against the samplers)."""
        self.engine.eval()
        b = collate(samples, self.pad_id, 0)
        logp = obj.gather_logprobs(self._forward(b), b["resp_BT"].to(self.device)).cpu()
        return [logp[i, : len(s.response_ids)].numpy() for i, s in enumerate(samples)]

    # -- weight sync ----------------------------------------------------------------------
    def weight_sync_address(self, master_addr: str) -> tuple[str, int]:
        ip = node_ip() if master_addr == "auto" else master_addr
        return ip, free_port()

    def param_specs(self):
        # ZeRO-3 partitions parameters in place (``p.shape`` is then (0,)); ``ds_shape`` keeps the full
        # shape. Found on an H100 (scripts/gpu_check.py): without it the receivers planned empty buckets.
        return [ParamSpec(n, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                for n, p in self._full_named_params()]

    def _full_named_params(self):
        return [(n, p) for n, p in self.engine.module.named_parameters()]

    def join_weight_sync(self, cfg: WeightSyncConfig, addr: str, port: int, world_size: int) -> bool:
        if self.rank != 0:
            return True
        self._sync_cfg = cfg
        self._sync = WeightSyncGroup(backend=cfg.backend, master_addr=addr, master_port=port, rank=0,
                                     world_size=world_size, timeout_s=cfg.timeout_s)
        self._buckets = plan_buckets(self.param_specs(), cfg.bucket_mb)
        return True

    def broadcast_weights(self, version: int) -> dict[str, float]:
        """Every rank calls this (ZeRO-3 gathers collectively); rank 0 sends to the samplers."""
        t0 = time.perf_counter()
        params = [p for _, p in self._full_named_params()]
        sent = 0
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rank == 0:
                    sent = self._sync.send(self._buckets, dict(self._full_named_params()))
        elif self.rank == 0:
            sent = self._sync.send(self._buckets, dict(self._full_named_params()))
        self.version = version
        dt = time.perf_counter() - t0
        self.busy_s += dt
        return {"weight_sync/seconds": dt, "weight_sync/bytes": float(sent)}

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group=CONTROL)
    def busy_seconds(self) -> float:
        """Seconds spent working (the driver turns deltas into idle fractions)."""
        return self.busy_s

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
        """Export the student in Hugging Face format (rank 0 writes)."""
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)
        return out_dir


_ADDITIVE = ("pg_loss", "dist_loss")
_DIST_KIND = {"reverse_kl_topk": "reverse_kl", "forward_kl_topk": "forward_kl", "jsd": "jsd"}
