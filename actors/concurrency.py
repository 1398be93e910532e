"""Ray concurrency groups shared by the actors.

Work methods (generate, score, train_step) run one at a time in the default group.
Control-plane reads (liveness, version, busy time) run in ``CONTROL``, so the
driver can read them while a long generate or train step is in progress.
"""

CONTROL = "control"
CONCURRENCY_GROUPS = {CONTROL: 1}
