"""The demo's datasets: disjoint splits and their Parquet folders in public shapes.

Owns how the rows of ``demo.tasks`` are drawn into train, held-out, dev and SFT-pool sets
(pairwise-disjoint prompts) and how they are written: one Parquet folder per split and
domain, ``<out>/data/<split>/<domain>/part-00000.parquet``, in the shape public datasets
have (``DATA_COLUMNS``): math DeepMath-style (``question``, ``final_answer``,
``difficulty``; no id column), reverse as chat messages (``id``, ``messages``, ``answer``),
code HumanEval-style (``task_id``, ``prompt``, ``canonical_solution``, ``test``,
``entry_point``). The configs' ``data:`` sections name these columns.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from demo.settings import PrepareSettings
from demo.tasks import (
    POOL_MAY_REPEAT,
    PROBLEM_MAKERS,
    format_response,
    make_row,
    math_difficulty,
    prompt_value,
)


DATA_DIR = "data"
SPLITS: tuple[str, ...] = ("train", "heldout")
PART_FILE = "part-00000.parquet"


# The columns of each domain's Parquet rows (the configs' data sources name them): the
# prompt column first.
DATA_COLUMNS: dict[str, tuple[str, ...]] = {
    "math": ("question", "final_answer", "difficulty"),  # DeepMath; no id column
    "reverse": ("messages", "id", "answer"),  # a chat-messages prompt
    "code": ("prompt", "task_id", "canonical_solution", "test", "entry_point"),  # HumanEval
}
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
DATA_SCHEMAS: dict[str, pa.Schema] = {
    "math": pa.schema([("question", pa.string()), ("final_answer", pa.string()), ("difficulty", pa.float64())]),
    "reverse": pa.schema([("id", pa.string()), ("messages", _MESSAGES), ("answer", pa.string())]),
    "code": pa.schema([("task_id", pa.string()), ("prompt", pa.string()), ("canonical_solution", pa.string()),
                       ("test", pa.string()), ("entry_point", pa.string())]),
}


def prompt_column(domain: str) -> str:
    """The column holding a domain's prompt (the configs' ``prompt_key``)."""
    return DATA_COLUMNS[domain][0]


def dataset_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """The Parquet row of an internal row, in its domain's public shape (``DATA_COLUMNS``)."""
    domain = row["domain"]
    if domain == "math":
        return {"question": row["prompt"], "final_answer": row["answer"], "difficulty": math_difficulty(row["prompt"])}
    if domain == "reverse":
        return {"id": row["id"], "messages": prompt_value(domain, row["prompt"]), "answer": row["answer"]}
    if domain == "code":
        return {"task_id": row["id"], "prompt": row["prompt"], "canonical_solution": row["answer"],
                "test": row["tests"], "entry_point": row["entry_point"]}
    raise ValueError(f"unknown domain {domain!r}")


def make_splits(
    settings: PrepareSettings,
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]], dict[str, list[tuple[Any, str]]]]:
    """Return (train, heldout, dev, sft_pool) over ``settings.domains``, with
    pairwise-disjoint prompts.

    Rows are ``make_row``'s (canonical, internal), domain after domain. Ids: code rows are
    HumanEval-style ``Demo/<n>``, numbered across held-out, dev and train; the others
    ``<split>-<domain>-<i>`` (math's are not written: its Parquet rows have no id column).
    ``sft_pool[domain]`` holds (prompt value, response) pairs: the prompt as the domain's
    Parquet rows hold it (``prompt_value``), the response in the model's format (repeats
    allowed within the pool of a ``POOL_MAY_REPEAT`` domain).
    """
    rng = random.Random(settings.seed)
    taken: set[str] = set()
    code_ids = iter(range(10**9))

    def draw(domain: str, n: int, *, repeats: bool = False) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        make = PROBLEM_MAKERS[domain]
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"cannot draw {n} unique {domain} problems")
            prompt, answer = make(rng)
            if prompt in taken:
                continue
            if not repeats:
                taken.add(prompt)
            out.append((prompt, answer))
        return out

    def rows(split: str, counts: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for domain in settings.domains:
            for i, (prompt, answer) in enumerate(draw(domain, counts)):
                row_id = f"Demo/{next(code_ids)}" if domain == "code" else f"{split}-{domain}-{i:05d}"
                out.append(make_row(row_id, domain, prompt, answer))
        return out

    # Held-out and dev are drawn first so their prompts are reserved before anything else.
    heldout = rows("heldout", settings.n_heldout_per_domain)
    dev = rows("dev", settings.n_dev_per_domain)
    train = rows("train", settings.n_train_per_domain)
    sft_pool = {
        domain: [(prompt_value(domain, p), format_response(domain, a)) for p, a in draw(
            domain, settings.sft_pool_per_domain, repeats=domain in POOL_MAY_REPEAT)]
        for domain in settings.domains
    }
    return train, heldout, dev, sft_pool


def data_path(out_dir: str | os.PathLike[str], split: str, domain: str) -> Path:
    """The folder of one split of one domain (a config's data source ``path``)."""
    return Path(out_dir) / DATA_DIR / split / domain


def write_dataset(out_dir: Path, split: str, rows: Sequence[Mapping[str, Any]], domains: Sequence[str]) -> None:
    """``<out_dir>/data/<split>/<domain>/part-00000.parquet`` per domain, in its public shape."""
    for domain in domains:
        records = [dataset_record(r) for r in rows if r["domain"] == domain]
        folder = data_path(out_dir, split, domain)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=DATA_SCHEMAS[domain]), folder / PART_FILE)


def read_dataset(out_dir: str | os.PathLike[str], split: str, domain: str) -> list[dict[str, Any]]:
    """The Parquet records of one split of one domain, as written (tests, inspection)."""
    folder = data_path(out_dir, split, domain)
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def record_to_row(domain: str, record: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """An internal row from a Parquet record (the inverse of ``dataset_record``; math gets an
    id from ``index``): what the evaluation and the graders take."""
    if domain == "math":
        return make_row(f"math-{index:05d}", domain, record["question"], record["final_answer"])
    if domain == "reverse":
        return make_row(record["id"], domain, record["messages"][-1]["content"], record["answer"])
    if domain == "code":
        row = make_row(record["task_id"], domain, record["prompt"], record["canonical_solution"])
        row.update(tests=record["test"], entry_point=record["entry_point"])
        return row
    raise ValueError(f"unknown domain {domain!r}")
