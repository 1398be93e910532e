"""``learner.compile``: per-decoder-layer torch.compile, warmed up when the engine starts.

The compiled learner must train exactly like the eager one (same loss, same weights after a step, up to
float reassociation in the fused kernels), the warm-up must leave the weights and gradients untouched, and
every micro-batch shape a step meets (padded, unpadded, one response; with and without gradient) must
already be compiled: a recompilation inside a step would be paid on the training clock.
"""

from __future__ import annotations

import pytest
import torch

from tests.builders import DEMO_VOCAB, random_train_batch


@pytest.fixture(scope="module", autouse=True)
def _release_the_process_group():
    """The learners here run DeepSpeed in the test process; tear its world down afterwards, DeepSpeed's cached
    groups with it, so that a later in-process user (vLLM's uni executor destroys and re-creates the world)
    does not leave the next in-process learner holding a destroyed group."""
    yield
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from tests.builders import save_tiny_student

    return str(save_tiny_student(tmp_path_factory.mktemp("student") / "student"))


def _learner(student: str, **cfg):
    from configs.schema import ForwardKLTopK, LearnerConfig, PolicyGradientTerm
    from learner.learner import Learner, free_port

    # the SPEC §1 term with M = 2: the step runs a no-grad π_S,old pass as well as the training passes;
    # a 24-token budget cuts the ragged batch into padded, unpadded and single-response micro-batches
    objective = ForwardKLTopK(top_k=4, pg=PolicyGradientTerm(weight=0.5))
    lr = Learner(student, LearnerConfig(max_tokens_per_micro_batch=24, num_cpus=1, lr=1e-2, mini_batches=2,
                                        objective=objective, **cfg), rank=0, world_size=1, seed=0, total_steps=100)
    lr.init_engine("127.0.0.1", free_port())
    return lr


def test_compiled_layers_train_like_eager_without_recompiling(student):
    from learner.batch import plan_micro_batches, split_mini_batches

    batch = random_train_batch(16, DEMO_VOCAB)
    shapes = set()
    for part in split_mini_batches(batch, 2):  # the test exercises every variant the warm-up covers
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in part.samples]
        for mb in plan_micro_batches(lengths, 1, 24, None)[0]:
            shapes.add("one" if len(mb) == 1 else "padded" if len({lengths[i] for i in mb}) > 1 else "unpadded")
    assert shapes == {"one", "padded", "unpadded"}

    eager, compiled = _learner(student), _learner(student, compile=True)
    assert eager.compile_s == 0.0 and compiled.compile_s > 0.0
    assert compiled.param_checksum() == eager.param_checksum()  # the warm-up stepped nothing
    assert all(p.grad is None for p in compiled.engine.module.parameters())

    before = compiled.param_checksum()
    m_eager = eager.train_step(batch)
    with torch._dynamo.config.patch(error_on_recompile=True):  # every shape was compiled at start-up
        m_compiled = compiled.train_step(batch)
    assert m_compiled["loss"] == pytest.approx(m_eager["loss"], rel=1e-4)
    assert m_compiled["grad_norm"] == pytest.approx(m_eager["grad_norm"], rel=1e-4)
    assert compiled.param_checksum() != before  # the step moved the weights ...
    assert compiled.param_checksum() == pytest.approx(eager.param_checksum(), rel=1e-6)  # ... as eager did


def test_compile_is_refused_with_zero3():
    from configs.schema import load_config

    with pytest.raises(ValueError, match="learner.compile.*zero_stage"):
        load_config(None, ["learner.compile=true", "learner.zero_stage=3"])
