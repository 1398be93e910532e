"""Teacher-aligned prompt selection (Rethinking OPD): keep the prompts where the domain's teacher is confident
and the student is not, at the states the student visits; train on the selection with the same column map.

    python scripts/select_prompts.py configs/my_run.yaml --source '{path: data/math, domain: math, \
        prompt_key: question, answer_key: final_answer}' --out selections/math [--n 4] [--keep 0.5] \
        [--min-teacher-confidence 0.5] [--teacher-path /models/teacher] [key=value ...]

Writes <out>/selected.parquet (the source's own columns, so ``data.train: [{path: <out>/selected.parquet,
...same keys}]`` trains on it), <out>/scores.parquet (every prompt's confidences and gap) and
<out>/selection.json (settings, counts, failures). One model is loaded at a time: run it on a node that
holds the teacher. The logic and the score's definition live in actors/prompt_selection.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.prompt_selection import select_prompts  # noqa: E402
from scripts.offline import config_and_source  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the run's YAML (student, sampler settings, domains and their teachers)")
    ap.add_argument("--source", required=True, help="the prompts as a data source (YAML mapping, data.train's keys)")
    ap.add_argument("--out", required=True, help="directory to write the selection to")
    ap.add_argument("--n", type=int, default=4, help="responses the student samples per prompt")
    ap.add_argument("--keep", type=float, default=0.5, help="share of the eligible prompts kept, largest gap first")
    ap.add_argument("--min-teacher-confidence", type=float, default=0.5,
                    help="eligible prompts: the teacher's mean modal probability at least this")
    ap.add_argument("--teacher-path", help="score every domain with this model instead of the config's teachers")
    ap.add_argument("--batch", type=int, default=256, help="prompts per sampler call, responses per scoring call")
    args, overrides = ap.parse_known_args(argv)
    loaded = config_and_source(args.config, overrides, args.source)
    if loaded is None:
        return 2
    cfg, src = loaded
    try:
        meta = select_prompts(cfg, src, out=args.out, n=args.n, keep=args.keep,
                              min_teacher_confidence=args.min_teacher_confidence, teacher_path=args.teacher_path,
                              batch=args.batch)
    except (ValueError, FileNotFoundError) as e:  # bad rows, columns or paths: the message names them
        print(e, file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("prompts", "eligible", "selected", "selected_path", "mean_confidence",
                                           "failed_responses", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
