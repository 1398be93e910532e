"""Teachers must read the student's token ids as the same tokens (checked before any actor starts)."""

from __future__ import annotations

import json

import pytest

from actors.vocab_check import TokenizerMismatch, check_tokenizers


def _save(tok, path, vocab_size):
    tok.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": vocab_size}))
    return str(path)


@pytest.fixture(scope="module")
def fixture_tok():
    from scripts.build_fixture import build_tokenizer

    return build_tokenizer()


def test_same_tokenizer_and_an_extended_vocabulary_pass(tmp_path, fixture_tok):
    student = _save(fixture_tok, tmp_path / "s", 151_936)
    same = _save(fixture_tok, tmp_path / "t", 151_936)
    fixture_tok.add_tokens(["<tool_call>"])  # the teacher's vocabulary extends the student's
    ext = _save(fixture_tok, tmp_path / "ext", 151_936)
    check_tokenizers(student, {"math": same, "code": ext})


def test_mismatched_pair_is_rejected_naming_both_models(tmp_path, fixture_tok):
    from demo.tokenizer import build_tokenizer as char_tokenizer

    student = _save(fixture_tok, tmp_path / "qwen_student", 151_936)
    other = _save(char_tokenizer(), tmp_path / "char_teacher", 64)
    with pytest.raises(TokenizerMismatch, match=r"(?s)teacher 'math' \(.*char_teacher\) and the student "
                                                r"\(.*qwen_student\).*token id 0 is .* for the student.*"
                                                r"cross-tokenizer distillation is not supported yet"):
        check_tokenizers(student, {"math": other})


def test_teacher_embedding_must_cover_the_students_ids(tmp_path, fixture_tok):
    student = _save(fixture_tok, tmp_path / "s", 151_936)
    small = _save(fixture_tok, tmp_path / "t", 4_000)
    with pytest.raises(TokenizerMismatch, match="embedding has 4000 rows"):
        check_tokenizers(student, {"math": small})
