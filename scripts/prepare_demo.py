"""Build the demo's data and tiny models once, offline, and cache them on disk.

Owns everything the on-policy distillation demo needs before it starts:

* two synthetic, verifiable domains:
  ``math`` (3-digit addition, prompt ``"123+456="``, response ``"\\boxed{579}"``,
  graded by ``actors.verifiers.math``) and ``reverse`` (reverse a lowercase string of
  length 4-8, prompt ``"rev:abcde="``, response ``"edcba"``, graded by
  ``actors.verifiers.exact``);
* a character-level tokenizer (``tokenizers`` WordLevel over single characters, fused
  decoder) saved so that transformers and vLLM both load it and decode exactly;
* tiny untied Qwen3 models (~1M params, same shape): one teacher per domain, SFT'd to
  high accuracy, and a student with a low but non-zero pass rate on both domains (an
  early snapshot of the math teacher's run, then a short SFT adding reversal while
  self-replay holds its math level; see ``PrepareSettings``);
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
import fcntl
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
from transformers.utils import logging as hf_logging  # noqa: E402

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
    """One SFT run on the SFT pools of ``domains``, sampled in proportion to ``weights``
    (default: equal).

    Every ``PrepareSettings.check_every`` steps, greedy accuracy is measured on the dev
    set of ``stop_domains`` (default: ``domains``). Training stops once it is at least
    ``stop_at`` on every one of them (``steps`` still sets the lr schedule), and the
    weights at the first check reaching ``snapshot_at`` everywhere are kept aside.

    For a domain in ``self_replay`` the targets are not the reference responses but the
    model's own greedy responses at the start of the run (on
    ``PrepareSettings.replay_prompts`` prompts): training on them keeps that skill about
    where it is, instead of forgetting it or improving it, while other domains are learnt.
    """

    domains: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    stop_at: float | None = None
    stop_domains: tuple[str, ...] | None = None
    snapshot_at: float | None = None
    weights: tuple[float, ...] | None = None
    self_replay: tuple[str, ...] = ()


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
    # Teachers train until the dev set says the domain is (nearly) solved.
    teacher_math: SFTPlan = SFTPlan(
        ("math",), steps=1500, batch_size=64, lr=3e-3, stop_at=0.95, snapshot_at=0.05
    )
    teacher_reverse: SFTPlan = SFTPlan(("reverse",), steps=600, batch_size=64, lr=3e-3, stop_at=0.99)
    # Student cold start: weak but non-zero on both domains. Addition sits on a loss
    # plateau (~0 accuracy) for a seed-dependent 300-500+ steps before it suddenly climbs
    # to >90% within ~250 steps, so a from-scratch student was slow and its accuracy hard
    # to place. The student therefore starts from the math teacher's snapshot (the first
    # check with dev accuracy >= 5%, just past the plateau). Reversal is then added, with
    # the math skill held in place by self-replay: measured, training on correct math
    # answers instead sent math to 40-99%, and reversal alone erased math (0%) at once.
    # "scratch" trains the student from a fresh init instead.
    student_init: str = "teacher_math_snapshot"
    student: SFTPlan = SFTPlan(
        ("reverse", "math"), steps=500, batch_size=64, lr=3e-3, stop_at=0.15,
        stop_domains=("reverse",), weights=(0.7, 0.3), self_replay=("math",),
    )
    replay_prompts: int = 2000
    check_every: int = 25
    eval_max_new_tokens: int = 16

    @classmethod
    def fast(cls) -> PrepareSettings:
        """Seconds, not minutes: for tests. Accuracies are meaningless."""
        return cls(
            n_train_per_domain=50,
            n_heldout_per_domain=20,
            n_dev_per_domain=20,
            sft_pool_per_domain=500,
            # snapshot_at=0 snapshots at the first check: exercises the student-init path.
            teacher_math=SFTPlan(("math",), steps=20, batch_size=32, lr=3e-3, snapshot_at=0.0),
            teacher_reverse=SFTPlan(("reverse",), steps=20, batch_size=32, lr=3e-3),
            student=SFTPlan(("reverse", "math"), steps=10, batch_size=32, lr=1e-3,
                            weights=(0.7, 0.3), self_replay=("math",)),
            replay_prompts=64,
            check_every=10,
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


def mix_pools(
    pool: Mapping[str, Sequence[tuple[str, str]]],
    domains: Sequence[str],
    weights: Sequence[float] | None = None,
) -> list[tuple[str, str]]:
    """Concatenate the domains' pairs with counts proportional to ``weights``.

    The highest-weight domain contributes its whole pool; smaller pools (self-replay)
    are cycled to reach their count. ``sft`` samples uniformly, so counts set the shares.
    """
    weights = list(weights) if weights is not None else [1.0] * len(domains)
    if len(weights) != len(domains) or min(weights) <= 0:
        raise ValueError(f"need one positive weight per domain, got {weights} for {domains}")
    top = max(range(len(domains)), key=lambda i: weights[i])
    base = len(pool[domains[top]])
    out: list[tuple[str, str]] = []
    for domain, weight in zip(domains, weights, strict=True):
        source = pool[domain]
        n = round(base * weight / weights[top])
        out.extend(source[i % len(source)] for i in range(n))
    return out


def train_phase(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: SFTPlan,
    pool: Mapping[str, Sequence[tuple[str, str]]],
    dev_rows: Sequence[Mapping[str, Any]],
    *,
    check_every: int,
    seed: int,
    max_new_tokens: int = 16,
    replay_prompts: int = 2000,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """One SFT run with dev-set checks; return (training record, snapshot or None)."""
    stop_domains = set(plan.stop_domains or plan.domains)
    dev = [r for r in dev_rows if r["domain"] in stop_domains]
    checks: list[dict[str, Any]] = []
    snapshot: dict[str, torch.Tensor] | None = None
    record: dict[str, Any] = {"domains": list(plan.domains)}

    def stop_fn(step: int, loss: float) -> bool:
        nonlocal snapshot
        acc = evaluate_greedy(model, tokenizer, dev, max_new_tokens=max_new_tokens)
        checks.append({"step": step, "loss": round(loss, 4), "dev_accuracy": acc})
        logger.info("%s step %d loss %.4f dev accuracy %s", name, step, loss, acc)
        if snapshot is None and plan.snapshot_at is not None and min(acc.values()) >= plan.snapshot_at:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            record["snapshot"] = {"step": step, "dev_accuracy": acc}
            logger.info("%s snapshot at step %d", name, step)
        return plan.stop_at is not None and min(acc.values()) >= plan.stop_at

    sources: dict[str, Sequence[tuple[str, str]]] = dict(pool)
    for domain in plan.self_replay:
        prompts = [p for p, _ in pool[domain][:replay_prompts]]
        responses = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        sources[domain] = list(zip(prompts, responses, strict=True))
        # How good the replayed targets are (the reference response is the pool's second item).
        correct = sum(r == ref for r, (_, ref) in zip(responses, pool[domain], strict=False))
        record.setdefault("self_replay_accuracy", {})[domain] = correct / max(1, len(prompts))

    wants_checks = plan.stop_at is not None or plan.snapshot_at is not None
    use_checks = check_every > 0 and wants_checks and bool(dev)
    t0 = time.perf_counter()
    losses = sft(
        model, tokenizer, mix_pools(sources, plan.domains, plan.weights),
        steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
        log_every=max(1, plan.steps // 10),
        check_every=check_every if use_checks else 0,
        stop_fn=stop_fn if use_checks else None,
    )
    tail = losses[-20:]
    record.update(
        steps_run=len(losses),
        final_loss=round(sum(tail) / len(tail), 4),
        train_seconds=round(time.perf_counter() - t0, 2),
        dev_checks=checks,
    )
    return record, snapshot


def _ready_digest(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / READY_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(out: Path) -> None:
    """Delete staging dirs left by killed runs (SIGTERM/SIGKILL skip the cleanup)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing stale staging directory %s", path)
            shutil.rmtree(path, ignore_errors=True)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    # One preparer per cache: a concurrent caller waits here, then finds READY.
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_ready(out, settings):
            return json.loads((out / REPORT_FILE).read_text())
        return _prepare_locked(out, settings, fast)


