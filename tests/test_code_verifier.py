"""The code verifier's sandbox against hostile programs (actors/verifiers/code/).

Every hostile test must end incorrect (or harmless), within its limits, and leave the
machine as it was: the autouse fixture checks after each test that no process of the
sandbox uids is alive, no ``uniopd-sbx-*`` directory is left in /tmp and no cgroup is
left. The tests use their own uid range (63000+) so that a grader running elsewhere on the
machine cannot confuse them. Properties that a machine cannot provide (no root, no
namespaces, no cgroup) are skipped with the reason, never passed vacuously.
"""

from __future__ import annotations

import dataclasses

import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the code sandbox is Linux-only", allow_module_level=True)

from actors.verifiers import code as cv  # noqa: E402

TEST_UID_BASE = 63000
TEST_UIDS = tuple(range(TEST_UID_BASE, TEST_UID_BASE + 2 * cv.N_SLOTS))

ISO = cv.detect_isolation()
ROOT = os.geteuid() == 0


def _mode_works(iso: cv.Isolation) -> bool:
    try:
        res = cv.run_program("print('ok')", cv.SandboxLimits(wall_seconds=10), isolation=iso)
    except Exception:  # noqa: BLE001
        return False
    return res.returncode == 0 and res.stdout == b"ok\n"


# The isolation detect_isolation() picked, plus the no-namespace set-up of a root machine
# without CAP_SYS_ADMIN (an unprivileged Docker container), exercised here for real.
NO_NS = cv.Isolation(namespaces=False, setuid=True, cgroup=ISO.cgroup)
MODES = [ISO] + ([NO_NS] if ISO != NO_NS and ROOT and _mode_works(NO_NS) else [])
MODE_IDS = ["ns" if m.namespaces else ("uid" if m.setuid else "plain") for m in MODES]

needs_setuid = pytest.mark.skipif(not ISO.setuid, reason="needs root: programs would run as the grader's own user")
needs_ns = pytest.mark.skipif(not ISO.namespaces, reason="needs root with CAP_SYS_ADMIN (unshare) for namespaces")
needs_cgroup = pytest.mark.skipif(not ISO.cgroup, reason="no writable memory cgroup on this machine")

FAST = cv.SandboxLimits(wall_seconds=3.0, cpu_seconds=3, memory_bytes=256 * 2**20)
SHORT = cv.SandboxLimits(wall_seconds=1.5, cpu_seconds=5, memory_bytes=256 * 2**20)
GRACE = 1.5  # seconds of teardown and interpreter start allowed past a wall-clock limit

ADD = SimpleNamespace(
    prompt='def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    tests=(
        "def check(candidate):\n"
        "    assert candidate(1, 2) == 3\n"
        "    assert candidate(-5, 5) == 0\n"
        "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n"
        "    assert candidate(10**30, 1) == 10**30 + 1\n"
    ),
    entry_point="add",
)
ADD_COMPLETION = "    return a + b\n"


def _check_mode(iso: cv.Isolation, *, setuid: bool = False, namespaces: bool = False) -> None:
    if setuid and not iso.setuid:
        pytest.skip("this mode runs programs as the grader's user")
    if namespaces and not iso.namespaces:
        pytest.skip("this mode has no namespaces")


@pytest.fixture(autouse=True, scope="module")
def _test_uid_range():
    old = cv.isolation.UID_BASE
    cv.isolation.UID_BASE = TEST_UID_BASE
    yield
    cv.isolation.UID_BASE = old


def _sandbox_dirs() -> set[str]:
    return {e for e in os.listdir(tempfile.gettempdir()) if e.startswith("uniopd-sbx-")}


def _cgroup_dirs() -> set[str]:
    base = cv._cgroup_base()
    if base is None:
        return set()
    return {e for e in os.listdir(base) if e.startswith(f"uniopd-sbx-{os.getpid()}-")}


