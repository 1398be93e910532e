"""Config and dataset validation: every shipped YAML loads; bad input names the key/row and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import ConfigError, check_paths, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("**/*.yaml"))
CLUSTER = REPO / "configs" / "cluster"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.domains and cfg.teachers


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_dumped_config_loads_back_equal_with_each_union_type_first(path, tmp_path):
    from configs.schema import dump_config

    cfg = load_config(path)
    text = dump_config(cfg)
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg
    assert "calibration:\n    type: " in text and "objective:\n    type: " in text


def test_defaults_are_the_released_uniopd_settings():
    c = load_config().buffer
    assert (c.calibration.type, c.calibration.statistic, c.calibration.direction, c.calibration.scope) == (
        "shift", "mean", "both", "group")
    assert c.calibration.delta == 0.4 and c.balance_ratio == 1.0


def test_schema_defaults_are_the_spec_defaults():
    from configs.schema import BufferConfig, LearnerConfig, MarginShift, PolicyGradientTerm, ReverseKLPG, TruncatedIS

    buf, lrn = BufferConfig(), LearnerConfig()
    assert buf.calibration == MarginShift(statistic="mean", direction="both", scope="group", delta=0.4)
    assert lrn.objective == ReverseKLPG(pg=PolicyGradientTerm(weight=1.0, eps_low=0.2, eps_high=0.28,
                                                               mask_threshold=10.0))
    assert lrn.importance == TruncatedIS(upper=5.0)
    assert (lrn.lr_schedule.type, lrn.lr_schedule.warmup_steps) == ("constant", 0)


@pytest.mark.parametrize("overrides,message", [
    (["buffer.calibration.type=clip"], r"`buffer.calibration.type` is 'clip'; it must be one of 'none', 'shift', 'mask'"),
    (["buffer.calibration.form=greedy"], r"`buffer.calibration.form` is not a known key of `type: shift`"),
    (["buffer.calibration.type=mask", "buffer.calibration.direction=both"],
     r"`buffer.calibration.direction` is not a known key of `type: mask`"),
    (["buffer.calibration={type: mask, form: group_drop, greedy_min_frac: 0.5}"],
     r"`greedy_min_frac` applies to `form: greedy` only"),
    (["buffer.calibration.mode=mask"], r"`mode` is now `type`"),
    (["learner.objective.beta=0.3"], r"`learner.objective.beta` is not a known key of `type: forward_kl_topk`"),
    (["learner.objective.type=reverse_kl_pg", "learner.objective.top_k=4"],
     r"`learner.objective.top_k` is not a known key of `type: reverse_kl_pg`"),
    (["learner.objective.dist_weight=0.5"], r"`dist_weight` is now `weight \(of a top-k `type`\)`"),
    (["learner.objective={pg: {baseline: vopd}}"], r"`pg.baseline` is vopd.*write `type: vopd`"),
    (["learner.objective={type: vopd, pg: {baseline: none}}"], r"that is `type: reverse_kl_pg`"),
    (["learner.objective={type: kl_mix, alpha: 1.5}"], r"alpha"),
    (["learner.objective.top_k=8", "learner.objective.drift={}"], r"`top_k` \(8\) is below `drift.top_n` \(16\)"),
    (["learner.objective.drift.treshold=0.5"], r"treshold"),
    (["learner.importance.type=icepop", "learner.importance.low=3"], r"`low` \(3\) must be < `high` \(2\)"),
    (["learner.importance.upper=3", "learner.importance.type=none"], r"`learner.importance.upper` is not a known key"),
    (["learner.warmup_steps=3"], r"`warmup_steps` is now `lr_schedule.warmup_steps`"),
    (["learner.lr_schedule.type=constant", "learner.lr_schedule.min_lr_ratio=0.2"],
     r"`learner.lr_schedule.min_lr_ratio` is not a known key of `type: constant`"),
])
def test_union_sections_take_only_their_variants_keys_and_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_union_sections_take_a_bare_type_and_default_a_missing_one():
    cfg = load_config(None, ["buffer.calibration=none", "learner.importance=icepop", "learner.lr_schedule=linear"])
    assert (cfg.buffer.calibration.type, cfg.learner.importance.type, cfg.learner.lr_schedule.type) == (
        "none", "icepop", "linear")
    assert (cfg.learner.importance.low, cfg.learner.lr_schedule.min_lr_ratio) == (0.5, 0.1)
    cfg = load_config(None, ["learner.objective={pg: {weight: 2}}"])  # no type: the default variant
    assert (cfg.learner.objective.type, cfg.learner.objective.pg.weight) == ("reverse_kl_pg", 2.0)
    assert not cfg.needs_topk and load_config().needs_topk
    # vOPD and drift control read the teacher's top-k: the teachers must return it
    cfg = load_config(None, ["learner.objective={type: vopd, pg: {weight: 0.5}}"])
    assert cfg.needs_topk and cfg.learner.objective.pg.baseline == "vopd" and cfg.learner.objective.top_k == 32
    cfg = load_config(None, ["learner.objective={drift: {top_n: 8}}"])
    assert cfg.needs_topk and cfg.learner.objective.top_k == 8


def test_override_changes_nested_value_with_yaml_typing():
    cfg = load_config(None, ["buffer.max_lag=2", "learner.lr=1e-3", "run.name=x"])
    assert cfg.buffer.max_lag == 2 and cfg.learner.lr == 1e-3 and cfg.run.name == "x"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"`buffer.max_lagg` is not a known key"):
        load_config(None, ["buffer.max_lagg=1"])


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"`buffer.max_lag` is -1"):
        load_config(None, ["buffer.max_lag=-1"])


def test_domain_without_teacher_is_rejected_with_fix():
    with pytest.raises(ConfigError, match=r"`domains.math.teacher` is 'nope'.*add it under `teachers`"):
        load_config(None, ["domains.math.teacher=nope"])


def test_unknown_verifier_type_is_rejected():
    with pytest.raises(ConfigError, match="domains.math.verifier"):
        load_config(None, ["domains.math.verifier.type=regex"])


def test_demo_code_config_prepares_the_code_recipe():
    cfg = load_config(REPO / "configs" / "demo_code.yaml")
    assert (cfg.demo.recipe, cfg.demo.cache_dir) == ("code", ".cache/demo_code")
    assert cfg.domains["code"].verifier.type == "code" and cfg.domains["math"].verifier.type == "math"
    assert {t.path for t in cfg.teachers.values()} == {".cache/demo_code/teacher_math", ".cache/demo_code/teacher_code"}
    assert all(src.path.startswith(".cache/demo_code/") for src in cfg.data.train)
    assert cfg.student.path == ".cache/demo_code/student"
    assert cfg.sampler.max_new_tokens >= 20  # code responses: up to 19 characters + EOS
    assert load_config().demo.recipe == "default"


def test_demo_recipe_must_prepare_the_configured_domains():
    with pytest.raises(ConfigError, match=r"`demo.recipe` is 'default'.*`domains` is \['code', 'math'\]"):
        load_config(REPO / "configs" / "demo_code.yaml", ["demo.recipe=default"])
    with pytest.raises(ConfigError, match=r"`demo.recipe` is 'chess'"):
        load_config(None, ["demo.recipe=chess"])
    assert load_config(REPO / "configs" / "demo_code.yaml", ["demo.recipe=default", "demo.prepare=false"])


def test_demo_recipe_domains_match_the_preparation():
    from configs.schema import DEMO_RECIPE_DOMAINS
    from demo.settings import RECIPES, recipe_settings

    assert set(DEMO_RECIPE_DOMAINS) == set(RECIPES)
    for recipe, domains in DEMO_RECIPE_DOMAINS.items():
        assert recipe_settings(recipe).domains == domains == recipe_settings(recipe, fast=True).domains


def test_override_without_equals_is_rejected():
    from configs.schema import parse_overrides

    with pytest.raises(ConfigError, match="not `key=value`"):
        parse_overrides(["run.steps"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  name: x\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(p)


def test_missing_model_path_is_named(tmp_path):
    cfg = load_config(None, [f"student.path={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"`student.path` is .*nowhere.*no config.json"):
        check_paths(cfg)


def test_dry_run_prints_plan_and_exits_zero():
    out = subprocess.run([sys.executable, "scripts/train.py", "--dry-run", "sampler.num_samplers=2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sampler" in out.stdout and "×2" in out.stdout
    assert "math       → math_teacher" in out.stdout


def test_dry_run_with_bad_config_exits_nonzero_before_any_actor():
    out = subprocess.run([sys.executable, "scripts/train.py", "--dry-run", "learner.lr=-1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "learner.lr" in out.stderr + out.stdout


# -- datasets ---------------------------------------------------------------------------------


def _dry_run(config: Path) -> str:
    out = subprocess.run([sys.executable, "scripts/train.py", str(config), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("name,gpus,engines,learners", [("qwen3_1p7b_math_code_1node", 8, 6, 2),
                                                        ("qwen3_1p7b_math_code_2node", 16, 12, 4)])
def test_cluster_config_dry_run_plans_its_gpus_and_placement_groups(name, gpus, engines, learners):
    """configs/cluster/: a Qwen3-1.7B student and two Qwen3-8B teachers on one and on two 8-GPU nodes.
    Valid, planned GPU for GPU, one placement group per vLLM engine and one for the learner ranks; the
    cluster's paths do not exist here and are reported, not fatal, in a dry run."""
    out = _dry_run(CLUSTER / f"{name}.yaml")
    assert out.split("  total ")[1].splitlines()[0].endswith(f"gpus={gpus}")
    groups = [ln.split() for ln in out.split("placement groups")[1].split("domains")[0].splitlines()[1:] if ln.strip()]
    assert len(groups) == engines + 1
    assert all(g[1] == "STRICT_PACK" and "GPU: 1}]" in " ".join(g) for g in groups[:-1])
    assert groups[-1][:2] == ["learner", "PACK"] and " ".join(groups[-1]).count("GPU: 1") == learners
    assert "train   deepmath" in out and "train   code" in out
    assert "not found on this machine (checked again at launch): `student.path`" in out
    assert "temperature 0.6, top-p 0.95, top-k 20" in out and "nccl engine" in out
    cfg = load_config(CLUSTER / f"{name}.yaml")
    assert cfg.sampler.max_new_tokens == 8192 and cfg.max_prompt_tokens + 8192 <= cfg.sampler.max_model_len
    assert cfg.data.chat_template_kwargs == {"enable_thinking": True} and cfg.buffer.truncated == "mask"
    assert cfg.weight_sync.master_addr == "auto"


