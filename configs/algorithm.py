"""The pluggable parts of the algorithm, as unions on ``type`` (loaded by configs/schema.py):
SPEC §4 margin calibration (``buffer.calibration``), SPEC §2 importance correction
(``learner.importance``), the SPEC §1/§6 objective (``learner.objective``) and the learning-rate
schedule (``learner.lr_schedule``).

Each variant carries only its own keys, so an impossible combination (a shift direction on a
mask, a JSD β on forward KL, a top-k on the plain policy gradient) cannot be written down. A
missing ``type`` means the documented default variant; a bare string is short for
``{type: <string>}`` (``buffer.calibration=none`` on the command line). These classes are the
one definition of each setting: buffers/calibration.py and the learner read them as they are.
A new objective is one ``TopKObjective`` subclass here, added to ``ObjectiveConfig``, and one
line of ``TOPK_OBJECTIVES`` in learner/objectives.py. Every objective has ``top_k`` (the teacher
top-k it reads; 0 for plain ``reverse_kl_pg``) and an optional SPEC §6 ``drift`` control.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys are rejected, values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------
# Pluggable parts as discriminated unions on `type`: each variant carries only its own keys,
# so an impossible combination (a shift direction on a mask, a JSD β on forward KL) cannot be
# written down. A missing `type` means the documented default variant; a bare string is short
# for `{type: <string>}` (`buffer.calibration=none` on the command line).


def moved_keys(value: Any, moved: dict[str, str]) -> None:
    """A key of the earlier flat layout names where it lives now (instead of "not a known key")."""
    for old, new in moved.items():
        if isinstance(value, dict) and old in value:
            raise ValueError(f"`{old}` is now `{new}` (the layout of this section changed; see configs/schema.py)")


def _tagged(default: str, moved: dict[str, str] | None = None):
    """Before-validator of a ``type``-tagged union: a missing ``type`` is the default variant, a bare
    string is the tag alone, and a key of the earlier flat layout names where it went."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        moved_keys(value, moved or {})
        if isinstance(value, dict) and "type" not in value:
            return {"type": default, **value}
        return value

    return BeforeValidator(fill)


Statistic = Literal["mean", "minmax"]


class _MarginStatistic(Section):
    statistic: Statistic = Field(
        "mean", description="c, w of SPEC §4: `mean` (class means, the released scripts) or `minmax` (c = min over "
        "the correct returns, w = max over the incorrect: the paper's margin m(q) = c − w).")
    scope: Literal["group", "global"] = Field(
        "group", description="`group`: each prompt's responses form one set; `global`: the whole batch is one set.")


class NoCalibration(_MarginStatistic):
    """Plain OPD: advantages untouched. ``statistic`` and ``scope`` still define the measured gap
    (``margin/gap_before``)."""

    type: Literal["none"] = "none"

    @property
    def summary(self) -> str:
        return f"none (gap measured: {self.statistic}, {self.scope})"


class _Calibrating(_MarginStatistic):
    delta: float = Field(0.4, ge=0, allow_inf_nan=False,
                         description="δ: the gap c − w that order consistency requires (SPEC §4).")


class MarginShift(_Calibrating):
    """SPEC §4 margin shift: when c − w < δ, s = δ − (c − w) is added to token advantages, so the gap is
    exactly δ afterwards. Default of the released Uni-OPD scripts (mean, both, group, δ = 0.4)."""

    type: Literal["shift"] = "shift"
    direction: Literal["correct_up", "incorrect_down", "both"] = Field(
        "both", description="Who moves: `correct_up` adds s to the correct responses, `incorrect_down` subtracts "
        "s from the incorrect ones, `both` moves each class by s/2.")

    @property
    def summary(self) -> str:
        return f"shift/{self.statistic}/{self.direction}/{self.scope} δ={self.delta:g}"