@pytest.fixture(autouse=True)
def machine_unchanged():
    dirs_before = _sandbox_dirs()
    yield
    deadline = time.monotonic() + 2.0
    while (left := cv._processes_of(TEST_UIDS)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"sandbox processes left behind: {left}"
    assert _sandbox_dirs() <= dirs_before, "a sandbox directory was left in /tmp"
    assert not _cgroup_dirs(), "a sandbox cgroup was left behind"


def evaluate(response: str, row=ADD, limits: cv.SandboxLimits = FAST, iso: cv.Isolation | None = None):
    t0 = time.perf_counter()
    res = cv.evaluate(response, row, limits, isolation=iso or ISO)
    elapsed = time.perf_counter() - t0
    assert elapsed < limits.wall_seconds + GRACE, f"took {elapsed:.2f}s past its {limits.wall_seconds}s limit"
    return res


def run(source: str, limits: cv.SandboxLimits = FAST, iso: cv.Isolation | None = None) -> cv.RunResult:
    t0 = time.perf_counter()
    res = cv.run_program(source, limits, isolation=iso or ISO)
    assert time.perf_counter() - t0 < limits.wall_seconds + GRACE
    assert not res.sandbox_error, res.sandbox_error
    return res


# --- positive and plain negative grading ---------------------------------------------


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_correct_completion_passes(iso):
    res = evaluate(ADD_COMPLETION, iso=iso)
    assert res.correct and res.reason == "passed", res


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_wrong_solution_fails(iso):
    res = evaluate("    return a - b\n", iso=iso)
    assert not res.correct and res.reason == "failed", res
    assert "tests.py:2" in res.detail


def test_full_function_in_fences_passes():
    response = (
        "Here is my solution:\n\n```python\nfrom typing import List\n\n"
        "def add(a: int, b: int) -> int:\n    return a + b\n```\nIt adds."
    )
    assert evaluate(response).correct


def test_grade_returns_correct_and_reason_for_attribute_and_mapping_rows():
    ok, reason = cv.grade(ADD_COMPLETION, ADD, FAST)
    assert ok and reason.startswith("passed")
    ok, reason = cv.grade("    return 0\n", dict(vars(ADD)), FAST)
    assert not ok and reason.startswith("failed: AssertionError")


def test_grade_accepts_the_pipeline_prompt_record():
    records = pytest.importorskip("buffers.records")
    row = records.Prompt(id="p0", domain="code", prompt=ADD.prompt, tests=ADD.tests, entry_point="add")
    assert cv.grade(ADD_COMPLETION, row, FAST)[0]


def test_mbpp_style_plain_asserts():
    row = SimpleNamespace(
        prompt="Write a function to remove all occurrences of a character from a string.",
        tests='assert remove_char("hello", "l") == "heo"\nassert remove_char("aaa", "a") == ""\n',
        entry_point="remove_char",
    )
    good = "```python\ndef remove_char(s, c):\n    return s.replace(c, '')\n```"
    bad = "```python\ndef remove_char(s, c):\n    return s\n```"
    assert evaluate(good, row).correct
    assert evaluate(bad, row).reason == "failed"


def test_prompt_helpers_and_rich_values():
    row = SimpleNamespace(
        prompt=(
            "import math\nfrom collections import Counter\n\n"
            "def encode(s: str) -> str:\n    return s[::-1]\n\n"
            "def decode(s: str) -> str:\n    \"\"\"Inverse of encode.\"\"\"\n"
        ),
        tests=(
            "def check(candidate):\n"
            "    assert candidate(encode('abc')) == 'abc'\n"
            "    assert math.isclose(len(candidate('xy')), 2)\n"
            "    try:\n        candidate(None)\n        assert False, 'should raise'\n"
            "    except TypeError:\n        pass\n"
        ),
        entry_point="decode",
    )
    assert evaluate("    return s[::-1]\n", row).correct
    values = SimpleNamespace(
        prompt="def f():\n    pass\n",
        tests=(
            "def check(candidate):\n"
            "    out = candidate()\n"
            "    assert out[0] == {1: (2.5, None), 'k': {3, 4}} and out[1] == b'\\x00' and list(out[2]) == [0, 1]\n"
            "    assert out[3] == float('inf') and out[4] != out[4] and out[5] == 1 + 2j and out[6] == range(3)\n"
            "    assert dict(out[7]) == {'a': 2} and out[8] == [1, 2]\n"
        ),
        entry_point="f",
    )
    solution = (
        "def f():\n    from collections import Counter\n"
        "    return ({1: (2.5, None), 'k': {3, 4}}, b'\\x00', (i for i in range(2)), float('inf'), float('nan'),"
        " 1 + 2j, range(3), Counter('aa'), map(int, '12'))\n"
    )
    res = evaluate(solution, values)
    assert not res.correct  # map() crosses as an iterator, and an iterator is not == [1, 2]
    assert evaluate(solution.replace("map(int, '12')", "list(map(int, '12'))"), values).correct


def test_no_code_and_syntax_error():
    assert evaluate("").reason == "no_code"
    assert evaluate("```python\n\n```").reason == "no_code"
    assert evaluate("    return a +\n").reason == "syntax_error"


def _count_sandbox_runs(monkeypatch) -> list:
    """The programs that reach the sandbox (a batch counts each of its programs)."""
    runs: list = []
    real = cv.runner._run

    def counting(job, *args, **kwargs):
        runs.extend(p["source"] for p in job["programs"]) if job["mode"] == "batch" else runs.append(job["source"])
        return real(job, *args, **kwargs)

    monkeypatch.setattr(cv.runner, "_run", counting)
    return runs


def test_a_program_that_does_not_compile_is_rejected_without_a_sandbox_run(monkeypatch):
    runs = _count_sandbox_runs(monkeypatch)
    for response in ("    return a +\n", "return a + b\n", "  return a\n    return b\n", "\treturn a + b\n"):
        res = evaluate(response)
        assert not res.correct and res.reason == "syntax_error", (response, res)
    assert runs == []
    # The in-process check compiles what the sandbox would (same file name, same future flags).
    assert "solution.py, line 3" in evaluate("    return a +\n").detail
    assert cv.precompile_error("def f(x: (yield)):\n    pass\n")  # an error only under `annotations`
    assert cv.precompile_error(ADD.prompt + ADD_COMPLETION) is None
    # A long program is left to the sandbox, which still finds the syntax error.
    long = "    return a +" + " " * cv.PRECOMPILE_MAX_CHARS + "\n"
    assert evaluate(long).reason == "syntax_error" and len(runs) == 1
    # Compiling runs nothing: a program whose definitions would write a file still compiles.
    assert cv.precompile_error("import os\nos.mkdir('/tmp/uniopd-precompile-ran')\n") is None
    assert not os.path.exists("/tmp/uniopd-precompile-ran")


def _code_rollout(text: str, prompt_id: str = "p0", prompt: str = ADD.prompt):
    import numpy as np

    from buffers.records import Prompt, Rollout

    row = Prompt(id=prompt_id, domain="code", prompt=prompt, tests=ADD.tests, entry_point="add")
    return Rollout(prompt=row, sample_idx=0, prompt_ids=[1], response_ids=[2], behaviour_logprobs_T=np.zeros(1),
                   policy_version=0, text=text, finish_reason="stop")


def test_verifier_grades_identical_programs_once_per_call(monkeypatch):
    from actors.verifier import Verifier
    from configs.schema import CodeVerifier, DomainConfig

    runs = _count_sandbox_runs(monkeypatch)
    verifier = Verifier({"code": DomainConfig(teacher="t", verifier=CodeVerifier(wall_seconds=3.0))})
    wrong = "    return a - b\n"
    out = verifier.verify([_code_rollout(ADD_COMPLETION), _code_rollout(ADD_COMPLETION, "p1"),
                           _code_rollout(wrong), _code_rollout(wrong)])
    assert [v.correct for v in out] == [True, True, False, False]
    assert out[2].reason == out[3].reason and out[2].reason.startswith("failed")
    assert len(runs) == 2  # one per distinct (solution, prompt, tests, entry point)
    # The next call grades again; a different prompt is a different program.
    other_prompt = ADD.prompt.replace("Return the sum", "Add")
    verifier.verify([_code_rollout(ADD_COMPLETION), _code_rollout(ADD_COMPLETION, prompt=other_prompt)])
    assert len(runs) == 4
    # Responses that differ only outside the program (prose around a fence) share a run.
    fenced = [f"Here:\n```python\n{ADD_COMPLETION}```\n", f"```python\n{ADD_COMPLETION}```\nDone."]
    assert verifier.grade_many(fenced, [_code_rollout("").prompt] * 2) == [True, True]
    assert len(runs) == 5
    assert verifier.grade_many([ADD_COMPLETION, ADD_COMPLETION], [_code_rollout("").prompt] * 2) == [True, True]
    assert len(runs) == 6


def test_missing_entry_point_is_an_error():
    res = evaluate("```python\ndef plus(a, b):\n    return a + b\n```", SimpleNamespace(
        prompt="Add two numbers.", tests=ADD.tests, entry_point="add"))
    assert res.reason == "error" and "'add'" in res.detail


def test_tests_that_pass_non_data_or_never_call_are_flagged():
    lam = SimpleNamespace(prompt="def apply(f, x):\n    pass\n",
                          tests="def check(candidate):\n    assert candidate(lambda v: v + 1, 1) == 2\n", entry_point="apply")
    res = evaluate("    return f(x)\n", lam)
    assert not res.correct and res.reason == "unsupported"
    idle = SimpleNamespace(prompt=ADD.prompt, tests="def check(candidate):\n    pass\n", entry_point="add")
    res = evaluate(ADD_COMPLETION, idle)
    assert not res.correct and res.reason == "no_tests"


def test_candidate_exception_is_an_error():
    res = evaluate("    return [][1]\n")
    assert res.reason == "error" and "IndexError" in res.detail and "solution.py:3" in res.detail


# --- hostile programs: fake verdicts ------------------------------------------------------


def test_printing_all_tests_passed_does_not_pass():
    res = evaluate("    print('all tests passed')\n    return 0\nprint('All tests passed!')\nprint('OK')\n")
    assert not res.correct and res.reason == "failed"


@pytest.mark.parametrize(
    "tail",
    ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit(0)\n",
     "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"],
    ids=["os._exit", "sys.exit", "SystemExit", "suicide"],
)
def test_exiting_before_the_tests_does_not_pass(tail):
    res = evaluate("    return 0\n" + tail)
    assert not res.correct and res.reason in ("crashed", "error"), res


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "import os; os._exit(0)", "raise KeyboardInterrupt"])
def test_exiting_inside_the_candidate_does_not_pass(body):
    res = evaluate(f"    {body}\n")
    assert not res.correct and res.reason in ("crashed", "error"), res


