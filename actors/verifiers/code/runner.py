"""Running sandboxed programs: launch bwrap and the supervisor, feed it, read it, clean up.

:func:`_run` is the grader's half of one sandbox run (one program, or a batch of judged
programs): it claims the run slots and memory cgroups (``isolation.py``), starts
``bwrap ... -- python -I -S -B -c BOOT`` with the sandbox-side modules (``codec.py``,
``protocol.py``, ``judge.py``, ``supervisor.py``) shipped on stdin as code objects -- the
sandboxed interpreters neither import the grader's modules nor see the repository --,
reads the capped outputs and the supervisor's records, enforces the wall-clock backstop
(SIGKILL to bwrap, which takes the namespace with it), and cleans up whatever is left.
:func:`detect_isolation` probes once which isolation works here.
"""

from __future__ import annotations

import logging
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .isolation import (BWRAP_MISSING, Isolation, SandboxLimits, _acquire_slots, _cgroup_base, _cgroup_create,
                        _cgroup_oom_killed, _cgroup_remove, _processes_of, _python, _sandbox_python, _warn_once,
                        bwrap_argv)
from .supervisor import _BOOT_STDIN, _CHILD_ENV_PATH

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
# The sandbox-side modules, in the order they run in the sandbox's one namespace.
_SANDBOX_MODULES = ("codec.py", "protocol.py", "judge.py", "supervisor.py")
_HARNESS = str(_PACKAGE / "supervisor.py")
_harness_lock = threading.Lock()
_harness_code: list[bytes] | None = None


def _harness() -> list[bytes]:
    """The sandbox-side modules, compiled once (each with its own file name), as marshal bytes."""
    global _harness_code
    with _harness_lock:
        if _harness_code is None:
            _harness_code = [marshal.dumps(compile((_PACKAGE / name).read_text("utf-8"), str(_PACKAGE / name), "exec",
                                                   dont_inherit=True)) for name in _SANDBOX_MODULES]
        return _harness_code


def _boot_payload(entry: str, *args: object) -> bytes:
    return marshal.dumps({"code": _harness(), "entry": entry, "args": list(args)})


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed program did. ``returncode`` is None when the run timed out or the
    sandbox failed; negative for a signal (as in subprocess)."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float
    oom_killed: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    sandbox_error: str = ""


# --- isolation detection ---------------------------------------------------------------

_detect_lock = threading.Lock()
_detected: Isolation | None = None


def detect_isolation(refresh: bool = False) -> Isolation:
    """The strongest isolation that works here, probed once per process (about 0.2 s)."""
    global _detected
    with _detect_lock:
        if _detected is not None and not refresh:
            return _detected
        root = os.geteuid() == 0
        cgroup = root and os.environ.get("UNIOPD_SANDBOX_NO_CGROUP", "") in ("", "0") and _cgroup_base() is not None
        candidates = []
        if root:
            candidates += [Isolation(True, True, cgroup), Isolation(False, True, cgroup)]
        candidates.append(Isolation(False, False, False))
        limits = SandboxLimits(wall_seconds=10.0)
        chosen, failures = None, []
        for iso in candidates:
            for attempt in ([iso, replace(iso, cgroup=False)] if iso.cgroup else [iso]):
                try:  # a trivial program, through the whole machinery
                    res = _run(_program_job("import sys; sys.stdout.write('ok')"), limits, attempt).result
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{attempt}: {type(e).__name__}: {e}")
                    continue
                if res.returncode == 0 and res.stdout == b"ok":
                    chosen = attempt
                    break
                failures.append(f"{attempt}: {res.sandbox_error or res.returncode} {res.stderr[-300:]!r}")
            if chosen is not None:
                break
        for failure in failures:
            logger.debug("code sandbox probe failed: %s", failure)
        if chosen is None:
            chosen = candidates[-1]
            logger.error("code sandbox: even the plainest set-up fails here; every code response will be "
                         "graded harness_error: %s", failures)
        if not chosen.namespaces:
            why = BWRAP_MISSING if any(BWRAP_MISSING in f for f in failures) else (
                "bwrap could not create namespaces (need root with CAP_SYS_ADMIN)")
            _warn_once("ns", "code sandbox: no namespaces: programs are NOT network-isolated and see the host "
                       "filesystem (%s); see actors/verifiers/code/__init__.py", why)
        if not chosen.setuid and root:
            logger.error("code sandbox: running as root but cannot switch to an unprivileged uid: untrusted "
                         "programs run AS ROOT with only rlimits; do not train on this machine")
        elif not chosen.setuid:
            _warn_once("uid", "code sandbox: not root, programs run as the grader's own user: no fork-bomb "
                       "containment, they can signal the grader, and verdicts are forgeable")
        if chosen.setuid and not chosen.cgroup:
            _warn_once("cg", "code sandbox: no memory cgroup: a run's total memory is bounded only by "
                       "max_processes x memory_bytes")
        logger.info("code sandbox isolation: %s", chosen)
        _detected = chosen
        return chosen


