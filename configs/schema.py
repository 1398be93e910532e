"""The one typed configuration of a Uni-OPD-Ray run, validated before anything starts.

A run is described by one YAML file (``configs/demo.yaml`` by default) plus
``key=value`` overrides from the command line. ``load_config`` merges them,
validates the whole tree and returns a frozen ``RunConfig``; every error names
the key, the value and the fix. No Ray actor starts and no model loads until this
returns. Checks that span sections (a domain whose teacher does not exist, a
top-k larger than the vocabulary is checked later, when the tokenizer is known)
sit on the root model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, model_validator

# The pluggable parts of the algorithm (configs/algorithm.py), re-exported: one import path for every config type.
from configs.algorithm import (  # noqa: F401
    VOPD, _tagged, CalibrationConfig, ConstantLR, CosineLR, DriftControl, ExtrapolatedPG, ForwardKLTopK, IcePop,
    ImportanceConfig, JSDTopK, KLMixTopK, LinearLR, LRSchedule, MarginMask, MarginShift, NoCalibration, NoImportance,
    ObjectiveConfig, PolicyGradientTerm, ReverseKLPG, ReverseKLTopK, Section, Statistic, TopKObjective, TruncatedIS,
    moved_keys)
from configs.scoring import (ConfidenceWeights, EqualWeights, TeacherCombination, check_scoring,  # noqa: F401
                             combination_of, reference_of, teacher_names)
from configs.teachers import CacheTeacher
from configs.privileged import (  # noqa: F401
    DOPDRouting, NoRouting, PrivilegedPrompt, RegimeRule, RoutingConfig, check_privileged)

DEFAULT_CONFIG = Path(__file__).with_name("demo.yaml")


class ConfigError(ValueError):
    """A configuration problem, with the key, the value and the fix in its message."""


class RunSection(Section):
    name: str = Field("demo", description="Run name: outputs go to <output_dir>/<name>/.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(0, description="Seed for sampling, balancing and the learner.")
    steps: int = Field(40, ge=1, description="Learner steps (optimizer updates) to run.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' or host:port); null starts an embedded local Ray."
    )
    num_cpus: float = Field(4, gt=0, description="Logical CPUs of the embedded Ray (ignored when joining a cluster).")
    eval_every: int = Field(0, ge=0, description="Held-out greedy evaluation every N steps (0: only before and after).")
    eval_every_s: float = Field(0, ge=0, description="Held-out evaluation every this many seconds of training, "
                                "evaluations not counted (0: off); with eval_every, whichever comes first. The "
                                "accuracy curve (training seconds, step, responses, accuracy) goes to summary.json.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop after this many seconds of training "
                                        "(evaluations not counted), or at run.steps, whichever comes first.")
    resume: str | None = Field(None, description="Run directory to resume from (latest complete checkpoint).")
    call_timeout_s: float = Field(600, gt=0, description="Timeout for any remote call the driver waits on.")
    eval_teachers: bool = Field(True, description="Measure the teachers' held-out accuracy (the bar) before "
                                "training; cached per (teacher, held-out set), so a repeated run pays it once.")
    eval_timeout_s: float = Field(1800, gt=0, description="Timeout of one held-out evaluation (batched vLLM).")


# The domains each demo recipe of scripts/prepare_demo.py prepares (tests/test_configs.py
# checks that the two agree; the schema does not import torch to find out).
DEMO_RECIPE_DOMAINS: dict[str, tuple[str, ...]] = {"default": ("math", "reverse"), "code": ("math", "code")}


class DemoSection(Section):
    prepare: bool = Field(
        True, description="Build the demo's tiny teachers, student and data on first use (cached under cache_dir)."
    )
    cache_dir: str = Field(".cache/demo", description="Where the demo preparation writes models and data.")
    recipe: Literal["default", "code"] = Field(
        "default", description="What the preparation builds: 'default' (math + reverse, configs/demo.yaml) or "
        "'code' (math + code graded in the sandbox, configs/demo_code.yaml).")


class DataSource(Section):
    """One source of prompts: a file, folder or glob of JSONL/JSON/Parquet/Arrow files (or a hub dataset
    name where the machine reaches one), loaded with Hugging Face ``datasets``, with its own column names."""

    path: str = Field(description="A file, a folder (every .jsonl/.json/.parquet/.arrow file under it, sorted), a "
                      "glob, or a hub dataset name (only where the machine can reach the hub).")
    name: str | None = Field(None, description="Short name in errors and metrics (default: the path's last part).")
    split: str = Field("train", description="Split to read (hub datasets; local files are one split).")
    prompt_key: str = Field("prompt", description="Column with the prompt: a string or a list of chat messages.")
    answer_key: str = Field("answer", description="Column with the reference answer (math / exact verifiers).")
    id_key: str | None = Field(
        "id", description="Column with a unique row id; when absent from the data (or null), ids are derived "
        "stably from the row's prompt and answer.")
    tests_key: str = Field("tests", description="Column with the tests (code verifier; HumanEval: `test`).")
    entry_point_key: str = Field("entry_point", description="Column with the function under test (code verifier).")
    context_key: str | None = Field(None, description="Column with privileged context (a reference answer, a worked "
                                    "solution) that teachers with `privileged` read through their template; needed "
                                    "by training rows of a domain such a teacher scores.")
    domain: str | None = Field(None, description="The domain of every row of this source (or use `domain_key`).")
    domain_key: str | None = Field(None, description="Column naming each row's domain (or use `domain`).")
    weight: float = Field(1.0, gt=0, description="Mixing weight: a training prompt comes from this source with "
                          "probability weight / Σ weights (each source cycles through its own shuffled epochs).")
    system_prompt: str | None = Field(None, description="System message put first (unless a row has its own).")
    prompt_template: str | None = Field(
        None, description="Applied to the (last user) prompt text, with `{prompt}` standing for it, e.g. "
        "'{prompt}\\nPut the final answer in \\boxed{}.'.")

    @model_validator(mode="after")
    def _one_domain_rule(self) -> DataSource:
        if (self.domain is None) == (self.domain_key is None):
            raise ValueError(f"source {self.path!r}: set exactly one of `domain` (one domain for every row) and "
                             f"`domain_key` (a column naming each row's domain)")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"source {self.path!r}: `prompt_template` is {self.prompt_template!r}; it must contain "
                             f"`{{prompt}}` where the prompt text goes")
        return self

    @property
    def label(self) -> str:
        """``name``, else the last folder or file of the path before any glob part."""
        parts = Path(self.path).parts
        plain = [p for p in parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]]
        return self.name or (Path(*plain).name if plain else self.path)


def _sources(value: Any) -> Any:
    """A bare path is one source in the canonical layout: columns id, domain, prompt, answer, tests, entry_point."""
    if isinstance(value, str):
        return [{"path": value, "domain_key": "domain"}]
    return value


class DataSection(Section):
    train: Annotated[list[DataSource], BeforeValidator(_sources)] = Field(
        description="Training sources, mixed by weight into one stream (a bare path: one source with canonical "
        "columns id, domain, prompt, answer).", min_length=1)
    heldout: Annotated[list[DataSource] | None, BeforeValidator(_sources)] = Field(
        None, description="Held-out sources for greedy accuracy (before/after and every run.eval_every steps).")
    prompts_per_step: int = Field(16, ge=1, description="B: prompts per learner step (SPEC §2).")
    on_bad_row: Literal["fail", "skip"] = Field("fail", description="A malformed row stops the run or is skipped and counted.")
    heldout_limit: int = Field(0, ge=0, description="Evaluate at most this many held-out prompts per domain (0: all).")
    chat_template: bool | None = Field(
        None, description="Render prompts with the student tokenizer's chat template (null: when it has one; "
        "false: raw text, for base models).")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments of apply_chat_template, e.g. {enable_thinking: false} "
        "for Qwen3.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest templated prompt in student tokens (null: sampler.max_model_len − "
        "sampler.max_new_tokens, so every response fits).")
    overlong_prompts: Literal["fail", "skip"] = Field(
        "skip", description="A prompt longer than max_prompt_tokens stops the run (fail) or is dropped and counted.")
    num_proc: int = Field(1, ge=1, description="Processes for formatting and tokenizing sources at load "
                          "(datasets.map; the result is cached, so a repeated run pays nothing).")


class MathVerifier(Section):
    type: Literal["math"] = "math"


class ExactVerifier(Section):
    type: Literal["exact"] = "exact"


class CodeVerifier(Section):
    type: Literal["code"] = "code"
    wall_seconds: float = Field(5.0, gt=0, description="Wall-clock limit of one program run.")
    memory_mb: int = Field(512, ge=16, description="Address-space limit of one program run.")
    parallel: int = Field(2, ge=1, description="Programs of one verify call that run at once in the sandbox "
                          "(each with its own limits); a batch of hostile loops then takes ⌈n/parallel⌉ wall limits.")


VerifierConfig = Annotated[MathVerifier | ExactVerifier | CodeVerifier, Field(discriminator="type")]


class DomainConfig(Section):
    teacher: str | list[str] = Field(description="Name of the teacher (a key of `teachers`) that scores this "
                                     "domain, or a list of several whose scores are combined per response (SPEC §5; "
                                     "the first one is the domain's held-out accuracy bar).")
    combine: TeacherCombination | None = Field(None, description="With several teachers: their weights per response "
                                               "(configs/scoring.py): `confidence` (null: this, τ = 1) or `equal`.")
    verifier: VerifierConfig = Field(description="How a response of this domain is graded.")
    routing: RoutingConfig = Field(NoRouting(), description="Per-token source of the advantage: `none` (the "
                                   "teacher, SPEC §1) or `dopd` (routed between the teacher and a privileged "
                                   "student by their gap, actors/dopd.py).")


class TeacherConfig(Section):
    """A teacher served by vLLM: scoring is a prefill with ``prompt_logprobs`` (SPEC §1, §6)."""

    type: Literal["vllm"] = "vllm"
    path: str = Field(description="Hugging Face model directory of the teacher.")
    replicas: int = Field(1, ge=1, description="Teacher actors (vLLM engines) serving this model (round-robin).")
    num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per teacher actor.")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per teacher actor (tensor_parallel_size on GPU nodes).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one teacher engine shards the model over.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int | None = Field(
        None, ge=8, description="Longest prompt + response the engine scores (null: sampler.max_model_len).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of each GPU vLLM may take.")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache of the engine on CPU, whole GiB (VLLM_CPU_KVCACHE_SPACE; vLLM reads an integer).")
    enforce_eager: bool = Field(True, description="No CUDA graphs (prefill-only scoring gains little from them).")
    micro_batch_size: int = Field(64, ge=1, description="Responses per scoring call into the engine (vLLM "
                                  "schedules them by its own token budget).")
    follow_student: bool = Field(False, description="Self-distillation: this teacher is the student itself "
                                 "(`path` = `student.path`) and takes every weight update of the learner, as the "
                                 "samplers do (through vLLM's weight-transfer API).")
    privileged: PrivilegedPrompt | None = Field(None, description="Prompt this teacher with privileged context "
                                                "(a dataset column) through a template; with follow_student: "
                                                "self-distillation (docs/algorithm.md §5).")


# `type: vllm` (default, live) or `type: cache` (SPEC §5 offline cache, configs/teachers.py)
TeacherVariant = Annotated[TeacherConfig | CacheTeacher, Field(discriminator="type"), _tagged("vllm")]


class ModelConfig(Section):
    path: str = Field(description="Hugging Face model directory of the student (tokenizer included).")


class SamplerConfig(Section):
    type: Literal["vllm"] = "vllm"
    num_samplers: int = Field(1, ge=1, description="N sampler actors, each holding one vLLM engine.")
    chunk_prompts: int = Field(
        0, ge=0, description="Prompts per generate call (0: prompts_per_step / num_samplers, one call per sampler "
        "per step). Smaller chunks give weight syncs earlier turns (they wait for the call in progress), larger "
        "ones batch better: measured on the demo (scripts/bench.py), B/N instead of B/(2N) cut the CPU per step "
        "from 2.4 to 1.9 s and raised sync 76 → 91 and async 91 → 122 samples/s.")
    max_inflight_chunks: int = Field(
        2, ge=1, description="Chunks queued per sampler: with 2, a sampler generates the next chunk while the "
        "last one is verified and scored.")
    n: int = Field(8, ge=1, description="Responses per prompt (the group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (Qwen3 recommends 0.6 for thinking). "
                               "The learner applies the same temperature, top-k, top-p and min-p to the log-probs of "
                               "the SPEC §2 behaviour weight, so any setting keeps it exact.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (Qwen3: 0.95).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: off; Qwen3: 20).")
    min_p: float = Field(0.0, ge=0, lt=1, description="Drop tokens below min_p × the likeliest one's probability.")
    seed: int | None = Field(None, description="Engine seed (sampler i gets seed + 1000 i); unset: run.seed.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism); each "
                                      "engine's GPUs come from one placement-group bundle set on one node.")
    enforce_eager: bool = Field(True, description="No CUDA graphs: faster start, slower decode. On GPUs set false "
                                "(CUDA graphs speed decoding of many short steps); CPU needs true.")
    enable_prefix_caching: bool = Field(False, description="Reuse the KV of shared prompt prefixes (system "
                                        "prompts, few-shot): on for GPU runs; reset after every weight update.")
    max_new_tokens: int = Field(16, ge=1, description="Longest response; one that reaches it is marked "
                                "truncated (buffer.truncated decides what that does).")
    max_model_len: int = Field(64, ge=8, description="Longest prompt + response the engine holds.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS of the tokenizer and "
                            "generation config always stops).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra stop token ids (e.g. <|im_end|> "
                                      "for a chat model whose generation config lacks it).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    kv_cache_gib: int = Field(1, ge=1, description="KV cache of the engine on CPU, whole GiB (VLLM_CPU_KVCACHE_SPACE; vLLM reads an integer).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class VerifierSection(Section):
    num_cpus: float = Field(0.25, gt=0, description="Ray CPUs of the verifier actor.")


class BufferConfig(Section):
    balance: bool = Field(True, description="SPEC §3.2 online correctness-aware balancing.")
    balance_ratio: float = Field(1.0, gt=0, description="r: keep correct : incorrect = r : 1 in mixed groups.")
    calibration: CalibrationConfig = Field(MarginShift(), description="SPEC §4 margin calibration: `shift` "
                                           "(default: mean, both, group, δ = 0.4), `mask` or `none`.")
    max_lag: int = Field(0, ge=0, description="η: off-policy lag bound (SPEC §2); 0 is synchronous on-policy.")
    truncated: Literal["keep", "mask", "incorrect"] = Field(
        "mask", description="A response cut at sampler.max_new_tokens: `mask` leaves it out of balancing, "
        "calibration and both loss terms (still counted in the SPEC §1 denominator), as long-reasoning recipes "
        "do; `incorrect` grades it incorrect; `keep` treats it like any other.")
    teacher_failure_window: int = Field(200, ge=1, description="Responses per teacher in the failure window.")
    teacher_max_failed_frac: float = Field(
        0.1, ge=0, le=1, description="The run stops, naming the teacher, when more than this fraction of its "
        "last teacher_failure_window responses failed (a failure gives A_t = 0, SPEC §1).")
    num_cpus: float = Field(0.25, gt=0)


class LearnerConfig(Section):
    """The DeepSpeed learner (learner/learner.py): data parallelism, precision and memory, the optimizer,
    the loss (SPEC §1, §2, §6) and checkpoints. Memory scales with ``max_tokens_per_micro_batch``
    (activations) and ``logit_chunk_tokens`` (one chunk of logits, ≈ chunk × vocabulary × 4 bytes),
    not with sequence length × vocabulary."""

    world_size: int = Field(1, ge=1, description="W: data-parallel learner ranks (Ray actors).")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="DeepSpeed ZeRO stage: 0 replicates everything, 1 partitions the optimizer state over the W "
        "ranks, 2 also the gradients, 3 also the weights (gathered layer by layer in the forward pass).")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: keep the optimizer state (fp32 master weights, Adam moments) in CPU memory "
        "and step it there with DeepSpeed's CPU Adam. Needs zero_stage ≥ 1.")
    bf16: bool = Field(
        False, description="Weights and activations in bf16; DeepSpeed keeps fp32 master weights in its optimizer "
        "wrapper (every ZeRO stage). Log-softmax and the loss run in fp32 either way.")
    compile: bool = Field(
        False, description="torch.compile every decoder layer (the model's `_no_split_modules` blocks, one compiled "
        "graph for all of them, dynamic shapes: per-block compilation as torchtitan and prime-rl do it), warmed up "
        "on dummy micro-batches when the engine starts, so compilation is set-up time (8-25 s measured on the demo's "
        "CPU learner) rather than the first steps'. Fuses the norms, rotary embeddings and activations around the "
        "matmuls. Needs a C++ compiler on CPU (inductor), Triton on GPUs. Not with zero_stage 3 (its hooks gather "
        "parameters inside the layers).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass (Hugging Face "
        "gradient checkpointing): activation memory ≈ one layer's instead of all layers', for ~30% more compute.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = \
        Field(None, description="Attention kernel passed to transformers' from_pretrained (null: transformers' "
              "default, sdpa where available). `eager` materialises B × heads × L × L scores: avoid it for long "
              "sequences.")
    max_tokens_per_micro_batch: int = Field(
        16384, ge=1, description="Token budget of one forward/backward: responses are sorted by length and packed into "
        "micro-batches whose padded size (responses × longest prompt+response) stays within it; a longer response "
        "gets a micro-batch of its own. Every rank runs the same number of micro-batches per step.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Optional cap on responses per micro-batch, on top of the token budget (null: no cap). "
        "Kept so configs written when micro-batches were counted in responses still load; prefer "
        "max_tokens_per_micro_batch.")
    logit_chunk_tokens: int = Field(
        1024, ge=1, description="Response positions per lm_head chunk: the log-softmax over the vocabulary is taken "
        "for this many positions at a time and recomputed in the backward pass, so at most chunk × vocabulary "
        "logits exist (1024 × 151,936 × 4 B = 0.6 GB for Qwen3).")
    mini_batches: int = Field(
        1, ge=1, description="M: optimizer steps per training step (PPO mini-batches; verl's ppo_mini_batch_size, "
        "OpenRLHF's micro-rollout split). The step's prompt groups are split into M parts of about B/M prompts, "
        "each its own SPEC §1 global batch; π_S,old is the policy before the first of them (a no-grad forward of "
        "parts 2..M when the objective has the §1 term), so the clip acts from the second. The lr schedule still "
        "counts training steps. 1: one step per batch, strictly on-policy.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: LRSchedule = Field(ConstantLR(), description="Warm-up, then `constant`, `cosine` or `linear` "
                                    "decay over run.steps (default: constant, no warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    objective: ObjectiveConfig = Field(ReverseKLPG(), description="The loss (SPEC §1, §6): `reverse_kl_pg` "
                                       "(default), or a top-k divergence optionally summed with the SPEC §1 term.")
    topk_overlap_metrics: bool = Field(
        True, description="When the objective reads the teacher's top-k: log per domain the student/teacher top-k "
        "overlap and the shared set's mass at student-visited states (\"Rethinking OPD\"; `overlap/<domain>/*`). "
        "Costs one top-k over the vocabulary per lm_head chunk.")
    importance: ImportanceConfig = Field(TruncatedIS(), description="SPEC §2 behaviour correction of the tokens: "
                                         "`tis` (default, upper 5), `icepop` or `none`.")
    num_cpus: float = Field(1, gt=0, description="CPUs per learner rank (Ray resources; also torch threads on CPU).")
    num_gpus: float = Field(0, ge=0, description="GPUs per learner rank (0: train on CPU).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every K steps (0: only at the end of the run).")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept (older ones are deleted).")
    skip_nonfinite: bool = Field(True, description="A NaN/inf loss or gradient skips the step (weights kept) "
                                 "instead of stopping the run.")

    @model_validator(mode="before")
    @classmethod
    def _schedule_keys_moved(cls, value: Any) -> Any:
        moved_keys(value, {"warmup_steps": "lr_schedule.warmup_steps", "min_lr_ratio": "lr_schedule.min_lr_ratio"})
        return value

    @model_validator(mode="after")
    def _compile_without_zero3(self) -> LearnerConfig:
        if self.compile and self.zero_stage == 3:
            raise ValueError("`learner.compile` is true with `learner.zero_stage` 3: ZeRO-3 gathers each layer's "
                             "parameters with hooks inside the compiled layers, which this learner does not support; "
                             "set learner.compile=false or learner.zero_stage to 0, 1 or 2")
        return self

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> LearnerConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("`learner.offload_optimizer` is true but `learner.zero_stage` is 0; ZeRO-Offload "
                             "moves the optimizer state of a ZeRO partition to the CPU: set learner.zero_stage to "
                             "1, 2 or 3, or learner.offload_optimizer=false")
        return self


class WeightSyncConfig(Section):
    backend: Literal["gloo", "nccl"] = Field("gloo", description="Collective backend: nccl on GPUs, gloo on CPU.")
    bucket_mb: float = Field(64, gt=0, description="Weights are flattened and broadcast in buckets of this size.")
    timeout_s: float = Field(120, gt=0, description="A weight update (or the transfer group's set-up) that does not "
                             "finish in time fails, naming the weight sync. It includes the wait for each sampler's "
                             "generate call in progress, so allow for the longest one.")
    master_addr: str = Field("auto", description="Address the samplers reach learner rank 0 at: `auto` is the IP of "
                             "learner rank 0's node (Ray's view of it); set it when that interface is not routable.")


class ChaosSection(Section):
    """Fault injection for tests and drills: random delays in the stages (off by default)."""

    sampler_delay_s: float = Field(0.0, ge=0, description="Each generate call first sleeps U(0, this) seconds.")
    teacher_delay_s: float = Field(0.0, ge=0, description="Each teacher call first sleeps U(0, this) seconds.")
    crash_in_checkpoint_step: int = Field(
        0, ge=0, description="Kill the driver half-way through writing the checkpoint of this step (0: never).")


class RunConfig(Section):
    run: RunSection = RunSection()
    demo: DemoSection = DemoSection()
    data: DataSection
    student: ModelConfig
    domains: dict[str, DomainConfig]
    teachers: dict[str, TeacherVariant]
    sampler: SamplerConfig = SamplerConfig()
    verifier: VerifierSection = VerifierSection()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    chaos: ChaosSection = ChaosSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if not self.domains:
            raise ValueError("`domains` is empty; name at least one domain with its teacher and verifier")
        for name, dom in self.domains.items():
            for t in teacher_names(dom.teacher):
                if t not in self.teachers:
                    raise ValueError(
                        f"`domains.{name}.teacher` is {dom.teacher!r}: {t!r} is not a key of `teachers` "
                        f"(known: {sorted(self.teachers)}); add it under `teachers` or fix the name"
                    )
        check_scoring(self)
        recipe_domains = DEMO_RECIPE_DOMAINS[self.demo.recipe]
        if self.demo.prepare and set(self.domains) != set(recipe_domains):
            raise ValueError(
                f"`demo.recipe` is {self.demo.recipe!r}, which prepares domains {list(recipe_domains)}, but "
                f"`domains` is {sorted(self.domains)}; pick the recipe that prepares these domains "
                f"({', '.join(f'{k}: {list(v)}' for k, v in DEMO_RECIPE_DOMAINS.items())}) "
                f"or set `demo.prepare=false`"
            )
        check_privileged(self)  # DOPD students named before "serves no domain" is judged
        unused = sorted(set(self.teachers) - {t for d in self.domains.values() for t in teacher_names(d.teacher)}
                        - {reference_of(self)} - {getattr(d.routing, "student", None) for d in self.domains.values()})
        if unused:
            raise ValueError(f"`teachers` {unused} serve no domain; remove them or route a domain to them")
        if self.learner.mini_batches > self.data.prompts_per_step:
            raise ValueError(f"`learner.mini_batches` ({self.learner.mini_batches}) exceeds `data.prompts_per_step` "
                             f"({self.data.prompts_per_step}): a mini-batch holds whole prompt groups; lower it or "
                             "raise prompts_per_step")
        if self.sampler.max_new_tokens >= self.sampler.max_model_len:
            raise ValueError(
                f"`sampler.max_new_tokens` ({self.sampler.max_new_tokens}) must be < `sampler.max_model_len` "
                f"({self.sampler.max_model_len}); raise max_model_len or lower max_new_tokens"
            )
        if self.data.max_prompt_tokens is not None and \
                self.data.max_prompt_tokens + self.sampler.max_new_tokens > self.sampler.max_model_len:
            raise ValueError(
                f"`data.max_prompt_tokens` ({self.data.max_prompt_tokens}) + `sampler.max_new_tokens` "
                f"({self.sampler.max_new_tokens}) exceeds `sampler.max_model_len` ({self.sampler.max_model_len}); "
                f"lower one of the first two or raise max_model_len")
        sp = self.sampler
        if sp.num_gpus > 0 and sp.num_gpus != sp.tensor_parallel_size:
            raise ValueError(f"`sampler.num_gpus` ({sp.num_gpus:g}) must equal `sampler.tensor_parallel_size` "
                             f"({sp.tensor_parallel_size}) on GPU nodes: one engine holds one GPU per shard")
        if sp.num_gpus == 0 and sp.tensor_parallel_size > 1:
            raise ValueError(f"`sampler.tensor_parallel_size` is {sp.tensor_parallel_size} but `sampler.num_gpus` is 0: "
                             "tensor parallelism needs GPUs (set num_gpus to the same number)")
        if (sp.num_gpus > 0) != (self.weight_sync.backend == "nccl"):
            raise ValueError(f"`weight_sync.backend` is {self.weight_sync.backend!r} with `sampler.num_gpus` "
                             f"{sp.num_gpus:g}: use nccl when the samplers hold GPUs, gloo when they run on CPU")
        for name, t in self.teachers.items():
            if t.follow_student and Path(t.path).resolve() != Path(self.student.path).resolve():
                raise ValueError(f"`teachers.{name}.follow_student` is true but its `path` ({t.path}) is not "
                                 f"`student.path` ({self.student.path}): a teacher that takes the student's weight "
                                 "updates must be the student's model")
            if t.num_gpus > 0 and t.num_gpus != t.tensor_parallel_size:
                raise ValueError(f"`teachers.{name}.num_gpus` ({t.num_gpus:g}) must equal its `tensor_parallel_size` "
                                 f"({t.tensor_parallel_size}) on GPU nodes: one engine holds one GPU per shard")
            if t.max_model_len is not None and t.max_model_len < self.sampler.max_model_len:
                raise ValueError(
                    f"`teachers.{name}.max_model_len` ({t.max_model_len}) is below `sampler.max_model_len` "
                    f"({self.sampler.max_model_len}): the teacher could not score the longest responses")
        for src in [*self.data.train, *(self.data.heldout or [])]:
            if src.domain is not None and src.domain not in self.domains:
                raise ValueError(f"data source {src.path!r} has `domain` {src.domain!r}, which is not a key of "
                                 f"`domains` (known: {sorted(self.domains)})")
        return self

    # -- derived facts used by the driver and the plan ---------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def teacher_of_domain(self) -> dict[str, str]:
        """Each domain's (first) teacher: the one it routes to alone and its held-out accuracy bar."""
        return {d: teacher_names(c.teacher)[0] for d, c in self.domains.items()}

    @property
    def max_prompt_tokens(self) -> int:
        return self.data.max_prompt_tokens or self.sampler.max_model_len - self.sampler.max_new_tokens

    @property
    def needs_topk(self) -> bool:
        """The objective reads the teacher's top-k (a SPEC §6 distribution term, the vOPD baseline or drift control):
        teachers return ``learner.objective.top_k`` log-probs per position."""
        return self.learner.objective.top_k > 0

    @property
    def teacher_top_k(self) -> int:
        """Top-k log-probs per position every teacher returns: the objective's k (SPEC §6), 1 for the
        extrapolation-cliff diagnostic (the teacher's modal token, buffers/scoring.py), else 0."""
        o = self.learner.objective
        return max(o.top_k, int(isinstance(o, ExtrapolatedPG) and o.cliff_clip is not None))