def test_exit_inside_candidate_is_not_swallowed_by_broad_except_in_tests():
    row = SimpleNamespace(
        prompt=ADD.prompt,
        tests=(
            "def check(candidate):\n"
            "    for args in [(1, 2), (3, 4)]:\n"
            "        try:\n            candidate(*args)\n"
            "        except Exception:\n            pass\n"
            "        except:\n            pass\n"
        ),
        entry_point="add",
    )
    assert not evaluate("    raise SystemExit(0)\n", row).correct
    assert not evaluate("    import os; os._exit(0)\n", row).correct


def test_monkeypatching_builtins_does_not_pass():
    patch = (
        "import builtins\n"
        "builtins.abs = lambda x: 0\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"
        "import sys\nsys.settrace(lambda *a: None)\n"
    )
    res = evaluate("    return 0\n" + patch)
    assert not res.correct and res.reason == "failed"  # the tests ran with the real builtins
    # patching what the solution process's own harness needs only breaks the solution
    res = evaluate("    return 0\n" + patch + "builtins.len = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n")
    assert not res.correct and res.reason in ("failed", "error")


def test_always_equal_object_does_not_pass():
    response = (
        "    class AlwaysEqual(int):\n"
        "        def __eq__(self, other): return True\n"
        "        def __ne__(self, other): return False\n"
        "        def __sub__(self, other): return 0\n"
        "    class Weird:\n"
        "        def __eq__(self, other): return True\n"
        "    return Weird() if a > 0 else AlwaysEqual(7)\n"
    )
    res = evaluate(response)
    assert not res.correct and res.reason in ("error", "failed")


