"""Plain-torch supervised fine-tuning of a causal LM on (prompt, completion) pairs.

This module owns the *offline* warm-up training used to build the demo's tiny
teachers and the student's cold start (``demo.training``). It is deliberately
independent of Ray, DeepSpeed and the on-policy distillation learner (``learner/``,
SPEC §1): one process, one model, AdamW, a warmup + cosine learning-rate schedule.
Nothing outside the demo's preparation uses it, so it lives with it.

What it does per step:

* samples a batch of pairs (epoch-wise shuffling with a seeded generator),
* encodes the prompt with the caller's ``encode_prompt`` (or takes its token ids as
  given) and tokenizes the completion separately, appending EOS, so the token sequence
  is exactly what an inference engine sees when it is given the prompt's ids (the
  pipeline's: ``buffers.formatting.encode``, chat template included) and generates the
  completion followed by EOS,
* right-pads the batch and masks the loss to completion tokens (+ EOS) only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Called every ``check_every`` steps with (step, recent mean loss); returning True stops
# training early. The model is in eval mode during the call and put back in train mode after.
StopFn = Callable[[int, float], bool]


# Renders one prompt (a string, a list of chat messages, ...) into the token ids the model is
# conditioned on, e.g. ``lambda p: buffers.formatting.encode(p, fmt, tokenizer)``.
PromptEncoder = Callable[[Any], Sequence[int]]


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt) and bool(prompt)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Any, str]],
    encode_prompt: PromptEncoder | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Encode each (prompt, completion) pair into (prompt_ids, completion_ids + [eos]).

    A prompt is either its token ids (a non-empty sequence of ints, used as given) or
    anything ``encode_prompt`` renders: the prompt's ids come from the caller, so they are
    the ids the inference engines are given at run time (chat template, system prompt and
    all), never a second tokenization of raw text here. The completion is tokenized on its
    own (no special tokens) and EOS appended, as an engine generates it after the prompt;
    tokenizing prompt + completion together could merge tokens across the boundary.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs an eos_token_id: completions are trained to end with EOS")
    prompts: list[list[int]] = []
    for prompt, _ in pairs:
        if _is_token_ids(prompt):
            prompts.append(list(prompt))
        elif encode_prompt is not None:
            prompts.append(list(encode_prompt(prompt)))
        else:
            raise TypeError(
                f"prompt {prompt!r:.60} is not token ids and no encode_prompt was given: pass "
                f"encode_prompt (e.g. buffers.formatting.encode with the run's PromptFormat) so the prompt "
                f"is rendered the way the inference engines will see it")
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p, list(c) + [eos]) for p, c in zip(prompts, completions, strict=True)]


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are -100 on prompt and padding positions."""
    max_len = max(len(p) + len(c) for p, c in encoded)
    n = len(encoded)
    input_ids = torch.full((n, max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, max_len), dtype=torch.long)
    for i, (p, c) in enumerate(encoded):
        seq = p + c
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[i, len(p) : len(seq)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def completion_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked (completion + EOS) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1.
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Any, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 50,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    check_every: int = 0,
    stop_fn: StopFn | None = None,
    encode_prompt: PromptEncoder | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``pairs``; return the per-step training loss.

    Prompts are encoded per batch by ``encode_pairs`` (token ids as given, anything else
    through ``encode_prompt``).

    ``steps`` fixes the learning-rate schedule even when ``stop_fn`` stops earlier, so an
    early stop leaves the model exactly where the full run would have been at that step.
    """
    if not pairs:
        raise ValueError("sft needs at least one (prompt, completion) pair")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps=}, {batch_size=}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # A private generator: the order of examples depends on ``seed`` only, not on global RNG use.
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # any stochastic layer (dropout) in the model

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Norm gains and biases are not weight-decayed (standard practice for transformers).
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = int(steps * warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, min_lr_ratio)
    )

    losses: list[float] = []
    order = torch.randperm(len(pairs), generator=gen).tolist()
    cursor = 0
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):  # new epoch: reshuffle
            order = torch.randperm(len(pairs), generator=gen).tolist()
            cursor = 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        # Encoded per batch: ~3 ms for 64 chat-templated prompts, whereas encoding a 100k-pair
        # pool up front took seconds.
        batch = collate(encode_pairs(tokenizer, [pairs[i] for i in idx], encode_prompt), pad_id)

        loss = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())

        done = step + 1
        if log_every and (done % log_every == 0 or done == steps):
            recent = losses[-log_every:]
            logger.info(
                "sft step %d/%d loss %.4f lr %.2e",
                done, steps, sum(recent) / len(recent), scheduler.get_last_lr()[0],
            )
        if stop_fn is not None and check_every and done % check_every == 0 and done < steps:
            recent = losses[-check_every:]
            model.eval()
            try:
                with torch.no_grad():
                    stop = stop_fn(done, sum(recent) / len(recent))
            finally:
                model.train()
            if stop:
                logger.info("sft stopped early at step %d/%d", done, steps)
                break
    model.eval()
    return losses