def _kill_processes_of(uids: tuple[int, ...], timeout: float = 2.0) -> int:
    """SIGKILL every process of ``uids``: first one kill(-1) sweep per uid by a helper that
    drops to that uid (atomic against a fork bomb: no fork completes during the sweep), then
    by pid through pidfds (a recycled pid is never hit) until none is left."""
    killed = 0
    deadline = time.monotonic() + timeout
    if os.geteuid() == 0 and all(u > 0 for u in uids) and _processes_of(uids):
        try:
            subprocess.run([_python(), "-I", "-S", "-B", "-c", _BOOT_STDIN],
                           input=_boot_payload("_kill_uids", list(uids)),
                           capture_output=True, timeout=timeout, env={"PATH": _CHILD_ENV_PATH}, cwd="/")
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("code sandbox: kill helper failed: %s", e)
    while True:
        pids = _processes_of(uids)
        if not pids or time.monotonic() > deadline:
            return killed
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pid in _processes_of(uids):  # still ours now that the pidfd pins it
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.01)



# --- running --------------------------------------------------------------------------


def _program_job(source: str) -> dict:
    return {"mode": "program", "filename": "program.py", "source": source}


def _limits_dict(limits: SandboxLimits) -> dict:
    return {k: v for k, v in asdict(limits).items() if v is not None}


@dataclass
class _RawRun:
    result: RunResult
    verdict: bytes
    oom_killed: list[bool]  # per slot (program)


