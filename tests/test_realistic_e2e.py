"""The path a Qwen3 user takes, end to end, on a realistic fixture (scripts/build_fixture.py): a
Qwen3-architecture student and two teachers at Qwen3's vocabulary (151,936, untied), a byte-level
BPE tokenizer with ChatML special tokens and a template that honours ``enable_thinking``, a
DeepMath-style Parquet folder and the 164 real HumanEval problems as sources, responses of a few
hundred tokens — through the real pipeline: vLLM sampler and vLLM teachers, verifier (math and
sandboxed code), buffer, DeepSpeed learner, weight sync.

It checks what a user relies on: the exact templated ids of a known prompt; the teacher's
log-probs equal a transformers forward on the same ids; truncated responses are marked and
handled as configured; the sampler and learner log-probs agree after a sync; a full run (with
the teacher bar and its cache) completes.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MAX_NEW = 192


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    from scripts.build_fixture import build_fixture

    return build_fixture(tmp_path_factory.mktemp("qwen3_fixture") / "fx")


def _overrides(fx, out, **extra) -> list[str]:
    math_src = (f"[{{path: {fx['math_data']}, domain: math, prompt_key: question, answer_key: final_answer, "
                f"id_key: null, weight: 1, prompt_template: '{{prompt}} Put the final answer in \\boxed{{}}.'}}, "
                f"{{path: {fx['code_data']}, domain: code, prompt_key: prompt, id_key: task_id, "
                f"answer_key: canonical_solution, tests_key: test, entry_point_key: entry_point, weight: 1}}]")
    o = {
        "demo.prepare": "false", "run.output_dir": out, "run.name": "qwen3", "run.steps": 2,
        "student.path": fx["student"],
        "domains": "{math: {teacher: math_teacher, verifier: {type: math}}, "
                   "code: {teacher: code_teacher, verifier: {type: code}}}",
        "teachers": (f"{{math_teacher: {{path: {fx['teacher_math']}, num_cpus: 0.5}}, "
                     f"code_teacher: {{path: {fx['teacher_code']}, num_cpus: 0.5}}}}"),
        "data.train": math_src, "data.heldout": math_src, "data.heldout_limit": 2,
        "data.chat_template": "true", "data.chat_template_kwargs": "{enable_thinking: false}",
        "data.prompts_per_step": 2, "sampler.n": 2, "sampler.max_new_tokens": MAX_NEW,
        "sampler.max_model_len": 1024, "sampler.num_cpus": 0.5, "buffer.truncated": "mask",
        "learner.max_tokens_per_micro_batch": 1200, "learner.logit_chunk_tokens": 128,
        "learner.objective.weight": 0.5, "learner.objective.top_k": 4,
        "learner.lr": 1e-4,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def cfg(fixture_dir, tmp_path_factory):
    from configs.schema import load_config

    return load_config(None, _overrides(fixture_dir, tmp_path_factory.mktemp("runs")))


def test_templated_ids_of_a_known_prompt(cfg, fixture_dir):
    from transformers import AutoTokenizer

    from actors.pipeline import load_data

    data = load_data(cfg)
    assert [s.label for s in data.train] == ["math", "HumanEval.jsonl"] and len(data.train[1]) == 164
    math = data.train[0].prompt(0)
    tok = AutoTokenizer.from_pretrained(fixture_dir["student"])
    user = f"{math.prompt} Put the final answer in \\boxed{{}}."
    expected = (f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(list(math.prompt_ids)) == expected
    assert list(math.prompt_ids) == tok(expected, add_special_tokens=False)["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert math.prompt_ids[0] == im_start and math.prompt_ids.count(im_start) == 2
    he = data.train[1].prompt(0)
    assert he.id.startswith("HumanEval/") and "def check(candidate)" in he.tests


def test_pipeline_pieces_on_the_realistic_fixture(cfg, fixture_dir, ray_cluster):
    import asyncio

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from actors.pipeline import Pipeline, load_data
    from actors.placement import release, spawn_actors
    from buffers.records import TrainSample

    actors = spawn_actors(cfg, load_data(cfg).train)
    try:
        pipe = Pipeline(cfg, actors)
        pipe.start()
        a = pipe.a
        prompts = ray.get(a.buffer.admit.remote(2))
        # sampler → verifier → teacher, kept to compare with transformers
        scored = []
        for p in prompts:
            ref = pipe.router.pick(p.domain).score.remote(a.verifier.verify.remote(a.samplers[0].generate.remote([p])))
            scored += ray.get(ref)
        assert all(s.status == "ok" for s in scored)
        rollouts = [s.rollout for s in scored]
        assert all(len(r.response_ids) <= MAX_NEW for r in rollouts)
        assert all(r.truncated == (r.finish_reason == "length") for r in rollouts)
        # the teacher's log-probs are a transformers forward on the same ids
        for s in scored:
            path = fixture_dir["teacher_math" if s.rollout.prompt.domain == "math" else "teacher_code"]
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ids = torch.tensor([s.rollout.prompt_ids + s.rollout.response_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            P, T = len(s.rollout.prompt_ids), len(s.rollout.response_ids)
            ref = logp[P - 1: P - 1 + T].gather(-1, torch.tensor(s.rollout.response_ids)[:, None])[:, 0].numpy()
            assert np.max(np.abs(ref - s.teacher.logprobs_T)) < 1e-4
            top = logp[P - 1: P - 1 + T].topk(4, dim=-1)
            assert np.array_equal(top.indices.numpy(), s.teacher.topk_ids_TK)
            assert np.max(np.abs(top.values.numpy() - s.teacher.topk_logprobs_TK)) < 1e-4
        # truncated responses are marked and masked (buffer.truncated = mask)
        ray.get([a.buffer.add.remote(scored)])
        batch = ray.get(a.buffer.get_batch.remote())
        for smp, r in zip(batch.samples, sorted(rollouts, key=lambda r: (r.prompt.uid, r.sample_idx))):
            assert smp.excluded == r.truncated and (not r.truncated or smp.weight == 0.0)
        # one step, a sync, then sampler and learner agree on fresh responses
        asyncio.run(pipe.train_and_sync(ray.put(batch)))
        fresh = ray.get(a.samplers[0].generate.remote(prompts[:1]))
        samples = [TrainSample(r.prompt_ids, r.response_ids, r.behaviour_logprobs_T, None, None, None, 0.0, 1.0,
                               r.policy_version, r.prompt.domain, False, r.prompt.id) for r in fresh]
        learner_lp = ray.get(a.learners[0].compute_logprobs.remote(samples))
        worst = max(float(np.max(np.abs(lp - r.behaviour_logprobs_T))) for r, lp in zip(fresh, learner_lp))
        assert fresh[0].policy_version == 1 and worst < 1e-4, worst
    finally:
        release(actors)  # kills the actors and frees their placement groups


def test_full_run_with_teacher_bar_and_its_cache(fixture_dir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    cmd = [sys.executable, "scripts/train.py", *_overrides(fixture_dir, tmp_path, **{"run.num_cpus": 4})]
    for name in ("first", "second"):
        out = subprocess.run([*cmd, f"run.name={name}"], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
    first = json.loads((tmp_path / "first" / "summary.json").read_text())
    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert first["steps"] == 2 and set(first["accuracy"]["teacher"]) == {"math", "code"}
    assert first["data"]["HumanEval.jsonl"]["prompts"] == 164
    assert second["accuracy"]["teacher"] == first["accuracy"]["teacher"]
    assert len(list((tmp_path / ".eval_cache").glob("*.json"))) == 2  # one per (teacher, held-out set)
    assert "from cache" in out.stderr + out.stdout
    # a quiet console: the run's own lines (one per step, the held-out accuracies, the final table);
    # library and actor output goes to runs/<name>/run.log and Ray's session logs
    console = out.stderr + out.stdout
    assert "step 1/2" in console and "step 2/2" in console and "held-out accuracy at step 2" in console
    assert "run finished" in console and "summary: {" not in console
    assert "pid=" not in console, console[-3000:]  # Ray's prefix of forwarded actor output
    assert not re.search(r"^(INFO|WARNING|DEBUG) \d\d-\d\d ", console, re.M), console[-3000:]  # vLLM's format
    assert (tmp_path / "second" / "run.log").is_file()