def test_every_number_in_the_cluster_configs_is_explained():
    """Each line of configs/cluster/ that sets a number carries a comment, or belongs to a block whose
    header line has one (code_teacher: "the same engine settings as math_teacher")."""
    import re

    for path in CLUSTER.glob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, ln in enumerate(lines):
            if not re.search(r":\s*-?[0-9][0-9.e+-]*\s*(#.*)?$", ln) or "#" in ln:
                continue
            indent = len(ln) - len(ln.lstrip())
            header = next(h for h in reversed(lines[:i]) if h.strip() and len(h) - len(h.lstrip()) < indent)
            assert "#" in header, f"{path.name}:{i + 1}: `{ln.strip()}` has no comment, nor has its block"


def test_teacher_gpus_must_match_tensor_parallel_size():
    with pytest.raises(ConfigError, match=r"`teachers.math_teacher.num_gpus` \(1\) must equal its "
                                          r"`tensor_parallel_size` \(2\)"):
        load_config(CLUSTER / "qwen3_1p7b_math_code_1node.yaml",
                    ["teachers.math_teacher.num_gpus=1", "teachers.math_teacher.tensor_parallel_size=2"])


def test_peer_bench_settings_load_and_take_effect(tmp_path):
    """scripts/bench_peer.py's overrides of configs/demo.yaml validate, and each of PIPELINE_SETTINGS reaches the
    resolved config (a renamed demo teacher or key would otherwise fail only 30 minutes into a bench)."""
    import argparse

    import yaml

    from scripts import bench_peer

    args = argparse.Namespace(budget_s=10.0, eval_every_s=5.0)
    cfg = load_config(REPO / "configs/demo.yaml", bench_peer.bench_overrides(tmp_path, args))
    assert set(cfg.domains) == {bench_peer.DOMAIN} and cfg.student.path == str(tmp_path / "student")
    dumped = cfg.model_dump()
    for key, (value, why) in bench_peer.PIPELINE_SETTINGS.items():
        node = dumped
        for part in key.split("."):
            node = node[part]
        want = yaml.safe_load(value) if isinstance(value, str) else value
        assert node == want, (key, node, want)
        assert why