def test_shadowing_builtins_or_prompt_helpers_does_not_pass():
    res = evaluate("    return 0\ndef abs(x):\n    return 0\n")
    assert not res.correct and res.reason == "failed"
    poly = SimpleNamespace(  # HumanEval/32: the tests judge find_zero with the prompt's own poly
        prompt=(
            "def poly(xs: list, x: float):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
            "def find_zero(xs: list):\n    \"\"\"A zero of the polynomial.\"\"\"\n"
        ),
        tests="def check(candidate):\n    assert abs(poly([-6, 11, -6, 1], candidate([-6, 11, -6, 1]))) < 1e-4\n",
        entry_point="find_zero",
    )
    cheat = "```python\ndef poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 123.0\n```"
    assert evaluate(cheat, poly).reason == "failed"
    assert evaluate("```python\ndef find_zero(xs):\n    return 1.0\n```", poly).correct


def test_a_check_defined_by_the_response_is_not_used():
    row = SimpleNamespace(prompt="Add.", tests="assert add(1, 2) == 3\n", entry_point="add")
    res = evaluate("```python\ndef check(candidate):\n    pass\n\ndef add(a, b):\n    return 0\n```", row)
    assert res.reason == "failed"


def test_forging_the_verdict_channel_does_not_pass():
    response = (
        "    return 0\n"
        "import os\n"
        "for fd in range(0, 64):\n"
        "    for line in (b'JUDGE 0 passed 0\\n', b'INIT 0 0\\n'):\n"
        "        try:\n            os.write(fd, line)\n"
        "        except OSError:\n            pass\n"
        "import gc\nsecrets = [o for o in gc.get_objects() if isinstance(o, dict) and 'nonce' in o]\n"
        "assert not secrets, 'the nonce is visible to the solution'\n"
        "os._exit(0)\n"
    )
    res = evaluate(response)
    assert not res.correct
    assert "nonce is visible" not in res.detail


@needs_setuid
def test_the_judge_survives_a_solution_that_kills_everything_it_can():
    response = (
        "    return a + b\n"
        "import os, signal\n"
        "for pid in range(1, 4096):\n"
        "    if pid != os.getpid():\n"
        "        try:\n            os.kill(pid, signal.SIGKILL)\n"
        "        except OSError:\n            pass\n"
    )
    res = evaluate(response)
    assert res.correct, res  # the judge (another uid) was out of reach, so the honest answer still counts


# --- hostile programs: resources ------------------------------------------------------


@pytest.mark.parametrize("response", ["    return a + b\nwhile True:\n    pass\n", "    while True:\n        pass\n"],
                         ids=["at-import", "in-candidate"])
def test_infinite_loop_times_out(response):
    t0 = time.perf_counter()
    res = evaluate(response, limits=SHORT)
    assert res.reason == "timeout" and not res.correct
    assert SHORT.wall_seconds <= time.perf_counter() - t0 < SHORT.wall_seconds + GRACE


def test_cpu_limit_kills_before_the_wall_clock():
    limits = cv.SandboxLimits(wall_seconds=20, cpu_seconds=1)
    t0 = time.perf_counter()
    res = evaluate("    while True:\n        pass\n", limits=limits)
    assert res.reason == "timeout" and "CPU" in res.detail
    assert time.perf_counter() - t0 < 6


def test_sleeping_program_hits_the_wall_clock():
    res = run("import time\ntime.sleep(60)\n", SHORT)
    assert res.timed_out and res.returncode is None


@needs_setuid
@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_fork_bomb_is_contained(iso):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res = evaluate("    return a + b\n" + bomb, limits=SHORT, iso=iso)
    assert not res.correct and res.reason == "timeout"
    # fork() failed at max_processes; the harness is still responsive; nothing is left
    res = run(
        f"import os\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        import time; time.sleep(30)\n    n += 1\nprint(n)\n",
        iso=iso,
    )
    assert 0 < int(res.stdout) < FAST.max_processes
    assert evaluate(ADD_COMPLETION, iso=iso).correct


