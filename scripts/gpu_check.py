"""GPU smoke check of the code paths the CPU test machine never runs.

Run on a CUDA machine from the repository root:  ``python3 scripts/gpu_check.py``

1. Learner (learner/learner.py) with a DeepSpeed engine on the GPU: ZeRO 0 and 3, bf16 off/on;
   a few train_step calls on a hand-made TrainBatch (finite loss, parameters moved), one step
   on a NaN batch (skipped, weights kept).
2. learner/objectives.py on CUDA vs CPU for the same random inputs (max abs diff, values + grads).
3. WeightSyncGroup (learner/weight_sync.py): learner rank 0 broadcasts its parameters to a
   receiver process (nccl on the one GPU, then gloo), plus a world-of-one nccl group.

Prints one ``PASS``/``FAIL`` line per check. Each learner case runs in its own subprocess
(``--case``) so one CUDA/NCCL failure cannot poison the next.
"""

from __future__ import annotations

import argparse
import json
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


_install_ray_stub()

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ tiny model
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


# ------------------------------------------------------------------ check 2: objectives
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


# ------------------------------------------------------------------ check 3 helper: receiver
def _receiver(backend: str, port: int, buckets, q) -> None:
    try:
        _install_ray_stub()
        from learner.weight_sync import WeightSyncGroup

        if backend == "nccl":
            torch.cuda.set_device(0)
        grp = WeightSyncGroup(backend=backend, master_addr="127.0.0.1", master_port=port, rank=1, world_size=2,
                              timeout_s=30)
        got = {}
        for rnd in range(2):
            # numpy, not tensors: torch's Queue shares tensor storage by fd, which breaks once this
            # process exits before the parent unpickles.
            got = {n: t.detach().float().cpu().numpy().copy() for n, t in grp.receive(buckets)}
        q.put(("ok", got))
    except BaseException as e:  # noqa: BLE001
        q.put(("err", f"{type(e).__name__}: {e}"))


# ------------------------------------------------------------------ check 1 (+3): one learner case
def full_params(learner) -> dict[str, torch.Tensor]:
    params = [p for _, p in learner._full_named_params()]
    if learner.cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in learner._full_named_params()}
    return {n: p.detach().float().cpu().clone() for n, p in learner._full_named_params()}


