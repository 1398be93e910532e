"""The learner's side of the SPEC §2 behaviour weight (learner/logprobs.py ``processed_logprobs``):
log-probs under the samplers' temperature, min-p, top-k and top-p, as vLLM's
``processed_logprobs`` reports them. Hand-computed on a 4-token vocabulary, then against vLLM's own
top-k/top-p routine on random logits, chunked and unchunked alike.

The same agreement through a real engine after a weight update is in tests/test_weight_transfer.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.logprobs import LogitProcessing, processed_logprobs

INF = float("inf")


def _logits_as_hidden(z_NV: torch.Tensor):
    """hidden = logits and W = I, so the head's output is ``z_NV`` itself."""
    V = z_NV.shape[1]
    return z_NV.clone(), torch.eye(V)


def _all_ids(z: torch.Tensor, proc: LogitProcessing, chunk: int = 1024) -> torch.Tensor:
    """processed log-prob of every vocabulary id at every position, one call per id."""
    h, w = _logits_as_hidden(z)
    N, V = z.shape
    return torch.stack([processed_logprobs(h, w, None, torch.full((N,), v), chunk, proc) for v in range(V)], dim=1)


# logits [2, 1, 0, −1] at T = 0.5 are [4, 2, 0, −2]; p ∝ e^4, e^2, 1, e^−2 = 0.8650, 0.1171, 0.0158, 0.0021
Z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
LSE_TOP2 = math.log(math.exp(4) + math.exp(2))


def test_temperature_alone_is_a_scaled_log_softmax():
    got = _all_ids(Z, LogitProcessing(temperature=0.5))
    want = torch.log_softmax(Z / 0.5, dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[0, 0].item() == pytest.approx(4 - math.log(math.exp(4) + math.exp(2) + 1 + math.exp(-2)), abs=1e-6)


def test_top_p_keeps_the_nucleus_and_renormalises():
    # vLLM drops the ascending cumulative mass ≤ 1 − p = 0.1: 0.0021 and 0.0180 go, 0.1351 stays.
    got = _all_ids(Z, LogitProcessing(temperature=0.5, top_p=0.9))[0]
    assert got[0].item() == pytest.approx(4 - LSE_TOP2, abs=1e-6)  # −0.126928
    assert got[1].item() == pytest.approx(2 - LSE_TOP2, abs=1e-6)  # −2.126928
    assert got[2].item() == -INF and got[3].item() == -INF


def test_top_k_and_min_p():
    assert _all_ids(Z, LogitProcessing(temperature=0.5, top_k=1))[0].tolist() == [0.0, -INF, -INF, -INF]
    # min_p 0.1: tokens below 0.1 × 0.8650 are dropped, leaving the same two as top-p 0.9
    got = _all_ids(Z, LogitProcessing(temperature=0.5, min_p=0.1))[0]
    assert got[0].item() == pytest.approx(4 - LSE_TOP2, abs=1e-6) and got[2].item() == -INF


def test_identity_processing_is_the_plain_log_softmax():
    assert LogitProcessing().identity and not LogitProcessing(temperature=0.6).identity
    torch.testing.assert_close(_all_ids(Z, LogitProcessing()), torch.log_softmax(Z, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("proc", [LogitProcessing(0.6, 0, 0.95, 0.0), LogitProcessing(0.7, 20, 0.8, 0.0),
                                  LogitProcessing(1.3, 7, 1.0, 0.05)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_matches_vllms_own_top_k_top_p_on_random_logits(proc, chunk):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(3)
    N, V = 9, 257
    z = torch.randn(N, V, generator=g) * 3
    ids = torch.randint(0, V, (N,), generator=g)
    # vLLM's order (v1/sample/sampler.py): temperature, min-p (a logits processor), top-k/top-p
    ref = z / proc.temperature
    if proc.min_p:
        p = ref.softmax(dim=1)
        ref = ref.masked_fill(p < proc.min_p * p.amax(dim=1, keepdim=True), -INF)
    k = torch.full((N,), proc.top_k) if proc.top_k else None
    p = torch.full((N,), proc.top_p) if proc.top_p < 1 else None
    ref = apply_top_k_top_p_pytorch(ref.clone(), k, p).log_softmax(dim=1).gather(1, ids[:, None])[:, 0]
    h, w = _logits_as_hidden(z)
    got = processed_logprobs(h, w, None, ids, chunk, proc)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # the sampled token of a real sampler is always kept; random ids here may be masked: both −inf then
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
