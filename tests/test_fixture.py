"""The Qwen3-shaped fixture (scripts/build_fixture.py): shape, chat template, tokenizer, sampling.

Fast (seconds): builds the fixture once per session and checks it with transformers only;
vLLM loading it is exercised by the tests that start an engine.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from scripts.build_fixture import build_fixture, sample_stats

QWEN3_VOCAB = 151_936


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("qwen3_fixture") / "fx", seed=0)


@pytest.fixture(scope="session")
def tokenizer(fixture_paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_paths["student"])


def test_layout_and_cache(fixture_paths):
    assert set(fixture_paths) == {"student", "teacher_math", "teacher_code", "math_data", "code_data"}
    root = fixture_paths["student"].parent
    assert (root / "READY").is_file()
    t0 = time.perf_counter()
    assert build_fixture(root, seed=0) == fixture_paths  # cached: same settings return at once
    assert time.perf_counter() - t0 < 1.0


def test_config_is_qwen3_at_real_vocab_untied(fixture_paths, tokenizer):
    from safetensors import safe_open

    for name in ("student", "teacher_math", "teacher_code"):
        cfg = json.loads((fixture_paths[name] / "config.json").read_text())
        assert cfg["architectures"] == ["Qwen3ForCausalLM"]
        assert cfg["vocab_size"] == QWEN3_VOCAB > len(tokenizer)
        assert cfg["tie_word_embeddings"] is False
        assert cfg["head_dim"] == 32 and cfg["num_key_value_heads"] == 1
        assert cfg["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        gen = json.loads((fixture_paths[name] / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        with safe_open(fixture_paths[name] / "model.safetensors", "pt") as f:
            assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    heads = [safe_open(fixture_paths[n] / "model.safetensors", "pt").get_tensor("lm_head.weight")
             for n in ("student", "teacher_math")]
    assert not torch.equal(*heads)  # different seeds


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert 2_000 <= len(tokenizer) <= 4_000
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(t, add_special_tokens=False)) == [t]


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "What is 1 + 1?"}]
    user = "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    render = tokenizer.apply_chat_template
    assert render(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        user + "<think>\n\n</think>\n\n"
    )
    assert render(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True) == user
    assert render(msgs, tokenize=False, add_generation_prompt=True) == user
    with_system = [{"role": "system", "content": "Be brief."}, *msgs,
                   {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2 + 2?"}]
    assert render(with_system, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render(msgs, tokenize=False) == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"


def test_tokenizer_round_trip(fixture_paths, tokenizer):
    rows = [json.loads(line) for line in fixture_paths["code_data"].read_text().splitlines()]
    samples = [r["prompt"] + r["canonical_solution"] for r in rows[:20]]
    samples += ["\tif x:\n\t\treturn  {'a': [1, 2]}\n\n\n", "Compute $\\frac{3}{4} + \\frac{1}{6}$ = \\boxed{11/12} é ✓ 中文"]
    for s in samples:
        ids = tokenizer.encode(s, add_special_tokens=False)
        assert tokenizer.decode(ids) == s
        assert max(ids) < len(tokenizer)
    digits = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345", add_special_tokens=False))
    assert digits == list("12345")  # one token per digit, as Qwen's pre-tokenizer splits them


def test_data(fixture_paths):
    import pyarrow.parquet as pq

    table = pq.read_table(fixture_paths["math_data"])
    assert table.column_names == ["question", "final_answer", "difficulty"]
    assert table.num_rows == 64
    assert (fixture_paths["math_data"] / "part-00000.parquet").is_file()
    rows = [json.loads(line) for line in fixture_paths["code_data"].read_text().splitlines()]
    assert len(rows) == 164
    assert set(rows[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_transformers_samples_in_vocab(fixture_paths, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_paths["student"], dtype=torch.float32).eval()
    assert model.lm_head.weight.shape == (QWEN3_VOCAB, 64)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 123 + 456?"}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    stats = sample_stats(model, tokenizer, prompt, n=8, max_new_tokens=32, seed=0)
    assert stats["in_vocab_fraction"] >= 0.99
    assert stats == sample_stats(model, tokenizer, prompt, n=8, max_new_tokens=32, seed=0)  # seeded
    # EOS is a rare event (~0.1% a token), never the dominant one.
    assert stats["stop_rate"] <= 0.5