class MarginMask(_Calibrating):
    """SPEC §4 margin mask: responses (or a whole set) whose returns violate the gap get zero advantage."""

    type: Literal["mask"] = "mask"
    form: Literal["greedy", "group_drop"] = Field(
        "greedy", description="`greedy` (release): remove the worst correct or best incorrect response, whichever "
        "raises the gap more, until the gap reaches δ; `group_drop` (paper): drop the whole set.")
    greedy_min_frac: float = Field(
        0.25, gt=0, le=1, description="Greedy form only: a class keeps at least max(1, ⌊frac·|class|⌋) responses.")

    @property
    def summary(self) -> str:
        return f"mask/{self.form}/{self.statistic}/{self.scope} δ={self.delta:g}"

    @model_validator(mode="after")
    def _frac_only_for_greedy(self) -> MarginMask:
        if self.form == "group_drop" and "greedy_min_frac" in self.model_fields_set:
            raise ValueError("`greedy_min_frac` applies to `form: greedy` only; remove it or set `form: greedy`")
        return self


CalibrationConfig = Annotated[NoCalibration | MarginShift | MarginMask,
                              Field(discriminator="type"), _tagged("shift", {"mode": "type", "mask_form": "form"})]


class NoImportance(Section):
    """No behaviour correction: every token weighs 1 (exact only at lag 0 with identical log-probs)."""

    type: Literal["none"] = "none"


class TruncatedIS(Section):
    """SPEC §2 truncated importance sampling: w_t = min(π_S,old / π_behave, upper)."""

    type: Literal["tis"] = "tis"
    upper: float = Field(5.0, gt=0, description="Truncation bound of the behaviour weight (SPEC §2 default 5).")


class IcePop(Section):
    """SPEC §2 ICE-POP: w_t = π_S,old / π_behave inside [low, high], 0 outside (the token is masked)."""

    type: Literal["icepop"] = "icepop"
    low: float = Field(0.5, gt=0, description="Lower end of the kept band of behaviour weights.")
    high: float = Field(2.0, gt=0, description="Upper end of the kept band of behaviour weights.")

    @model_validator(mode="after")
    def _band(self) -> IcePop:
        if self.low >= self.high:
            raise ValueError(f"`low` ({self.low:g}) must be < `high` ({self.high:g}): the band of kept weights "
                             "would be empty")
        return self


ImportanceConfig = Annotated[NoImportance | TruncatedIS | IcePop,
                             Field(discriminator="type"), _tagged("tis", {"mode": "type", "tis_upper": "upper", "icepop_low": "low", "icepop_high": "high"})]


class PolicyGradientTerm(Section):
    """SPEC §1: clipped policy gradient on A_t = log π_T − log π_S,old (+ the SPEC §4 calibration), the
    behaviour weight of SPEC §2 applied per token. The term that carries the margin calibration."""

    weight: float = Field(1.0, gt=0, description="Weight of this term in the loss.")
    eps_low: float = Field(0.2, ge=0, lt=1, description="ε_low: ρ is clipped below at 1 − ε_low (Uni-OPD: 0.2).")
    eps_high: float = Field(0.28, ge=0, description="ε_high: ρ is clipped above at 1 + ε_high (Uni-OPD: 0.28).")
    mask_threshold: float = Field(10.0, gt=0, description="Tokens with |log πθ − log πT| ≥ this are masked.")
    baseline: Literal["none", "vopd"] = Field(
        "none", description="`vopd` (\"KL for a KL\", SPEC §6): subtract the detached per-state b_t = −KL(π_S ‖ π_T), "
        "a top-k + tail estimate at the visited state, from A_t; unbiased (b_t does not depend on the sampled "
        "token). Needs the teacher's top-k: allowed in `type: vopd` and in a top-k objective's `pg`.")


