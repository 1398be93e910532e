"""Cost of grading code in the sandbox: one program per sandbox vs batches.

    python scripts/bench_sandbox.py [--programs 64] [--batch 1 8 32] [--parallel 2]

Grades ``--programs`` distinct correct programs of a HumanEval-style row with
``actors.verifiers.code.evaluate_many``, in batches of each size given, and prints per
program the wall-clock milliseconds and the CPU milliseconds of the sandbox processes
(``RUSAGE_CHILDREN``: bwrap, the supervisor, zygote, solutions, judges) and of the grader
itself. Every verdict must be "passed", or the script fails. Needs Linux; the isolation it
gets (namespaces through bwrap / uids / cgroup) is printed first, since it changes the cost.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROW = {
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "tests": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n",
    "entry_point": "add",
}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args(argv)

    from actors.verifiers import code as cv

    iso = cv.detect_isolation()
    print(f"isolation: {iso}")
    cv.evaluate_many([(f"    return a + b + {0} - {0}\n", ROW)])  # warm the page cache
    print(f"{'batch':>6} {'wall ms/program':>16} {'sandbox CPU ms/program':>23} {'grader CPU ms/program':>22}")
    for size in args.batch:
        items = [(f"    return a + b + {i} - {i}\n", ROW) for i in range(args.programs)]
        c0, g0, t0 = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF), time.perf_counter()
        results = []
        for start in range(0, len(items), size):
            results += cv.evaluate_many(items[start : start + size], parallel=args.parallel)
        wall = time.perf_counter() - t0
        child, grader = _cpu(resource.RUSAGE_CHILDREN) - c0, _cpu(resource.RUSAGE_SELF) - g0
        bad = [r for r in results if not r.correct]
        if bad:
            print(f"batch {size}: {len(bad)} programs not passed, e.g. {bad[0]}")
            return 1
        n = len(items)
        print(f"{size:>6} {1e3 * wall / n:>16.1f} {1e3 * child / n:>23.1f} {1e3 * grader / n:>22.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
