"""The learner's account of its train step in ``scripts/bench.py``: the kernel's per-thread figures
(``learner.learner.thread_sched_s``) and their per-step means read back from TensorBoard."""

import math
import sys
import time

import pytest

from learner.learner import thread_sched_s
from scripts.bench import learner_step_times

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/thread-self/schedstat is Linux's")


@linux
def test_a_busy_thread_is_on_a_core_for_its_cpu_time_and_never_longer_than_the_wall():
    (on0, wait0), c0, t0 = thread_sched_s(), time.thread_time(), time.perf_counter()
    while time.thread_time() - c0 < 0.2:  # 0.2 CPU-s of this thread
        pass
    (on1, wait1), cpu, wall = thread_sched_s(), time.thread_time() - c0, time.perf_counter() - t0
    assert on1 - on0 == pytest.approx(cpu, abs=0.02)
    assert wait1 >= wait0
    assert (on1 - on0) + (wait1 - wait0) <= wall + 0.02


@linux
def test_a_sleeping_thread_is_neither_on_a_core_nor_waiting_for_one():
    on0, wait0 = thread_sched_s()
    time.sleep(0.3)
    on1, wait1 = thread_sched_s()
    assert (on1 - on0) + (wait1 - wait0) < 0.05  # 0.3 s asleep: blocked, the rest of a step's wall


def test_per_step_means_skip_the_first_step_and_the_rest_is_blocked(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path / "tensorboard"))
    # step 1 (compile, first allocations) is left out; steps 2 and 3: wall 0.50 / 0.60, on a core 0.40 / 0.40,
    # waiting for one 0.06 / 0.10
    for step, (wall, on, wait) in enumerate([(3.0, 1.0, 0.1), (0.50, 0.40, 0.06), (0.60, 0.40, 0.10)], start=1):
        w.add_scalar("learner/step_s", wall, step)
        w.add_scalar("learner/step_thread_cpu_s", on, step)
        w.add_scalar("learner/step_thread_core_wait_s", wait, step)
    w.close()
    got = learner_step_times(tmp_path)
    assert got["wall"] == pytest.approx(0.55)
    assert got["on_cpu"] == pytest.approx(0.40)
    assert got["core_wait"] == pytest.approx(0.08)
    assert got["blocked"] == pytest.approx(0.55 - 0.40 - 0.08)  # 0.07


def test_no_kernel_figures_means_no_split(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path / "tensorboard"))
    for step in (1, 2):  # the NaN a kernel without schedstat gives is not written (MetricsWriter drops it)
        w.add_scalar("learner/step_s", 0.5, step)
    w.close()
    got = learner_step_times(tmp_path)
    assert got == {"wall": 0.5} and not any(math.isnan(v) for v in got.values())
