"""One metrics path: namespaced scalars reduced once per step, written to TensorBoard
and summarised on the console.

Keys follow SPEC §7 (``lag/max``, ``margin/gap_after``, ``teacher/math/kl`` ...).
Each value is already reduced by its producer (the buffer reduces over the batch,
the learner over its shard, the driver over ranks), so this module only writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger("uniopd")

_CONSOLE_KEYS = {"loss": "loss", "throughput/samples_per_s": "responses/s", "lag/max": "lag",
                 "margin/gap_before": "gap", "balance/correct_frac_before": "correct"}


class MetricsWriter:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def console(self, step: int, total: int, metrics: dict[str, float]) -> None:
        acc = " ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in sorted(metrics.items())
                       if k.startswith("accuracy/train/"))
        rest = " ".join(f"{name}={metrics[k]:.3g}" for k, name in _CONSOLE_KEYS.items() if k in metrics)
        log.info("step %d/%d  %s  train-acc[%s]", step, total, rest, acc)

    def close(self) -> None:
        self.tb.close()
