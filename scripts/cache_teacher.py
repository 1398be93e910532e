"""Score a fixed response set (the cold-start SFT data) once with a teacher and write an offline teacher
cache (SPEC §5, Lightning OPD); train from it with ``teachers.<name>: {type: cache, path: OUT}``.

    python scripts/cache_teacher.py configs/my_run.yaml --source '{path: sft.jsonl, domain: math}' \
        --response-key response --teacher-path /models/teacher --out caches/math [--top-k 32] [key=value ...]

The run config gives the student (tokenizer, chat template), the data formatting and the domains, so
prompts are rendered exactly as training renders them. ``--source`` is a ``data.train`` entry (column map:
prompt_key, answer_key, id_key, domain/domain_key, ...). The SFT data's producer is read from the sidecar
``<source path>.producer.json`` (or ``--producer``); a teacher other than it is refused unless ``--force``.
The logic lives in actors/teacher_cache.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.teacher_cache import build_cache  # noqa: E402
from actors.teacher_identity import read_producer  # noqa: E402
from configs.teachers import TeacherConsistencyError  # noqa: E402
from scripts.offline import config_and_source  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the run's YAML (student, data formatting, domains)")
    ap.add_argument("--source", required=True, help="the SFT data as a data source (YAML mapping)")
    ap.add_argument("--response-key", default="response", help="column holding the response text")
    ap.add_argument("--teacher-path", required=True, help="HF model directory of the teacher")
    ap.add_argument("--out", required=True, help="cache directory to write")
    ap.add_argument("--top-k", type=int, default=0, help="also store the teacher's top-k per position")
    ap.add_argument("--producer", help="JSON file with the SFT data producer's identity {path, weights_hash}")
    ap.add_argument("--force", action="store_true", help="write the cache even if teacher consistency fails")
    ap.add_argument("--batch", type=int, default=64, help="responses per teacher call")
    ap.add_argument("--max-model-len", type=int, help="longest prompt + response (default: the longest)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args, overrides = ap.parse_known_args(argv)
    loaded = config_and_source(args.config, overrides, args.source)
    if loaded is None:
        return 2
    cfg, src = loaded
    if not Path(args.teacher_path).is_dir():
        print(f"--teacher-path {args.teacher_path}: not a model directory (config.json, weights, tokenizer)",
              file=sys.stderr)
        return 2
    producer = json.loads(Path(args.producer).read_text()) if args.producer else read_producer(src.path)
    if producer is None:
        logging.warning("no producer sidecar for %s: teacher consistency cannot be checked", src.path)
    try:
        meta = build_cache(cfg, src, response_key=args.response_key, teacher_path=args.teacher_path, out=args.out,
                           top_k=args.top_k, producer=producer, force=args.force, batch=args.batch,
                           max_model_len=args.max_model_len, dtype=args.dtype)
    except TeacherConsistencyError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad rows, columns or paths: the message names them
        print(e, file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("rows", "top_k", "skipped_rows", "score_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