class DriftControl(Section):
    """SPEC §6 Prune-OPD drift control (Prune-OPD, arXiv 2605.07804), on every token-level loss term of the
    objective. overlap_t = |topN_S ∩ topN_T| / N at each student-visited state (the student's N likeliest tokens
    over the whole vocabulary, from the learner's chunked head; the teacher's N likeliest of its returned top-k);
    a drift event when overlap_t < ``threshold``; token weight

        w_t = clamp(1 − decay·e_t, 0, 1) + offset        (``offset_inside_clamp: false``, SPEC §6 read literally)
        w_t = clamp(1 − decay·e_t + offset, 0, 1)        (``offset_inside_clamp: true``)

    with e_t the events at positions ≤ t (the drifted token itself counts: its teacher signal is already the
    unreliable one). The paper states a monotone down-weighting but not this formula's details; the literal
    reading gives weights in [0.5, 1.5], 1.5 before any drift. Severe drift truncates the training window:
    the tokens after the first severe position leave both loss terms (the rollout "stopped early"; here it
    was generated already, so the saving is reported as ``drift/tokens_saved``)."""

    top_n: int = Field(16, ge=1, description="N of the top-N overlap (Prune-OPD: 16). The teacher's top-k must be ≥ N.")
    threshold: float = Field(0.7, ge=0, le=1, description="A drift event when overlap_t < this (Prune-OPD: 0.7).")
    decay: float = Field(0.01, ge=0, description="Weight lost per drift event so far (SPEC §6: 0.01).")
    offset: float = Field(0.5, ge=0, description="Added to the clamped weight (SPEC §6: + 0.5).")
    offset_inside_clamp: bool = Field(
        False, description="false: w = clamp(1 − decay·e, 0, 1) + offset (SPEC §6 as written, w ∈ [offset, 1 + "
        "offset]); true: w = clamp(1 − decay·e + offset, 0, 1).")
    severe_consecutive: int | None = Field(
        8, ge=1, description="Severe drift: this many consecutive drift events (project choice; null: off). The "
        "window ends at the position that completes the run.")
    severe_overlap: float | None = Field(
        None, ge=0, le=1, description="Severe drift: overlap_t < this at one position (null: off).")

    @property
    def summary(self) -> str:
        sev = [f"{self.severe_consecutive} in a row"] if self.severe_consecutive else []
        sev += [f"overlap<{self.severe_overlap:g}"] if self.severe_overlap is not None else []
        return f"drift(top-{self.top_n}<{self.threshold:g}, truncate at {' or '.join(sev) or 'never'})"


def _drift_fits(top_k: int, drift: DriftControl | None) -> None:
    if drift is not None and top_k < drift.top_n:
        raise ValueError(f"`top_k` ({top_k}) is below `drift.top_n` ({drift.top_n}): the teacher's top-{drift.top_n} "
                         f"is read from its returned top-k; raise top_k to ≥ {drift.top_n} or lower drift.top_n")


def _drift_summary(drift: DriftControl | None) -> str:
    return f" + {drift.summary}" if drift else ""


class ReverseKLPG(Section):
    """SPEC §6 ``reverse_kl_pg`` (default): the SPEC §1 sampled-token policy gradient alone."""

    type: Literal["reverse_kl_pg"] = "reverse_kl_pg"
    pg: PolicyGradientTerm = Field(PolicyGradientTerm(), description="The SPEC §1 term's settings.")
    drift: DriftControl | None = Field(None, description="SPEC §6 Prune-OPD drift control (null: off); the "
                                       "teachers then return their top-`drift.top_n`.")

    @property
    def top_k(self) -> int:
        """Teacher top-k this objective reads: only drift control's top-N."""
        return self.drift.top_n if self.drift else 0

    @property
    def summary(self) -> str:
        return f"{self.pg.weight:g}×reverse_kl_pg{_drift_summary(self.drift)}"

    @model_validator(mode="after")
    def _no_baseline_without_topk(self) -> ReverseKLPG:
        if self.pg.baseline == "vopd":
            raise ValueError("`pg.baseline` is vopd, which needs the teacher's top-k, but `reverse_kl_pg` fetches "
                             "none; write `type: vopd` (the SPEC §1 term with the vOPD baseline, `top_k` settable)")
        return self


class VOPD(Section):
    """SPEC §6 ``vopd`` ("KL for a KL"): the SPEC §1 term with the control variate b_t = −KL(π_S ‖ π_T) (top-k
    + tail estimate, detached) subtracted from A_t, so its advantage is A_t + KL_t. The teacher returns its
    top-k for the estimate; nothing else changes (the §4 calibration still rides on this term)."""

    type: Literal["vopd"] = "vopd"
    pg: PolicyGradientTerm = Field(PolicyGradientTerm(baseline="vopd"), description="The SPEC §1 term's settings "
                                   "(`baseline` must stay `vopd`: without it this is `reverse_kl_pg`).")
    top_k: int = Field(32, ge=1, description="Teacher top-k of the KL estimate (the rest is one tail category).")
    drift: DriftControl | None = Field(None, description="SPEC §6 Prune-OPD drift control (null: off).")

    @property
    def summary(self) -> str:
        return f"{self.pg.weight:g}×vopd (top-{self.top_k} baseline){_drift_summary(self.drift)}"

    @model_validator(mode="before")
    @classmethod
    def _baseline_defaults_to_vopd(cls, value: Any) -> Any:
        """``pg: {weight: 0.5}`` under ``type: vopd`` keeps the type's baseline (a default, not a rewrite)."""
        if isinstance(value, dict) and isinstance(value.get("pg"), dict) and "baseline" not in value["pg"]:
            return {**value, "pg": {**value["pg"], "baseline": "vopd"}}
        return value

    @model_validator(mode="after")
    def _baseline_and_drift(self) -> VOPD:
        if self.pg.baseline != "vopd":
            raise ValueError("`type: vopd` has `pg.baseline: none`; that is `type: reverse_kl_pg` (remove "
                             "pg.baseline or change the type)")
        _drift_fits(self.top_k, self.drift)
        return self


