"""The learner's typed batch: what one micro-batch of ``TrainSample`` records becomes as tensors
(``collate`` → ``LearnerBatch``), which responses go to which rank and micro-batch
(``plan_micro_batches``), and where the loss reads the student (``response_positions``).

Shape suffixes: B responses, L longest prompt + response, T longest response, K teacher top-k,
N real response tokens of the micro-batch, J = 1 + K ids read per token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from buffers.records import TrainBatch, TrainSample


@dataclass(frozen=True)
class LearnerBatch:
    """One micro-batch, right-padded; every tensor is 0 (or ``pad_id``) on padding."""

    ids_BL: torch.Tensor  # prompt + response token ids
    attn_BL: torch.Tensor  # 1 on real tokens
    pos_BT: torch.Tensor  # the position of ids_BL whose output predicts response token t
    resp_BT: torch.Tensor  # response token ids
    mask_BT: torch.Tensor  # 1.0 on real response tokens
    behave_BT: torch.Tensor  # the sampler's (behaviour policy's) log-probs, SPEC §2
    teacher_BT: torch.Tensor  # the teacher's log-probs of the sampled tokens, SPEC §1
    has_teacher_B: torch.Tensor  # 1.0 when the teacher call succeeded (else A_t = 0, SPEC §1)
    shift_B: torch.Tensor  # SPEC §4 margin shift, added to every token advantage of the response
    weight_B: torch.Tensor  # 0.0 when masked by §3.2 balancing or the §4 margin mask
    excluded_B: torch.Tensor  # 1.0: out of both loss terms (truncated, buffer.truncated=mask)
    topk_ids_BTK: torch.Tensor | None  # the teacher's top-k token ids (None: no distribution term)
    topk_lp_BTK: torch.Tensor | None  # their teacher log-probs, SPEC §6
    has_topk_B: torch.Tensor  # 1.0 when the response has the teacher's top-k
    raw_behave_B: torch.Tensor | None = None  # 1.0: behave_BT is raw (a prefilled cached response, SPEC §5)
    teacher_w_BT: torch.Tensor | None = None  # DOPD per-token advantage weights (None: 1), actors/dopd.py

    @property
    def top_k(self) -> int:
        """K actually collated (0: none), at most the configured top-k."""
        return 0 if self.topk_ids_BTK is None else self.topk_ids_BTK.shape[-1]

    def to(self, device: torch.device | str) -> LearnerBatch:
        return replace(self, **{f.name: t.to(device) for f in fields(self) if (t := getattr(self, f.name)) is not None})


def collate(samples: list[TrainSample], pad_id: int, top_k: int) -> LearnerBatch:
    """Right-padded prompt+response sequences and response-aligned token tensors. ``top_k`` (0: none) is
    capped at what the teacher returned.

    Filled as numpy arrays and handed to torch once per field (``torch.from_numpy``, no copy): a torch
    slice assignment per sample and field costs ~10 µs of dispatch each, which at the demo's 128
    responses of ~30 tokens was 14.5 ms a step, more than copying the data."""
    B = len(samples)
    # The teacher may return fewer than top_k (top_k > vocab): never pad categories with fake ids.
    top_k = min([top_k] + [s.topk_ids_TK.shape[1] for s in samples if s.topk_ids_TK is not None]) if top_k else 0
    L = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    T = max(1, max(len(s.response_ids) for s in samples))
    ids_BL = np.full((B, L), pad_id, dtype=np.int64)
    attn_BL = np.zeros((B, L), dtype=np.int64)
    pos_BT = np.zeros((B, T), dtype=np.int64)
    resp_BT = np.full((B, T), pad_id, dtype=np.int64)
    mask_BT = np.zeros((B, T), dtype=np.float32)
    behave_BT = np.zeros((B, T), dtype=np.float32)
    teacher_BT = np.zeros((B, T), dtype=np.float32)
    has_teacher_B = np.zeros(B, dtype=np.float32)
    shift_B = np.zeros(B, dtype=np.float32)
    weight_B = np.zeros(B, dtype=np.float32)
    excluded_B = np.array([float(s.excluded) for s in samples], dtype=np.float32)
    topk_ids = np.zeros((B, T, top_k), dtype=np.int64) if top_k else None
    topk_lp = np.zeros((B, T, top_k), dtype=np.float32) if top_k else None
    has_topk_B = np.zeros(B, dtype=np.float32)
    teacher_w_BT = np.ones((B, T), dtype=np.float32) if any(s.teacher_weights_T is not None for s in samples) \
        else None
    for i, s in enumerate(samples):
        P, t = len(s.prompt_ids), len(s.response_ids)
        ids_BL[i, :P] = s.prompt_ids
        ids_BL[i, P : P + t] = s.response_ids
        attn_BL[i, : P + t] = 1
        if t == 0:
            continue
        # logits at position P-1+j predict response token j
        pos_BT[i, :t] = np.arange(P - 1, P - 1 + t)
        resp_BT[i, :t] = s.response_ids
        mask_BT[i, :t] = 1
        behave_BT[i, :t] = s.behaviour_logprobs_T
        shift_B[i] = s.advantage_shift
        weight_B[i] = s.weight
        if s.teacher_logprobs_T is not None:
            teacher_BT[i, :t] = s.teacher_logprobs_T
            has_teacher_B[i] = 1
        if teacher_w_BT is not None and s.teacher_weights_T is not None:
            teacher_w_BT[i, :t] = s.teacher_weights_T
        if top_k and s.topk_ids_TK is not None:
            topk_ids[i, :t] = s.topk_ids_TK[:, :top_k]
            topk_lp[i, :t] = s.topk_logprobs_TK[:, :top_k]
            has_topk_B[i] = 1
    t_ = torch.from_numpy
    return LearnerBatch(ids_BL=t_(ids_BL), attn_BL=t_(attn_BL), pos_BT=t_(pos_BT), resp_BT=t_(resp_BT),
                        mask_BT=t_(mask_BT), behave_BT=t_(behave_BT), teacher_BT=t_(teacher_BT),
                        has_teacher_B=t_(has_teacher_B), shift_B=t_(shift_B), weight_B=t_(weight_B),
                        excluded_B=t_(excluded_B), topk_ids_BTK=None if topk_ids is None else t_(topk_ids),
                        topk_lp_BTK=None if topk_lp is None else t_(topk_lp), has_topk_B=t_(has_topk_B),
                        raw_behave_B=t_(np.array([float(s.behaviour_raw) for s in samples], dtype=np.float32)),
                        teacher_w_BT=None if teacher_w_BT is None else t_(teacher_w_BT))


def split_mini_batches(batch: TrainBatch, m: int) -> list[TrainBatch]:
    """``learner.mini_batches``: the batch's prompt groups, in the buffer's order, cut into ``min(m, groups)``
    parts whose group counts differ by at most one. A group (a prompt's responses) stays whole: balancing
    (SPEC §3.2) and calibration (§4) act within it. Each part is the global batch of its optimizer step, so
    its SPEC §1 denominator is its own share of ``n_responses_total`` (its size, masked responses included)."""
    if m <= 1:
        return [batch]
    groups: dict[str, list[TrainSample]] = {}
    for s in batch.samples:
        groups.setdefault(s.prompt_id, []).append(s)
    ordered = list(groups.values())
    n = min(m, len(ordered))
    cuts = [round(k * len(ordered) / n) for k in range(n + 1)]
    n_all = max(1, len(batch.samples))
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        samples = [s for g in ordered[a:b] for s in g]
        ids = [g[0].prompt_id for g in ordered[a:b]]
        parts.append(TrainBatch(samples=samples, prompt_ids=ids,
                                n_responses_total=max(1, round(batch.n_responses_total * len(samples) / n_all))))
    return parts


def pad_responses(values_T: list[np.ndarray], T: int) -> torch.Tensor:
    """Per-response token values (each of its response's length) as a right-padded B × T float tensor, laid
    out like ``collate``'s ``*_BT`` fields."""
    out = np.zeros((len(values_T), T), dtype=np.float32)
    for i, v in enumerate(values_T):
        out[i, : len(v)] = v
    return torch.from_numpy(out)


def plan_micro_batches(lengths: list[int], world_size: int, max_tokens: int,
                       max_responses: int | None = None) -> list[list[list[int]]]:
    """``plan[r][m]``: the indices (into the batch) of rank r's m-th micro-batch of this step.

    Every rank computes this from the whole batch, so the ranks agree without a collective, and
    every rank gets the same number of micro-batches (empty ones pad the shorter plans): DeepSpeed
    needs the same number of backward passes per step on every rank (ZeRO-2/3 communicate inside
    each one; ZeRO-3 inside each forward too).

    Sharding: longest first, each response to the rank with the fewest tokens so far (ties: the
    lower rank), so the ranks get similar work. Bucketing: each rank's responses, longest first,
    cut greedily into micro-batches whose padded size (count × longest prompt+response) fits
    ``max_tokens`` and that hold at most ``max_responses``; a response longer than the budget
    gets a micro-batch of its own.

    Why length-sorted buckets rather than padding-free packing: packing several responses into one
    row needs an attention kernel that honours sequence boundaries inside the row (flash-attention
    varlen through position ids); sdpa and eager, which CPUs and many GPU setups run, would attend
    across responses or need an L × L block mask. Buckets work with every kernel and give each
    response exactly the computation it gets alone; sorting keeps the padding small (neighbours
    have similar lengths; the step metric ``pad_frac`` shows what is left).
    """
    if max_tokens < 1 or world_size < 1:
        raise ValueError(f"max_tokens={max_tokens}, world_size={world_size}: both must be ≥ 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in order:  # `order` is longest first, so each shard stays sorted longest first
        r = min(range(world_size), key=lambda q: (load[q], q))
        shards[r].append(i)
        load[r] += lengths[i]
    plan: list[list[list[int]]] = []
    for shard in shards:
        mbs: list[list[int]] = []
        for i in shard:
            cur = mbs[-1] if mbs else None
            if cur is not None and (len(cur) + 1) * max(1, lengths[cur[0]]) <= max_tokens and \
                    (max_responses is None or len(cur) < max_responses):
                cur.append(i)
            else:
                mbs.append([i])
        plan.append(mbs)
    n_mb = max(1, max(len(mbs) for mbs in plan))
    return [mbs + [[] for _ in range(n_mb - len(mbs))] for mbs in plan]


def response_positions(b: LearnerBatch, top_k: int) -> tuple[torch.Tensor, ...]:
    """Where the loss reads the student: ``rows_N, cols_N`` (a row of ``ids_BL`` and the position whose
    output predicts the token), ``t_N`` (the token's index in the response) and ``ids_NJ``: the sampled
    token, then the teacher's top-k ids (id 0 where a response has none), for every real response token."""
    rows, t = (b.mask_BT > 0).nonzero(as_tuple=True)
    cols = b.pos_BT[rows, t]
    ids = [b.resp_BT[rows, t, None]]
    if top_k:
        has_BT = (b.has_topk_B[:, None] * b.mask_BT) > 0
        ids.append(torch.where(has_BT[..., None], b.topk_ids_BTK, 0)[rows, t])
    return rows, cols, t, torch.cat(ids, dim=-1)