def _prepare_locked(out: Path, settings: PrepareSettings, fast: bool) -> dict[str, Any]:
    is_cache = (out / REPORT_FILE).exists() or (out / READY_FILE).exists()
    if out.exists() and any(out.iterdir()) and not is_cache:
        # Never delete a directory this module did not create.
        raise FileExistsError(f"{out} exists, is not empty and is not a demo cache; refusing to overwrite")

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the machine has 2 cores
    t_start = time.perf_counter()
    _remove_dead_staging(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        report = _build(staging, settings, fast)
        report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        # READY last: its presence (with this digest) is what marks the cache complete.
        (staging / READY_FILE).write_text(json.dumps({"digest": settings.digest(), "fast": fast}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        torch.set_num_threads(threads)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo artefacts written to %s in %.1fs", out, report["wall_seconds"])
    return report


def _build(out: Path, settings: PrepareSettings, fast: bool) -> dict[str, Any]:
    tokenizer = build_tokenizer()
    train, heldout, dev, pool = make_splits(settings)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)

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
    plans = {"teacher_math": settings.teacher_math, "teacher_reverse": settings.teacher_reverse,
             "student": settings.student}
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    for k, (name, plan) in enumerate(plans.items()):
        t0 = time.perf_counter()
        seed = settings.seed * 1000 + 100 * k
        model = build_model(settings, tokenizer, seed=seed)
        init = "scratch"
        if name == "student" and settings.student_init != "scratch":
            source = settings.student_init.removesuffix("_snapshot")
            if source in snapshots:
                model.load_state_dict(snapshots[source])
                init = settings.student_init
            else:
                # Fast mode with too few checks, or the teacher never reached snapshot_at.
                logger.warning("no %s snapshot was taken; the student starts from scratch", source)
        logger.info("training %s (%d params, init %s)", name, count_parameters(model), init)
        record, snapshot = train_phase(
            name, model, tokenizer, plan, pool, dev,
            check_every=settings.check_every, seed=seed + 1, max_new_tokens=settings.eval_max_new_tokens,
            replay_prompts=settings.replay_prompts,
        )
        if snapshot is not None:
            snapshots[name] = snapshot
        t_eval = time.perf_counter()
        accuracy = evaluate_greedy(model, tokenizer, heldout, max_new_tokens=settings.eval_max_new_tokens)
        logger.info("%s held-out greedy accuracy %s", name, accuracy)
        save_model(model, tokenizer, out / MODEL_DIRS[name])
        report["models"][name] = {
            "heldout_accuracy": accuracy,
            "init": init,
            "params": count_parameters(model),
            "training": record,
            "eval_seconds": round(time.perf_counter() - t_eval, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return report


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the cache)")
    parser.add_argument("--fast", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--force", action="store_true", help="rebuild even if READY matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise
    report = prepare(args.out, fast=args.fast, force=args.force)
    summary = {name: m["heldout_accuracy"] for name, m in report["models"].items()}
    logger.info("held-out greedy accuracy: %s; wall %.1fs", json.dumps(summary), report["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