def learner_case(model: str, zero: int, bf16: bool, sync: list[str]) -> None:
    import torch.multiprocessing as mp

    import deepspeed

    from configs.schema import LearnerConfig, ObjectiveConfig, WeightSyncConfig
    from learner.learner import Learner
    from learner.weight_sync import WeightSyncGroup, plan_buckets

    tag = f"learner zero={zero} bf16={bf16}"
    print(f"--- {tag}: deepspeed {deepspeed.__version__}", flush=True)
    cfg = LearnerConfig(num_gpus=1, zero_stage=zero, bf16=bf16, micro_batch_size=4, lr=1e-3,
                        objective=ObjectiveConfig(dist_weight=0.5, top_k=4))
    learner = Learner(model, cfg, rank=0, world_size=1, seed=0, total_steps=10)
    try:
        t = time.perf_counter()
        n = learner.init_engine("127.0.0.1", free_port())
        report(f"{tag} init_engine", str(learner.device).startswith("cuda"),
               f"params={n} device={learner.device} optimizer={type(learner.optimizer).__name__} "
               f"{time.perf_counter() - t:.1f}s")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report(f"{tag} init_engine", False, f"{type(e).__name__}: {e}")
        return
    batch = make_batch()
    try:
        before = full_params(learner)
        lp0 = np.concatenate(learner.compute_logprobs(batch.samples))
        losses = []
        for step in range(3):
            m = learner.train_step(batch)
            losses.append(m["loss"])
            print(f"  step {step}: " + json.dumps({k: round(v, 6) for k, v in m.items()}), flush=True)
        after = full_params(learner)
        lp1 = np.concatenate(learner.compute_logprobs(batch.samples))
        dparam = max(float((before[k] - after[k]).abs().max()) for k in before)
        ok = all(math.isfinite(x) for x in losses) and dparam > 0 and m["skipped_nonfinite"] == 0
        report(f"{tag} train_step x3", ok, f"losses={[round(x, 6) for x in losses]} grad_norm={m['grad_norm']:.4f} "
               f"max|dparam|={dparam:.3e} max|dlogp|={float(np.abs(lp1 - lp0).max()):.3e} "
               f"step_s={m['step_s']:.3f}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report(f"{tag} train_step x3", False, f"{type(e).__name__}: {e}")
        return
    try:  # non-finite step: skipped, weights kept
        before = full_params(learner)
        m = learner.train_step(make_batch(nan_behaviour=True))
        after = full_params(learner)
        dparam = max(float((before[k] - after[k]).abs().max()) for k in before)
        lr_now = learner.optimizer.param_groups[0]["lr"]
        report(f"{tag} nonfinite-skip", m["skipped_nonfinite"] == 1 and dparam == 0 and lr_now > 0,
               f"skipped={m['skipped_nonfinite']} max|dparam|={dparam:.3e} lr_after={lr_now}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report(f"{tag} nonfinite-skip", False, f"{type(e).__name__}: {e}")

    if not sync:
        return
    specs = learner.param_specs()
    n_zero = sum(1 for s in specs if s.numel == 0)
    expect = full_params(learner)
    shapes_ok = all(tuple(expect[s.name].shape) == s.shape for s in specs)
    report(f"{tag} param_specs shapes", shapes_ok and n_zero == 0,
           f"{len(specs)} specs, {n_zero} with numel 0, dtypes={sorted({s.dtype for s in specs})}, "
           f"e.g. {specs[0].name}{specs[0].shape}")
    if not shapes_ok:
        print("  (skipping weight sync for this case: the plan does not match the parameters)", flush=True)
        return
    ctx = mp.get_context("spawn")
    for backend in sync:
        if backend == "nccl1":  # world of one: rank 0 alone
            try:
                # Through the learner's own path (ZeRO-3 gathers inside broadcast_weights).
                learner._sync = None
                learner.join_weight_sync(WeightSyncConfig(backend="nccl", bucket_mb=1.0, timeout_s=30),
                                         "127.0.0.1", free_port(), 1)
                m1 = learner.broadcast_weights(1)
                torch.cuda.synchronize()
                m2 = learner.broadcast_weights(2)
                torch.cuda.synchronize()
                sent = m1["weight_sync/bytes"]
                report(f"{tag} weight_sync nccl world=1", sent > 0,
                       f"bytes={sent:.0f} buckets={len(learner._buckets)} first={m1['weight_sync/seconds']:.4f}s "
                       f"second={m2['weight_sync/seconds']:.4f}s")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report(f"{tag} weight_sync nccl world=1", False, f"{type(e).__name__}: {e}")
            continue
        port = free_port()
        wcfg = WeightSyncConfig(backend=backend, bucket_mb=1.0, timeout_s=30)
        buckets = plan_buckets(specs, wcfg.bucket_mb)
        q = ctx.Queue()
        proc = ctx.Process(target=_receiver, args=(backend, port, buckets, q), daemon=True)
        proc.start()
        try:
            learner._sync = None
            learner.join_weight_sync(wcfg, "127.0.0.1", port, 2)
            m1 = learner.broadcast_weights(1)
            m2 = learner.broadcast_weights(2)
            if backend == "nccl":
                torch.cuda.synchronize()
            status, got = q.get(timeout=90)
            if status != "ok":
                report(f"{tag} weight_sync {backend} 2-proc", False, f"receiver: {got}")
            else:
                diff = max(float((expect[k] - torch.from_numpy(got[k])).abs().max()) for k in expect)
                same_keys = set(got) == set(expect)
                report(f"{tag} weight_sync {backend} 2-proc", same_keys and diff == 0.0,
                       f"max|recv-sent|={diff:.3e} bytes={m1['weight_sync/bytes']:.0f} buckets={len(buckets)} "
                       f"first={m1['weight_sync/seconds']:.4f}s second={m2['weight_sync/seconds']:.4f}s")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rx = ""
            try:
                rx = "; receiver: " + str(q.get(timeout=40)[1])
            except Exception:  # noqa: BLE001
                pass
            report(f"{tag} weight_sync {backend} 2-proc", False, f"sender: {type(e).__name__}: {e}{rx}")
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


# ------------------------------------------------------------------ driver
CASES = [  # (zero, bf16, sync backends)
    (0, False, ["nccl", "gloo", "nccl1"]),
    (0, True, ["nccl1", "gloo"]),
    (3, False, ["gloo"]),
    (3, True, ["nccl1"]),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=4, metavar=("MODEL", "ZERO", "BF16", "SYNC"))
    a = ap.parse_args()
    if a.case:
        model, zero, bf16, sync = a.case
        learner_case(model, int(zero), bf16 == "1", [s for s in sync.split(",") if s])
        return 0 if all(ok for _, ok, _ in RESULTS) else 1

    import transformers

    print(f"torch {torch.__version__} cuda {torch.version.cuda} nccl {torch.cuda.nccl.version()} "
          f"transformers {transformers.__version__} gpu {torch.cuda.get_device_name(0)} "
          f"ray={'stub' if getattr(sys.modules['ray'], '__gpu_check_stub__', False) else 'real'}", flush=True)
    try:
        import deepspeed

        print(f"deepspeed {deepspeed.__version__} accelerator {deepspeed.get_accelerator().device_name()}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"deepspeed import failed: {e!r}", flush=True)
    t0 = time.perf_counter()
    if not os.environ.get("GPU_CHECK_SKIP_OBJ"):
        check_objectives()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(Path(tmp) / "student"))
        cases = CASES
        if os.environ.get("GPU_CHECK_CASES"):  # e.g. "0:0:gloo;3:1:gloo,nccl1"
            cases = [(int(z), b == "1", sy.split(",")) for z, b, sy in
                     (c.split(":") for c in os.environ["GPU_CHECK_CASES"].split(";"))]
        for zero, bf16, sync in cases:
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--case", model, str(zero), "1" if bf16 else "0", ",".join(sync)]
            try:
                r = subprocess.run(cmd, timeout=240, capture_output=True, text=True)
            except subprocess.TimeoutExpired as e:
                print((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), flush=True)
                print((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), flush=True)
                report(f"learner case zero={zero} bf16={bf16} process", False, "timed out after 240s")
                continue
            out = r.stdout + r.stderr
            print(out, flush=True)
            for line in r.stdout.splitlines():
                if line.startswith(("PASS ", "FAIL ")):
                    RESULTS.append((line, line.startswith("PASS"), ""))
            if not any(ln.startswith(("PASS", "FAIL")) for ln in r.stdout.splitlines()) or r.returncode not in (0, 1):
                report(f"learner case zero={zero} bf16={bf16} process", False, f"rc={r.returncode}")
            print(f"(case took {time.perf_counter() - t:.1f}s)", flush=True)
    print("=" * 30 + " SUMMARY", flush=True)
    for name, ok, detail in RESULTS:
        print(name if name.startswith(("PASS", "FAIL")) else f"{'PASS' if ok else 'FAIL'} {name} {detail}")
    print(f"total {time.perf_counter() - t0:.1f}s; {sum(ok for _, ok, _ in RESULTS)}/{len(RESULTS)} passed")
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