@needs_setuid
def test_shell_fork_bomb_is_contained():
    shell = "/bin/bash" if os.path.exists("/bin/bash") else pytest.skip("no bash")
    res = run(
        "import os, subprocess, time\n"
        f"p = subprocess.Popen([{shell!r}, '-c', 'bomb() {{ bomb | bomb & }}; bomb'])\n"
        "time.sleep(1.0)\n"
        "uid = str(os.getuid()).encode()\n"
        "n = 0\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n        status = open(f'/proc/{pid}/status', 'rb').read()\n"
        "    except OSError:\n        continue\n"
        "    n += status.split(b'\\nUid:')[1].split()[0] == uid\n"
        "print(n, flush=True)\n",
        SHORT,
    )
    assert res.stdout.strip(), res
    assert 0 < int(res.stdout) <= FAST.max_processes


@pytest.mark.parametrize(
    "response",
    ["    return a + b\nx = bytearray(10**10)\n", "    chunks = []\n    while True:\n        chunks.append(bytearray(10**7))\n"],
    ids=["one-big", "growing"],
)
def test_memory_bomb(response):
    res = evaluate(response)
    assert res.reason == "memory" and not res.correct, res


@needs_setuid
@needs_cgroup
def test_cgroup_caps_the_total_memory_of_forked_children():
    limits = cv.SandboxLimits(wall_seconds=8, memory_bytes=256 * 2**20, total_memory_bytes=192 * 2**20)
    prog = (
        "import os, time\n"
        "pids = []\n"
        "for _ in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        b = bytearray(120 * 2**20)\n"  # touches the pages: 6 x 120 MiB > 192 MiB
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "print(sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids))\n"
    )
    res = run(prog, limits)
    assert res.oom_killed, res
    assert b"-9" in res.stdout  # some children were OOM-killed (SIGKILL)


def test_output_is_capped_and_drained():
    limits = cv.SandboxLimits(wall_seconds=10, max_output_bytes=1000)
    t0 = time.perf_counter()
    res = run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 100_000)\nprint('done', file=sys.stderr)\n",
              limits)
    assert res.returncode == 0 and len(res.stdout) == 1000 and res.stdout_truncated
    assert res.stderr == b"done\n"
    assert time.perf_counter() - t0 < 5


def test_file_size_limit():
    res = run(
        "import errno\ntry:\n    open('big', 'wb').write(b'x' * (2 * 2**20))\n    print('WROTE')\n"
        "except OSError as e:\n    print('EFBIG' if e.errno == errno.EFBIG else e)\n"
    )
    assert res.stdout.strip() == b"EFBIG"


# --- hostile programs: escaping ------------------------------------------------------


@needs_ns
def test_no_network_even_to_localhost():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        res = run(
            "import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('8.8.8.8', 53), ('1.1.1.1', 443)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=1)\n        print('CONNECTED', addr)\n"
            "    except OSError as e:\n        print('BLOCKED', e.errno)\n"
        )
        assert res.stdout.count(b"BLOCKED") == 3 and b"CONNECTED" not in res.stdout, res.stdout
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    # a graded response that phones home at import fails instead of passing
    res = evaluate(f"    return a + b\nimport socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    assert res.reason == "error" and "unreachable" in res.detail.lower(), res


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_environment_is_clean_and_secrets_unreachable(iso, monkeypatch):
    _check_mode(iso, setuid=True)
    monkeypatch.setenv("UNIOPD_TEST_SECRET", "hunter2-sandbox-secret")
    res = run(
        "import os\n"
        "print(sorted(os.environ))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid()), '1']:\n"
        "    try:\n        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print(pid, 'denied', e.errno)\n"
        f"for pid in [{os.getpid()}, {os.getppid()}]:\n"
        "    try:\n        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print(pid, 'denied', e.errno)\n",
        iso=iso,
    )
    assert b"hunter2" not in res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == b"['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR', 'UNIOPD_MAX_MESSAGE']"


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_cannot_write_outside_its_directory(iso):
    _check_mode(iso, setuid=True)
    outside = tempfile.mkdtemp(prefix="uniopd-test-outside-")
    os.chmod(outside, 0o755)
    victim = os.path.join(outside, "victim.txt")
    with open(victim, "w") as f:
        f.write("original")
    evil_tmp = os.path.join(tempfile.gettempdir(), f"uniopd-test-evil-{os.getpid()}")
    try:
        res = run(
            "import os\n"
            f"for path, mode in [({outside + '/new.txt'!r}, 'w'), ({victim!r}, 'a'), ({victim!r}, 'w'),"
            f" ({evil_tmp!r}, 'w'), ('/etc/evil', 'w'), ('/usr/evil', 'w')]:\n"
            "    try:\n        open(path, mode).write('pwned')\n        print('WROTE', path)\n"
            "    except OSError as e:\n        print('DENIED', e.errno)\n"
            f"for fn in (lambda: os.remove({victim!r}), lambda: os.chmod({victim!r}, 0o777),"
            f" lambda: os.rename({victim!r}, {victim + '2'!r})):\n"
            "    try:\n        fn()\n        print('CHANGED')\n"
            "    except OSError as e:\n        print('DENIED', e.errno)\n"
            "open('inside.txt', 'w').write('fine')\n"
            "print('INSIDE', open('inside.txt').read())\n",
            iso=iso,
        )
        wrote = [line for line in res.stdout.splitlines() if line.startswith(b"WROTE")]
        if iso.namespaces:  # the host /tmp is not even in its tree
            assert not wrote and res.stdout.count(b"DENIED") == 9, res.stdout
        else:  # world-writable /tmp is writable, and cleaned up after the run (checked below)
            assert wrote == [b"WROTE " + evil_tmp.encode()] and res.stdout.count(b"DENIED") == 8, res.stdout
        assert b"CHANGED" not in res.stdout
        assert b"INSIDE fine" in res.stdout
        with open(victim) as f:
            assert f.read() == "original"
        assert os.listdir(outside) == ["victim.txt"]
        assert not os.path.exists(evil_tmp)
    finally:
        for p in (victim, evil_tmp):
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(outside)


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_world_writable_dirs_are_cleaned(iso):
    _check_mode(iso, setuid=True)
    marker = f"uniopd-test-litter-{os.getpid()}"
    res = run(
        "import os\n"
        f"for d in ('/tmp', '/var/tmp', '/dev/shm', os.getcwd()):\n"
        "    try:\n"
        f"        open(os.path.join(d, {marker!r}), 'w').write('x')\n        print('LITTER', d)\n"
        "    except OSError as e:\n        print('DENIED', d, e.errno)\n",
        iso=iso,
    )
    assert b"LITTER" in res.stdout  # at least its own dir
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(d, marker)), d


