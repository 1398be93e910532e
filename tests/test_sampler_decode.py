"""The sampler decodes its responses itself (vLLM runs with ``detokenize=False`` and flat log-probs):
its texts and log-probs must be exactly what vLLM's own detokenizer and per-position log-prob dicts
give for the same completions, on a character-level tokenizer (the demo's) and a byte-level BPE one
with ChatML special tokens and Qwen3's vocabulary (scripts/build_fixture.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _prompts(sampler, questions):
    from buffers.records import Prompt

    tok = sampler.tokenizer
    return [Prompt(str(i), "math", q, answer="", prompt_ids=tuple(
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)))
            for i, q in enumerate(questions)]


def _check_against_vllm(sampler, prompts) -> dict[str, int]:
    """Generate once with vLLM's detokenizer on, and compare what the sampler's own decode makes of
    the same completions; the flat log-prob reader against vLLM's per-position view of them."""
    from vllm import TokensPrompt

    c = sampler.cfg
    params = sampler._params(n=c.n, temperature=c.temperature, logprobs=0, flat_logprobs=True)  # detokenize=True
    assert params.detokenize and params.flat_logprobs
    outs = sampler.llm.generate([TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts], params,
                                use_tqdm=False)
    reasons = {"eos": 0, "stop_token": 0, "length": 0}
    for out in outs:
        assert sampler._texts(out.outputs) == [o.text for o in out.outputs]
        for o in out.outputs:
            # FlatLogprobs' sequence API gives each position's {token id: Logprob} dict
            dict_lps = np.array([o.logprobs[t][tok].logprob for t, tok in enumerate(o.token_ids)], np.float32)
            np.testing.assert_array_equal(sampler_module()._sampled_logprobs(o.logprobs, list(o.token_ids)),
                                          dict_lps)
            reasons["length" if o.finish_reason == "length" else
                    "stop_token" if isinstance(o.stop_reason, int) else "eos"] += 1
    # the rollouts' own path (flat log-probs, no detokenizer) runs and reads as arrays
    rollouts = sampler.generate(prompts)
    assert all(len(r.behaviour_logprobs_T) == len(r.response_ids) for r in rollouts)
    return reasons


def sampler_module():
    import actors.sampler

    return actors.sampler


def test_own_decode_matches_vllm_char_tokenizer(tiny_demo):
    from actors.sampler import Sampler
    from configs.schema import SamplerConfig

    from transformers import AutoTokenizer

    # "}" is a plain character (not a special token): as an extra stop token vLLM leaves it out of
    # the text, which the sampler's decode must do too
    close = AutoTokenizer.from_pretrained(tiny_demo / "student").convert_tokens_to_ids("}")
    s = Sampler(str(tiny_demo / "student"), SamplerConfig(n=4, max_new_tokens=16, max_model_len=64,
                                                          stop_token_ids=[close]))
    assert not s._sampling().detokenize and s._sampling().flat_logprobs
    reasons = _check_against_vllm(s, _prompts(s, [f"{a}+{b}=" for a in range(10, 60, 7) for b in (3, 58)]))
    assert reasons["stop_token"] > 0 and reasons["length"] + reasons["eos"] > 0, reasons


def test_own_decode_matches_vllm_bpe_tokenizer(tmp_path_factory):
    from actors.sampler import Sampler
    from configs.schema import SamplerConfig
    from scripts.build_fixture import build_fixture

    paths = build_fixture(tmp_path_factory.mktemp("qwen3_fixture") / "fx", seed=0)
    s = Sampler(str(paths["student"]), SamplerConfig(n=4, max_new_tokens=24, max_model_len=128))
    reasons = _check_against_vllm(s, _prompts(s, ["What is 12 + 30?", "Write a function that adds two numbers.",
                                                   "Déjà vu: ünïcödé → 数学", "def f(x):\n    return"]))
    assert reasons["length"] > 0, reasons


def test_stop_strings_keep_vllm_detokenizer(tiny_demo):
    from actors.sampler import Sampler
    from configs.schema import SamplerConfig

    s = Sampler(str(tiny_demo / "student"), SamplerConfig(n=2, max_new_tokens=8, max_model_len=64, stop=["}"]))
    assert s._sampling().detokenize  # vLLM needs its detokenizer to match stop strings
    out = s.generate(_prompts(s, ["1+2="]))
    assert all("}" not in r.text for r in out)
