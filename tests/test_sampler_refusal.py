"""A prompt the engine refuses fails alone: the sampler returns its n responses marked "refused"
(the buffer then drops the group and counts it) and generates the rest of the batch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_refused_prompt_fails_alone(tiny_demo):
    from actors.sampler import Sampler
    from buffers.records import Prompt
    from configs.schema import SamplerConfig

    cfg = SamplerConfig(n=2, max_new_tokens=4, max_model_len=32)
    sampler = Sampler(str(tiny_demo / "student"), cfg)
    ok = Prompt("ok", "math", "1+1=", answer="2", prompt_ids=(5, 6, 7))
    too_long = Prompt("long", "math", "x", answer="2", prompt_ids=(5,) * 40)  # > max_model_len
    out = sampler.generate([ok, too_long])
    by_id = {pid: [r for r in out if r.prompt.id == pid] for pid in ("ok", "long")}
    assert len(by_id["ok"]) == 2 and all(r.finish_reason in ("stop", "length") and r.response_ids
                                         for r in by_id["ok"])
    assert len(by_id["long"]) == 2 and all(r.finish_reason == "refused" and not r.response_ids
                                           for r in by_id["long"])
    assert sampler.refused == 1
    assert sampler.generate_greedy([too_long, ok])[0] == ""