def _run(job: dict, limits: SandboxLimits, isolation: Isolation, cfgs: list[bytes] | None = None,
         wall_seconds: float | None = None) -> _RawRun:
    """Launch, supervise, collect and clean up one sandboxed run: one program (``job["mode"]
    == "program"``), or a batch of judged programs (``"batch"``: one slot -- uids and memory
    cgroup -- per entry of ``job["programs"]``, and one judge config of ``cfgs`` each, which
    reaches its judge through a pipe of its own, never through the supervisor's memory)."""
    t0 = time.perf_counter()
    batch = job["mode"] == "batch"
    n = len(job["programs"]) if batch else 1
    cfgs = cfgs or []
    slots = _acquire_slots(n) if isolation.setuid else []
    uids = [u for slot in slots for u in slot.uids]
    cgroups: list[str | None] = []
    host_dir = None
    proc = None
    vr = vw = -1
    cfg_pipes: list[list[int]] = []
    cg_fds: list[int] = []  # per program: its cgroup's cgroup.procs, written by the supervisor
    timed_out = False
    streams = {"stdout": bytearray(), "stderr": bytearray(), "verdict": bytearray()}
    dropped = {"stdout": 0, "stderr": 0, "verdict": 0}
    try:
        if isolation.cgroup:
            for slot in slots:
                try:
                    cgroups.append(_cgroup_create(limits, slot))
                except OSError as e:
                    cgroups.append(None)
                    _warn_once("cgcreate", "code sandbox: cannot create a memory cgroup (%s); going on without", e)
        cg_fds = [os.open(f"{c}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) if c else -1 for c in cgroups]
        cg_fds += [-1] * (n - len(cg_fds))
        if not isolation.namespaces:
            host_dir = tempfile.mkdtemp(prefix="uniopd-sbx-")
            os.chmod(host_dir, 0o755)
        vr, vw = os.pipe()
        cfg_pipes = [list(os.pipe()) for _ in cfgs]
        full_job = dict(job)
        full_job.update(
            parent_pid=os.getpid(),
            verdict_fd=vw,
            python=_sandbox_python(isolation),
            namespaces=isolation.namespaces,
            uids=list(slots[0].uids) if slots and not batch else None,
            host_dir=host_dir,
            cgroup_fd=cg_fds[0] if not batch else -1,
            limits=_limits_dict(limits),
        )
        if batch:
            full_job["programs"] = [
                dict(p, uids=list(slots[k].uids) if slots else None, cfg_fd=cfg_pipes[k][0], cgroup_fd=cg_fds[k])
                for k, p in enumerate(job["programs"])
            ]
        payload = _boot_payload("_supervisor_main", full_job)
        # The supervisor runs the programs' interpreter: solution and judge are forked from
        # it, so they import the stdlib the sandbox uids can read (see _sandbox_python).
        argv = [full_job["python"], "-I", "-S", "-B", "-c", _BOOT_STDIN]
        proc = subprocess.Popen(
            bwrap_argv(limits) + argv if isolation.namespaces else argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(vw, *(r for r, _ in cfg_pipes), *(fd for fd in cg_fds if fd >= 0)),
            env={"PATH": _CHILD_ENV_PATH, "LANG": "C.UTF-8"},
            cwd="/",
            start_new_session=True,
        )
        os.close(vw)
        vw = -1
        for fd in cg_fds:
            if fd >= 0:
                os.close(fd)
        cg_fds = []
        inputs = {proc.stdin.fileno(): payload}
        for pair, cfg in zip(cfg_pipes, cfgs):
            os.close(pair[0])
            inputs[pair[1]] = cfg
            pair[:] = [-1, -1]  # _pump owns the write end from here, and closes it
        deadline = t0 + (wall_seconds or limits.wall_seconds)
        timed_out = _pump(proc, inputs, vr, streams, dropped, limits, deadline)
        if timed_out:
            _killpg(proc.pid)
        proc.wait()
    finally:
        for fd in (vr, vw, *(fd for pair in cfg_pipes for fd in pair), *cg_fds):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.poll() is None:
            _killpg(proc.pid)
            proc.wait()
        if slots:
            # Backstop: the supervisor (pid 1) kills everything on a normal exit; after a
            # timeout (or without namespaces) whatever survived is killed here.
            if timed_out or not isolation.namespaces or proc is None or proc.returncode != 0:
                _kill_processes_of(tuple(uids))
        oom = [bool(c) and _cgroup_oom_killed(c) for c in cgroups] + [False] * (n - len(cgroups))
        for c in cgroups:
            if c:
                _cgroup_remove(c)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
            if slots:
                _remove_files_of(tuple(uids))
        for slot in slots:
            slot.release()
    returncode, error = None, ""
    verdict = bytes(streams["verdict"])
    for line in _top_lines(verdict):
        if line.startswith(b"ERROR "):
            error = line[6:].decode("utf-8", "replace")
        elif line.startswith(b"INIT ") and not batch:
            parts = line.split()
            if len(parts) == 3 and parts[1] != b"-":
                returncode = os.waitstatus_to_exitcode(int(parts[1]))
    if timed_out:
        returncode = None
    elif not error and proc is not None and proc.returncode != 0:
        error = f"sandbox exited with {proc.returncode}: {bytes(streams['stderr'][-500:]).decode('utf-8', 'replace')}"
    result = RunResult(
        returncode=returncode,
        stdout=bytes(streams["stdout"]),
        stderr=bytes(streams["stderr"]),
        timed_out=timed_out,
        seconds=time.perf_counter() - t0,
        oom_killed=oom[0],
        stdout_truncated=dropped["stdout"] > 0,
        stderr_truncated=dropped["stderr"] > 0,
        sandbox_error=error,
    )
    return _RawRun(result, verdict, oom)


@dataclass(frozen=True)
class _Record:
    """What the supervisor reported of one program of a batch."""

    sol_status: str  # wait status of the solution process, or "-"
    judge_status: str
    timed_out: bool
    seconds: float
    verdict: bytes  # what the judge wrote on its verdict pipe
    stderr: bytes  # solution's and judge's, capped


def _verdict_items(verdict: bytes):
    """The supervisor's lines on the verdict pipe (ERROR, INIT, DONE, PROG), each with the bytes
    of its record for a PROG line (contents written by sandboxed processes, never parsed
    as lines) or None."""
    pos = 0
    while pos < len(verdict):
        end = verdict.find(b"\n", pos)
        if end < 0:
            return
        line = verdict[pos:end]
        pos = end + 1
        parts = line.split()
        body = None
        if parts[:1] == [b"PROG"] and len(parts) == 8 and all(p.isdigit() for p in parts[1:2] + parts[4:]):
            size = int(parts[6]) + int(parts[7])
            body, pos = verdict[pos : pos + size], pos + size
            if len(body) < size:
                return  # cut short (the sandbox was killed while writing)
        yield line, body


def _top_lines(verdict: bytes):
    return (line for line, _ in _verdict_items(verdict))


def _batch_records(verdict: bytes) -> dict[int, _Record]:
    out: dict[int, _Record] = {}
    for line, body in _verdict_items(verdict):
        if body is not None:
            parts = line.split()
            nv = int(parts[6])
            out[int(parts[1])] = _Record(parts[2].decode(), parts[3].decode(), parts[4] == b"1",
                                         int(parts[5]) / 1000, body[:nv], body[nv:])
    return out


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc: subprocess.Popen, inputs: dict[int, bytes], vr: int, streams: dict, dropped: dict,
          limits: SandboxLimits, deadline: float) -> bool:
    """Feed ``inputs`` (fd → bytes; each fd is closed once written, or when its reader is
    gone), read the capped outputs until EOF; True if the deadline passed first."""
    assert proc.stdin and proc.stdout and proc.stderr
    caps = {"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes, "verdict": 1 << 20}
    sel = selectors.DefaultSelector()
    pending = {fd: memoryview(data) for fd, data in inputs.items()}
    for fd in pending:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE, "in")
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(vr, selectors.EVENT_READ, "verdict")

    def close_input(fd: int) -> None:
        if fd in pending:
            del pending[fd]
            if fd in sel.get_map():
                sel.unregister(fd)
            if fd == proc.stdin.fileno():
                proc.stdin.close()
            else:
                os.close(fd)

    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.perf_counter()
            if now >= deadline:
                return True
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # sandbox gone, a straggler holds a pipe: the backstop will kill it
            timeout = min(deadline - now, 0.1 if exited_at is None else 0.05)
            for key, _ in sel.select(timeout):
                name = key.data
                if name == "in":
                    view = pending[key.fd]
                    try:
                        n = os.write(key.fd, view[:65536])
                        pending[key.fd] = view = view[n:]
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        close_input(key.fd)
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = streams[name]
                room = caps[name] - len(buf)
                if room > 0:
                    buf += chunk[:room]
                dropped[name] += max(0, len(chunk) - max(room, 0))
    finally:
        sel.close()
        for fd in list(pending):
            close_input(fd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if not f.closed:
                f.close()
    return False


def _remove_files_of(uids: tuple[int, ...]) -> None:
    """Without a private /tmp: delete what the slot uids left in the world-writable dirs."""
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid in uids:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
            except OSError:
                continue


def run_program(source: str, limits: SandboxLimits | None = None, *, isolation: Isolation | None = None) -> RunResult:
    """Run ``source`` as ``python -I -S -B program.py`` in the sandbox (cwd = its private dir).

    The exit status of an untrusted program is *not* a verdict (it can exit 0 whenever it
    likes); graders use :func:`evaluate`, where the verdict comes from the judge process.
    """
    limits = limits or SandboxLimits()
    isolation = isolation or detect_isolation()
    return _run(_program_job(source), limits, isolation).result

