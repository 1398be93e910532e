"""``learner.compile``: per-decoder-layer torch.compile of the student, warmed up before training starts.

One compiled graph serves every decoder layer (the blocks the model lists in ``_no_split_modules``, as
torchtitan and prime-rl compile per block), with dynamic batch and length; the warm-up runs each variant
a training step meets, so compilation is set-up time, not the first steps'.
"""

from __future__ import annotations

import time

import torch

from learner.logprobs import ResponseLogprobModel


def compile_layers(policy: ResponseLogprobModel, pad_id: int, *, no_grad: bool) -> float:
    """``learner.compile``: torch.compile every decoder layer (the classes the model lists in
    ``_no_split_modules``; dynamic shapes, so one graph serves every micro-batch size and length), then run
    the variants training meets through the model, so that compilation happens here and not inside the first
    steps: a padded micro-batch (transformers passes an attention mask), an unpadded one (no mask: causal
    attention) and a single response (batch size 1 is specialised), each with gradient, and without gradient
    too when ``no_grad`` (the SPEC §1 π_S,old pre-pass of parts 2..M). Evaluation-mode forwards
    (``compute_logprobs``, checks only) compile on first use. Gradients are cleared afterwards and nothing
    is stepped. Returns the seconds it took."""
    t0 = time.perf_counter()
    blocks = set(getattr(policy.causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in policy.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"learner.compile: {type(policy.causal_lm).__name__} names no decoder-layer class in "
                         "_no_split_modules, so there is nothing to compile per layer; set learner.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    device = policy.head.weight.device
    vocab = policy.head.weight.shape[0]
    ids = (torch.arange(16, device=device) * 7 + 3) % vocab

    def run(lengths: list[int], grad: bool) -> None:
        B, L = len(lengths), max(lengths)
        ids_BL = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        attn_BL = torch.zeros((B, L), dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            ids_BL[i, :n], attn_BL[i, :n] = ids[:n], 1
        rows = torch.arange(B, device=device)
        cols = torch.tensor([n - 1 for n in lengths], device=device)
        with torch.set_grad_enabled(grad):
            out = policy(input_ids_BL=ids_BL, attention_mask_BL=attn_BL, rows_N=rows, cols_N=cols,
                         token_ids_NJ=ids[:B, None])
            if grad:
                out.sum().backward()

    policy.train()
    try:
        for grad in (True, False) if no_grad else (True,):
            for lengths in ([8, 6], [8, 8], [8]):  # padded (a mask), unpadded (none), one response (B = 1)
                run(lengths, grad)
    except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on GPUs
        raise RuntimeError(f"learner.compile: torch.compile of the decoder layers failed while warming up "
                           f"({type(e).__name__}: {e}); set learner.compile=false") from e
    for p in policy.parameters():
        p.grad = None
    return time.perf_counter() - t0
