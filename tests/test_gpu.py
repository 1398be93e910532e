"""The code paths the CPU test machine never runs, on a CUDA device (marked ``gpu``).

Skipped where ``torch.cuda.is_available()`` is false (tests/conftest.py). On a CUDA machine:
``python -m pytest -m gpu tests/test_gpu.py -rA`` (``python3 scripts/gpu_check.py`` does the
same; ``-k`` picks checks to fit a short device slot, ``GPU_CASE_TIMEOUT_S`` bounds each case's
process, default 300 s). Needs torch, transformers and DeepSpeed; Ray and vLLM are optional
(tests/gpu_cases.py stands check-only stubs in for their module-level imports).

1. learner/objectives.py on CUDA vs CPU for the same random inputs (values and gradients), in
   this process.
2. The learner on the GPU, ZeRO 0 and 3 × bf16 off/on, token budget 24 per micro-batch (several
   micro-batches a step), gradient checkpointing, sdpa, sampler processing T=0.6 / top-p 0.95:
   three train_steps (finite loss, parameters moved); a NaN batch (skipped, weights kept);
   transfer_metadata() (full shapes, none zero-size, equal to the gathered parameters) and
   DeepSpeedSource (bit-exact); compute_logprobs(processed=True) vs a reference from the full
   logits of a plain HF model holding the gathered weights (vLLM's top-p), on responses sampled
   from it (all finite) and on random tokens (-inf agreement); save_hf reloaded with
   transformers (same weights, same log-probs as compute_logprobs). One process per case.
3. Long response: the scripts/bench_memory.py student (V = 151,936), bf16, ZeRO 0, gradient
   checkpointing, top-k term (k = 32): one train step on 4,096 and on 16,384 response tokens;
   reports torch.cuda.max_memory_allocated(), peak per token and the per-token slope.
4. vLLM's NCCL weight transfer (needs vLLM and two GPUs): the learner on cuda:0 sends, a
   receiver process on cuda:1 runs vLLM's NCCLWeightTransferEngine; two rounds (the second
   after a train step) compared bit-exact.

The student of 2 and 4 and the batches are the CPU tests' (tests/builders.py): the fast demo's
tiny Qwen3 and character tokenizer, and test_learner_dp.py's random batch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.gpu

LEARNER_CASES = [(0, False), (0, True), (3, False), (3, True)]  # (ZeRO stage, bf16)
CASE_TIMEOUT_S = int(os.environ.get("GPU_CASE_TIMEOUT_S", "300"))


@dataclass
class CaseRun:
    """What one tests/gpu_cases.py process reported: its checks, exit code and output tail."""

    checks: dict[str, dict]
    rc: int | None
    output: str

    def expect(self, check: str) -> str:
        """Fail unless ``check`` ran and passed; return its detail (the measured figures)."""
        tail = f"\n--- case output (rc={self.rc}), last lines:\n{self.output[-4000:]}"
        if check not in self.checks:
            pytest.fail(f"{check} did not run (an earlier check of the case failed, or the process died){tail}")
        result = self.checks[check]
        assert result["ok"], f"{check}: {result['detail']}{tail}"
        print(f"{check}: {result['detail']}")
        return result["detail"]


def run_case(args: list[str], workdir: Path) -> CaseRun:
    out = workdir / "results.json"
    cmd = [sys.executable, "-m", "tests.gpu_cases", *args, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        text = [s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (e.stdout, e.stderr)]
        rc, output = None, "".join(text) + f"\n(timed out after {CASE_TIMEOUT_S}s: GPU_CASE_TIMEOUT_S)"
    checks = json.loads(out.read_text()) if out.is_file() else {}
    return CaseRun(checks, rc, output)


@pytest.fixture(scope="module")
def gpu_student(tmp_path_factory) -> Path:
    """The fast demo's student, untrained, with logits of std ~1.1 so top-p 0.95 cuts a real share."""
    from tests.builders import save_tiny_student

    return save_tiny_student(tmp_path_factory.mktemp("gpu") / "student", lm_head_std=0.1)


@pytest.fixture(scope="module")
def environment() -> str:
    import torch
    import transformers

    line = (f"torch {torch.__version__} cuda {torch.version.cuda} nccl {torch.cuda.nccl.version()} "
            f"transformers {transformers.__version__} gpus {torch.cuda.device_count()} x "
            f"{torch.cuda.get_device_name(0)} ray={'present' if importlib.util.find_spec('ray') else 'stub'} "
            f"vllm={'present' if importlib.util.find_spec('vllm') else 'absent'}")
    print(line)
    return line


