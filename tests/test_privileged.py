"""Privileged-context teachers and DOPD routing (docs/algorithm.md §5): the privileged prompt built from
a template and a dataset column, its length policies, the config checks, and the routing rule of
actors/dopd.py on hand-computed numbers. CPU only, no Ray, no vLLM.

The tokenizer is the realistic fixture's (scripts/build_fixture.py: byte-level BPE, ChatML template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actors.dopd import REGIMES, combine, regime_fractions, route_tokens
from buffers.dataset import DatasetError, PrivilegedOverlongError, PrivilegedSpec, load_source
from buffers.formatting import PromptFormat, encode, encode_privileged, fill_privileged
from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, TrainSample, VerifiedRollout
from configs.schema import ConfigError, DataSource, DOPDRouting, RegimeRule, load_config
from learner.batch import collate

CHAT = PromptFormat(chat_template=True)
FMT = PromptFormat(chat_template=True, prompt_template="{prompt} Box the answer.")  # the source's, as prompt_format builds it
TEMPLATE = "{prompt}\nReference: {context}"
VER = {"math": "math", "reverse": "exact"}


@pytest.fixture(scope="module")
def tok():
    from scripts.build_fixture import build_tokenizer

    return build_tokenizer()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(limit: int = 10_000, overlong: str = "fail", domains=("math",)) -> PrivilegedSpec:
    return PrivilegedSpec("self", TEMPLATE, tuple(domains), limit, overlong)


def _load(tmp_path, tok, rows, *, spec=None, context_key="solution", **kw):
    src = DataSource(path=str(_jsonl(tmp_path / "train.jsonl", rows)), domain="math", prompt_key="q",
                     answer_key="a", id_key=None, context_key=context_key,
                     prompt_template="{prompt} Box the answer.")
    return load_source(src, FMT, tok, VER, max_prompt_tokens=10_000, privileged=(spec or _spec(),), **kw)


# -- the privileged prompt ------------------------------------------------------------------------


def test_privileged_prompt_is_the_student_turn_plus_context_through_the_chat_template(tok):
    fmt = PromptFormat(chat_template=True, system_prompt="Be brief.", prompt_template="{prompt} Box it.")
    ids = encode_privileged("What is 2+2?", fmt, TEMPLATE, "2+2=4, so 4.", tok)
    # the student's turn after the source template, then the teacher's template around it
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2? Box it.\n"
                               "Reference: 2+2=4, so 4.<|im_end|>\n<|im_start|>assistant\n")
    student = encode("What is 2+2?", fmt, tok)
    assert len(ids) > len(student) and ids[-3:] == student[-3:]  # same generation prompt at the end


def test_privileged_prompt_without_chat_template_fills_the_raw_text(tok):
    fmt = PromptFormat(chat_template=False, prompt_template="Q: {prompt}")
    assert tok.decode(encode_privileged("1+1", fmt, TEMPLATE, "2", tok)) == "Q: 1+1\nReference: 2"


def test_braces_in_the_prompt_or_context_are_not_placeholders():
    # one pass: the context's literal "{prompt}" and the prompt's "{context}" stay as written
    assert fill_privileged("[{prompt}|{context}]", "a{context}", "\\frac{1}{prompt}") == \
        "[a{context}|\\frac{1}{prompt}]"


def test_dataset_rows_carry_the_teachers_prompt_ids(tmp_path, tok):
    loaded = _load(tmp_path, tok, [{"q": "1+1?", "a": "2", "solution": "1+1 = 2"}])
    p = loaded.prompt(0)
    want = encode_privileged("1+1?", FMT, TEMPLATE, "1+1 = 2", tok)
    assert p.prompt_ids_for("self") == tuple(want)
    assert p.prompt_ids_for("other") is None
    assert tok.decode(p.prompt_ids_for("self")).count("Reference: 1+1 = 2") == 1
    assert "Reference" not in tok.decode(p.prompt_ids)  # the student never sees the context


def test_rows_of_other_domains_get_no_privileged_prompt(tmp_path, tok):
    loaded = _load(tmp_path, tok, [{"q": "1+1?", "a": "2", "solution": "x"}], spec=_spec(domains=("reverse",)))
    assert loaded.prompt(0).teacher_prompt_ids == ()


def test_a_file_without_rows_of_the_privileged_domain_concatenates_with_one_that_has_them(tmp_path, tok):
    (tmp_path / "src").mkdir()
    _jsonl(tmp_path / "src" / "a.jsonl", [{"q": "r1", "a": "x", "d": "reverse"}])  # no context needed here
    _jsonl(tmp_path / "src" / "b.jsonl", [{"q": "1+1?", "a": "2", "d": "math", "solution": "2"}])
    src = DataSource(path=str(tmp_path / "src"), domain_key="d", prompt_key="q", answer_key="a", id_key=None,
                     context_key="solution")
    loaded = load_source(src, CHAT, tok, VER, max_prompt_tokens=10_000, privileged=(_spec(),))
    by_domain = {loaded.prompt(i).domain: loaded.prompt(i) for i in range(len(loaded))}
    assert by_domain["reverse"].teacher_prompt_ids == () and by_domain["math"].prompt_ids_for("self")


def test_missing_context_is_an_error_naming_source_file_row_and_column(tmp_path, tok):
    rows = [{"q": "1+1?", "a": "2", "solution": "ok"}, {"q": "2+2?", "a": "4", "solution": ""}]
    with pytest.raises(DatasetError) as e:
        _load(tmp_path, tok, rows)
    msg = str(e.value)
    assert "source 'train.jsonl'" in msg and "train.jsonl row 1" in msg and "`solution` (context_key)" in msg
    assert "privileged teacher 'self'" in msg


def test_missing_context_row_is_skipped_and_counted_under_on_bad_row_skip(tmp_path, tok):
    rows = [{"q": "1+1?", "a": "2", "solution": "ok"}, {"q": "2+2?", "a": "4"}]
    loaded = _load(tmp_path, tok, rows, on_bad_row="skip")
    assert len(loaded) == 1 and loaded.skipped == 1


def _fit_limit(tok, context: str) -> int:
    return len(encode_privileged("1+1?", FMT, TEMPLATE, context, tok))


def test_overlong_privileged_prompt_fails_naming_the_fix(tmp_path, tok):
    n = _fit_limit(tok, "a long worked solution")
    with pytest.raises(PrivilegedOverlongError) as e:
        _load(tmp_path, tok, [{"q": "1+1?", "a": "2", "solution": "a long worked solution"}], spec=_spec(n - 1),
              on_bad_row="skip")  # not a bad row: `fail` stops the load whatever on_bad_row says
    msg = str(e.value)
    assert f"is {n} tokens" in msg and f"{n - 1} fit" in msg and "row 0" in msg
    assert "teachers.self.privileged.overlong" in msg


def test_overlong_privileged_prompt_skip_drops_the_row_and_counts_it(tmp_path, tok):
    ctx_long, ctx_short = "step one then step two then step three gives 2", "2"
    rows = [{"q": "1+1?", "a": "2", "solution": ctx_long}, {"q": "1+1?", "a": "3", "solution": ctx_short}]
    loaded = _load(tmp_path, tok, rows, spec=_spec(_fit_limit(tok, ctx_short), "skip"))
    assert len(loaded) == 1 and loaded.overlong == 1 and loaded.prompt(0).answer == "3"


def test_truncate_context_keeps_the_contexts_tail_within_the_limit(tmp_path, tok):
    ctx = "first we add one and one, which gives the answer 2"
    limit = _fit_limit(tok, ctx) - 5
    p = _load(tmp_path, tok, [{"q": "1+1?", "a": "2", "solution": ctx}],
              spec=_spec(limit, "truncate_context")).prompt(0)
    ids = p.prompt_ids_for("self")
    assert len(ids) <= limit
    text = tok.decode(ids)
    assert "gives the answer 2<|im_end|>" in text and "first we add" not in text


# -- config ---------------------------------------------------------------------------------------

SELF = "{path: /m/student, follow_student: true, privileged: {template: '{prompt} ref: {context}'}}"


def _cfg(**extra):
    o = {"student.path": "/m/student", "demo.prepare": "false", "learner.objective": "{type: reverse_kl_pg}"}
    o.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def _context_keys() -> dict[str, str]:
    import yaml

    from configs.schema import DEFAULT_CONFIG

    train = yaml.safe_load(DEFAULT_CONFIG.read_text())["data"]["train"]
    keys = ["final_answer", "answer"]
    return {"data.train": yaml.safe_dump([{**s, "context_key": k} for s, k in zip(train, keys)],
                                         default_flow_style=True, width=10**6).strip()}


def test_self_teacher_with_privileged_template_loads():
    cfg = _cfg(**{"teachers": "{reverse_teacher: {path: /m/t}, self: " + SELF + "}",
                  "domains.math.teacher": "self"}, **_context_keys())
    assert cfg.teachers["self"].privileged.template == "{prompt} ref: {context}"
    assert cfg.teachers["self"].privileged.overlong == "fail"


def test_privileged_teacher_needs_context_key_on_the_sources_it_reads():
    with pytest.raises(ConfigError) as e:
        _cfg(**{"teachers": "{reverse_teacher: {path: /m/t}, self: " + SELF + "}", "domains.math.teacher": "self"})
    assert "`data.train[0]`" in str(e.value) and "context_key" in str(e.value) and "'math'" in str(e.value)


def test_template_without_context_placeholder_is_refused():
    with pytest.raises(ConfigError) as e:
        _cfg(**{"teachers.math_teacher.privileged": "{template: 'only {prompt}'}"})
    assert "privileged.template" in str(e.value) and "{context}" in str(e.value)


def _dopd(**routing):
    r = ", ".join(f"{k}: {v}" for k, v in {"type": "dopd", "student": "self", **routing}.items())
    return {"teachers": "{math_teacher: {path: /m/t}, reverse_teacher: {path: /m/r}, self: " + SELF + "}",
            "domains.math.routing": "{" + r + "}", **_context_keys()}


def test_dopd_routing_loads_and_its_student_counts_as_a_used_teacher():
    cfg = _cfg(**_dopd(gap_threshold=0.5))
    r = cfg.domains["math"].routing
    assert isinstance(r, DOPDRouting) and r.gap_threshold == 0.5 and r.wide_teacher_ahead.weight == 1.0
    assert cfg.domains["reverse"].routing.type == "none"


def test_plan_names_privileged_teachers_and_dopd_routing():
    from actors.pipeline import describe_plan

    o = _dopd()
    o["teachers"] = o["teachers"].replace("math_teacher: {path: /m/t}",
                                          "math_teacher: {path: /m/t, privileged: {template: '{prompt} {context}'}}")
    plan = describe_plan(_cfg(**o))
    assert "/m/t [privileged] [dopd with privileged student self, τ=1]" in plan


def test_dopd_student_must_follow_the_student_with_a_privileged_template():
    o = _dopd()
    o["teachers"] = "{math_teacher: {path: /m/t}, reverse_teacher: {path: /m/r}, self: {path: /m/student}}"
    with pytest.raises(ConfigError) as e:
        _cfg(**o)
    assert "`domains.math.routing.student`" in str(e.value) and "follow_student" in str(e.value)


def test_dopd_student_must_exist():
    with pytest.raises(ConfigError) as e:
        _cfg(**{**_dopd(student="ghost")})
    assert "'ghost'" in str(e.value) and "not a key of `teachers`" in str(e.value)


def test_dopd_refuses_a_top_k_objective():
    with pytest.raises(ConfigError) as e:
        _cfg(**_dopd(), **{"learner.objective": "{type: forward_kl_topk, top_k: 8}"})
    assert "reverse_kl_pg" in str(e.value) and "forward_kl_topk" in str(e.value)


# -- DOPD routing (actors/dopd.py) ----------------------------------------------------------------

RULE = DOPDRouting(student="self", gap_threshold=1.0)


def test_routing_rule_on_hand_computed_tokens():
    teacher = np.array([-0.1, -3.0, -1.0, -2.0, -1.0], np.float32)
    student = np.array([-2.0, -0.5, -1.5, -1.8, -2.0], np.float32)
    # t − s = 1.9 (wide, teacher ahead), −2.5 (wide, student ahead), 0.5 (close, teacher ahead),
    # −0.2 (close, student ahead), 1.0 (= τ: wide, teacher ahead)
    lp, w, regime = route_tokens(teacher, student, RULE)
    assert regime.tolist() == [0, 1, 2, 3, 0]
    # defaults: wide → the teacher (1.0, then 0.5), close → the privileged student at 0.1
    np.testing.assert_allclose(lp, [-0.1, -3.0, -1.5, -1.8, -1.0])
    np.testing.assert_allclose(w, [1.0, 0.5, 0.1, 0.1, 1.0])
    fr = regime_fractions(teacher, student, RULE)
    assert fr == {REGIMES[0]: 0.4, REGIMES[1]: 0.2, REGIMES[2]: 0.2, REGIMES[3]: 0.2}


def test_configured_regimes_change_source_and_weight():
    rule = DOPDRouting(student="self", gap_threshold=0.3, wide_student_ahead=RegimeRule(source="student", weight=2.0),
                       close_teacher_ahead=RegimeRule(source="teacher", weight=0.0))
    lp, w, regime = route_tokens(np.array([-3.0, -1.0], np.float32), np.array([-0.5, -1.2], np.float32), rule)
    # −2.5: wide, student ahead → student (−0.5) × 2; 0.2 < 0.3: close, teacher ahead → teacher × 0
    assert regime.tolist() == [1, 2]
    np.testing.assert_allclose(lp, [-0.5, -1.0])
    np.testing.assert_allclose(w, [2.0, 0.0])


def _scored(lp, status="ok", behaviour=None):
    lp = np.asarray(lp, np.float32)
    b = np.full(len(lp), -1.0, np.float32) if behaviour is None else behaviour
    r = Rollout(Prompt("p", "math", "q"), 0, [1, 2], list(range(3, 3 + len(lp))), b, 0, "", "stop")
    v = VerifiedRollout(r, True, "match")
    return ScoredRollout(v, TeacherScore(lp) if status == "ok" else None, "t", status)


def test_routed_return_weights_each_tokens_advantage():
    teacher, student = _scored([-0.1, -3.0, -1.0, -2.0]), _scored([-2.0, -0.5, -1.5, -1.8])
    (routed,) = combine([teacher], [student], RULE)
    # routed log-probs [−0.1, −3.0, −1.5, −1.8] − behaviour −1 = [0.9, −2.0, −0.5, −0.8];
    # × weights [1, 0.5, 0.1, 0.1] = [0.9, −1.0, −0.05, −0.08]; mean = −0.23 / 4 = −0.0575
    assert routed.status == "ok" and routed.teacher_name == "t"
    assert routed.distill_return() == pytest.approx(-0.0575, abs=1e-6)
    assert teacher.distill_return() == pytest.approx((0.9 - 2.0 + 0.0 - 1.0) / 4, abs=1e-6)  # unrouted


def test_regime_shares_are_token_weighted_per_domain_in_the_batch_metrics():
    from buffers.scoring import routing_metrics

    # response 1: regimes [0, 1, 2, 3] (the rule's hand-computed tokens above, 4 of them); response 2: t − s =
    # 2.0 and 1.5 → [0, 0]. Tokens: regime 0 ×3, 1 ×1, 2 ×1, 3 ×1 of 6. An unrouted response adds nothing.
    (r1,) = combine([_scored([-0.1, -3.0, -1.0, -2.0])], [_scored([-2.0, -0.5, -1.5, -1.8])], RULE)
    (r2,) = combine([_scored([-0.5, -1.0])], [_scored([-2.5, -2.5])], RULE)
    assert r1.teacher.regimes_T.tolist() == [0, 1, 2, 3]
    m = routing_metrics([r1, r2, _scored([-1.0, -1.0]), _scored([], "failed")])
    assert m == pytest.approx({f"dopd/math/{REGIMES[0]}": 3 / 6, f"dopd/math/{REGIMES[1]}": 1 / 6,
                               f"dopd/math/{REGIMES[2]}": 1 / 6, f"dopd/math/{REGIMES[3]}": 1 / 6})
    assert routing_metrics([_scored([-1.0])]) == {}


def test_a_failed_side_fails_the_routed_rollout_and_empty_ones_pass_through():
    out = combine([_scored([-1.0]), _scored([-1.0], "failed"), _scored([])],
                  [_scored([-1.0], "failed"), _scored([-1.0]), _scored([])], RULE)
    assert [o.status for o in out] == ["failed", "failed", "ok"]
    assert out[0].teacher is None and out[2].teacher.weights_T is None


def test_collate_carries_routing_weights_with_ones_elsewhere():
    def sample(T, w):
        return TrainSample([1, 2], list(range(3, 3 + T)), np.zeros(T, np.float32), np.zeros(T, np.float32), None,
                           None, 0.0, 1.0, 0, "math", True, "p", teacher_weights_T=w)

    b = collate([sample(3, np.array([0.5, 0.1, 1.0], np.float32)), sample(2, None)], 0, 0)
    np.testing.assert_allclose(b.teacher_w_BT.numpy(), [[0.5, 0.1, 1.0], [1.0, 1.0, 1.0]])
    assert collate([sample(2, None)], 0, 0).teacher_w_BT is None