class TopKObjective(Section):
    """A SPEC §6 per-token divergence over the teacher's top-k + one tail category, differentiated in the
    student directly, optionally summed with the SPEC §1 term. A subclass adds its ``type`` and own keys
    (and learner/objectives.py one ``TOPK_OBJECTIVES`` entry)."""

    weight: float = Field(1.0, gt=0, description="Weight of the distribution term in the loss.")
    top_k: int = Field(32, ge=1, description="Teacher top-k log-probs returned per position (capped at the "
                       "vocabulary: k ≥ vocabulary makes the divergence exact).")
    on_masked: bool = Field(
        False, description="Apply the distribution term also to responses masked by SPEC §3.2 balancing or the "
        "§4 margin mask, so those shape only the SPEC §1 term (false: a masked response has zero loss weight "
        "in both terms).")
    pg: PolicyGradientTerm | None = Field(
        None, description="Add the SPEC §1 term (which carries the §4 margin calibration) with these settings, "
        "e.g. `pg: {weight: 0.1}` (`pg: {baseline: vopd}` adds the vOPD control variate); null: the distribution "
        "term alone.")
    drift: DriftControl | None = Field(None, description="SPEC §6 Prune-OPD drift control on both terms (null: off).")

    @property
    def summary(self) -> str:
        pg = f"{self.pg.weight:g}×{'vopd' if self.pg.baseline == 'vopd' else 'reverse_kl_pg'} + " if self.pg else ""
        return (f"{pg}{self.weight:g}×{self.type} (top-{self.top_k}{', masked responses too' if self.on_masked else ''})"
                f"{_drift_summary(self.drift)}")

    @model_validator(mode="after")
    def _drift_top_k(self) -> TopKObjective:
        _drift_fits(self.top_k, self.drift)
        return self


class ReverseKLTopK(TopKObjective):
    """``reverse_kl_topk``: KL(student ‖ teacher) = Σ p_S (log p_S − log p_T) over top-k + tail."""

    type: Literal["reverse_kl_topk"] = "reverse_kl_topk"


class ForwardKLTopK(TopKObjective):
    """``forward_kl_topk``: KL(teacher ‖ student) = Σ p_T (log p_T − log p_S) over top-k + tail."""

    type: Literal["forward_kl_topk"] = "forward_kl_topk"


class JSDTopK(TopKObjective):
    """``jsd``: generalised Jensen–Shannon β·KL(T ‖ M) + (1−β)·KL(S ‖ M), M = β p_T + (1−β) p_S (GKD)."""

    type: Literal["jsd"] = "jsd"
    beta: float = Field(0.5, ge=0, le=1, description="β: 0 is forward KL, 1 reverse KL (TRL's convention).")

    @property
    def summary(self) -> str:
        return super().summary.replace("×jsd", f"×jsd(β={self.beta:g})")