# ------------------------------------------------------------------ 1. objectives, CUDA vs CPU
@pytest.fixture(scope="module")
def objective_inputs() -> dict:
    """Random logits (4 × 16 × 1000, std 3), tokens, a ragged mask (one empty row), behaviour and teacher
    log-probs and top-8 teacher distributions, on the CPU: both devices get the same values."""
    import torch

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the Dirichlet draw takes the global generator
    B, T, V, K = 4, 16, 1000, 8
    tk_lp = torch.log(torch.distributions.Dirichlet(torch.ones(K + 1)).sample((B, T))[..., :K])
    return {
        "logits": torch.randn(B, T, V, generator=g) * 3,
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "mask": (torch.arange(T)[None] < torch.tensor([16, 9, 1, 0])[:, None]).float(),
        "behave": -torch.rand(B, T, generator=g) * 6,
        "teacher": -torch.rand(B, T, generator=g) * 6,
        "tk_ids": torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K),
        "tk_lp": tk_lp.sort(dim=-1, descending=True).values,
    }


def objective_terms(inputs: dict, dev: str, dtype) -> dict:
    """Every objective term and the gradient of their sum on ``inputs``, computed on ``dev``."""
    import torch

    from learner import objectives as obj

    logits, tokens, mask, behave, teacher, tk_ids, tk_lp = (inputs[k] for k in (
        "logits", "tokens", "mask", "behave", "teacher", "tk_ids", "tk_lp"))
    B, T = tokens.shape
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


@pytest.mark.parametrize("dtype_name,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_objectives_on_cuda_equal_the_cpu_values_and_gradients(environment, objective_inputs, dtype_name,
                                                               tol) -> None:
    import torch

    dtype = getattr(torch, dtype_name)
    cpu, gpu = objective_terms(objective_inputs, "cpu", dtype), objective_terms(objective_inputs, "cuda", dtype)
    worst, parts = 0.0, []
    for k in cpu:
        finite = bool(torch.isfinite(gpu[k]).all())
        d = float((cpu[k] - gpu[k]).abs().max()) if cpu[k].numel() else 0.0
        worst = max(worst, d if finite else math.inf)
        parts.append(f"{k}={d:.2e}{'' if finite else '(NONFINITE)'}")
    assert worst < tol, f"max_abs_diff={worst:.3e} (tol {tol}); " + " ".join(parts)


# ------------------------------------------------------------------ 2. the learner on the GPU
@pytest.fixture(scope="module", params=LEARNER_CASES, ids=lambda c: f"zero{c[0]}-{'bf16' if c[1] else 'fp32'}")
def learner_run(request, environment, gpu_student, tmp_path_factory) -> CaseRun:
    zero, bf16 = request.param
    return run_case(["learner", str(gpu_student), str(zero), str(int(bf16))], tmp_path_factory.mktemp("case"))


# The checks of one learner case, in the order they run, and what each one verifies.
LEARNER_CHECKS = {
    "init_engine": "the DeepSpeed engine starts on the GPU",
    "train_step": "three token-budget steps: finite losses, several micro-batches each, the weights move",
    "nonfinite_skip": "a batch with NaN behaviour log-probs is skipped and keeps the weights",
    "transfer_metadata": "transfer_metadata has the full shapes; DeepSpeedSource sends them bit-exact",
    "processed_logprobs": "processed log-probs equal a top-p reference from the full logits",
    "save_hf_reload": "the save_hf export reloads with the same weights and log-probs",
}


@pytest.mark.parametrize("check", list(LEARNER_CHECKS))
def test_learner_case_passes_each_check(learner_run, check) -> None:
    """One test per check of ``LEARNER_CHECKS``, per (ZeRO, bf16) case of ``learner_run``."""
    learner_run.expect(check)


# ------------------------------------------------------------------ 3. a long response
def test_a_16k_token_response_trains_with_finite_loss_and_bounded_memory(environment, tmp_path) -> None:
    """Finite loss on 4,096 and 16,384 response tokens; the peak and slope are reported (bench_memory's
    targets are informational, not asserted: they were set for CPU, where the test cannot run)."""
    run_case(["long", str(tmp_path)], tmp_path).expect("long_response")


# ------------------------------------------------------------------ 4. vLLM's NCCL weight transfer
def test_vllm_nccl_weight_transfer_is_bit_exact_over_two_rounds(environment, gpu_student, tmp_path) -> None:
    import torch

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed on this machine")
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one device: needs two GPUs")
    run = run_case(["transfer", str(gpu_student), str(tmp_path)], tmp_path)
    run.expect("round0")
    run.expect("round1_after_a_train_step")
