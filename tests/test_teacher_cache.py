"""SPEC §5 offline teacher cache (Lightning OPD): the cache's round trip, the teacher-consistency refusal
and its override, the weight hash, the config variant, and the rows a prompt gets (CPU, no Ray)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from actors.teacher_cache import CachedTeacher, prompt_key, scored_batch, write_cache
from actors.teacher_identity import file_sha256, model_identity, read_producer, weights_hash, write_producer
from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, VerifiedRollout
from configs.schema import CacheTeacher, ConfigError, TeacherConfig, check_paths, load_config
from configs.teachers import TeacherConsistencyError, check_consistency

T_A = {"path": "/m/teacher_a", "weights_hash": "a" * 64}
T_B = {"path": "/m/teacher_b", "weights_hash": "b" * 64}


def _scored(pid: str, prompt_ids, resp, lps, topk_ids=None, topk_lps=None) -> ScoredRollout:
    p = Prompt(pid, "reverse", "q", "ans", prompt_ids=tuple(prompt_ids))
    r = Rollout(p, 0, list(prompt_ids), list(resp), np.zeros(0, np.float32), 0, f"text-{pid}", "stop")
    return ScoredRollout(VerifiedRollout(r, False, "mismatch"),
                         TeacherScore(np.array(lps, np.float32), topk_ids, topk_lps), "t")


def _cache(tmp_path, producer=T_A, teacher=T_A):
    """Two prompts: p1 with two cached responses (3 and 1 tokens), p2 with one (2 tokens); top-2."""
    k2 = lambda rows: np.array(rows, np.int32)  # noqa: E731
    rows = [
        _scored("p1", [5, 6], [7, 8, 9], [-0.5, -1.0, -1.5], k2([[7, 1], [8, 2], [9, 3]]),
                np.array([[-0.5, -2.0], [-1.0, -2.5], [-1.5, -3.0]], np.float32)),
        _scored("p2", [5, 7], [4, 3], [-0.25, -0.75], k2([[4, 1], [3, 1]]),
                np.array([[-0.25, -3.0], [-0.75, -1.0]], np.float32)),
        _scored("p1", [5, 6], [2], [-2.0], k2([[1, 2]]), np.array([[-0.1, -2.0]], np.float32)),
    ]
    meta = write_cache(tmp_path / "cache", [scored_batch(rows[:2], 2), scored_batch(rows[2:], 2)],
                       {"teacher": teacher, "sft_producer": producer, "top_k": 2})
    return tmp_path / "cache", meta


def _actor(path, n=2, top_k=2, max_new_tokens=16, max_model_len=64):
    return CachedTeacher("t", CacheTeacher(path=str(path), force=True), group_size=n, top_k=top_k,
                         max_new_tokens=max_new_tokens, max_model_len=max_model_len)


def test_cache_round_trip_gives_back_the_arrays_and_the_identities(tmp_path):
    import pyarrow as pa

    path, meta = _cache(tmp_path)
    assert meta["rows"] == 3
    stored = json.loads((path / "cache.json").read_text())
    assert stored["teacher"] == T_A and stored["sft_producer"] == T_A and stored["top_k"] == 2
    schema_meta = pa.ipc.open_file(pa.memory_map(str(path / "responses.arrow"))).schema.metadata
    assert json.loads(schema_meta[b"uniopd.teacher_cache"])["teacher"] == T_A
    t = _actor(path)
    p1 = Prompt("p1", "reverse", "q", "ans", prompt_ids=(5, 6))
    rolls = t.responses([p1])
    # n = 2, epoch 0: p1's rows in write order, response 0 = [7, 8, 9], response 1 = [2]
    assert [r.response_ids for r in rolls] == [[7, 8, 9], [2]]
    assert [r.text for r in rolls] == ["text-p1", "text-p1"] and all(r.behaviour == "prefill" for r in rolls)
    scored = t.score([VerifiedRollout(r, True, "match") for r in rolls])
    np.testing.assert_array_equal(scored[0].teacher.logprobs_T, np.float32([-0.5, -1.0, -1.5]))
    np.testing.assert_array_equal(scored[0].teacher.topk_ids_TK, [[7, 1], [8, 2], [9, 3]])
    np.testing.assert_array_equal(scored[0].teacher.topk_logprobs_TK, np.float32([[-0.5, -2.0], [-1.0, -2.5],
                                                                                  [-1.5, -3.0]]))
    np.testing.assert_array_equal(scored[1].teacher.logprobs_T, np.float32([-2.0]))
    assert prompt_key([5, 6]) == hashlib.sha1(np.int32([5, 6]).tobytes()).hexdigest()


def test_responses_cycle_by_epoch_cut_to_the_context_and_refuse_unknown_prompts(tmp_path):
    path, _ = _cache(tmp_path)
    t = _actor(path, n=3, top_k=1, max_new_tokens=2)
    p1 = Prompt("p1", "reverse", "q", "ans", prompt_ids=(5, 6), epoch=1)
    # epoch 1, n 3: rows (1·3 + j) mod 2 for j = 0, 1, 2 → second, first, second; max_new_tokens 2 cuts [7, 8, 9]
    rolls = t.responses([p1, Prompt("zz", "reverse", "q", prompt_ids=(9, 9))])
    assert [r.response_ids for r in rolls[:3]] == [[2], [7, 8], [2]]
    assert [r.finish_reason for r in rolls] == ["stop", "length", "stop", "refused", "refused", "refused"]
    scored = t.score([VerifiedRollout(r, False, "mismatch") for r in rolls])
    np.testing.assert_array_equal(scored[1].teacher.logprobs_T, np.float32([-0.5, -1.0]))  # cut like the tokens
    np.testing.assert_array_equal(scored[1].teacher.topk_ids_TK, [[7], [8]])  # top-1 of the stored top-2
    assert scored[3].teacher.logprobs_T.size == 0 and t.missing == 1


def test_cache_top_k_below_the_objective_is_refused(tmp_path):
    path, _ = _cache(tmp_path)
    with pytest.raises(ValueError, match="top-2.*--top-k 4"):
        _actor(path, top_k=4)


def test_consistency_refuses_another_teacher_naming_both_and_force_overrides():
    with pytest.raises(TeacherConsistencyError) as e:
        check_consistency(T_B, T_A, force=False, fix="FIX")
    assert "/m/teacher_b" in str(e.value) and "/m/teacher_a" in str(e.value) and "FIX" in str(e.value)
    check_consistency(T_B, T_A, force=True, fix="")  # forced
    check_consistency(T_A, {**T_A, "path": "/elsewhere"}, force=False, fix="")  # same weights, moved: fine
    check_consistency(T_B, None, force=False, fix="")  # unknown producer: cannot be checked


def _cache_config(path, **teacher):
    return load_config(None, [f"teachers.reverse_teacher={json.dumps({'type': 'cache', 'path': str(path), **teacher})}"])


def test_config_load_refuses_an_inconsistent_cache_unless_forced(tmp_path):
    path, _ = _cache(tmp_path, producer=T_A, teacher=T_B)
    with pytest.raises(ConfigError) as e:
        _cache_config(path)
    assert "teacher_b" in str(e.value) and "teacher_a" in str(e.value) and "force: true" in str(e.value)
    cfg = _cache_config(path, force=True)
    assert isinstance(cfg.teachers["reverse_teacher"], CacheTeacher)
    consistent, _ = _cache(tmp_path / "ok")
    assert _cache_config(consistent).teachers["reverse_teacher"].force is False


def test_teacher_type_defaults_to_vllm_and_the_cache_variant_has_only_its_keys(tmp_path):
    cfg = load_config(None)
    assert all(isinstance(t, TeacherConfig) and t.type == "vllm" for t in cfg.teachers.values())
    with pytest.raises(ConfigError, match="`teachers.reverse_teacher.replicas` is not a known key of `type: cache`"):
        _cache_config(tmp_path, replicas=2)
    with pytest.raises(ConfigError, match="must be one of 'vllm', 'cache'"):
        load_config(None, ["teachers.reverse_teacher={type: disk, path: x}"])


def test_check_paths_names_a_missing_cache_and_a_short_top_k(tmp_path):
    cfg = _cache_config(tmp_path / "none")
    notes = check_paths(cfg, only_existing=True)
    assert any("teachers.reverse_teacher.path" in n and "cache_teacher.py" in n for n in notes)
    path, _ = _cache(tmp_path)
    cfg = load_config(None, [f"teachers.reverse_teacher={{type: cache, path: {path}}}",
                             "learner.objective={type: forward_kl_topk, top_k: 8}"])
    assert any("holds top-2" in n for n in check_paths(cfg, only_existing=True))


def test_weights_hash_is_the_hash_of_names_sizes_and_shard_hashes_and_is_stable(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    a, b = b"\x01" * (3 << 20) + b"x", b"weights-b"
    (d / "model-00002.safetensors").write_bytes(b)
    (d / "model-00001.safetensors").write_bytes(a)
    (d / "config.json").write_text("{}")  # not a weight file
    # by hand: sha256 of the JSON list of [name, size, sha256(bytes)] sorted by name
    rows = [["model-00001.safetensors", len(a), hashlib.sha256(a).hexdigest()],
            ["model-00002.safetensors", len(b), hashlib.sha256(b).hexdigest()]]
    expect = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert weights_hash(d, chunk_mb=1) == expect  # a 3 MB shard read in 1 MB chunks
    assert file_sha256(d / "model-00001.safetensors", chunk_mb=2) == hashlib.sha256(a).hexdigest()
    assert (d / ".uniopd_weights_sha256.json").is_file()
    assert weights_hash(d, threads=1) == expect  # memoised: the same answer
    (d / "model-00002.safetensors").write_bytes(b"weights-c")  # same size, new bytes and mtime
    assert weights_hash(d) != expect
    ident = model_identity(d)
    write_producer(tmp_path / "sft.jsonl", ident)
    assert read_producer(tmp_path / "sft.jsonl") == ident and read_producer(tmp_path / "other") is None


def test_collate_marks_prefilled_cached_responses_as_raw_behaviour():
    from buffers.records import TrainSample
    from learner.batch import collate

    def sample(raw: bool) -> TrainSample:
        return TrainSample([1, 2], [3], np.float32([-0.5]), None, None, None, 0.0, 1.0, 0, "d", True, "p",
                           behaviour_raw=raw)

    assert collate([sample(True), sample(False)], 0, 0).raw_behave_B.tolist() == [1.0, 0.0]
