"""The teacher variants other than a live vLLM engine (``teachers.<name>.type``), and the teacher-consistency
rule of the offline cache (SPEC §5, Lightning OPD).

``type: vllm`` (the default, ``configs/schema.py`` ``TeacherConfig``) scores the student's own samples live.
``type: cache`` (``CacheTeacher`` here) trains its domains from a cache written once by
``scripts/cache_teacher.py`` (actors/teacher_cache.py): the responses of a fixed set (the cold-start SFT data)
and the teacher's log-probs of them. No teacher engine runs.

Teacher consistency (Lightning OPD, Wu, Han & Cai 2026): offline OPD reaches the optimum of live OPD only
when the teacher that scored the cache is the one that produced the SFT data; the paper shows a different
one leaves an irreducible gradient bias. A cache records both identities (model path and a hash of the
weights, actors/teacher_identity.py); a mismatch is refused when the cache is made and when a config that
uses it loads, unless ``force: true``. Identities compare by weight hash only (a path differs between
machines; the weights do not). An SFT set whose producer is unknown (no sidecar) cannot be checked: it is
allowed and says so (our choice; the paper does not discuss it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from configs.algorithm import Section

CACHE_META = "cache.json"  # the identity of a cache, beside its Arrow file (read at config load)


class TeacherConsistencyError(ValueError):
    """A cache scored by another teacher than the SFT data's producer (Lightning OPD teacher consistency)."""


def describe_identity(ident: dict[str, Any] | None) -> str:
    if not ident:
        return "unknown"
    return f"{ident.get('path')} (weights sha256 {str(ident.get('weights_hash'))[:16]}…)"


def consistency_problem(teacher: dict[str, Any], producer: dict[str, Any] | None) -> str | None:
    """Why a cache by ``teacher`` over SFT data from ``producer`` breaks teacher consistency, or None.
    Same teacher ⇔ same weight hash; an unknown producer cannot be checked (None)."""
    if not producer or producer.get("weights_hash") is None:
        return None
    if producer["weights_hash"] == teacher.get("weights_hash"):
        return None
    return (f"the teacher that scores the cache is {describe_identity(teacher)}, but the SFT data was produced "
            f"by {describe_identity(producer)}; Lightning OPD's teacher consistency needs the same teacher for "
            f"both (another one leaves a gradient bias that training does not remove)")


def check_consistency(teacher: dict[str, Any], producer: dict[str, Any] | None, *, force: bool, fix: str) -> None:
    """Raise ``TeacherConsistencyError`` (naming both identities and ``fix``) unless consistent or forced."""
    problem = consistency_problem(teacher, producer)
    if problem and not force:
        raise TeacherConsistencyError(f"{problem}; {fix}")


def read_cache_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``cache.json`` of a cache directory, or None when there is none (yet)."""
    f = Path(path) / CACHE_META
    return json.loads(f.read_text()) if f.is_file() else None


class CacheTeacher(Section):
    """SPEC §5 offline teacher cache (Lightning OPD): the domain's rollouts are the cached responses, their
    teacher log-probs (and top-k) come from the cache, correctness from the verifier, and the student's
    log-probs of them from a prefill on a sampler (the SPEC §2 behaviour policy; see actors/teacher_cache.py
    for what the behaviour weight corrects). Point the domain's ``data.train`` source at the SFT data the
    cache was made from (the same column map); a prompt the cache does not hold is refused and counted."""

    type: Literal["cache"] = "cache"
    path: str = Field(description="Cache directory written by scripts/cache_teacher.py (cache.json + "
                      "responses.arrow).")
    force: bool = Field(False, description="Use a cache whose teacher is not the one that produced the SFT data "
                        "(teacher consistency broken: Lightning OPD shows a gradient bias).")
    num_cpus: float = Field(0.25, gt=0, description="Ray CPUs of the cache reader actor.")

    # What the placement and the driver read of every teacher: a cache runs no engine.
    replicas = property(lambda self: 1)
    num_gpus = property(lambda self: 0.0)
    tensor_parallel_size = property(lambda self: 1)
    max_model_len = property(lambda self: None)
    follow_student = property(lambda self: False)

    @model_validator(mode="after")
    def _teacher_consistency(self) -> CacheTeacher:
        meta = read_cache_meta(self.path)  # a missing cache is reported by check_paths
        if meta is not None:
            check_consistency(meta["teacher"], meta.get("sft_producer"), force=self.force,
                              fix=f"rebuild the cache at {self.path} with the SFT data's producer, or set "
                              "`force: true` on this teacher to train from it anyway")
        return self

    def problems(self, name: str, top_k: int) -> list[str]:
        """Path checks before anything starts: the cache exists and holds the top-k the objective needs."""
        meta = read_cache_meta(self.path)
        if meta is None:
            return [f"`teachers.{name}.path` is {self.path!r}: no {CACHE_META} there; write the cache with "
                    "scripts/cache_teacher.py"]
        # a top-k of the whole vocabulary is every k (the learner caps k at the vocabulary too)
        if min(top_k, meta.get("vocab_size") or top_k) > meta["top_k"]:
            return [f"`learner.objective.top_k` is {top_k} but the cache of `teachers.{name}` holds top-"
                    f"{meta['top_k']}; lower top_k or rebuild the cache with --top-k {top_k}"]
        return []