@needs_ns
def test_host_filesystem_is_not_visible():
    res = run(
        "import os\n"
        f"print(os.path.exists({os.path.abspath(__file__)!r}), os.path.exists({cv._HARNESS!r}),"
        " os.path.exists('/root/.bashrc'), sorted(os.listdir('/')))\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    first, procs = res.stdout.splitlines()
    assert first.startswith(b"False False False")
    assert procs == b"['2']"  # hidepid: only itself (the supervisor is pid 1, invisible)


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_cannot_kill_its_parent_or_the_grader(iso):
    _check_mode(iso, setuid=True)
    grader = os.getpid()
    res = run(
        "import os, signal\n"
        f"targets = [os.getppid(), {grader}, 1]\n"
        "for pid in targets:\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('KILLED', pid)\n"
        "    except OSError as e:\n        print('DENIED', e.errno)\n"
        "pg = os.getpgid(os.getppid())\n"  # 0 across the PID namespace boundary: nothing to aim at
        "if pg > 0 and pg != os.getpgrp():\n"
        "    try:\n        os.killpg(pg, signal.SIGKILL)\n        print('KILLEDPG')\n"
        "    except OSError as e:\n        print('DENIED', e.errno)\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\n"  # all it may signal: its own uid's processes only
        "except ProcessLookupError:\n    pass\n"
        "print('ALIVE', flush=True)\n",
        iso=iso,
    )
    assert b"KILLED" not in res.stdout, res.stdout
    assert res.stdout.count(b"DENIED") >= 3 and b"ALIVE" in res.stdout
    res = evaluate("    return a + b\nimport os\nos.kill(os.getppid(), 9)\n", iso=iso)
    assert not res.correct and "PermissionError" in res.detail
    assert evaluate(ADD_COMPLETION, iso=iso).correct  # the grader is intact


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_daemonized_grandchild_is_killed(iso):
    _check_mode(iso, setuid=True)
    marker = f"uniopd-test-daemon-{os.getpid()}-{time.monotonic_ns()}"
    daemon = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        devnull = os.open('/dev/null', os.O_RDWR)\n"
        "        for fd in (0, 1, 2):\n            os.dup2(devnull, fd)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', {marker!r}])\n"
        "    os._exit(0)\n"
    )
    res = run(daemon + "print('parent done')\n", iso=iso)
    assert res.returncode == 0 and b"parent done" in res.stdout
    res = evaluate("    return a + b\n" + daemon, iso=iso)
    assert res.correct  # harmless, and gone afterwards:
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert marker.encode() not in f.read(), f"daemon {pid} survived"
        except OSError:
            continue


# --- speed, concurrency ----------------------------------------------------------------


def test_a_normal_run_is_fast():
    evaluate(ADD_COMPLETION)  # warm the page cache
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert evaluate(ADD_COMPLETION).correct
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.5, times


def test_concurrent_runs_use_separate_slots():
    results: list = []

    def work(i: int) -> None:
        for j in range(3):
            resp = ADD_COMPLETION if (i + j) % 2 == 0 else "    return a * b\n"
            results.append((resp == ADD_COMPLETION, cv.evaluate(resp, ADD, FAST).correct))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all(expected == got for expected, got in results), results


# --- batches: many programs in one sandbox ---------------------------------------------

