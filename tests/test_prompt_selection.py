"""Teacher-aligned prompt selection (Rethinking OPD; actors/prompt_selection.py): the per-prompt confidence
and the selection rule on hand-computed numbers, the teacher a domain is scored by, and (slow) the three
passes on the tiny demo models writing a selection that trains with the source's own column map."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.prompt_selection import ConfidenceSums, select, teacher_of
from configs.schema import load_config


def test_confidence_is_the_token_weighted_mean_modal_probability_per_prompt():
    s = ConfidenceSums(3)
    s.add(0, np.log([0.9, 0.5]))  # prompt 0, response 1: modal probabilities 0.9, 0.5
    s.add(0, np.log([0.4]))  # prompt 0, response 2: 0.4 → (0.9 + 0.5 + 0.4) / 3 tokens = 0.6
    s.add(2, np.log([1.0, 0.2, 0.3, 0.5]))  # prompt 2: 2.0 / 4 = 0.5; prompt 1: nothing scored
    c = s.mean()
    assert c[0] == pytest.approx(0.6) and c[2] == pytest.approx(0.5) and math.isnan(c[1])


def test_selection_keeps_confident_teachers_then_the_largest_gaps():
    c_t = np.array([0.90, 0.95, 0.40, 0.80, 0.99, np.nan, 0.70])
    c_s = np.array([0.50, 0.90, 0.10, 0.70, 0.60, 0.20, np.nan])
    # eligible (c_T ≥ 0.5, both defined): 0 (gap 0.40), 1 (0.05), 3 (0.10), 4 (0.39); prompt 2 has the
    # largest gap (0.30 > 0.10) but an unsure teacher; 5 and 6 lack a score.
    assert select(c_t, c_s, keep=0.5, min_teacher_confidence=0.5).tolist() == [0, 4]
    assert select(c_t, c_s, keep=0.6, min_teacher_confidence=0.5).tolist() == [0, 4, 3]  # ceil(0.6 × 4) = 3
    assert select(c_t, c_s, keep=1.0, min_teacher_confidence=0.0).tolist() == [0, 4, 2, 3, 1]
    assert select(c_t, c_s, keep=1.0, min_teacher_confidence=0.99).tolist() == [4]
    with pytest.raises(ValueError, match="keep"):
        select(c_t, c_s, keep=0.0, min_teacher_confidence=0.5)


def test_the_domains_first_live_teacher_scores_it_and_a_self_teacher_is_refused():
    cfg = load_config(None, ["demo.prepare=false", "domains.math.teacher=[math_teacher, reverse_teacher]"])
    name, tc = teacher_of(cfg, "math", None)
    assert name == "math_teacher" and tc.path == cfg.teachers["math_teacher"].path
    assert teacher_of(cfg, "math", "/m/other")[1].path == "/m/other"
    cfg = load_config(None, ["demo.prepare=false", "teachers.self={path: .cache/demo/student, follow_student: true}",
                             "domains.reverse.teacher=[self, reverse_teacher]"])
    with pytest.raises(ValueError, match="reverse.*self.*--teacher-path"):
        teacher_of(cfg, "reverse", None)


@pytest.mark.slow
def test_selection_on_the_tiny_demo_writes_a_trainable_half(tiny_demo, tmp_path):
    import pyarrow.parquet as pq
    import yaml

    from actors.prompt_selection import select_prompts
    from configs.schema import DataSource
    from tests.conftest import demo_overrides, demo_sources

    cfg = load_config(None, demo_overrides(tiny_demo))
    src = DataSource.model_validate(next(s for s in yaml.safe_load(demo_sources(tiny_demo)) if s["domain"] == "reverse"))
    meta = select_prompts(cfg, src, out=tmp_path / "sel", n=2, keep=0.5, min_teacher_confidence=0.0, batch=16)
    rows = pq.read_table(src.path).num_rows
    scores = pq.read_table(tmp_path / "sel/scores.parquet").to_pandas()
    assert meta["prompts"] == len(scores) == rows and meta["failed_responses"] == {"student": 0, "teacher": 0}
    assert meta["teachers"] == {"reverse": {"name": "reverse_teacher", "path": cfg.teachers["reverse_teacher"].path}}
    ok = scores[np.isfinite(scores.gap)]
    assert meta["selected"] == math.ceil(0.5 * len(ok)) == int(scores.selected.sum())
    assert ((ok.student_confidence > 0) & (ok.student_confidence <= 1) & (ok.teacher_confidence <= 1)).all()
    # the kept ones are exactly the largest gaps
    assert scores[scores.selected].gap.min() >= scores[~scores.selected & np.isfinite(scores.gap)].gap.max()
    # the selection has the source's own columns, so the same column map trains on it
    sel = pq.read_table(tmp_path / "sel/selected.parquet")
    assert set(pq.read_table(src.path).column_names) <= set(sel.column_names) and sel.num_rows == meta["selected"]
    from actors.pipeline import load_data

    srcs = [s if s["domain"] != "reverse" else {**s, "path": str(tmp_path / "sel/selected.parquet")}
            for s in yaml.safe_load(demo_sources(tiny_demo))]
    train = load_data(load_config(None, demo_overrides(tiny_demo, **{"data.train": json.dumps(srcs)}))).train
    assert len(next(t for t in train if t.source.domain == "reverse")) == meta["selected"]
    assert json.loads((tmp_path / "sel/selection.json").read_text())["selected"] == meta["selected"]
    assert not (tmp_path / "sel/responses.arrow").exists()


def test_source_rows_keep_file_and_row_and_the_cache_builder_names_a_bad_response_column(tiny_demo, tmp_path):
    from actors.prompt_selection import load_rows
    from actors.teacher_cache import sft_rollouts
    from configs.schema import DataSource
    from tests.conftest import demo_overrides

    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"reverse: ab{i}"}], "answer": f"{i}ba",
             "response": f"{i}ba"} for i in range(3)]
    rows[1]["messages"] = []  # a bad row: skipped and counted, the others keep their file and row
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, demo_overrides(tiny_demo))
    src = DataSource(path=str(f), domain="reverse", prompt_key="messages")
    got = load_rows(cfg, src)
    assert [p.id for p in got.prompts] == ["r0", "r2"] and got.where == [(0, 0), (0, 2)] and got.skipped == 1
    assert got.names == [str(f)]
    rolls, skipped = sft_rollouts(cfg, src, "response")
    assert [r.text for r in rolls] == ["0ba", "2ba"] and skipped == 1
    with pytest.raises(ValueError, match=f"{f}: no response column 'reply'.*--response-key"):
        sft_rollouts(cfg, src, "reply")


def test_the_offline_scripts_refuse_bad_input_with_exit_code_2(capsys, tmp_path):
    from scripts import cache_teacher, select_prompts

    assert select_prompts.main(["configs/demo.yaml", "--source", "{path: x}", "--out", str(tmp_path)]) == 2
    assert "set exactly one of `domain`" in capsys.readouterr().err
    assert select_prompts.main(["configs/demo.yaml", "--source", f"{{path: {tmp_path}/none, domain: math}}",
                                "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}/none" in capsys.readouterr().err
    (tmp_path / "rows").mkdir()
    pq.write_table(pa.table({"question": ["1+1"], "final_answer": ["2"]}), tmp_path / "rows" / "a.parquet")
    assert select_prompts.main(["configs/demo.yaml", "--source", f"{{path: {tmp_path}/rows, domain: math}}",
                                "--out", str(tmp_path / "o"), f"student.path={tmp_path}/no_student"]) == 2
    assert f"`student.path` is '{tmp_path}/no_student': no config.json" in capsys.readouterr().err
    assert cache_teacher.main(["configs/demo.yaml", "--source", "{path: x, domain: math}", "--teacher-path",
                               str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert cache_teacher.main(["configs/demo.yaml", "--source", f"{{path: {tmp_path}/none, domain: math}}",
                               "--teacher-path", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "no weight files" in capsys.readouterr().err  # the teacher is identified (hashed) first
