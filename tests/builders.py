"""Objects several test modules build the same way: a tiny untrained student and a random batch.

The CPU tests (``test_learner_dp.py``) and the GPU tests (``test_gpu.py``, ``gpu_cases.py``) build
them here, so a GPU run checks the shapes the CPU suite checks. The student is the demo's (the
``demo`` package's character tokenizer and tiny Qwen3 at ``PrepareSettings.fast()``'s shape),
freshly initialised: no preparation, no data, only torch, tokenizers and transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from buffers.records import TrainBatch, TrainSample

DEMO_VOCAB = 50  # the fast demo's character tokenizer with its 4 chat-template tokens (test_demo_models pins it)
FIRST_ID = 2  # below it: <pad> and <eos>, which no random prompt or response holds


def random_train_batch(
    n: int = 16,
    vocab: int = DEMO_VOCAB,
    *,
    domains: Sequence[str] = ("reverse", "math"),
    nan_behaviour: bool = False,
) -> TrainBatch:
    """``n`` ragged samples (prompts 3-6, responses 2-8 tokens: padding is exercised) with random
    token ids in [FIRST_ID, vocab), behaviour and teacher log-probs and top-4 teacher
    distributions, seeded (the same batch every call). Sample 5 has no teacher (a failed call,
    A_t = 0); samples 2 and 11 have weight 0 (masked by balancing, still in the denominator);
    every third has an advantage shift. ``domains`` cycle over the samples. ``nan_behaviour``:
    every behaviour log-prob is NaN (a batch the learner must skip)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        P, T, K = 3 + i % 4, 2 + (i * 5) % 7, 4
        topk_ids = np.stack([rng.choice(np.arange(FIRST_ID, vocab), size=K, replace=False) for _ in range(T)])
        topk_lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=T)[:, :K]), axis=1)[:, ::-1]
        prompt_ids = [int(x) for x in rng.integers(FIRST_ID, vocab, size=P)]
        response_ids = [int(x) for x in rng.integers(FIRST_ID, vocab, size=T)]
        behaviour = rng.uniform(-4.5, -3.0, size=T).astype(np.float32)
        if nan_behaviour:
            behaviour[:] = np.nan
        teacher = None if i == 5 else rng.uniform(-3.0, -0.2, size=T).astype(np.float32)
        samples.append(TrainSample(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            behaviour_logprobs_T=behaviour,
            teacher_logprobs_T=teacher,
            topk_ids_TK=None if i == 5 else topk_ids.astype(np.int32),
            topk_logprobs_TK=None if i == 5 else np.ascontiguousarray(topk_lp, dtype=np.float32),
            advantage_shift=0.1 if i % 3 == 0 else 0.0,
            weight=0.0 if i in (2, 11) else 1.0,
            policy_version=0, domain=domains[i % len(domains)], correct=bool(i % 2), prompt_id=f"p{i}",
        ))
    return TrainBatch(samples=samples, n_responses_total=n)


def save_tiny_student(out: Path, *, seed: int = 0, lm_head_std: float | None = None) -> Path:
    """The fast demo's student, untrained, saved as a complete HF directory at ``out``.

    ``lm_head_std`` redraws the output layer from N(0, std²): at 0.1 the logits have a std of
    ~1.1 (not ~0.2), so top-p 0.95 drops a real share of the vocabulary (test_gpu's reference)."""
    import torch

    from demo.models import build_model, save_model
    from demo.settings import PrepareSettings
    from demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(PrepareSettings.fast(), tokenizer, seed=seed)
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    save_model(model, tokenizer, out)
    return out
