"""SPEC §5 offline teacher cache end to end on the tiny demo: scripts/cache_teacher.py's builder scores the
reversal domain's SFT responses once with its teacher, then the real pipeline (vLLM sampler prefill,
verifier, cache actor, buffer, DeepSpeed learner, weight sync) trains a few steps with that domain's
teacher a cache while math keeps its live teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.conftest import demo_overrides, demo_sources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached(tiny_demo, tmp_path_factory):
    """The reversal SFT set (the demo's train prompts with their reference responses, which the reversal
    teacher was SFT'd on: the test records that teacher as their producer) and its cache, top-4."""
    import pyarrow.parquet as pq

    from actors.teacher_cache import build_cache
    from actors.teacher_identity import model_identity, read_producer, write_producer
    from configs.schema import DataSource, load_config

    tmp = tmp_path_factory.mktemp("cache")
    rows = pq.read_table(tiny_demo / "data/train/reverse").to_pylist()
    sft = tmp / "reverse_sft.jsonl"
    sft.write_text("".join(json.dumps({**r, "response": r["answer"]}) + "\n" for r in rows))
    write_producer(sft, model_identity(tiny_demo / "teacher_reverse"))
    srcs = yaml.safe_load(demo_sources(tiny_demo))
    srcs = [s if s["domain"] != "reverse" else {**s, "path": str(sft)} for s in srcs]
    base = demo_overrides(tiny_demo, **{"data.train": json.dumps(srcs), "run.output_dir": tmp / "runs"})
    cfg = load_config(None, base)
    src = DataSource.model_validate(next(s for s in srcs if s["domain"] == "reverse"))
    meta = build_cache(cfg, src, response_key="response", teacher_path=str(tiny_demo / "teacher_reverse"),
                       out=tmp / "rev_cache", top_k=4, producer=read_producer(sft), batch=16)
    return base, tmp / "rev_cache", meta, len(rows)


def test_cache_from_another_teacher_than_the_producer_is_refused(cached, tiny_demo):
    from actors.teacher_cache import build_cache
    from configs.schema import DataSource, load_config
    from configs.teachers import TeacherConsistencyError

    base, _, _, _ = cached
    cfg = load_config(None, base)
    src = DataSource.model_validate(next(s for s in yaml.safe_load(cfg.model_dump_json()) ["data"]["train"]
                                         if s["domain"] == "reverse"))
    with pytest.raises(TeacherConsistencyError, match="teacher_math.*teacher_reverse"):
        build_cache(cfg, src, response_key="response", teacher_path=str(tiny_demo / "teacher_math"),
                    out=cached[1].parent / "bad", producer=json.loads(
                        (cached[1].parent / "reverse_sft.jsonl.producer.json").read_text()))


def test_training_steps_from_the_cache_use_its_scores_and_the_students_prefill(cached, ray_cluster):
    import asyncio

    import ray

    from actors.pipeline import Pipeline, load_data
    from actors.placement import release, spawn_actors
    from actors.teacher_cache import CacheReader
    from configs.schema import check_paths, load_config

    base, path, meta, n_rows = cached
    assert meta["rows"] == n_rows and meta["top_k"] == 4 and meta["teacher"] == meta["sft_producer"]
    cfg = load_config(None, base + [f"teachers.reverse_teacher={{type: cache, path: {path}}}",
                                    "learner.objective={type: forward_kl_topk, top_k: 4, pg: {weight: 1.0}}",
                                    "sampler.num_cpus=0.5"])
    check_paths(cfg)
    actors = spawn_actors(cfg, load_data(cfg).train)
    try:
        pipe = Pipeline(cfg, actors)
        pipe.start()
        reader = CacheReader(path)
        seen_cached = 0
        for step in range(3):
            prompts = ray.get(actors.buffer.admit.remote(cfg.data.prompts_per_step))
            failure = ray.get(actors.buffer.add_chain.remote([p.uid for p in prompts], pipe.produce_on(0, prompts)))
            assert failure is None
            batch_ref, _ = actors.buffer.next_batch.remote()
            m = asyncio.run(pipe.train_and_sync(batch_ref))
            assert np.isfinite(m["loss"]) and np.isfinite(m["learner/dist_loss"])
            for s in ray.get(batch_ref).samples:
                if s.domain != "reverse":
                    assert not s.behaviour_raw
                    continue
                seen_cached += 1
                assert s.behaviour_raw and s.policy_version == step  # the student's prefill at this version
                rows = reader.rows_of(s.prompt_ids)
                row = reader.row(int(rows[0]))
                assert s.response_ids == row["response_ids"][: len(s.response_ids)].tolist()
                np.testing.assert_array_equal(s.teacher_logprobs_T, row["teacher_logprobs"][: len(s.response_ids)])
                # the prefill is the student's own log-prob of the cached tokens: a probability
                assert s.behaviour_logprobs_T.shape == (len(s.response_ids),) and (s.behaviour_logprobs_T <= 0).all()
        assert seen_cached > 0 and pipe.version == 3
    finally:
        release(actors)