# One of each kind of ending; every program must get in a batch the verdict it gets alone.
BATCH = [
    ADD_COMPLETION,
    "    while True:\n        pass\n",  # timeout, next to programs that must not suffer from it
    "    return a - b\n",
    "    import os\n    os._exit(0)\n",
    "    x = bytearray(10**10)\n",  # memory
    "    return a +\n",  # syntax error, never reaches the sandbox
    "    import os\n    os.kill(os.getppid(), 9)\n    return a + b\n",  # the judge is another uid
    "    print('all tests passed')\n    raise SystemExit(0)\n",
    "import os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(60)\n",  # a daemon; no add
    ADD_COMPLETION,
]


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_a_batch_gives_every_program_its_own_verdict(iso):
    alone = [evaluate(r, limits=SHORT, iso=iso).reason for r in BATCH]
    t0 = time.perf_counter()
    together = cv.evaluate_many([(r, ADD) for r in BATCH], SHORT, isolation=iso, parallel=2)
    elapsed = time.perf_counter() - t0
    assert [r.reason for r in together] == alone, (alone, together)
    assert alone[:5] == ["passed", "timeout", "failed", "crashed", "memory"] and alone[-1] == "passed"
    assert elapsed < 2 * SHORT.wall_seconds + GRACE  # one loop: at most two wall limits (one per slot)


@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_hostile_loops_in_a_batch_run_side_by_side(iso):
    loop = "    while True:\n        pass\n"
    items = [(loop, ADD), (ADD_COMPLETION, ADD), (loop, ADD), (ADD_COMPLETION, ADD)]
    # Long loops, so that serial (≥ 2 × 4 s) and side by side (4 s + start-up) stay apart even when
    # the machine is loaded: a 1.5 s limit took 5.0 s side by side beside a test run and a benchmark.
    limits = dataclasses.replace(SHORT, wall_seconds=4.0)
    t0 = time.perf_counter()
    out = cv.evaluate_many(items, limits, isolation=iso, parallel=2)
    assert [r.reason for r in out] == ["timeout", "passed", "timeout", "passed"]
    assert time.perf_counter() - t0 < 2 * limits.wall_seconds  # serial could not: the two loops overlapped


@needs_setuid
@pytest.mark.parametrize("iso", MODES, ids=MODE_IDS)
def test_programs_of_a_batch_cannot_reach_each_other(iso):
    """Program 0 leaves a file, a daemon and a SysV-free trace of itself; program 1, run after
    it in the same sandbox, must find none of them (its answer is right only if so)."""
    marker = f"uniopd-batch-{os.getpid()}-{time.monotonic_ns()}"
    first = (
        "import os, sys\n"
        "open('left.txt', 'w').write('x')\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    devnull = os.open('/dev/null', os.O_RDWR)\n"
        "    for fd in (0, 1, 2):\n        os.dup2(devnull, fd)\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "def add(a, b):\n    return a + b\n"
    )
    second = (
        "import os\n"
        "def add(a, b):\n"
        "    seen = []\n"
        "    for d in ('..', '../..', '../../0', '../../0/s'):\n"
        "        try:\n            seen += os.listdir(d)\n        except OSError:\n            pass\n"
        "    if 'left.txt' in seen:\n        return 'file'\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "        try:\n"
        f"            if {marker!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read():\n"
        "                return 'daemon'\n"
        "        except OSError:\n            pass\n"
        "    return a + b\n"
    )
    out = cv.evaluate_many([(first, ADD), (second, ADD)], FAST, isolation=iso, parallel=1)
    assert [r.reason for r in out] == ["passed", "passed"], out


def test_tests_and_nonces_never_travel_through_the_launcher(monkeypatch):
    """The solution processes are forked from the sandbox's init: what the init holds, a
    solution could read. The tests and nonces go to the judges through pipes of their own."""
    payloads: list = []
    real = cv.runner._boot_payload

    def capture(entry, *args):
        out = real(entry, *args)
        payloads.append(out)
        return out

    monkeypatch.setattr(cv.runner, "_boot_payload", capture)
    secret = f"SECRET{time.monotonic_ns()}"
    row = SimpleNamespace(prompt=ADD.prompt, tests=ADD.tests + f"    assert {secret!r}\n", entry_point="add")
    nonces: list = []
    real_token = cv.grading.secrets.token_hex
    monkeypatch.setattr(cv.grading.secrets, "token_hex", lambda n=None: nonces.append(real_token(n)) or nonces[-1])
    out = cv.evaluate_many([(ADD_COMPLETION, row), ("    return 0\n", row)], FAST)
    assert [r.reason for r in out] == ["passed", "failed"]
    assert payloads and len(nonces) == 2
    for payload in payloads:
        assert secret.encode() not in payload
        assert not any(n.encode() in payload for n in nonces)


