"""Who a teacher is: its model path and a hash of its weights (SPEC §5 teacher consistency, Lightning OPD).

``weights_hash(dir)`` is sha256 over the sorted (file name, size, sha256 of the file's bytes) of every
weight file (``*.safetensors``; ``*.bin``/``*.pt`` when there is none). Each file is read in fixed chunks
(``chunk_mb``), several files at once (``threads``; hashlib releases the GIL on large buffers), so memory
stays at threads × chunk whatever the model's size. Cost: one full read of the weights — a 32B teacher in
bf16 is 64 GB, i.e. the disk's read time (≈ 30 s at 2 GB/s) or sha256's ≈ 0.5–1 GB/s per core, whichever is
slower; measured figures are in docs/algorithm.md. The per-file digests are memoised in
``<dir>/.uniopd_weights_sha256.json`` (or, for a read-only model, under ``~/.cache/uni_opd_ray/weights/``)
keyed by size and mtime, so a second call reads nothing.

The producer of an SFT data set is recorded in a sidecar ``<data path>.producer.json`` (``write_producer``),
written by whoever generates the data (the demo's preparation for its reference responses); the cache
writer reads it (actors/teacher_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MEMO = ".uniopd_weights_sha256.json"
_WEIGHT_SUFFIXES = ((".safetensors",), (".bin", ".pt"))


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    for suffixes in _WEIGHT_SUFFIXES:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in suffixes)
        if files:
            return files
    raise FileNotFoundError(f"{d}: no weight files (*.safetensors, *.bin, *.pt) to hash")


def file_sha256(path: Path, chunk_mb: int = 8) -> str:
    h, size = hashlib.sha256(), chunk_mb << 20
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(size)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _memo_path(model_dir: Path) -> Path:
    if os.access(model_dir, os.W_OK):
        return model_dir / MEMO
    key = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:20]
    return Path.home() / ".cache" / "uni_opd_ray" / "weights" / f"{key}.json"


def weights_hash(model_dir: str | Path, *, threads: int = 4, chunk_mb: int = 8) -> str:
    """sha256 of the sorted (name, size, sha256) of every weight file (memoised by size and mtime)."""
    d = Path(model_dir)
    files = weight_files(d)
    memo_file = _memo_path(d)
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    stats = {f.name: f.stat() for f in files}

    def digest(f: Path) -> str:
        m, st = memo.get(f.name), stats[f.name]
        if m and m["size"] == st.st_size and m["mtime_ns"] == st.st_mtime_ns:
            return m["sha256"]
        return file_sha256(f, chunk_mb)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = dict(zip((f.name for f in files), pool.map(digest, files)))
    new = {n: {"size": stats[n].st_size, "mtime_ns": stats[n].st_mtime_ns, "sha256": digests[n]} for n in digests}
    if new != memo:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            memo_file.write_text(json.dumps(new, indent=1))
        except OSError:
            pass  # a memo is an optimisation only
    rows = [[n, stats[n].st_size, digests[n]] for n in sorted(digests)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def model_identity(model_dir: str | Path, **kw: Any) -> dict[str, Any]:
    """A teacher's identity as caches and SFT sidecars record it."""
    return {"path": str(Path(model_dir).resolve()), "weights_hash": weights_hash(model_dir, **kw)}


def producer_sidecar(data_path: str | Path) -> Path:
    return Path(str(data_path).rstrip("/") + ".producer.json")


def write_producer(data_path: str | Path, identity: dict[str, Any]) -> Path:
    """Record who produced the SFT data at ``data_path`` (an identity from ``model_identity``, or any
    ``{path, weights_hash}``, e.g. a rule's name and the hash of its code)."""
    out = producer_sidecar(data_path)
    out.write_text(json.dumps(identity, indent=1))
    return out


def read_producer(data_path: str | Path) -> dict[str, Any] | None:
    f = producer_sidecar(data_path)
    return json.loads(f.read_text()) if f.is_file() else None
