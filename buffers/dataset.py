"""Prompt datasets: JSONL or Parquet, one record per prompt, validated row by row.

A record needs ``id``, ``domain``, ``prompt`` and what its domain's verifier needs
(``answer`` for math/exact, ``tests`` and ``entry_point`` for code). A malformed row
is an error naming the file, the row (1-based line for JSONL, 0-based row index for
Parquet) and the field; with ``on_bad_row="skip"`` it is skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from buffers.records import Prompt

log = logging.getLogger(__name__)

_NEEDS = {"math": ("answer",), "exact": ("answer",), "code": ("tests", "entry_point")}


class DatasetError(ValueError):
    pass


@dataclass
class LoadedDataset:
    prompts: list[Prompt]
    skipped: int
    path: str


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{i}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DatasetError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
    else:
        raise DatasetError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl or .parquet")


def _parse(where: str, row: Any, verifier_of_domain: dict[str, str]) -> Prompt:
    if isinstance(row, DatasetError):
        raise row
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a record must be an object with id, domain, prompt")
    for key in ("id", "domain", "prompt"):
        if row.get(key) in (None, ""):
            raise DatasetError(f"{where}: field `{key}` is missing or empty")
    domain = str(row["domain"])
    if domain not in verifier_of_domain:
        raise DatasetError(
            f"{where}: field `domain` is {domain!r}, which the config does not define "
            f"(known: {sorted(verifier_of_domain)}); add it under `domains` or fix the row"
        )
    for key in _NEEDS.get(verifier_of_domain[domain], ()):
        if row.get(key) in (None, ""):
            raise DatasetError(
                f"{where}: field `{key}` is missing; domain {domain!r} uses the "
                f"{verifier_of_domain[domain]!r} verifier, which needs it"
            )
    return Prompt(
        id=str(row["id"]),
        domain=domain,
        prompt=str(row["prompt"]),
        answer=None if row.get("answer") is None else str(row["answer"]),
        tests=row.get("tests"),
        entry_point=row.get("entry_point"),
    )


def load_prompts(path: str | Path, verifier_of_domain: dict[str, str], on_bad_row: str = "fail") -> LoadedDataset:
    """Read and validate every row; raise ``DatasetError`` (fail) or skip and count (skip)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file does not exist")
    prompts, skipped, seen = [], 0, set()
    for where, row in _rows(path):
        try:
            p = _parse(where, row, verifier_of_domain)
            if p.id in seen:
                raise DatasetError(f"{where}: field `id` {p.id!r} repeats an earlier row; ids must be unique")
            seen.add(p.id)
            prompts.append(p)
        except DatasetError as e:
            if on_bad_row == "fail":
                raise
            skipped += 1
            log.warning("skipping bad row: %s", e)
    if not prompts:
        raise DatasetError(f"{path}: no valid rows")
    return LoadedDataset(prompts=prompts, skipped=skipped, path=str(path))
