"""Ray concurrency groups shared by every actor, the learner included.

Work methods (generate, score, train_step) run one at a time in the default group.
Control-plane reads (liveness, version, busy time) run in ``CONTROL``, so the
driver can read them while a long generate or train step is in progress.

It lives in ``learner/`` because the learner is one of those actors and ``learner/``
never imports ``actors/`` (the samplers, teachers and placement already import
``learner/``), so the dependency between the two folders stays one-way.
"""

import ray

CONTROL = "control"
CONCURRENCY_GROUPS = {CONTROL: 1}


class ControlPlane:
    """Liveness and busy time, answered in ``CONTROL`` while a work method runs. A subclass adds
    the seconds its work methods take to ``busy_s`` (the driver turns deltas into idle fractions)."""

    busy_s: float = 0.0

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group=CONTROL)
    def busy_seconds(self) -> float:
        return self.busy_s
