"""Tokenizer compatibility of teachers and student, checked before any actor starts.

A teacher scores the student's own token ids (SPEC §1): that is only meaningful when
every id the student can produce means the same token to the teacher. Accepted: the same
vocabulary, or a teacher vocabulary that extends the student's (every student id maps to
the same token string in the teacher, special and added tokens included — those are what
the chat template puts around each prompt), with teacher embeddings covering every
student id. Anything else is an error naming both models: cross-tokenizer distillation
is not supported yet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class TokenizerMismatch(ValueError):
    pass


def _embedding_rows(path: str) -> int | None:
    try:
        cfg = json.loads(Path(path, "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


def check_pair(student_tok, student_path: str, teacher_tok, teacher_path: str, teacher_name: str) -> None:
    """Raise ``TokenizerMismatch`` unless the teacher reads every student id as the same token."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    head = (f"teacher {teacher_name!r} ({teacher_path}) and the student ({student_path}) do not share a "
            f"tokenizer")
    tail = ("cross-tokenizer distillation is not supported yet: use a teacher of the student's model family "
            "(same tokenizer, or a vocabulary that extends the student's)")
    if s_vocab != t_vocab:
        t_by_id = {i: t for t, i in t_vocab.items()}
        for tok, i in sorted(s_vocab.items(), key=lambda kv: kv[1]):
            if t_by_id.get(i) != tok:
                other = t_by_id.get(i)
                raise TokenizerMismatch(f"{head}: token id {i} is {tok!r} for the student and "
                                        f"{'absent' if other is None else repr(other)} for the teacher; {tail}")
    rows = _embedding_rows(teacher_path)
    top = max(s_vocab.values(), default=0)
    s_rows = _embedding_rows(student_path) or 0
    if rows is not None and rows < max(top + 1, s_rows):
        raise TokenizerMismatch(f"{head}: the teacher's embedding has {rows} rows, the student can produce ids up to "
                                f"{max(top, s_rows - 1)}; {tail}")
    for attr in ("eos_token", "pad_token", "bos_token"):
        s, t = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        if s is not None and t is not None and s != t:
            # Different EOS is fine for scoring (ids keep their meaning); worth a line in the log.
            log.info("teacher %s: %s is %r, the student's is %r (scoring is unaffected)", teacher_name, attr, t, s)


def check_tokenizers(student_path: str, teachers: dict[str, str], student_tok=None) -> None:
    """Every teacher (name → model dir) against the student; raises on the first mismatch."""
    from transformers import AutoTokenizer

    student_tok = student_tok or AutoTokenizer.from_pretrained(student_path)
    seen: set[str] = set()
    for name, path in teachers.items():
        if path in seen:
            continue
        seen.add(path)
        check_pair(student_tok, student_path, AutoTokenizer.from_pretrained(path), path, name)
