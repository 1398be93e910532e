"""The student's log-probs at response positions, computed without a positions × vocabulary tensor.

What this module owns: log π_θ(id | ·) for the few ids the loss reads at each response
position — the sampled token (SPEC §1, §2) and, for the SPEC §6 distribution term, the
teacher's top-k ids — from the model's last hidden states, chunk by chunk:

    z_c      = h_c Wᵀ (+ b)                     C × V logits of one chunk of C positions
    logp_c,j = z_c[id_j] − logsumexp(z_c)        C × J, J = 1 (+ K) ids per position

Invariant: no tensor wider than one chunk of logits ever exists — in the forward pass or
the backward pass, and never an fp32 copy of the whole. The forward pass keeps only the
per-position logsumexp; the backward pass recomputes each chunk's logits and turns them in
place into the gradient (the log-softmax rule ∂logp_j/∂z = onehot(id_j) − softmax(z)), so
the extra memory peaks at ≈ C × V × 4 bytes (+ C × V × 2 when the head is bf16), whatever
the sequence length. At Qwen3's V = 151,936 and C = 1024 that is 0.6 GB, where the full
logits of one 8k-token response took ~5 GB per copy.

``ResponseLogprobModel`` wraps a Hugging Face causal LM so that one ``forward`` runs the base
model, picks the response positions and applies the chunked head: DeepSpeed wraps this
module, so ZeRO-3 gathers the head's weight for it (registered as an external parameter by
the learner) and every rank runs the same collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LogitProcessing", "ResponseLogprobModel", "chunked_logprobs", "processed_logprobs"]

# Config attributes by which some architectures transform logits after the lm_head (Gemma 2/3
# soft-capping, Cohere and Granite scaling). The chunked head computes lm_head(h) only, so those
# models are refused instead of trained on the wrong distribution.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _chunk_logits(h_CH: Tensor, weight_VH: Tensor, bias_V: Tensor | None) -> Tensor:
    """fp32 logits of one chunk (the matmul runs in the weights' dtype, as the model's own head)."""
    z_CV = F.linear(h_CH, weight_VH, bias_V)
    return z_CV if z_CV.dtype == torch.float32 else z_CV.float()


class _ChunkedLogSoftmaxGather(torch.autograd.Function):
    """``log_softmax(h Wᵀ + b)[n, ids[n, j]]`` over chunks of positions, recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, ids_NJ: Tensor,
                chunk: int, top_n: int) -> tuple[Tensor, Tensor]:
        N = hidden_NH.shape[0]
        out_NJ = torch.empty(ids_NJ.shape, dtype=torch.float32, device=hidden_NH.device)
        lse_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        top_Nn = torch.empty((N, top_n), dtype=torch.long, device=hidden_NH.device)
        for s in range(0, N, chunk):
            z_CV = _chunk_logits(hidden_NH[s : s + chunk], weight_VH, bias_V)
            picked_CJ = z_CV.gather(1, ids_NJ[s : s + chunk])
            if top_n:  # the student's N likeliest ids (SPEC §6 drift / overlap), read before z is overwritten
                top_Nn[s : s + chunk] = z_CV.topk(top_n, dim=1).indices
            # logsumexp in place (torch.logsumexp would allocate a second C × V buffer)
            max_C = z_CV.amax(dim=1)
            lse_C = max_C + z_CV.sub_(max_C[:, None]).exp_().sum(dim=1).log()
            out_NJ[s : s + chunk] = picked_CJ - lse_C[:, None]
            lse_N[s : s + chunk] = lse_C
            del z_CV
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, ids_NJ, lse_N)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(top_Nn)
        return out_NJ, top_Nn

    @staticmethod
    def backward(ctx, grad_NJ: Tensor, _grad_top: Tensor | None = None):
        hidden_NH, weight_VH, bias_V, ids_NJ, lse_N = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        # The head's gradient sums over every chunk: accumulate in fp32 (a bf16 running sum would
        # round once per chunk where the unchunked matmul rounds once).
        grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        grad_b = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if need_b else None
        for s in range(0, hidden_NH.shape[0], chunk):
            h_CH = hidden_NH[s : s + chunk]
            g_CJ = grad_NJ[s : s + chunk].float()
            # ∂L/∂z = Σ_j g_j (onehot(id_j) − p) = scatter(g) − p · Σ_j g_j, built in the logits' buffer
            gz_CV = _chunk_logits(h_CH, weight_VH, bias_V)
            gz_CV.sub_(lse_N[s : s + chunk, None]).exp_().mul_(-g_CJ.sum(dim=1, keepdim=True))
            gz_CV.scatter_add_(1, ids_NJ[s : s + chunk], g_CJ)
            if need_b:
                grad_b.add_(gz_CV.sum(dim=0))
            gz_CV = gz_CV.to(weight_VH.dtype)
            if need_h:
                grad_h[s : s + chunk] = gz_CV @ weight_VH
            if need_w:
                if weight_VH.dtype == torch.float32:
                    grad_w.addmm_(gz_CV.t(), h_CH)
                else:
                    grad_w.add_(gz_CV.t() @ h_CH)
            del gz_CV
        return (grad_h, grad_w.to(weight_VH.dtype) if need_w else None,
                grad_b.to(bias_V.dtype) if need_b else None, None, None, None)