# ----------------------------------------------------------------------------------------
# Loading


def _set_override(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override `{dotted}={raw}`: `{k}` is a value, not a section")
        node = nxt
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out = []
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"command-line argument {a!r} is not `key=value` (example: `run.steps=10`)")
        k, v = a.split("=", 1)
        out.append((k.strip(), v))
    return out


def _user_path(tree: Any, loc: tuple) -> tuple[str, str | None]:
    """The dotted key a user wrote for a pydantic error location: pydantic puts the tag of a
    discriminated union (``shift``, ``code``) into the location; it is dropped here (and returned,
    to say which variant the key was checked against)."""
    parts, node, tag = [], tree, None
    for p in loc:
        if str(p).startswith("function-"):
            continue
        if isinstance(node, dict) and p not in node and isinstance(p, str) and node.get("type", p) == p \
                and p != "type":
            tag = p  # the union tag: the key lives in the same mapping
            continue
        if isinstance(node, str) and p == node:  # a bare tag written for the whole section
            tag = p
            continue
        parts.append(str(p))
        node = node.get(p) if isinstance(node, dict) else node[p] if isinstance(node, list) and \
            isinstance(p, int) and p < len(node) else None
    return ".".join(parts), tag


def _format_error(err: ValidationError, source: str, tree: Any = None) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key, tag = _user_path(tree, e["loc"])
        val = e.get("input")
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        if e["type"] == "extra_forbidden":
            where = f" of `type: {tag}`" if tag else ""
            lines.append(f"  - `{key}` is not a known key{where}; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  - `{key}` is required; set it in the YAML or as `{key}=...`")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"  - `{key}.type` is {e['ctx']['tag']!r}; it must be one of {e['ctx']['expected_tags']}")
        else:
            shown = repr(val) if not isinstance(val, dict) else "{...}"
            where = f"`{key}` is {shown}; " if key else ""
            lines.append(f"  - {where}{msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML + ``key=value`` overrides into a validated ``RunConfig`` or raise ``ConfigError``."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML (default {DEFAULT_CONFIG})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, data:, ...)")
    for key, raw in parse_overrides(overrides or []):
        _set_override(tree, key, raw)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path), tree)) from None