@needs_ns
def test_a_solution_finds_no_earlier_verdict_in_its_memory():
    """Program 0 fails an assertion that names a marker (its verdict detail carries the
    test line); program 1 walks every object reachable in its interpreter for it."""
    needle = "ZQXJ71"
    row0 = SimpleNamespace(prompt=ADD.prompt, tests=f"def check(candidate):\n    assert candidate(1, 2) == 4, '{needle}'\n",
                           entry_point="add")
    scan = (
        "import gc\n"
        "def add(a, b):\n"
        "    needle = ''.join(map(chr, [90, 81, 88, 74, 55, 49]))\n"
        "    for o in gc.get_objects():\n"
        "        for r in [o, *gc.get_referents(o)]:\n"
        "            if r is needle:\n                continue\n"
        "            if isinstance(r, str) and needle in r:\n                return 'found'\n"
        "            if isinstance(r, (bytes, bytearray)) and needle.encode() in r:\n                return 'found'\n"
        "    return a + b\n"
    )
    out = cv.evaluate_many([(ADD_COMPLETION, row0), (scan, ADD)], FAST, parallel=1)
    assert out[0].reason == "failed" and needle in out[0].detail
    assert out[1].reason == "passed", out[1]


def test_the_verifier_grades_a_call_in_one_batch(monkeypatch):
    from actors.verifier import Verifier
    from configs.schema import CodeVerifier, DomainConfig

    calls: list = []
    real = cv.runner._run
    monkeypatch.setattr(cv.runner, "_run", lambda job, *a, **k: calls.append(job["mode"]) or real(job, *a, **k))
    verifier = Verifier({"code": DomainConfig(teacher="t", verifier=CodeVerifier(wall_seconds=3.0))})
    texts = [ADD_COMPLETION, "    return a - b\n", "    return b + a\n", "    return a +\n", ADD_COMPLETION]
    out = verifier.verify([_code_rollout(t) for t in texts])
    assert [v.correct for v in out] == [True, False, True, False, True]
    assert calls == ["batch"]  # three distinct compiling programs, one sandbox


# --- pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -(10**40), 1.5, float("inf"), -0.0, "", "héllo\udcff", b"\x00\xff", bytearray(b"ab"),
     [1, [2, (3, {4: {5}})]], (), {"a": frozenset({1, 2})}, 3 - 4j, range(1, 10, 3), {(1, 2): [None]},
     list(range(-5, 50)), [i / 7 for i in range(20)] + [float("inf")], ["", "a,b", "é\udcff", "x"] * 5],
)
def test_codec_roundtrip(value):
    out = cv.decode_value(cv.encode_value(value))
    assert out == value and type(out) is type(value)


def test_codec_converts_and_rejects():
    from collections import Counter, OrderedDict, namedtuple
    from decimal import Decimal
    from fractions import Fraction

    point = namedtuple("point", "x y")
    assert cv.decode_value(cv.encode_value(point(1, 2))) == (1, 2)
    assert type(cv.decode_value(cv.encode_value(Counter("aab")))) is dict
    assert type(cv.decode_value(cv.encode_value(OrderedDict(a=1)))) is dict
    assert cv.decode_value(cv.encode_value(Decimal("1.10"))) == Decimal("1.10")
    assert cv.decode_value(cv.encode_value(Fraction(1, 3))) == Fraction(1, 3)
    assert list(cv.decode_value(cv.encode_value(x * 2 for x in range(3)))) == [0, 2, 4]
    nan = cv.decode_value(cv.encode_value(float("nan")))
    assert nan != nan
    for bad in (object(), lambda: 0, type, [object()]):
        with pytest.raises(TypeError):
            cv.encode_value(bad)
    for junk in (b"", b"X", b"l\x00\x00\x00\x05", b"i\x00\x00\x00\x031e3", b"N\x00", b"d\x00\x00\x00\x01l\x00\x00\x00\x00N",
                 b"L\x00\x00\x00\x031_0", b"L\x00\x00\x00\x00", b"W\x00\x00\x00\x013s\x00\x00\x00\x01a"):
        with pytest.raises((ValueError, TypeError)):
            cv.decode_value(junk)
    deep = b"l\x00\x00\x00\x01" * 1000 + b"N"
    with pytest.raises((ValueError, RecursionError)):
        cv.decode_value(deep)


def test_extract_code():
    assert cv.extract_code("    return x\n") == "    return x\n"  # a bare completion keeps its indentation
    text = "Try:\n```python\ndef f():\n    return 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\n"
    assert cv.extract_code(text, "f").strip().endswith("return 2")
    assert cv.extract_code("<think>```python\ndef f(): pass\n```</think>```python\nx = 1\n```", "f") == "x = 1\n"
    assert cv.extract_code("```python\ndef f():\n    return 1", "f").startswith("def f()")  # unterminated fence
    joined = cv.extract_code("```python\nimport math\n```\n```python\ny = 2\n```", "f")
    assert "import math" in joined and "y = 2" in joined


def test_build_solution():
    prompt = 'from typing import List\n\ndef f(xs: List[int]) -> int:\n    """Doc."""\n'
    assert cv.build_solution("    return 1\n", prompt, "f") == prompt + "    return 1\n"
    full = cv.build_solution("```python\ndef f(xs: List[int]) -> int:\n    return 2\n```", prompt, "f")
    assert full.startswith(prompt.rstrip()) and full.rstrip().endswith("return 2")  # keeps the prompt's imports
    assert cv.build_solution("def f(x):\n    return 3\n", "Write f.", "f") == "def f(x):\n    return 3\n"
    assert cv.build_solution("   \n", prompt, "f") is None
