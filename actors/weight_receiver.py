"""The vLLM-engine side of learner → engine weight updates (learner/weight_sync.py).

Mixed into every actor whose engine holds the student's weights: the samplers, and a teacher
that is the student itself (``teachers.<name>.follow_student``, self-distillation). The engine
is built with ``transfer_config(backend)``; the learner's trainer engine opens the group
through ``init_weight_transfer_engine`` (every tensor-parallel worker of the engine joins), and
each update runs vLLM's ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``
in one ``receive_weights`` task of this actor. One task, because a Ray actor runs calls of
different callers in any order: the driver orders ``receive_weights`` after the generate (or
score) call in progress, and nothing runs on half-loaded weights. A completed update sets the
policy version; a failed one keeps it.
"""

from __future__ import annotations

import logging
import time
import uuid

import ray

from learner.concurrency import CONTROL, ControlPlane
from learner.errors import PartialWeightsError

log = logging.getLogger(__name__)


class _RotaryReloadNoise(logging.Filter):
    """Every layerwise reload logs "RotaryEmbedding: Failed to load weights": the rotary cos/sin
    cache is not in the checkpoint and vLLM keeps the (constant) cache it has (the post-update
    log-prob match is tested). Dropped; any other layer that fails to load is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] == "RotaryEmbedding")


_ROTARY_FILTER = _RotaryReloadNoise()


def transfer_config(backend: str):
    """vLLM's ``WeightTransferConfig`` for ``backend`` (``nccl``: vLLM's engine; ``gloo``: ours,
    registered in vLLM's factory here and, through the package's ``vllm.general_plugins`` entry
    point, in every worker process vLLM starts)."""
    from vllm.config import WeightTransferConfig

    from learner.weight_sync import register

    register()
    return WeightTransferConfig(backend=backend)


class WeightReceiver(ControlPlane):
    """Needs ``self.llm`` (a ``vllm.LLM`` built with ``transfer_config``), ``self.busy_s`` and
    ``self.label`` (for logs); owns ``version`` and the actor's incarnation id."""

    version: int = 0
    _update_info: dict | None = None

    def _init_receiver(self) -> None:
        self.version = 0
        self._update_info = None
        self._partial = False  # the last update failed part-way: weights unusable until the next one
        self._incarnation = uuid.uuid4().hex

    def init_weight_transfer_engine(self, init_info: dict, update_info: dict) -> bool:
        """Join the learner's transfer group (blocks until every member joins); ``update_info``
        (parameter names, dtypes, shapes) is the same for every update and is kept for them."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self._update_info = update_info
        return True

    def receive_weights(self, version: int) -> float:
        """One complete update from the learner, loaded in place; the policy version is then
        ``version``. Returns seconds spent."""
        if self._update_info is None:
            raise RuntimeError(f"{self.label}: receive_weights before init_weight_transfer_engine")
        t0 = time.perf_counter()
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if _ROTARY_FILTER not in reload_log.filters:
            reload_log.addFilter(_ROTARY_FILTER)
        self.llm.start_weight_update()
        try:
            self.llm.update_weights({"update_info": self._update_info})
        except BaseException:
            # vLLM's worker ends the update session itself and takes the next complete update
            # (tests/test_weight_transfer.py); the version stays, as these weights are partial.
            log.error("%s: weight update to version %d failed; keeping version %d", self.label, version, self.version)
            self._partial = True
            raise
        self.llm.finish_weight_update(weight_version=str(version))
        self._partial = False
        self.llm.reset_prefix_cache()  # cached KV belongs to the old weights
        self.version = version
        dt = time.perf_counter() - t0
        self.busy_s += dt
        return dt

    def require_complete_weights(self) -> None:
        """Called before every generate or score: a failed update left the engine's layers partly
        loaded, and vLLM would run on them (placeholder tensors) until a complete update."""
        if getattr(self, "_partial", False):
            raise PartialWeightsError(f"{self.label}: the last weight update failed part-way; waiting for the "
                                      f"driver to re-send version {self.version}")

    @ray.method(concurrency_group=CONTROL)
    def incarnation(self) -> str:
        """Changes when Ray restarts this actor (the driver then re-forms the group and re-sends)."""
        return self._incarnation

    @ray.method(concurrency_group=CONTROL)
    def get_version(self) -> int:
        return self.version