class ExtrapolatedPG(Section):
    """SPEC §6 ``extrapolated`` (G-OPD / ExOPD, "Learning beyond Teacher: Generalized On-Policy Distillation
    with Reward Extrapolation"): the SPEC §1 policy gradient on

        A_t = λ(log π_T − log π_ref) − (log π_S,old − log π_ref) = [λ log π_T + (1−λ) log π_ref] − log π_S,old

    with π_ref a fixed reference (the initial student). The bracket is one teacher log-prob per token, so
    buffers/scoring.py combines the domain teacher's and the reference teacher's scores with the fixed
    weights (λ, 1−λ) before the buffer, and the learner runs the plain SPEC §1 term on it."""

    type: Literal["extrapolated"] = "extrapolated"
    lam: float = Field(1.25, gt=0, allow_inf_nan=False, description="λ: 1 is plain OPD, > 1 extrapolates past the "
                       "teacher (G-OPD: 1.25); too large a λ collapses the output format (the extrapolation cliff).")
    reference: str | None = Field(
        None, description="The teacher (a key of `teachers`) that serves π_ref, e.g. `teachers.reference: {path: "
        "<student.path>}`; it scores every response and serves no domain. null: the one teacher whose path is "
        "`student.path` (and that does not follow the student).")
    cliff_clip: float | None = Field(
        0.2, gt=0, lt=1, description="c of the extrapolation-cliff diagnostic (`extrapolation/<d>/*` metrics, "
        "buffers/scoring.py:lambda_star), the clip strength (SPEC §1 ε_low = 0.2). The diagnostic needs the "
        "teachers' top-1 log-prob at each position; null turns it off and the teachers return no top-k.")
    pg: PolicyGradientTerm = Field(PolicyGradientTerm(), description="The SPEC §1 term's settings.")
    drift: DriftControl | None = Field(None, description="SPEC §6 Prune-OPD drift control (null: off); the "
                                       "teachers then return their top-`drift.top_n`.")

    @property
    def top_k(self) -> int:
        """Teacher top-k this objective reads: only drift control's top-N (the cliff diagnostic's top-1 is
        ``RunConfig.teacher_top_k``'s business)."""
        return self.drift.top_n if self.drift else 0

    @model_validator(mode="after")
    def _no_baseline(self) -> ExtrapolatedPG:
        if self.pg.baseline == "vopd":
            raise ValueError("`pg.baseline` is vopd, which `extrapolated` does not fetch the top-k for; remove it")
        return self

    @property
    def summary(self) -> str:
        return f"{self.pg.weight:g}×extrapolated(λ={self.lam:g}, reference {self.reference or 'at student.path'})"




class KLMixTopK(TopKObjective):
    """``kl_mix``: α·KL(teacher ‖ student) + (1−α)·KL(student ‖ teacher) over top-k + tail ("Decoupling KL and
    Trajectories"); α = 1 is ``forward_kl_topk``, α = 0 ``reverse_kl_topk``. The paper mixes the two
    directions; the 0.5 default is a project choice."""

    type: Literal["kl_mix"] = "kl_mix"
    alpha: float = Field(0.5, ge=0, le=1, description="α: weight of forward KL; 1 − α weighs reverse KL.")

    @property
    def summary(self) -> str:
        return super().summary.replace("×kl_mix", f"×kl_mix(α={self.alpha:g})")


ObjectiveConfig = Annotated[ReverseKLPG | VOPD | ReverseKLTopK | ForwardKLTopK | JSDTopK | KLMixTopK | ExtrapolatedPG,
                            Field(discriminator="type"), _tagged("reverse_kl_pg", {
                                "dist_kind": "type", "dist_weight": "weight (of a top-k `type`)", "jsd_beta": "beta "
                                "(`type: jsd`)", "dist_on_masked": "on_masked", "pg_weight": "pg.weight", "eps_low":
                                "pg.eps_low", "eps_high": "pg.eps_high", "mask_threshold": "pg.mask_threshold"})]


class _Warmup(Section):
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from lr / warmup_steps to lr over this many steps.")


class ConstantLR(_Warmup):
    """Warm-up, then the peak ``learner.lr`` to the end."""

    type: Literal["constant"] = "constant"


class _Decaying(_Warmup):
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Learning rate at the last step, as a fraction of lr.")


class CosineLR(_Decaying):
    """Warm-up, then cosine decay from lr to min_lr_ratio × lr at the last step."""

    type: Literal["cosine"] = "cosine"


class LinearLR(_Decaying):
    """Warm-up, then linear decay from lr to min_lr_ratio × lr at the last step."""

    type: Literal["linear"] = "linear"


LRSchedule = Annotated[ConstantLR | CosineLR | LinearLR, Field(discriminator="type"), _tagged("constant")]