def model_dir_problem(key: str, path: str) -> str | None:
    """What is wrong with ``path`` as a Hugging Face model directory (no config.json), or None."""
    if Path(path, "config.json").is_file():
        return None
    return f"{key} is {path!r}: no config.json there; point it at a HF model dir"


def check_paths(cfg: RunConfig, only_existing: bool = False) -> list[str]:
    """Model and data paths exist (after the demo preparation, which may create them). With
    ``only_existing`` (``--dry-run`` on a machine that lacks the cluster's storage) a missing path is
    returned as a note instead of an error; paths that do exist are still checked."""
    problems = [m for m in [model_dir_problem("`student.path`", cfg.student.path)] if m]
    for name, t in cfg.teachers.items():
        if isinstance(t, CacheTeacher):
            problems += t.problems(name, cfg.learner.objective.top_k if cfg.needs_topk else 0)
        elif m := model_dir_problem(f"`teachers.{name}.path`", t.path):
            problems.append(m)
    from buffers.dataset import source_files  # datasets is imported only when paths are checked

    for key in ("train", "heldout"):
        for i, src in enumerate(getattr(cfg.data, key) or []):
            try:
                source_files(src)
            except FileNotFoundError as e:
                problems.append(f"`data.{key}[{i}].path`: {e}")
    if only_existing:
        return problems
    if problems:
        raise ConfigError("invalid paths:\n  - " + "\n  - ".join(problems))
    return []


def _type_first(node: Any) -> Any:
    """A union section's ``type`` first, as one writes it (pydantic dumps base-class keys first)."""
    if isinstance(node, dict):
        return {k: _type_first(v) for k, v in sorted(node.items(), key=lambda kv: kv[0] != "type")}
    return [_type_first(v) for v in node] if isinstance(node, list) else node


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(_type_first(cfg.model_dump(mode="json")), sort_keys=False)
