"""The on-policy distillation demo's offline preparation: data, tokenizer, tiny models.

Owns everything the demo needs before it starts, built the way a user's real data and
models come, so the demo walks their path (``scripts/prepare_demo.py`` is the entry point,
``demo.prepare.prepare`` the call; ``scripts/train.py`` calls it when ``demo.prepare`` is
on):

* ``demo.tasks``: synthetic, verifiable domains, two per recipe (``math`` addition,
  ``reverse`` string reversal, ``code`` HumanEval-style stubs). The default recipe is
  math + reverse (``configs/demo.yaml``), the code recipe math + code
  (``configs/demo_code.yaml``);
* ``demo.data``: the splits, written as Parquet folders in the shapes public datasets have
  (DeepMath, chat messages, HumanEval);
* ``demo.tokenizer``: a character-level tokenizer with role tokens and a chat template,
  and the one prompt encoding (``buffers.formatting.encode``) every model input goes
  through;
* ``demo.models``: tiny untied Qwen3 models (~1M params, same shape);
* ``demo.sft``: plain-torch supervised fine-tuning (one process, AdamW);
* ``demo.training``: the SFT runs with dev checks: one teacher per domain SFT'd to high
  accuracy, and a cold-started student that lands between 10% and 40% held-out greedy
  accuracy on every domain;
* ``demo.evaluation``: greedy accuracy graded by the domains' real verifiers;
* ``demo.settings``: ``PrepareSettings`` and the recipes (the digest that keys the cache);
* ``demo.prepare``: the cache on disk (``READY``, ``prepare_report.json``).

The package is offline tooling: ``actors/``, ``learner/`` and ``buffers/`` never import it.
"""

import os

# libgomp's default (active) wait policy spins; when another process holds one of the two
# cores, a 2-thread torch step was measured 15x slower (2.8 s vs 0.17 s per SFT step).
# Only effective if set before torch (and so libgomp) is first imported: the package sets
# it on import, before any of its modules imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
