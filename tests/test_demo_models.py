"""Tests for the demo's prepared data, tokenizer and tiny models (scripts/prepare_demo.py).

The fast preparations (seconds) of both recipes, default (math + reverse) and code
(math + code), are built once per module. The vLLM test (marked slow) checks that
vLLM-CPU loads the same directory, tokenizes and detokenizes exactly like transformers,
and that its sampled-token logprobs equal HF log-softmax.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.verifiers import exact as exact_verifier
from actors.verifiers import math as math_verifier
from learner.sft import collate, encode_pairs, sft
from scripts import prepare_demo as pd


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cache"
    pd.prepare(out, fast=True)
    return out


@pytest.fixture(scope="module")
def student_dir(demo_dir: Path) -> Path:
    return demo_dir / "student"


@pytest.fixture(scope="module")
def code_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_code") / "cache"
    pd.prepare(out, fast=True, recipe="code")
    return out


needs_sandbox = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the code sandbox is Linux-only")


# ------------------------------------------------------------------ layout, caching


def test_layout_and_report(demo_dir: Path) -> None:
    for name in ("teacher_math", "teacher_reverse", "student"):
        d = demo_dir / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{d / f} missing"
    report = json.loads((demo_dir / pd.REPORT_FILE).read_text())
    assert set(report["models"]) == {"teacher_math", "teacher_reverse", "student"}
    for record in report["models"].values():
        assert set(record["heldout_accuracy"]) == set(pd.DEFAULT_DOMAINS)
        assert all(0.0 <= a <= 1.0 for a in record["heldout_accuracy"].values())
    # The fast settings snapshot the math teacher at its first check: the student starts there.
    assert report["models"]["student"]["init"] == "teacher_math_snapshot"
    assert report["models"]["teacher_math"]["training"]["snapshot"]["step"] == 10
    assert "math" in report["models"]["student"]["training"]["self_replay_accuracy"]
    assert json.loads((demo_dir / pd.READY_FILE).read_text())["digest"] == pd.PrepareSettings.fast().digest()
    # No staging directory is left behind next to the cache.
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(f".{demo_dir.name}.tmp")]


def test_prepare_reuses_ready_cache(demo_dir: Path) -> None:
    weights = demo_dir / "student" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    report = pd.prepare(demo_dir, fast=True)
    assert time.perf_counter() - t0 < 2.0
    assert weights.stat().st_mtime_ns == mtime
    assert report == json.loads((demo_dir / pd.REPORT_FILE).read_text())
    # Different settings -> different digest -> the cache does not count as ready.
    other = dataclasses.replace(pd.PrepareSettings.fast(), seed=1)
    assert not pd.is_ready(demo_dir, other)


def test_prepare_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a demo cache")
    with pytest.raises(FileExistsError):
        pd.prepare(tmp_path, fast=True)
    assert (tmp_path / "precious.txt").read_text() == "not a demo cache"


# ---------------------------------------------------------------------------- data


def test_datasets(demo_dir: Path) -> None:
    settings = pd.PrepareSettings.fast()
    train = pd.read_jsonl(demo_dir / "train.jsonl")
    heldout = pd.read_jsonl(demo_dir / "heldout.jsonl")
    extra = dict(settings.train_extra)
    assert Counter(r["domain"] for r in train) == {
        d: settings.n_train_per_domain + extra.get(d, 0) for d in pd.DEFAULT_DOMAINS}
    assert len(heldout) == 2 * settings.n_heldout_per_domain
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))
    assert {r["domain"] for r in train} == set(pd.DEFAULT_DOMAINS)
    assert sum(r["domain"] == "math" for r in heldout) == settings.n_heldout_per_domain
    # Train is shuffled (mixed), not one block per domain.
    assert {r["domain"] for r in train[: len(train) // 4]} == set(pd.DEFAULT_DOMAINS)

    _, _, dev, pool = pd.make_splits(settings)
    sft_prompts = {p for pairs in pool.values() for p, _ in pairs}
    train_p, held_p, dev_p = ({r["prompt"] for r in rows} for rows in (train, heldout, dev))
    assert not held_p & train_p and not held_p & sft_prompts and not held_p & dev_p
    assert not train_p & sft_prompts

    for r in train + heldout:
        assert set(r) == {"id", "domain", "prompt", "answer"}
        if r["domain"] == "math":
            a, b = r["prompt"].rstrip("=").split("+")
            assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
            assert r["answer"] == str(int(a) + int(b))
        else:
            s = r["prompt"].removeprefix("rev:").removesuffix("=")
            assert 4 <= len(s) <= 8 and s.isalpha() and s.islower()
            assert r["answer"] == s[::-1]


def test_graders() -> None:
    row = {"domain": "math", "answer": "579"}
    assert math_verifier.grade("\\boxed{579}", row)[0]
    assert math_verifier.grade("\\boxed{1}\\boxed{579}", row)[0]  # the last box counts
    assert not math_verifier.grade("\\boxed{578}", row)[0]
    assert not math_verifier.grade("579", row)[0]  # unboxed answers do not count
    assert not math_verifier.grade("\\boxed{579", row)[0]
    assert math_verifier.grade("\\boxed{\\frac{1}{2}}", {"answer": "0.5"})[0]
    assert exact_verifier.grade(" edcba ", {"answer": "edcba"})[0]
    assert not exact_verifier.grade("edcb", {"answer": "edcba"})[0]
    assert pd.grade_math("\\boxed{1035}", "1035") and not pd.grade_math("\\boxed{1036}", "1035")
    assert pd.grade_exact("abc", "abc") and not pd.grade_exact("abd", "abc")
    # Every reference response is graded correct by its domain's verifier (code: in the
    # sandbox, ~0.1-0.5 s a program, hence fewer).
    for domain, make in pd.PROBLEM_MAKERS.items():
        rng = random.Random(0)
        for i in range(5 if domain == "code" else 20):
            prompt, answer = make(rng)
            row = pd.make_row(f"t-{i}", domain, prompt, answer)
            assert pd.grade_row(pd.format_response(domain, answer), row)[0]


# ---------------------------------------------------------------- default recipe pinned


def test_default_recipe_is_pinned() -> None:
    """The default cache (.cache/demo) changes only on purpose: digest, 46-token vocabulary
    and splits are pinned. The held-out hash predates the code domain (commit with
    FORMAT_VERSION 1, two domains) and still holds; digest and train hash changed when
    ``train_extra`` added 1000 reversal prompts (drawn after everything else, so held-out,
    dev and the SFT pools, and so the models, are as before). Values: ``digest()`` and
    ``hashlib.sha256`` of the ``train.jsonl`` / ``heldout.jsonl`` bytes ``_build`` writes."""
    settings = pd.PrepareSettings()
    assert settings.domains == ("math", "reverse")
    assert settings.digest() == "3b03666c09cbe83b"
    assert pd.PrepareSettings.fast().digest() == "d79b4a0022cb8869"
    assert len(pd.build_tokenizer()) == 46 and len(pd.build_tokenizer(settings.domains)) == 46
    train, heldout, _, _ = pd.make_splits(settings)
    assert Counter(r["domain"] for r in train) == {"math": 1000, "reverse": 2000}
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train).encode()
    assert hashlib.sha256(blob).hexdigest() == "7ef5040ea7917468bfb15656b51d8d195ac6f8dd64e81737bb12768599343c73"
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout).encode()
    assert hashlib.sha256(blob).hexdigest() == "9a5d3c3c08f99bc7b2f994db0852cb081cdfbc63ac9aeae7d632af3ca66844ed"


def test_settings_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="math first"):
        pd.PrepareSettings(domains=("code", "math"))
    with pytest.raises(ValueError, match="known domains"):
        pd.PrepareSettings(domains=("math", "chess"))
    with pytest.raises(ValueError, match="student.domains"):
        pd.PrepareSettings(domains=("math", "code"))  # the default student learns reverse
    with pytest.raises(ValueError, match="train_extra"):
        pd.PrepareSettings(train_extra=(("code", 10),))
    with pytest.raises(ValueError, match="recipe"):
        pd.recipe_settings("chess")
    # A teacher plan of a domain that is not prepared does not key the cache.
    code = pd.PrepareSettings.code()
    assert dataclasses.replace(code, teacher_reverse=pd.SFTPlan(("reverse",), 1, 1, 1.0)).digest() == code.digest()
    assert dataclasses.replace(code, teacher_code=pd.SFTPlan(("code",), 1, 1, 1.0)).digest() != code.digest()


# ---------------------------------------------------------------------- code domain


def test_code_problems_fit_the_models_and_the_grader_runs_them() -> None:
    rng = random.Random(0)
    tok = pd.build_tokenizer(("math", "code"))
    assert len(tok) == 46 + len(pd.CODE_CHARS)
    for i in range(300):
        prompt, answer = pd.make_code_problem(rng)
        ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == prompt + answer
        assert len(ids) + 1 <= pd.PrepareSettings().max_position_embeddings
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) + 1 <= 24
        compile(prompt, "stub", "exec")  # HumanEval-style: the stub compiles on its own
    row = pd.make_row("t-0", "code", 'def f(x):\n "add 3 mul 2 sub 4"\n', " return ((x+3)*2)-4")
    assert row["tests"] == "assert f(0)==2\nassert f(1)==4\nassert f(5)==12\n" and row["entry_point"] == "f"


@needs_sandbox
def test_code_references_pass_the_sandboxed_grader_and_wrong_completions_fail() -> None:
    row = pd.make_row("t-0", "code", 'def f(x):\n "add 3 mul 2 sub 4"\n', " return ((x+3)*2)-4")
    assert pd.grade_row(" return ((x+3)*2)-4", row)[0]
    # Any equivalent completion passes (that is the point of running tests) ...
    assert pd.grade_row(" return 2*x+2", row)[0]
    assert pd.grade_row(" y = x + 3\n return y * 2 - 4", row)[0]
    # ... and a wrong one fails, for the right reason.
    for response, reason in ((" return ((x+3)*2)-5", "failed"), (" return (x+3)*(2-4)", "failed"),
                             (" return ((x+3)*2-4", "syntax_error"), ("return ((x+3)*2)-4", "syntax_error"),
                             (" return ((y+3)*2)-4", "error"), ("", "no_code")):
        ok, why = pd.grade_row(response, row)
        assert not ok and why.startswith(reason), (response, why)
    # The dev-set stand-in accepts the reference only: a lower bound of the verifier.
    assert pd.grade_dev_row(" return ((x+3)*2)-4", row)[0]
    assert not pd.grade_dev_row(" return 2*x+2", row)[0]
    assert not pd.grade_dev_row("return ((x+3)*2)-4", row)[0]


def test_code_recipe_layout_data_and_tokenizer(code_demo_dir: Path) -> None:
    for name in ("teacher_math", "teacher_code", "student"):
        assert (code_demo_dir / name / "model.safetensors").is_file()
    assert not (code_demo_dir / "teacher_reverse").exists()
    report = json.loads((code_demo_dir / pd.REPORT_FILE).read_text())
    assert set(report["models"]) == {"teacher_math", "teacher_code", "student"}
    assert report["vocab_size"] == 46 + len(pd.CODE_CHARS)
    for record in report["models"].values():
        assert set(record["heldout_accuracy"]) == {"math", "code"}
    assert report["models"]["student"]["init"] == "teacher_math_snapshot"
    assert json.loads((code_demo_dir / pd.READY_FILE).read_text())["digest"] == pd.PrepareSettings.code_fast().digest()

    settings = pd.PrepareSettings.code_fast()
    train = pd.read_jsonl(code_demo_dir / "train.jsonl")
    heldout = pd.read_jsonl(code_demo_dir / "heldout.jsonl")
    assert len(heldout) == 2 * settings.n_heldout_per_domain
    assert {r["domain"] for r in train} == {"math", "code"}
    code_rows = [r for r in train + heldout if r["domain"] == "code"]
    assert {r["entry_point"] for r in code_rows} == {"f"}
    assert all(r["tests"].count("assert f(") == len(pd.CODE_TEST_INPUTS) for r in code_rows)
    _, _, dev, pool = pd.make_splits(settings)
    eval_prompts = {r["prompt"] for r in train + heldout + dev}
    assert not eval_prompts & {p for pairs in pool.values() for p, _ in pairs}

    tok = AutoTokenizer.from_pretrained(code_demo_dir / "student")
    assert len(tok) == report["vocab_size"]
    for row in code_rows:
        text = row["prompt"] + pd.format_response("code", row["answer"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode(tok("\n\n(a*b)-\"c\"")["input_ids"]) == "\n\n(a*b)-\"c\""  # newlines one per token


# ---------------------------------------------------------------- tokenizer, model


def test_tokenizer_round_trip(student_dir: Path, demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert tok.eos_token == pd.EOS and tok.pad_token == pd.PAD
    assert tok.eos_token_id != tok.pad_token_id
    rows = pd.read_jsonl(demo_dir / "heldout.jsonl")
    for row in rows:
        prompt, response = row["prompt"], pd.format_response(row["domain"], row["answer"])
        text = prompt + response
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # One token per character, no <unk>, and no BOS/EOS added to a raw prompt.
        assert len(ids) == len(text)
        assert tok.unk_token_id not in ids
        assert tok(prompt)["input_ids"] == ids[: len(prompt)]
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode(tok("ab cd")["input_ids"]) == "ab cd"  # no spaces inserted or dropped


def test_student_loads_with_transformers(student_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (128, 4, 4, 2, 32)
    assert 0.7e6 < pd.count_parameters(model) < 1.5e6
    assert next(model.parameters()).dtype == torch.float32


def test_evaluate_greedy_batched_equals_unbatched(student_dir: Path, demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    rows = pd.read_jsonl(demo_dir / "heldout.jsonl")[:12]
    batched = pd.generate_greedy(model, tok, [r["prompt"] for r in rows], max_new_tokens=8)
    for row, text in zip(rows, batched, strict=True):
        ids = torch.tensor([tok(row["prompt"])["input_ids"]])
        gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == text
    # A grader that accepts everything gives 1.0 per domain; one that rejects everything 0.0.
    assert pd.evaluate_greedy(model, tok, rows, lambda r, row: True, max_new_tokens=4) == {
        d: 1.0 for d in {r["domain"] for r in rows}}
    assert set(pd.evaluate_greedy(model, tok, rows, lambda r, row: (False, "no"), max_new_tokens=4).values()) == {0.0}


# ------------------------------------------------------------------------------ sft


def test_mix_pools_weights() -> None:
    pool = {"a": [("a", str(i)) for i in range(100)], "b": [("b", "x"), ("b", "y")]}
    mixed = pd.mix_pools(pool, ("a", "b"), (0.75, 0.25))
    assert sum(p == "a" for p, _ in mixed) == 100  # the top-weight pool, whole
    b = [c for p, c in mixed if p == "b"]
    assert len(b) == 33 and b[:4] == ["x", "y", "x", "y"]  # a small pool is cycled
    assert len(pd.mix_pools(pool, ("a", "b"))) == 200
    with pytest.raises(ValueError):
        pd.mix_pools(pool, ("a", "b"), (1.0,))


def test_collate_masks_prompt_and_padding() -> None:
    tok = pd.build_tokenizer()
    enc = encode_pairs(tok, [("12+3=", "\\boxed{15}"), ("rev:ab=", "ba")])
    batch = collate(enc, tok.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert ids.shape == (2, len("12+3=\\boxed{15}") + 1)
    # Row 0: prompt masked, completion + EOS supervised.
    assert (labels[0, :5] == -100).all()
    assert tok.decode(labels[0, 5:].tolist()) == "\\boxed{15}" + pd.EOS
    # Row 1: padding is masked and not attended.
    n1 = len("rev:ab=ba") + 1
    assert tok.decode(labels[1, 7:n1].tolist()) == "ba" + pd.EOS
    assert (labels[1, n1:] == -100).all() and (batch["attention_mask"][1, n1:] == 0).all()
    assert (ids[1, n1:] == tok.pad_token_id).all()


def test_sft_learns_a_small_task() -> None:
    tok = pd.build_tokenizer()
    settings = pd.PrepareSettings.fast()
    model = pd.build_model(settings, tok, seed=0)
    pairs = [("rev:abcd=", "dcba"), ("rev:wxyz=", "zyxw"), ("1+1=", "\\boxed{2}")]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    losses = sft(model, tok, pairs, steps=60, batch_size=3, lr=3e-3, seed=0, log_every=0)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.1 * sum(losses[:5]) / 5
    out = pd.generate_greedy(model, tok, [p for p, _ in pairs], max_new_tokens=12)
    assert out == [c for _, c in pairs]


def test_sft_is_seeded() -> None:
    tok = pd.build_tokenizer()
    settings = pd.PrepareSettings.fast()
    pairs = [(f"rev:{w}=", w[::-1]) for w in ("abcd", "bcde", "cdef", "defg", "efgh")]
    runs = []
    for _ in range(2):
        model = pd.build_model(settings, tok, seed=3)
        runs.append(sft(model, tok, pairs, steps=5, batch_size=2, lr=1e-3, seed=7, log_every=0))
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- vLLM


@pytest.mark.slow
def test_vllm_matches_transformers(student_dir: Path, demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vllm = pytest.importorskip("vllm")

    tok = AutoTokenizer.from_pretrained(student_dir)
    hf = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    llm = vllm.LLM(model=str(student_dir), dtype="float32", enforce_eager=True, max_model_len=64,
                   distributed_executor_backend="uni", seed=0)
    try:
        rows = pd.read_jsonl(demo_dir / "heldout.jsonl")[:16]
        prompts = [r["prompt"] for r in rows]
        # vLLM tokenizes the raw prompt exactly like transformers (no BOS, one id per char).
        assert llm.get_tokenizer().encode(prompts[0]) == tok(prompts[0])["input_ids"]

        # Sampling at temperature 1 from a barely trained model visits many different tokens.
        params = vllm.SamplingParams(temperature=1.0, max_tokens=24, logprobs=0, seed=123)
        outputs = llm.generate(prompts, params)
        n_tokens = 0
        for prompt, out in zip(prompts, outputs, strict=True):
            prompt_ids = list(out.prompt_token_ids)
            assert prompt_ids == tok(prompt)["input_ids"]
            comp = out.outputs[0]
            gen_ids = list(comp.token_ids)
            assert gen_ids and len(comp.logprobs) == len(gen_ids)
            vllm_lp = torch.tensor([step[t].logprob for step, t in zip(comp.logprobs, gen_ids, strict=True)],
                                   dtype=torch.float64)
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([prompt_ids + gen_ids])).logits[0].double()
            hf_lp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1].gather(
                1, torch.tensor(gen_ids).unsqueeze(1)).squeeze(1)
            assert torch.allclose(vllm_lp, hf_lp, atol=1e-4, rtol=0), (vllm_lp - hf_lp).abs().max()
            assert comp.text == tok.decode(gen_ids, skip_special_tokens=True)
            n_tokens += len(gen_ids)
        assert n_tokens > 16

        # Greedy: vLLM's text equals the HF greedy text used by evaluate_greedy.
        greedy = llm.generate(prompts, vllm.SamplingParams(temperature=0.0, max_tokens=16))
        assert [o.outputs[0].text for o in greedy] == pd.generate_greedy(hf, tok, prompts, max_new_tokens=16)
    finally:
        del llm
