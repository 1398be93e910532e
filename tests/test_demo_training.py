"""The SFT runs that build the demo's models (demo.sft, demo.training): the cold-start retry
loop over the math teacher's snapshots, the choice of the check nearest the target, the mixing
of SFT pools, and plain SFT itself (masking, learning a small task, seeding). Scripted
accuracies stand in for evaluation where the loop, not the model, is under test.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from demo import training
from demo.data import make_splits
from demo.evaluation import evaluate_greedy, generate_greedy, grade_dev_row
from demo.models import build_model
from demo.settings import PrepareSettings, SFTPlan
from demo.sft import collate, encode_pairs, sft
from demo.tokenizer import EOS, build_tokenizer, encode_prompt
from demo.training import Snapshot, band_distance, mix_pools, next_snapshot


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------ cold start


def _snap(step: int, acc: float) -> Snapshot:
    return Snapshot(step, {"math": acc}, {})


def test_next_snapshot_moves_along_the_ladder() -> None:
    ladder = [_snap(10, 0.04), _snap(20, 0.09), _snap(30, 0.18), _snap(40, 0.25), _snap(50, 0.41)]
    band = (0.10, 0.40)
    first = next_snapshot(ladder, set(), 0.22)
    assert first.step == 40  # |0.25 - 0.22| < |0.18 - 0.22|
    # Held-out math too low: the next snapshot up; too high: the next one down.
    assert next_snapshot(ladder, {40}, 0.22, first, 0.05, band).step == 50
    assert next_snapshot(ladder, {40}, 0.22, first, 0.45, band).step == 30
    assert next_snapshot(ladder, {40, 30}, 0.22, ladder[2], 0.45, band).step == 20
    # Math inside the band (the other domain was off): the untried one nearest the target.
    assert next_snapshot(ladder, {40}, 0.22, first, 0.2, band).step == 30
    # Nothing left in that direction.
    assert next_snapshot(ladder, {40, 50}, 0.22, first, 0.05, band) is None
    assert next_snapshot([], set(), 0.22) is None
    assert band_distance({"math": 0.05, "reverse": 0.5}, band) == pytest.approx(0.15)
    assert band_distance({"math": 0.1, "reverse": 0.4}, band) == 0.0


def test_cold_start_retries_until_the_band_and_logs_every_attempt(tmp_path: Path, monkeypatch) -> None:
    """The retry loop with scripted accuracies: attempt 0 (snapshot nearest the target)
    ends with math too low, attempt 1 (next snapshot up) too high, attempt 2 (the next
    one down from there, not yet tried) lands; each is in the report."""
    settings = dataclasses.replace(PrepareSettings.fast(), heldout_band=(0.10, 0.40), student_attempts=4)
    tok = build_tokenizer()
    state = build_model(settings, tok, seed=0).state_dict()
    ladder = [Snapshot(s, {"math": a}, state) for s, a in ((10, 0.05), (20, 0.12), (30, 0.23), (40, 0.3))]
    heldout_script = iter([{"math": 0.04, "reverse": 0.2}, {"math": 0.5, "reverse": 0.2},
                           {"math": 0.15, "reverse": 0.25}])
    started: list[int] = []

    def fake_train_phase(name, model, tokenizer, plan, pool, dev, **kw):
        started.append(kw["seed"])
        return {"steps_run": 3, "chosen": {"step": 3, "dev_accuracy": {}}}, []

    monkeypatch.setattr(training, "train_phase", fake_train_phase)
    monkeypatch.setattr(training, "evaluate_greedy", lambda *a, **k: next(heldout_script))
    entry = training.cold_start(tmp_path, settings, tok, {}, [], [], ladder, seed=200)
    cold = entry["cold_start"]
    assert [a["snapshot"]["step"] for a in cold["attempts"]] == [30, 40, 20]
    assert [a["accepted"] for a in cold["attempts"]] == [False, False, True]
    assert cold["accepted"] and cold["attempt"] == 2 and entry["heldout_accuracy"] == {"math": 0.15, "reverse": 0.25}
    assert started == [201, 202, 203]  # a new SFT seed per attempt
    assert (tmp_path / "student" / "model.safetensors").is_file()

    # No attempt lands: the least bad one is kept, and the report says so.
    # Math too high from 0.23 (off by 0.05), then too low from 0.12 (off by 0.08), and the
    # only snapshot above 0.12 was tried: attempt 0 is kept.
    heldout_script = iter([{"math": 0.45, "reverse": 0.2}, {"math": 0.02, "reverse": 0.2}])
    monkeypatch.setattr(training, "evaluate_greedy", lambda *a, **k: next(heldout_script))
    entry = training.cold_start(tmp_path, settings, tok, {}, [], [], ladder[:3], seed=200)
    cold = entry["cold_start"]
    assert [a["snapshot"]["step"] for a in cold["attempts"]] == [30, 20]
    assert not cold["accepted"] and cold["attempt"] == 0 and entry["heldout_accuracy"]["math"] == 0.45


def test_train_phase_keeps_the_check_nearest_the_target(monkeypatch) -> None:
    """With ``SFTPlan.target`` the model ends with the weights of the dev check nearest the
    target on every domain (here the second of four), not the last or the first past a bar."""
    settings = PrepareSettings.fast()
    tok = build_tokenizer()
    model = build_model(settings, tok, seed=0)
    _, _, dev, pool = make_splits(settings)
    script = iter([{"math": 0.05, "reverse": 0.02}, {"math": 0.2, "reverse": 0.25},
                   {"math": 0.18, "reverse": 0.5}, {"math": 0.1, "reverse": 0.9}])
    weights_at: dict[int, torch.Tensor] = {}
    real_eval = evaluate_greedy

    def fake_eval(m, t, rows, grade_fn=None, **kw):
        if grade_fn is grade_dev_row:
            weights_at[len(weights_at) * 5 + 5] = m.lm_head.weight.detach().clone()
            return next(script)
        return real_eval(m, t, rows, grade_fn, **kw)

    monkeypatch.setattr(training, "evaluate_greedy", fake_eval)
    plan = SFTPlan(("reverse", "math"), steps=20, batch_size=8, lr=1e-3, stop_at=0.9, stop_domains=("reverse",),
                      target=0.22, weights=(0.7, 0.3), self_replay=("math",), check_every=5)
    record, kept = training.train_phase("student", model, tok, plan, pool, dev, check_every=5, seed=0, replay_prompts=16)
    assert [c["step"] for c in record["dev_checks"]] == [5, 10, 15, 20]
    assert record["chosen"]["step"] == 10 and kept == []
    assert torch.equal(model.lm_head.weight, weights_at[10])


# ------------------------------------------------------------------------------ sft


def test_mix_pools_weights() -> None:
    pool = {"a": [("a", str(i)) for i in range(100)], "b": [("b", "x"), ("b", "y")]}
    mixed = mix_pools(pool, ("a", "b"), (0.75, 0.25))
    assert sum(p == "a" for p, _ in mixed) == 100  # the top-weight pool, whole
    b = [c for p, c in mixed if p == "b"]
    assert len(b) == 33 and b[:4] == ["x", "y", "x", "y"]  # a small pool is cycled
    assert len(mix_pools(pool, ("a", "b"))) == 200
    with pytest.raises(ValueError):
        mix_pools(pool, ("a", "b"), (1.0,))


def test_collate_masks_prompt_and_padding() -> None:
    tok = build_tokenizer()
    enc = encode_pairs(tok, [("12+3=", "\\boxed{15}"), (user("rev:ab="), "ba")],
                       lambda p: encode_prompt(tok, p))
    n0 = len("12+3=") + 3  # <|user|> ... <|end|><|assistant|>
    assert enc[0][0] == encode_prompt(tok, "12+3=") and len(enc[0][0]) == n0
    batch = collate(enc, tok.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert ids.shape == (2, n0 + len("\\boxed{15}") + 1)
    # Row 0: prompt masked, completion + EOS supervised.
    assert (labels[0, :n0] == -100).all()
    assert tok.decode(labels[0, n0:].tolist()) == "\\boxed{15}" + EOS
    # Row 1: padding is masked and not attended.
    p1 = len("rev:ab=") + 3
    n1 = p1 + len("ba") + 1
    assert tok.decode(labels[1, p1:n1].tolist()) == "ba" + EOS
    assert (labels[1, n1:] == -100).all() and (batch["attention_mask"][1, n1:] == 0).all()
    assert (ids[1, n1:] == tok.pad_token_id).all()
    # Token ids are taken as given; a raw string without an encoder is refused (one formatting path).
    assert encode_pairs(tok, [([7, 8], "1")]) == [([7, 8], [tok.convert_tokens_to_ids("1"), tok.eos_token_id])]
    with pytest.raises(TypeError, match="encode_prompt"):
        encode_pairs(tok, [("12+3=", "x")])


def test_sft_learns_a_small_task() -> None:
    tok = build_tokenizer()
    settings = PrepareSettings.fast()
    model = build_model(settings, tok, seed=0)
    pairs = [(user("rev:abcd="), "dcba"), (user("rev:wxyz="), "zyxw"), ("1+1=", "\\boxed{2}")]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    losses = sft(model, tok, pairs, steps=60, batch_size=3, lr=3e-3, seed=0, log_every=0,
                 encode_prompt=lambda p: encode_prompt(tok, p))
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.1 * sum(losses[:5]) / 5
    out = generate_greedy(model, tok, [encode_prompt(tok, p) for p, _ in pairs], max_new_tokens=12)
    assert out == [c for _, c in pairs]


def test_sft_is_seeded() -> None:
    tok = build_tokenizer()
    settings = PrepareSettings.fast()
    pairs = [(encode_prompt(tok, user(f"rev:{w}=")), w[::-1]) for w in ("abcd", "bcde", "cdef", "defg", "efgh")]
    runs = []
    for _ in range(2):
        model = build_model(settings, tok, seed=3)
        runs.append(sft(model, tok, pairs, steps=5, batch_size=2, lr=1e-3, seed=7, log_every=0))
    assert runs[0] == runs[1]
