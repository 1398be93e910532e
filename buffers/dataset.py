"""Prompt sources: files, folders or globs of JSONL/JSON/Parquet/Arrow (or a hub dataset), read with
Hugging Face ``datasets``, validated row by row and rendered into the student's prompt ids.

Each source (``data.train[i]``, ``configs/schema.py`` ``DataSource``) has its own column names; a
load turns it into one table with canonical columns::

    id · domain · prompt (the verifier's text) · prompt_ids (templated, buffers/formatting.py)
    answer · tests · entry_point

through one batched ``datasets.map``, whose result is an Arrow file in the ``datasets`` cache: a
repeated run reuses it, and the table is memory-mapped, so handing it to the buffer actor
(on the driver's node, actors/placement.py) pickles a file reference, not the rows — a
1M-row source is never copied into an actor. Only the buffer holds training sources;
samplers see one admitted chunk of prompts at a time.

Bad input: a malformed row is an error naming the source, the file, the row and the field
(``on_bad_row: fail``) or is skipped and counted (``skip``). A templated prompt longer than
``max_prompt_tokens`` (student tokens) fails the load or is skipped and counted
(``overlong_prompts``). Ids missing from the data are derived from the row's prompt and answer
(the same row gets the same id on every load; a repeated prompt gets ``-2``, ``-3``, ...).

Privileged teachers (``teachers.<name>.privileged``, docs/algorithm.md §5): a training row of a
domain such a teacher scores also gets that teacher's prompt ids (column ``privileged_ids:<name>``,
``buffers/formatting.py:encode_privileged``) built from the source's ``context_key`` column; a row
without it is a bad row naming the column. The privileged prompt must leave ``sampler.max_new_tokens``
of the teacher's max_model_len; the teacher's ``privileged.overlong`` says what happens otherwise.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from buffers.formatting import PromptFormat, PromptFormatError, encode, encode_privileged, user_text
from buffers.records import Prompt
from configs.schema import DataSource, RunConfig

log = logging.getLogger(__name__)

_NEEDS = {"math": ("answer",), "exact": ("answer",), "code": ("tests", "entry_point")}
_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
             ".arrow": "arrow"}
CANONICAL = ("id", "domain", "prompt", "prompt_ids", "answer", "tests", "entry_point")


class DatasetError(ValueError):
    pass


class PrivilegedOverlongError(DatasetError):
    """A privileged prompt too long for its teacher under ``overlong: fail`` (stops the load, whatever
    ``data.on_bad_row`` says)."""


PRIVILEGED_PREFIX = "privileged_ids:"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(_BUILDERS, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix


def source_files(src: DataSource) -> list[Path] | None:
    """The files of a local source (sorted), or None for a hub dataset name. Raises
    ``FileNotFoundError`` with the fix when a local-looking path matches nothing."""
    p = Path(src.path)
    if any(ch in src.path for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(src.path, recursive=True)) if _suffix(Path(f)) in _BUILDERS]
        if not files:
            raise FileNotFoundError(f"{src.path!r}: the glob matches no .jsonl/.json/.parquet/.arrow file")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in _BUILDERS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise FileNotFoundError(f"{src.path!r}: the folder holds no .jsonl/.json/.parquet/.arrow file")
        return files
    if p.is_file():
        if _suffix(p) not in _BUILDERS:
            raise FileNotFoundError(f"{src.path!r}: unknown format {p.suffix!r}; use .jsonl, .json, .parquet or .arrow")
        return [p]
    # "owner/name" with no such local path: a hub dataset. Anything path-like is a missing file.
    if src.path.startswith((".", "/", "~")) or src.path.count("/") != 1 or p.suffix:
        raise FileNotFoundError(f"{src.path!r}: no such file or folder")
    return None


def _read_files(src: DataSource, files: list[Path] | None):
    """One ``datasets.Dataset`` per file (so a row's error can name its file), or the hub split."""
    import datasets

    datasets.disable_progress_bars()
    if files is None:
        try:
            return [(f"{src.path} ({src.split})", datasets.load_dataset(src.path, split=src.split))]
        except Exception as e:  # noqa: BLE001 - offline machines get a message that says what to do
            raise DatasetError(f"source {src.label!r}: cannot load hub dataset {src.path!r} split {src.split!r} "
                               f"({type(e).__name__}: {e}); download it and point `path` at the files") from e
    out = []
    for f in files:
        try:
            ds = datasets.load_dataset(_BUILDERS[_suffix(f)], data_files=[str(f)], split="train")
        except Exception as e:  # noqa: BLE001 - malformed file: name it
            raise DatasetError(f"source {src.label!r}: cannot read {f} ({type(e).__name__}: {e})") from e
        out.append((str(f), ds))
    return out


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def derived_id(prompt: Any, answer: Any) -> str:
    """A stable id from what makes a row a row (its prompt and answer)."""
    blob = json.dumps([prompt, answer], sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


@dataclass(frozen=True)
class PrivilegedSpec:
    """One privileged teacher as a source's rows see it (picklable, hashable: part of the map's fingerprint)."""

    teacher: str
    template: str
    domains: tuple[str, ...]  # the domains it scores: only their rows get its prompt
    limit: int  # its max_model_len − sampler.max_new_tokens: the longest privileged prompt
    overlong: str  # "fail" | "skip" | "truncate_context" (configs/privileged.py)

    @property
    def column(self) -> str:
        return PRIVILEGED_PREFIX + self.teacher


def privileged_prompt(prompt: Any, fmt: PromptFormat, ps: PrivilegedSpec, context: str, tokenizer) -> list[int] | None:
    """The teacher's prompt ids, within ``ps.limit`` tokens; None when they do not fit and the policy is not
    ``truncate_context`` or even an empty context does not fit. Truncation keeps the context's last tokens:
    each pass drops at least the excess, so it ends within len(context tokens) passes (one or two in practice)."""
    ids = encode_privileged(prompt, fmt, ps.template, context, tokenizer)
    if len(ids) <= ps.limit or ps.overlong != "truncate_context":
        return ids if len(ids) <= ps.limit else None
    ctx_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    keep = len(ctx_ids)
    while len(ids) > ps.limit and keep > 0:
        keep = max(0, keep - (len(ids) - ps.limit))
        ids = encode_privileged(prompt, fmt, ps.template, tokenizer.decode(ctx_ids[len(ctx_ids) - keep:]) if keep
                                else "", tokenizer)
    return ids if len(ids) <= ps.limit else None


@dataclass(frozen=True)
class _RowSpec:
    """What the batched map needs (picklable: ``datasets`` fingerprints it to cache the result)."""

    src: DataSource
    fmt: PromptFormat
    verifier_of_domain: dict[str, str]
    max_prompt_tokens: int
    has_id: bool
    privileged: tuple[PrivilegedSpec, ...] = ()


def _convert_batch(batch: dict[str, list], indices: list[int], *, spec: _RowSpec, tokenizer, where: str) -> dict:
    priv_cols = [ps.column for ps in spec.privileged]
    src, out = spec.src, {k: [] for k in (*CANONICAL, *priv_cols, "_error", "_overlong", "_priv_overlong")}
    n = len(indices)
    for j in range(n):
        row = {k: v[j] for k, v in batch.items()}
        err, overlong, priv_overlong = None, False, False
        rec = dict.fromkeys((*CANONICAL, *priv_cols))
        rec["prompt_ids"] = []
        rec.update({c: [] for c in priv_cols})
        try:
            prompt = row.get(src.prompt_key)
            if prompt in (None, "", []):
                raise DatasetError(f"field `{src.prompt_key}` (prompt_key) is missing or empty")
            domain = src.domain if src.domain is not None else row.get(src.domain_key)
            if domain in (None, ""):
                raise DatasetError(f"field `{src.domain_key}` (domain_key) is missing or empty")
            domain = str(domain)
            if domain not in spec.verifier_of_domain:
                raise DatasetError(f"field `{src.domain_key}` is {domain!r}, which the config does not define "
                                   f"(known: {sorted(spec.verifier_of_domain)}); add it under `domains` or fix the row")
            fields = {"answer": row.get(src.answer_key), "tests": row.get(src.tests_key),
                      "entry_point": row.get(src.entry_point_key)}
            keys = {"answer": src.answer_key, "tests": src.tests_key, "entry_point": src.entry_point_key}
            for need in _NEEDS.get(spec.verifier_of_domain[domain], ()):
                if fields[need] in (None, ""):
                    raise DatasetError(f"field `{keys[need]}` ({need}_key) is missing; domain {domain!r} uses the "
                                       f"{spec.verifier_of_domain[domain]!r} verifier, which needs it")
            if spec.has_id:
                if row.get(src.id_key) in (None, ""):
                    raise DatasetError(f"field `{src.id_key}` (id_key) is missing or empty")
                rec["id"] = str(row[src.id_key])
            else:
                rec["id"] = f"{src.label}-{derived_id(prompt, fields['answer'])}"
            try:
                rec["prompt"] = user_text(prompt)
                rec["prompt_ids"] = encode(prompt, spec.fmt, tokenizer)
            except PromptFormatError as e:
                raise DatasetError(f"field `{src.prompt_key}`: {e}") from None
            overlong = len(rec["prompt_ids"]) > spec.max_prompt_tokens
            rec.update(domain=domain, answer=_text(fields["answer"]), tests=_text(fields["tests"]),
                       entry_point=_text(fields["entry_point"]))
            for ps in spec.privileged:
                if domain not in ps.domains:
                    continue
                context = _text(row.get(src.context_key)) if src.context_key else None
                if context in (None, ""):
                    raise DatasetError(f"field `{src.context_key}` (context_key) is missing or empty; domain "
                                       f"{domain!r} is scored by privileged teacher {ps.teacher!r}, which needs it")
                ids = privileged_prompt(prompt, spec.fmt, ps, context, tokenizer)
                if ids is None and ps.overlong != "skip":
                    n = len(encode_privileged(prompt, spec.fmt, ps.template, context, tokenizer))
                    raise PrivilegedOverlongError(
                        f"the privileged prompt of teacher {ps.teacher!r} is {n} tokens "
                        f"{'(the template alone overflows) ' if ps.overlong == 'truncate_context' else ''}but "
                        f"{ps.limit} fit (its max_model_len − sampler.max_new_tokens); raise "
                        f"teachers.{ps.teacher}.max_model_len, shorten the template, or set "
                        f"teachers.{ps.teacher}.privileged.overlong to truncate_context or skip")
                priv_overlong |= ids is None
                rec[ps.column] = ids or []
        except PrivilegedOverlongError as e:
            raise PrivilegedOverlongError(f"source {src.label!r}, {where} row {indices[j]}: {e}") from None
        except DatasetError as e:
            err = f"source {src.label!r}, {where} row {indices[j]}: {e}"
        for k in (*CANONICAL, *priv_cols):
            out[k].append(rec[k])
        out["_error"].append(err)
        out["_overlong"].append(overlong)
        out["_priv_overlong"].append(priv_overlong)
    return out


@dataclass
class LoadedSource:
    """A source's canonical table (memory-mapped Arrow) and what the load dropped."""

    source: DataSource
    table: Any  # datasets.Dataset with CANONICAL columns
    skipped: int
    overlong: int

    def __len__(self) -> int:
        return len(self.table)

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def weight(self) -> float:
        return self.source.weight

    def prompt(self, i: int) -> Prompt:
        return row_prompt(self.table[int(i)], self.source.label)


def load_source(src: DataSource, fmt: PromptFormat, tokenizer, verifier_of_domain: dict[str, str], *,
                on_bad_row: str = "fail", max_prompt_tokens: int, overlong_prompts: str = "skip",
                num_proc: int = 1, privileged: tuple[PrivilegedSpec, ...] = ()) -> LoadedSource:
    """Read, validate, render and tokenize one source; raise ``DatasetError`` naming source, file, row, field."""
    import datasets

    files = source_files(src)
    has_id = src.id_key is not None
    spec = _RowSpec(src, fmt, dict(verifier_of_domain), max_prompt_tokens, has_id, privileged)
    parts, skipped, overlong = [], 0, 0
    for where, raw in _read_files(src, files):
        if has_id and src.id_key not in raw.column_names:
            has_id = False  # "derived stably from the row when absent"
            spec = _RowSpec(src, fmt, dict(verifier_of_domain), max_prompt_tokens, False, privileged)
            log.info("source %r: no `%s` column in %s; ids are derived from prompt and answer", src.label,
                     src.id_key, where)
        conv = raw.map(_convert_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                       fn_kwargs={"spec": spec, "tokenizer": tokenizer, "where": where},
                       num_proc=num_proc if num_proc > 1 and len(raw) > 10_000 else None,
                       desc=f"formatting {src.label}")
        # column scans in Arrow (a 1M-row source: no Python list of rows)
        errors = pc.drop_null(_column(conv, "_error"))
        if len(errors):
            if on_bad_row == "fail":
                raise DatasetError(f"{errors[0].as_py()}\n({len(errors)} bad rows in {where}; fix them or set "
                                   f"`data.on_bad_row: skip` to drop and count them)")
            for e in errors[:5].to_pylist():
                log.warning("skipping bad row: %s", e)
            skipped += len(errors)
            conv = conv.filter(lambda e: [x is None for x in e], input_columns="_error", batched=True)
        n_long = pc.sum(_column(conv, "_overlong")).as_py() or 0
        if n_long:
            if overlong_prompts == "fail":
                i = pc.index(_column(conv, "_overlong"), True).as_py()
                raise DatasetError(f"source {src.label!r}, {where}: {n_long} prompts are longer than "
                                   f"{max_prompt_tokens} tokens after templating (first: id {conv[i]['id']!r}, "
                                   f"{len(conv[i]['prompt_ids'])} tokens); raise `data.max_prompt_tokens` / "
                                   f"`sampler.max_model_len`, or set `data.overlong_prompts: skip`")
            log.warning("source %r, %s: %d prompts longer than %d tokens skipped", src.label, where, n_long,
                        max_prompt_tokens)
            overlong += n_long
            conv = conv.filter(lambda o: [not x for x in o], input_columns="_overlong", batched=True)
        n_priv = pc.sum(_column(conv, "_priv_overlong")).as_py() or 0
        if n_priv:  # privileged.overlong: skip (fail raised in the map)
            log.warning("source %r, %s: %d rows skipped: their privileged prompt does not fit the teacher",
                        src.label, where, n_priv)
            overlong += n_priv
            conv = conv.filter(lambda o: [not x for x in o], input_columns="_priv_overlong", batched=True)
        parts.append(conv.remove_columns(["_error", "_overlong", "_priv_overlong"]))
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(table) == 0:
        raise DatasetError(f"source {src.label!r} ({src.path}): no valid rows ({skipped} bad, {overlong} overlong)")
    table = _unique_ids(table, src, has_id)
    return LoadedSource(src, table, skipped, overlong)


def _column(table, name: str):
    """One column as Arrow (honouring a filter's indices), without turning rows into Python objects."""
    return table.with_format("arrow")[name]


def _repeated(ids) -> list[str]:
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def _unique_ids(table, src: DataSource, has_id: bool):
    dup = _repeated(_column(table, "id"))
    if not dup:
        return table
    ids = table["id"]
    if has_id:
        raise DatasetError(f"source {src.label!r}: id {dup[0]!r} (column `{src.id_key}`) repeats; ids must be "
                           f"unique (or set `id_key: null` to derive them from each row)")
    seen: dict[str, int] = defaultdict(int)
    new = []
    for i in ids:
        seen[i] += 1
        new.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return table.remove_columns("id").add_column("id", new)


def row_prompt(row: dict, source: str) -> Prompt:
    """A canonical row as the record samplers, teachers and verifiers use."""
    priv = tuple((k[len(PRIVILEGED_PREFIX):], tuple(v)) for k, v in row.items()
                 if k.startswith(PRIVILEGED_PREFIX) and v)
    return Prompt(id=row["id"], domain=row["domain"], prompt=row["prompt"], answer=row["answer"], tests=row["tests"],
                  entry_point=row["entry_point"], prompt_ids=tuple(row["prompt_ids"]), source=source,
                  teacher_prompt_ids=priv)


def source_ids_unique_across(sources: list[LoadedSource]) -> None:
    """Ids key accounting and resume: two sources may not share one (prefix one with its name)."""
    if len(sources) < 2:
        return
    import pyarrow as pa

    dup = _repeated(pa.chunked_array([c for s in sources for c in _column(s.table, "id").chunks]))
    if dup:
        owners = [s.source.label for s in sources if pc.any(pc.equal(_column(s.table, "id"), dup[0])).as_py()]
        raise DatasetError(f"id {dup[0]!r} appears in sources {owners}; ids must be unique across sources "
                           f"(rename one, or derive ids with `id_key: null`)")


def prompt_format(cfg: RunConfig, src: DataSource, chat_template: bool) -> PromptFormat:
    return PromptFormat(chat_template=chat_template, chat_template_kwargs=dict(cfg.data.chat_template_kwargs),
                        system_prompt=src.system_prompt, prompt_template=src.prompt_template)


def privileged_specs(cfg: RunConfig) -> tuple[PrivilegedSpec, ...]:
    """The privileged teachers of the run, each with the domains it scores and its prompt budget."""
    from configs.privileged import privileged_domains

    out = []
    for name, doms in sorted(privileged_domains(cfg).items()):
        t = cfg.teachers[name]
        limit = (t.max_model_len or cfg.sampler.max_model_len) - cfg.sampler.max_new_tokens
        out.append(PrivilegedSpec(name, t.privileged.template, tuple(sorted(doms)), limit, t.privileged.overlong))
    return tuple(out)


def load_sources(cfg: RunConfig, split: str, tokenizer, chat_template: bool) -> list[LoadedSource]:
    """Every source of ``data.train`` or ``data.heldout`` (``split``), loaded and checked; training rows
    also get the privileged teachers' prompts (held-out prompts are the student's alone)."""
    verifier_of_domain = {d: c.verifier.type for d, c in cfg.domains.items()}
    privileged = privileged_specs(cfg) if split == "train" else ()
    out = [load_source(src, prompt_format(cfg, src, chat_template), tokenizer, verifier_of_domain,
                       on_bad_row=cfg.data.on_bad_row, max_prompt_tokens=cfg.max_prompt_tokens,
                       overlong_prompts=cfg.data.overlong_prompts, num_proc=cfg.data.num_proc,
                       privileged=privileged)
           for src in getattr(cfg.data, split) or []]
    source_ids_unique_across(out)
    return out


def as_prompts(sources: list[LoadedSource], limit_per_domain: int = 0) -> list[Prompt]:
    """The rows of small sources (held-out sets) as records, at most ``limit_per_domain`` per domain."""
    count: dict[str, int] = defaultdict(int)
    out = []
    for s in sources:
        for row in s.table:
            if limit_per_domain and count[row["domain"]] >= limit_per_domain:
                continue
            count[row["domain"]] += 1
            out.append(row_prompt(row, s.source.label))
    return out