def chunked_logprobs(hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, ids_NJ: Tensor,
                     chunk_tokens: int, top_n: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    """fp32 ``log softmax(hidden Wᵀ + b)`` at ``ids_NJ`` (J ids per position), C = ``chunk_tokens``
    positions at a time; differentiable in ``hidden_NH``, ``weight_VH`` and ``bias_V``.

    Equals ``torch.log_softmax(F.linear(hidden, W, b).float(), -1).gather(-1, ids)`` in value and
    gradient, with at most one C × V chunk of logits alive (see the module docstring). With ``top_n``
    > 0 it also returns the ids of each position's ``top_n`` largest logits over the whole vocabulary
    (N × top_n, likeliest first, no gradient), taken from the same chunks: ``(logp_NJ, top_ids_Nn)``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens is {chunk_tokens}; it must be ≥ 1 (positions per lm_head chunk)")
    if hidden_NH.dim() != 2 or ids_NJ.dim() != 2 or ids_NJ.shape[0] != hidden_NH.shape[0]:
        raise ValueError(f"hidden_NH {tuple(hidden_NH.shape)} and ids_NJ {tuple(ids_NJ.shape)} must be (N, H) "
                         f"and (N, J) with the same N")
    top_n = min(top_n, weight_VH.shape[0])
    logp_NJ, top_Nn = _ChunkedLogSoftmaxGather.apply(hidden_NH, weight_VH, bias_V, ids_NJ.long().contiguous(),
                                                     chunk_tokens, top_n)
    return (logp_NJ, top_Nn) if top_n > 0 else logp_NJ


@dataclass(frozen=True)
class LogitProcessing:
    """The sampler's logit processing, in vLLM's order: temperature, then min-p, then top-k and
    top-p (``vllm/v1/sample/sampler.py``). The sampler returns log-probs of the distribution it
    drew from (``processed_logprobs``); the SPEC §2 behaviour weight w = π_S,old / π_behave must
    compare the learner's log-probs under the same processing, or it is off by log T-scaling and
    the nucleus mass at every token (Qwen3's 0.6 / 0.95)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.top_k <= 0 and self.top_p >= 1.0 and self.min_p <= 0.0


def _top_p_drop(z_sorted: Tensor, top_p: float) -> Tensor:
    """vLLM's nucleus rule on ascending-sorted logits: drop the tokens whose cumulative probability
    (from the least likely up) is ≤ 1 − p, always keeping the likeliest."""
    drop = z_sorted.softmax(dim=1).cumsum_(dim=1) <= 1 - top_p
    drop[:, -1] = False
    return drop


@torch.no_grad()
def processed_logprobs(hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, ids_N: Tensor,
                       chunk_tokens: int, proc: LogitProcessing) -> Tensor:
    """fp32 log-probs of ``ids_N`` under ``proc`` (no gradient: they only enter the detached
    behaviour weight), C positions at a time; masked tokens get −inf, as in vLLM (a sampled token
    never is). With top-k, only the k largest logits of a position matter: they are taken with
    ``topk`` and top-p applies among them (C × k, not a C × V sort). Top-p without top-k sorts the
    chunk: the sort's values and int64 indices add ≈ 3 × C × V × 4 bytes, so those chunks are a
    quarter of ``chunk_tokens``."""
    full_sort = proc.top_k <= 0 and proc.top_p < 1.0
    chunk = max(1, chunk_tokens // 4) if full_sort else chunk_tokens
    out_N = torch.empty(ids_N.shape[0], dtype=torch.float32, device=hidden_NH.device)
    for s in range(0, hidden_NH.shape[0], chunk):
        z_CV = _chunk_logits(hidden_NH[s: s + chunk], weight_VH, bias_V)
        ids_C1 = ids_N[s: s + chunk, None]
        if proc.temperature != 1.0:
            z_CV.div_(proc.temperature)
        if proc.min_p > 0:
            p_CV = z_CV.softmax(dim=1)
            z_CV.masked_fill_(p_CV < proc.min_p * p_CV.amax(dim=1, keepdim=True), float("-inf"))
            del p_CV
        picked_C = z_CV.gather(1, ids_C1)[:, 0]
        if 0 < proc.top_k < z_CV.shape[1]:
            top_CK = z_CV.topk(proc.top_k, dim=1).values.flip(1)  # ascending, as vLLM sorts
            if proc.top_p < 1.0:
                top_CK = top_CK.masked_fill(_top_p_drop(top_CK, proc.top_p), float("-inf"))
            kept_min_C = torch.where(torch.isinf(top_CK), torch.full_like(top_CK, float("inf")), top_CK).amin(dim=1)
            lse_C = top_CK.logsumexp(dim=1)
            # the token is kept iff its logit reaches the smallest kept one (ties with it are kept, as in vLLM)
            out_N[s: s + chunk] = torch.where(picked_C >= kept_min_C, picked_C - lse_C, float("-inf"))
        else:
            if full_sort:
                z_sorted, idx = z_CV.sort(dim=1, descending=False)
                z_CV.scatter_(1, idx, z_sorted.masked_fill_(_top_p_drop(z_sorted, proc.top_p), float("-inf")))
                del z_sorted, idx
                picked_C = z_CV.gather(1, ids_C1)[:, 0]
            out_N[s: s + chunk] = picked_C - z_CV.logsumexp(dim=1)
        del z_CV
    return out_N


class ResponseLogprobModel(nn.Module):
    """A Hugging Face causal LM whose forward returns log-probs at chosen positions only.

    The causal LM's children (its base model and its lm_head) are registered here under their
    own names, so ``named_parameters`` and ``state_dict`` keys are the Hugging Face ones
    (weight sync, checkpoints and exports see the same names); the causal LM itself is kept
    unregistered in ``causal_lm`` for ``save_pretrained`` and its config.
    """

    def __init__(self, causal_lm: nn.Module, *, chunk_tokens: int) -> None:
        super().__init__()
        name = type(causal_lm).__name__
        head = causal_lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise NotImplementedError(f"{name}'s output layer is {type(head).__name__}; the chunked log-prob "
                                      "path needs a plain nn.Linear lm_head")
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(causal_lm.config, attr, neutral)
            if value is not None and value != neutral:
                raise NotImplementedError(f"{name} transforms its logits after the lm_head (config.{attr} = "
                                          f"{value}); the chunked log-prob path computes lm_head(h) only")
        if any(True for _ in causal_lm.parameters(recurse=False)):
            raise NotImplementedError(f"{name} holds parameters outside its submodules; not supported")
        for child_name, child in causal_lm.named_children():
            self.add_module(child_name, child)
            if child is head:
                self._head_name = child_name
        self._base_name = causal_lm.base_model_prefix
        self.__dict__["causal_lm"] = causal_lm  # not a submodule: parameter names stay the HF ones
        self.chunk_tokens = chunk_tokens

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self._head_name)

    def forward(self, input_ids_BL: Tensor, attention_mask_BL: Tensor, rows_N: Tensor, cols_N: Tensor,
                token_ids_NJ: Tensor, processing: LogitProcessing | None = None, top_n: int = 0) -> Tensor | tuple:
        """``logp_NJ[n, j]`` = log π(token_ids_NJ[n, j] | input_ids_BL[rows_N[n], : cols_N[n] + 1]), fp32.
        With ``processing``, also the (gradient-free) log-probs of ``token_ids_NJ[:, 0]`` under it,
        from the same hidden states: ``(logp_NJ, processed_N)``. With ``top_n`` > 0, also each position's
        ``top_n`` likeliest ids (``chunked_logprobs``), last: ``(logp_NJ, [processed_N,] top_ids_Nn)``."""
        base = getattr(self, self._base_name)
        hidden_BLH = base(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False).last_hidden_state
        hidden_NH = hidden_BLH[rows_N, cols_N]
        logp_NJ = chunked_logprobs(hidden_NH, self.head.weight, self.head.bias, token_ids_NJ, self.chunk_tokens, top_n)
        top = ()
        if top_n > 0:
            logp_NJ, top_Nn = logp_NJ
            top = (top_Nn,)
        if processing is None:
            return (logp_NJ, *top) if top else logp_NJ
        return logp_NJ, processed_logprobs(hidden_NH.detach(), self.head.weight.detach(),
                                           None if self.head.bias is None else self.head.bias.detach(),
                                           token_ids_NJ[:, 0], self.chunk_tokens, processing), *top
