"""Several scorers per response (buffers/scoring.py, configs/scoring.py): SPEC §5 confidence-weighted
multi-teacher and the SPEC §6 ``extrapolated`` objective, against hand-computed numbers, the failure
rules, the extrapolation-cliff diagnostic, the buffer actor's combination path (plain coroutines in
place of Ray refs) and the config checks."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from buffers.actor import BufferActor
from buffers.records import Prompt, Rollout, ScoredRollout, TeacherScore, VerifiedRollout
from buffers.replay import TeacherFailureError
from buffers.scoring import (ScorerRefs, ScoringRule, cliff_stats, combine, lambda_star, mix_metrics,
                             teacher_weights)
from configs.schema import BufferConfig, ConfidenceWeights, ConfigError, EqualWeights, load_config

LOG = np.log


def _rollout(response_ids, uid=0, idx=0, domain="math") -> VerifiedRollout:
    p = Prompt(f"q{uid}", domain, "p", uid=uid)
    T = len(response_ids)
    return VerifiedRollout(Rollout(p, idx, [1], list(response_ids), np.full(T, -1.0, np.float32), 0, "x", "stop"),
                           True, "match")


def _score(v: VerifiedRollout, lp, name, top_ids=None, top_lp=None, status="ok") -> ScoredRollout:
    if status == "failed":
        return ScoredRollout(v, None, name, "failed")
    arr = lambda x, t: None if x is None else np.asarray(x, dtype=t)  # noqa: E731
    return ScoredRollout(v, TeacherScore(np.asarray(lp, np.float32), arr(top_ids, np.int32), arr(top_lp, np.float32)),
                         name, "ok")


def _rule(teachers=("A", "B"), weighting=ConfidenceWeights(), top_k=0, **kw) -> ScoringRule:
    return ScoringRule("math", tuple(teachers), weighting, top_k, **kw)


# -- SPEC §5: confidence weights ------------------------------------------------------------


def test_confidence_weights_and_combined_logprobs_by_hand():
    # Teacher A gives the student's two tokens log-probs [-0.5, -1.5]: c_A = -1.0; teacher B [-2.0, -4.0]:
    # c_B = -3.0. τ = 1: w_A = e^-1 / (e^-1 + e^-3) = 1 / (1 + e^-2) = 0.880797, w_B = 0.119203.
    # Combined ℓ = w_A·A + w_B·B: t0 = 0.880797·-0.5 + 0.119203·-2.0 = -0.678805,
    #                             t1 = 0.880797·-1.5 + 0.119203·-4.0 = -1.798008.
    v = _rollout([4, 5])
    (out,) = combine(_rule(), [[_score(v, [-0.5, -1.5], "A")], [_score(v, [-2.0, -4.0], "B")]])
    assert out.status == "ok" and out.teacher_name == "A+B"
    np.testing.assert_allclose(out.mix.weights, [0.880797, 0.119203], atol=1e-6)
    np.testing.assert_allclose(out.teacher.logprobs_T, [-0.678805, -1.798008], atol=1e-5)
    # The identity the buffer relies on: Σ_k w_k A^(k) = ℓ − log π_S,old. With old = [-1, -1]:
    # A^(A) = [0.5, -0.5], A^(B) = [-1, -3]; Σ w A = [0.321195, -0.798008] = ℓ + 1.
    old = np.array([-1.0, -1.0])
    per_teacher = 0.880797 * (np.array([-0.5, -1.5]) - old) + 0.119203 * (np.array([-2.0, -4.0]) - old)
    np.testing.assert_allclose(per_teacher, [0.321195, -0.798008], atol=1e-5)
    np.testing.assert_allclose(out.teacher.logprobs_T - old, per_teacher, atol=1e-5)


def test_temperature_flattens_the_weights():
    # τ = 2: z = c / 2 = [-0.5, -1.5]: w_A = 1 / (1 + e^-1) = 0.731059. τ → large: equal weights.
    c = np.array([-1.0, -3.0])
    np.testing.assert_allclose(teacher_weights(c, [True, True], ConfidenceWeights(temperature=2.0)),
                               [0.731059, 0.268941], atol=1e-6)
    np.testing.assert_allclose(teacher_weights(c, [True, True], EqualWeights()), [0.5, 0.5])


def test_failed_teacher_renormalises_over_the_ones_that_answered():
    # A: c = -1, B failed, C: c = -2. Softmax over {A, C}: w_A = 1 / (1 + e^-1) = 0.731059, w_C = 0.268941,
    # w_B = 0. ℓ = 0.731059·[-1, -1] + 0.268941·[-3, -1] = [-1.537882, -1.0].
    v = _rollout([4, 5])
    parts = [[_score(v, [-1.0, -1.0], "A")], [_score(v, None, "B", status="failed")], [_score(v, [-3.0, -1.0], "C")]]
    (out,) = combine(_rule(("A", "B", "C")), parts)
    assert out.status == "ok"
    np.testing.assert_allclose(out.mix.weights, [0.731059, 0.0, 0.268941], atol=1e-6)
    np.testing.assert_allclose(out.teacher.logprobs_T, [-1.537882, -1.0], atol=1e-5)
    (eq,) = combine(_rule(("A", "B", "C"), EqualWeights()), parts)
    np.testing.assert_allclose(eq.mix.weights, [0.5, 0.0, 0.5])


def test_a_teacher_with_an_infinite_logprob_weighs_nothing_and_poisons_nothing():
    # c_A = -inf: softmax gives A weight e^(-1e30 - (-1)) = 0 and B weight 1; ℓ is B's numbers, no NaN.
    v = _rollout([4, 5])
    (out,) = combine(_rule(), [[_score(v, [-np.inf, -1.0], "A")], [_score(v, [-1.0, -2.0], "B")]])
    assert out.mix.weights == (0.0, 1.0)
    np.testing.assert_array_equal(out.teacher.logprobs_T, np.array([-1.0, -2.0], np.float32))


def test_all_teachers_failed_takes_the_usual_failure_path():
    v = _rollout([4, 5])
    (out,) = combine(_rule(), [[_score(v, None, "A", status="failed")], [_score(v, None, "B", status="failed")]])
    assert (out.status, out.teacher, out.mix.weights) == ("failed", None, (0.0, 0.0))
    assert out.distill_return() == 0.0  # SPEC §1: A_t = 0


def test_topk_comes_from_the_highest_weight_teacher_and_only_when_the_objective_reads_it():
    v = _rollout([4])
    a = _score(v, [-3.0], "A", top_ids=[[7, 8]], top_lp=[[-0.1, -3.0]])  # c_A = -3
    b = _score(v, [-0.5], "B", top_ids=[[9, 4]], top_lp=[[-0.3, -0.5]])  # c_B = -0.5: the heavier one
    (out,) = combine(_rule(top_k=2), [[a], [b]])
    np.testing.assert_array_equal(out.teacher.topk_ids_TK, [[9, 4]])
    (plain,) = combine(_rule(top_k=0), [[a], [b]])
    assert plain.teacher.topk_ids_TK is None and plain.teacher.topk_logprobs_TK is None


def test_empty_response_gets_equal_weights_and_an_empty_score():
    v = _rollout([])
    (out,) = combine(_rule(), [[_score(v, [], "A")], [_score(v, [], "B")]])
    assert out.status == "ok" and out.teacher.logprobs_T.shape == (0,) and out.mix.weights == (0.5, 0.5)


def test_scorers_answering_for_different_responses_is_an_error():
    with pytest.raises(RuntimeError, match="different responses"):
        combine(_rule(), [[_score(_rollout([4], uid=0), [-1.0], "A")], [_score(_rollout([4], uid=1), [-1.0], "B")]])


# -- SPEC §6: extrapolated ----------------------------------------------------------------


def test_extrapolated_identity_on_numbers():
    # λ = 1.25, log π_T = [-0.2, -2.0], log π_ref = [-1.0, -0.5], log π_S,old = [-0.8, -1.2].
    # ℓ = λ·T + (1 − λ)·ref = [-0.25 + 0.25, -2.5 + 0.125] = [0.0, -2.375]; A = ℓ − old = [0.8, -1.175].
    # Paper form λ(T − ref) − (old − ref): t0 = 1.25·0.8 − 0.2 = 0.8, t1 = 1.25·(-1.5) + 0.7 = -1.175.
    v = _rollout([4, 5])
    rule = _rule(("T",), reference="R", lam=1.25)
    (out,) = combine(rule, [[_score(v, [-0.2, -2.0], "T")], [_score(v, [-1.0, -0.5], "R")]])
    assert out.teacher_name == "T+R" and out.mix.teachers == ("T",) and out.mix.weights == (1.0,)
    np.testing.assert_allclose(out.teacher.logprobs_T, [0.0, -2.375], atol=1e-6)
    old, T, ref = np.array([-0.8, -1.2]), np.array([-0.2, -2.0]), np.array([-1.0, -0.5])
    np.testing.assert_allclose(out.teacher.logprobs_T - old, 1.25 * (T - ref) - (old - ref), atol=1e-6)
    np.testing.assert_allclose(out.teacher.logprobs_T - old, [0.8, -1.175], atol=1e-6)


def test_extrapolated_over_two_teachers_extrapolates_their_weighted_score():
    # The teachers' ℓ of test_confidence_weights_and_combined_logprobs_by_hand, [-0.678805, -1.798008], is the
    # π_T side; reference [-1, -1], λ = 1.25: 1.25·ℓ − 0.25·ref = [-0.848506 + 0.25, -2.247510 + 0.25].
    v = _rollout([4, 5])
    rule = _rule(("A", "B"), reference="R", lam=1.25)
    (out,) = combine(rule, [[_score(v, [-0.5, -1.5], "A")], [_score(v, [-2.0, -4.0], "B")], [_score(v, [-1.0, -1.0], "R")]])
    np.testing.assert_allclose(out.teacher.logprobs_T, [-0.598506, -1.997510], atol=1e-5)
    np.testing.assert_allclose(out.mix.weights, [0.880797, 0.119203], atol=1e-6)


def test_extrapolated_needs_both_the_teacher_and_the_reference():
    v = _rollout([4])
    rule = _rule(("T",), reference="R", lam=1.25)
    for t_status, r_status in (("failed", "ok"), ("ok", "failed")):
        (out,) = combine(rule, [[_score(v, [-1.0], "T", status=t_status)], [_score(v, [-1.0], "R", status=r_status)]])
        assert (out.status, out.teacher) == ("failed", None)


def test_lambda_star_by_hand():
    # p = 0.9, b = 0.5, c = 0.2: tail 1 − q* = 0.8·0.1 = 0.08, logit q* = ln(0.92 / 0.08) = 2.442347,
    # logit b = 0, logit p = ln 9 = 2.197225: λ* = 1.111560.
    # p = 0.99, b = 0.98: logit q* = ln(0.992 / 0.008) = 4.820282, logit b = ln 49 = 3.891820,
    # logit p = ln 99 = 4.595120: λ* = 0.928462 / 0.703300 = 1.320151.
    # p ≤ b: no cliff (∞); b unknown: NaN.
    got = lambda_star(np.array([0.9, 0.99, 0.5, 0.9]), np.array([0.5, 0.98, 0.9, np.nan]), 0.2)
    np.testing.assert_allclose(got[:2], [1.111560, 1.320151], atol=1e-5)
    assert got[2] == math.inf and math.isnan(got[3])


def test_at_lambda_star_the_extrapolated_tail_is_one_clip_step_below_the_teachers():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.05, 0.9, 50)
    p = b + (1 - b) * rng.uniform(0.05, 0.95, 50)  # p > b
    c = 0.28
    lam = lambda_star(p, b, c)
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    q = 1 / (1 + np.exp(-(lam * logit(p) + (1 - lam) * logit(b))))  # π_T^λ π_ref^(1−λ), normalised
    np.testing.assert_allclose(1 - q, (1 - c) * (1 - p), rtol=1e-6)
    assert (lam > 1).all()


def test_cliff_stats_by_hand():
    # Teacher modes [5, 7, 9] with p = [0.9, 0.99, 0.6]; the student sampled [5, 7, 4].
    # b: positions 0, 1 from the reference's score of y_t (0.5, 0.98); position 2 from the reference's top-1,
    # which is the teacher's mode 9 with 0.7 ≥ p: no cliff there. λ* = [1.111560, 1.320151, ∞]; λ = 1.25:
    # one token past, distance = 1.111560 − 1.25 = -0.138440, modal-probability sum 2.49.
    teacher = TeacherScore(LOG([0.2, 0.3, 0.1]).astype(np.float32), np.array([[5], [7], [9]], np.int32),
                           LOG([[0.9], [0.99], [0.6]]).astype(np.float32))
    ref = TeacherScore(LOG([0.5, 0.98, 0.05]).astype(np.float32), np.array([[5], [7], [9]], np.int32),
                       LOG([[0.5], [0.98], [0.7]]).astype(np.float32))
    s = cliff_stats([5, 7, 4], teacher, ref, 1.25, 0.2)
    assert (s.tokens, s.measured, s.past) == (3, 3, 1)
    assert s.distance == pytest.approx(-0.138440, abs=1e-5) and s.modal_prob_sum == pytest.approx(2.49, abs=1e-5)
    # The reference's top-1 at position 2 is another token: b is unknown there, the position unmeasured.
    ref2 = TeacherScore(ref.logprobs_T, np.array([[5], [7], [8]], np.int32), ref.topk_logprobs_TK)
    assert cliff_stats([5, 7, 4], teacher, ref2, 1.25, 0.2).measured == 2
    assert cliff_stats([5, 7, 4], TeacherScore(teacher.logprobs_T), ref, 1.25, 0.2) is None  # no top-1


def test_mix_metrics_mean_weight_per_teacher_and_cliff_token_means():
    v0, v1 = _rollout([4, 5], idx=0), _rollout([4, 5], idx=1)
    # response 0: c_A = -1, c_B = -3 → w = [0.880797, 0.119203]; response 1: equal log-probs → [0.5, 0.5]
    parts = [[_score(v0, [-0.5, -1.5], "A"), _score(v1, [-1.0, -1.0], "A")],
             [_score(v0, [-2.0, -4.0], "B"), _score(v1, [-1.0, -1.0], "B")]]
    m = mix_metrics(combine(_rule(), parts))
    assert m["teacher/math/weight/A"] == pytest.approx((0.880797 + 0.5) / 2, abs=1e-6)
    assert m["teacher/math/weight/B"] == pytest.approx((0.119203 + 0.5) / 2, abs=1e-6)
    teacher = TeacherScore(LOG([0.2, 0.3]).astype(np.float32), np.array([[4], [5]], np.int32),
                           LOG([[0.9], [0.99]]).astype(np.float32))
    ref = TeacherScore(LOG([0.5, 0.98]).astype(np.float32))
    out = combine(_rule(("T",), reference="R", lam=1.25, cliff_clip=0.2),
                  [[ScoredRollout(v0, teacher, "T")], [ScoredRollout(v0, ref, "R")]])
    m = mix_metrics(out)  # λ* = [1.111560, 1.320151]: 1 of 2 tokens past; p̄ = (0.9 + 0.99) / 2
    assert m["extrapolation/math/past_cliff_frac"] == 0.5 and m["extrapolation/math/measured_frac"] == 1.0
    assert m["extrapolation/math/teacher_modal_prob"] == pytest.approx(0.945, abs=1e-5)
    assert m["extrapolation/math/cliff_distance"] == pytest.approx(-0.138440, abs=1e-5)
    assert not any(k.startswith("teacher/math/weight") for k in m)  # one teacher: no weights to report


# -- the buffer actor's path ------------------------------------------------------------------


def _actor_with_two_teachers(max_failed_frac=0.1):
    prompts = [Prompt(f"q{i}", "math", f"p{i}") for i in range(2)]
    buf = BufferActor(prompts, BufferConfig(balance=False, calibration="none", teacher_failure_window=4,
                                            teacher_max_failed_frac=max_failed_frac),
                      group_size=2, prompts_per_step=1)
    (p,) = buf.admit(1)
    vs = [VerifiedRollout(Rollout(p, j, [1], [4, 5], np.full(2, -1.0, np.float32), 0, "x", "stop"), j == 0, "match")
          for j in range(2)]
    return buf, p, vs


async def _answer(x):
    return x


def test_buffer_actor_combines_scorer_answers_into_one_train_sample():
    buf, p, vs = _actor_with_two_teachers()
    a = [_score(v, [-0.5, -1.5], "A") for v in vs]
    b = [_score(v, [-2.0, -4.0], "B") for v in vs]
    chain = ScorerRefs(_rule(), [_answer(a), _answer(b)])
    assert asyncio.run(buf.add_chain([p.uid], [chain])) is None
    batch = buf.get_batch()
    for s in batch.samples:  # the same hand-computed ℓ as test_confidence_weights_and_combined_logprobs_by_hand
        np.testing.assert_allclose(s.teacher_logprobs_T, [-0.678805, -1.798008], atol=1e-5)
    assert buf.last_batch_metrics()["teacher/math/weight/A"] == pytest.approx(0.880797, abs=1e-6)


def test_a_teacher_that_keeps_failing_stops_the_run_even_when_the_other_answers():
    buf, p, vs = _actor_with_two_teachers(max_failed_frac=0.25)  # > 1 failure in a window of 4 stops
    a = [_score(v, [-0.5, -1.5], "A") for v in vs]
    b = [_score(v, None, "B", status="failed") for v in vs]
    with pytest.raises(TeacherFailureError, match="teacher 'B'"):
        asyncio.run(buf.add_chain([p.uid], [ScorerRefs(_rule(), [_answer(a), _answer(b)])]))


# -- configuration ----------------------------------------------------------------------------

REF = ["teachers.reference={path: .cache/demo/student}"]


def test_multi_teacher_domain_loads_and_routes_its_bar_to_the_first_teacher():
    cfg = load_config(None, ["domains.math.teacher=[reverse_teacher, math_teacher]",
                             "domains.math.combine={type: confidence, temperature: 0.5}"])
    assert cfg.teacher_of_domain["math"] == "reverse_teacher" and cfg.domains["math"].combine.temperature == 0.5
    from buffers.scoring import scoring_rule

    rule = scoring_rule(cfg, "math")
    assert rule.scorers == ("reverse_teacher", "math_teacher") and rule.top_k == 64  # demo: forward_kl_topk, k 64
    assert scoring_rule(cfg, "reverse") is None  # one teacher: the plain path


def test_extrapolated_finds_the_reference_at_student_path_and_asks_for_top1():
    cfg = load_config(None, ["learner.objective={type: extrapolated}", *REF])
    from buffers.scoring import scoring_rule

    rule = scoring_rule(cfg, "math")
    assert (rule.scorers, rule.lam, rule.cliff_clip, rule.top_k) == (("math_teacher", "reference"), 1.25, 0.2, 0)
    assert cfg.teacher_top_k == 1
    assert load_config(None, ["learner.objective={type: extrapolated, cliff_clip: null}", *REF]).teacher_top_k == 0


@pytest.mark.parametrize("overrides, message", [
    (["domains.math.teacher=[math_teacher, nope]"], r"`domains.math.teacher` is \['math_teacher', 'nope'\]: 'nope' "
     r"is not a key of `teachers`"),
    (["domains.math.teacher=[]"], r"`domains.math.teacher` is an empty list"),
    (["domains.math.teacher=[math_teacher, math_teacher]"], r"lists a teacher twice"),
    (["domains.math.combine={type: equal}"], r"`domains.math.combine` is set but the domain has one teacher"),
    (["domains.math.teacher=[math_teacher, reverse_teacher]", "domains.math.combine.temperature=0"],
     r"`domains.math.combine.temperature` is 0"),
    (["learner.objective={type: extrapolated}"], r"`learner.objective.reference` is null.*add `teachers.reference"),
    (["learner.objective={type: extrapolated, reference: ref}", *REF], r"`learner.objective.reference` is 'ref', "
     r"which is not a key of `teachers`"),
    (["learner.objective={type: extrapolated}", "teachers.reference={path: .cache/demo/student, "
      "follow_student: true}"], r"`learner.objective.reference` is null.*none has that path"),
    (["learner.objective={type: extrapolated, reference: reference}", "teachers.reference={path: "
      ".cache/demo/student, follow_student: true}"], r"`teachers.reference` is the extrapolation reference but has "
     r"`follow_student: true`"),
    (["learner.objective={type: extrapolated, reference: math_teacher}"], r"'math_teacher' is also the teacher of "
     r"domains \['math'\]"),
    (["learner.objective={type: extrapolated, lam: 0}", *REF], r"`learner.objective.lam` is 0"),
    (REF, r"`teachers` \['reference'\] serve no domain"),  # only the extrapolated objective uses a reference
])
def test_scoring_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
