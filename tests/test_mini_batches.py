"""``learner.mini_batches``: M optimizer steps per training step (PPO mini-batches).

The split keeps prompt groups whole and makes each part its own SPEC §1 global batch; without the
§1 term, M = 2 on a batch is exactly two M = 1 steps on its parts; with it, the second part's π_S,old
is the policy from before the first update (SPEC §1: "the policy being updated"), so the clip acts on it;
the lr schedule counts training steps whatever M is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from buffers.records import TrainBatch
from learner.batch import split_mini_batches
from tests.builders import DEMO_VOCAB, random_train_batch


def _grouped(n_groups: int, per_group: int = 2) -> TrainBatch:
    """random_train_batch's samples with prompt ids in groups of ``per_group`` (a, a, b, b, ...)."""
    b = random_train_batch(n_groups * per_group, DEMO_VOCAB)
    samples = [dataclasses.replace(s, prompt_id=f"g{i // per_group}") for i, s in enumerate(b.samples)]
    return TrainBatch(samples=samples, n_responses_total=len(samples), prompt_ids=[f"g{i}" for i in range(n_groups)])


def test_split_keeps_groups_whole_and_each_part_is_its_own_global_batch():
    batch = _grouped(5)  # 10 responses
    assert split_mini_batches(batch, 1) == [batch]
    parts = split_mini_batches(batch, 2)  # cuts at round(2.5) = 2 groups
    assert [[s.prompt_id for s in p.samples] for p in parts] == [["g0", "g0", "g1", "g1"],
                                                                 ["g2", "g2", "g3", "g3", "g4", "g4"]]
    assert [p.n_responses_total for p in parts] == [4, 6]
    assert [p.prompt_ids for p in parts] == [["g0", "g1"], ["g2", "g3", "g4"]]
    assert [s for p in parts for s in p.samples] == batch.samples  # nothing lost, order kept
    # more parts than groups: one group each
    assert [len(p.samples) for p in split_mini_batches(batch, 9)] == [2] * 5


def test_split_scales_a_denominator_that_counts_responses_outside_the_samples():
    batch = dataclasses.replace(_grouped(4), n_responses_total=16)  # 8 samples stand for 16 responses
    assert [p.n_responses_total for p in split_mini_batches(batch, 2)] == [8, 8]


def test_config_refuses_more_mini_batches_than_prompts_per_step():
    from configs.schema import load_config

    with pytest.raises(ValueError, match="mini_batches.*prompts_per_step"):
        load_config(None, ["learner.mini_batches=40", "data.prompts_per_step=32"])


# -- the learner (in-process DeepSpeed, one rank, the fast demo's untrained student) ---------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from tests.builders import save_tiny_student

    return str(save_tiny_student(tmp_path_factory.mktemp("student") / "student"))


def _learner(student: str, **cfg):
    from configs.schema import LearnerConfig
    from learner.learner import Learner, free_port

    lr = Learner(student, LearnerConfig(max_tokens_per_micro_batch=24, num_cpus=1, **cfg), rank=0, world_size=1,
                 seed=0, total_steps=100)
    lr.init_engine("127.0.0.1", free_port())
    return lr


def test_two_mini_batches_without_the_pg_term_are_two_steps_on_the_parts(student):
    from configs.schema import ForwardKLTopK

    kw = dict(lr=1e-2, objective=ForwardKLTopK(top_k=4, pg=None))
    batch = _grouped(8)
    split, plain = _learner(student, mini_batches=2, **kw), _learner(student, **kw)
    assert split.param_checksum() == plain.param_checksum()
    m = split.train_step(batch)
    for part in split_mini_batches(batch, 2):
        plain.train_step(part)
    assert m["optimizer_steps"] == 2.0 and split.steps_done == 1
    assert split.param_checksum() == pytest.approx(plain.param_checksum(), rel=1e-6)
    after_split, after_plain = (np.concatenate(x.compute_logprobs(batch.samples)) for x in (split, plain))
    np.testing.assert_allclose(after_split, after_plain, atol=1e-5)


def test_the_second_part_reads_pi_old_from_before_the_first_update(student):
    from configs.schema import PolicyGradientTerm, ReverseKLTopK

    lr = _learner(student, mini_batches=2, lr=1e-2,
                  objective=ReverseKLTopK(weight=0.5, top_k=4, pg=PolicyGradientTerm()))
    batch = _grouped(8)
    part2 = split_mini_batches(batch, 2)[1]
    before = lr.compute_logprobs(part2.samples)
    before_proc = lr.compute_logprobs(part2.samples, processed=True)
    seen: list = []
    inner = lr._chunk_loss

    def spy(samples, n_total, old_T=None):
        seen.append((samples, n_total, old_T))
        return inner(samples, n_total, old_T)

    lr._chunk_loss = spy
    m = lr.train_step(batch)
    first = [(s, n, o) for s, n, o in seen if s[0].prompt_id in {"g0", "g1", "g2", "g3"}]
    second = [(s, n, o) for s, n, o in seen if s[0].prompt_id not in {"g0", "g1", "g2", "g3"}]
    assert first and second and len(first) + len(second) == len(seen)
    assert all(o is None for *_, o in first) and all(n == 8 for _, n, _ in seen)
    index = {id(s): i for i, s in enumerate(part2.samples)}
    for samples, _, old in second:
        for s, (raw, proc) in zip(samples, old):
            np.testing.assert_allclose(raw, before[index[id(s)]], atol=1e-6)
            np.testing.assert_allclose(proc, before_proc[index[id(s)]], atol=1e-6)
    # the first update moved the second part's log-probs, so π_old ≠ πθ there: the check above can fail
    moved = np.concatenate(lr.compute_logprobs(part2.samples)) - np.concatenate(before)
    assert np.abs(moved).max() > 1e-3
    assert m["optimizer_steps"] == 2.0 and np.isfinite(m["loss"])


@pytest.mark.parametrize("m", [1, 3])
def test_the_lr_schedule_counts_training_steps_whatever_m_is(student, m):
    from configs.schema import ConstantLR, ForwardKLTopK

    lr = _learner(student, mini_batches=m, lr=1e-3, lr_schedule=ConstantLR(warmup_steps=4),
                  objective=ForwardKLTopK(top_k=4, pg=None))
    got = [lr.train_step(_grouped(6))["lr"] for _ in range(3)]
    # warm-up factor (k + 1) / 4 after k training steps: 2/4, 3/4, 4/4
    assert got == pytest.approx([0.5e-3, 0.75e-3, 1e-3])
