"""The supervisor inside the sandbox: runs one program, or a batch of judged programs.

``bwrap`` (bubblewrap, see ``isolation.py``) gives the supervisor new PID, network, mount,
IPC and UTS namespaces, an empty root of read-only bind mounts under ``/r`` with a fresh
``/proc``, ``/dev`` and size-capped tmpfs ``/tmp``, and makes it pid 1 (``--as-pid-1``):
when it exits the kernel kills every process left inside, daemonised or not, and bwrap
dies with the grader (``--die-with-parent``). What bwrap does not do stays here, each a
line or two (:func:`_enter_root`): ``chroot`` into ``/r`` (the kernel refuses
``CLONE_NEWUSER`` to a chrooted process, so a program cannot create a user namespace;
bwrap's ``--disable-userns`` needs a user namespace of its own, which maps a single uid),
``/proc`` remounted ``hidepid=2`` (a program sees only its own processes), the tmpfs's
inode cap, and the loopback interface without its address and down (bwrap brings ``lo``
up: programs of a batch could talk to each other over 127.0.0.1).

Then, as root with the few capabilities bwrap left it, the supervisor forks each solution
and judge, which confine themselves in :func:`_spawn`: fds, their program's memory cgroup
(an fd opened by the grader), rlimits, ``nice``, ``oom_score_adj``, and the slot's
unprivileged uid (which also clears every capability). A batch (:func:`_batch_main`) forks
a *zygote* first, before any judge config exists in the supervisor, so no test, nonce or
verdict is ever in the memory a solution inherits. Without namespaces (degraded mode, no
bwrap) the same code runs as a child subreaper of the grader, in a host temporary dir.

Runs inside the sandbox (shipped as a code object by ``runner.py``, in one namespace with
``codec.py``, ``protocol.py`` and ``judge.py``); imports only ``os`` and ``sys`` at module
level. Its records on the verdict pipe are parsed by ``runner.py``.
"""

from __future__ import annotations

import os
import sys

if __name__ != "uniopd_sandbox":  # in the sandbox, the shipped modules share one namespace
    from .codec import _write_all
    from .judge import _judge_main
    from .protocol import _JUDGE_CFG_FD, _JUDGE_RFD, _JUDGE_VERDICT_FD, _JUDGE_WFD, _SOL_RFD, _SOL_WFD, _solution_main

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 2, 4, 8, 32
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_SIOCSIFFLAGS, _SIOCSIFADDR = 0x8914, 0x8916
SANDBOX_ROOT = "/r"  # where bwrap builds the programs' root; the supervisor chroots into it
_CHILD_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


def _libc_call(name: str, *args) -> None:
    """A libc call the standard library lacks (``mount``, ``prctl``); OSError on failure."""
    import ctypes

    fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _prctl(option: int, arg: int) -> None:
    import ctypes

    _libc_call("prctl", option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _remount(fstype: str, target: str, flags: int, options: str) -> None:
    import ctypes

    _libc_call("mount", fstype.encode(), target.encode(), fstype.encode(),
               ctypes.c_ulong(_MS_REMOUNT | flags), options.encode())


def _enter_root(job: dict) -> None:
    """What bwrap leaves to us (module doc): chroot, hidepid, the inode cap, ``lo`` down."""
    import fcntl
    import socket
    import struct

    os.chroot(SANDBOX_ROOT)
    os.chdir("/")
    # gid=0: the supervisor (gid 0) keeps seeing the programs, which run with their own gids
    _remount("proc", "/proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2,gid=0")
    lim = job["limits"]
    _remount("tmpfs", "/tmp", _MS_NOSUID | _MS_NODEV, f"size={lim['tmpfs_bytes']},nr_inodes={lim['tmpfs_inodes']}")
    # bwrap gave ``lo`` 127.0.0.1 and brought it up: as a fresh network namespace has it, with
    # no address and down, every connect fails (ENETUNREACH; EADDRNOTAVAIL for ::1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        no_addr = struct.pack("HH4s8x", socket.AF_INET, 0, bytes(4))
        fcntl.ioctl(s, _SIOCSIFADDR, struct.pack("16s", b"lo") + no_addr)  # 0.0.0.0: deletes the address
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", 0))  # flags 0: down


def _supervisor_main(job: dict) -> int:
    """Entry point of a run (from the trusted grader): set up what is ours, run, report."""
    import signal

    vfd = job["verdict_fd"]
    try:
        if job["namespaces"]:
            _enter_root(job)  # pid 1 of bwrap's namespaces
        else:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the grader's thread
            if os.getppid() != job["parent_pid"]:
                return 1
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans (daemons) re-parent to us
        _supervise(job)
    except BaseException as e:  # noqa: BLE001
        _report(vfd, f"ERROR supervisor: {type(e).__name__}: {e}")
        return 1
    return 0


def _report(fd: int, line: str) -> None:
    try:
        _write_all(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _supervise(job: dict) -> None:
    """Supervisor: pid 1 of the namespace (or the subreaper without namespaces)."""
    vfd = job["verdict_fd"]
    ns_mode = job["namespaces"]
    base = "/tmp" if ns_mode else job["host_dir"]
    if job["mode"] == "batch":
        statuses: dict[int, int] = {}
        _batch_main(job, base, statuses)
        _teardown(ns_mode, [u for p in job["programs"] if p["uids"] for u in p["uids"]], statuses)
        _report(vfd, "DONE")
        os.close(vfd)
        os._exit(0)
    uids = job["uids"]  # the slot's [solution uid, judge uid] (only the first runs here), or None
    d = base + "/s"
    os.mkdir(d, 0o700)
    with open(d + "/" + job["filename"], "wb") as f:
        f.write(job["source"].encode("utf-8", "replace"))  # (a lone surrogate becomes "?")
    if uids:
        os.chown(d, uids[0], uids[0])
        os.chown(d + "/" + job["filename"], uids[0], uids[0])
    devnull = os.open("/dev/null", os.O_RDONLY)
    spid = _spawn(job, uids[0] if uids else None, d, {0: devnull, 1: 1, 2: 2},
                  argv=[job["python"], "-I", "-S", "-B", job["filename"]], cgroup_fd=job["cgroup_fd"])
    os.close(devnull)
    statuses = {}
    while spid not in statuses:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        statuses[pid] = status
    _teardown(ns_mode, uids or [], statuses)
    _report(vfd, f"INIT {statuses[spid] if spid in statuses else '-'} -")
    os.close(vfd)
    os._exit(0)


def _teardown(ns_mode: bool, uids: list, statuses: dict) -> None:
    """Kill everything that is left of the run, then reap it."""
    import signal
    import time

    if ns_mode:
        if os.getpid() == 1:  # never kill(-1) as root outside a PID namespace
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        for _ in range(50):
            for uid in uids:
                _kill_uid(uid)
            children = _children_of(os.getpid())
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
            _reap(statuses, block=False)
            if not children and not _children_of(os.getpid()):
                break
    _reap(statuses, block=ns_mode)


def _proc_table(proc_dir: str = "/proc"):
    """(pid, {real, effective, saved uid}, live) of every process in ``proc_dir`` (live: not
    a zombie). Used on both sides: the grader's backstops and the supervisor's per-program sweep."""
    for name in os.listdir(proc_dir):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_dir}/{name}/status", "rb") as f:
                data = f.read()
        except OSError:
            continue
        i = data.find(b"\nUid:")
        if i < 0:
            continue
        j = data.find(b"\nState:")
        live = not (j >= 0 and data[j + 7 : j + 16].split()[:1] in ([b"Z"], [b"X"]))
        yield int(name), {int(u) for u in data[i + 5 : data.find(b"\n", i + 1)].split()[:3]}, live


def _uid_has_processes(uid: int, proc_dir: str) -> bool:
    return any(uid in ids for _, ids, _ in _proc_table(proc_dir))


def _reaped():
    """(pid, wait status) of every exited child, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _msg(tag: bytes, k: int, value: int) -> bytes:
    return tag + k.to_bytes(4, "big") + value.to_bytes(4, "big")


def _zygote_main(job: dict, base: str, sock) -> None:
    """Forks the solution processes of a batch, on the supervisor's request, and reports their exits.

    It is forked from the supervisor before any judge exists, so no test, nonce or verdict was
    ever in its memory -- nor in its children's, which a solution could otherwise scan
    (``gc``, ``ctypes``) for the tests of an earlier program of the batch."""
    import select
    import socket

    devnull = os.open("/dev/null", os.O_RDWR)
    progs = job["programs"]
    kids: dict = {}  # pid -> program index
    while True:
        ready = select.select([sock], [], [], 0.01 if kids else None)[0]
        for pid, status in _reaped() if kids else ():
            if pid in kids:
                sock.send(_msg(b"X", kids.pop(pid), status))
        if not ready:
            continue
        msg = sock.recv(9)
        if len(msg) != 9:
            os._exit(0)  # the supervisor closed the socket: the batch is over
        k = int.from_bytes(msg[1:5], "big")
        p = progs[k]
        req_r, req_w = os.pipe()  # judge -> solution
        rep_r, rep_w = os.pipe()  # solution -> judge
        err_r, err_w = os.pipe()  # stderr of solution and judge -> supervisor
        pid = _spawn(job, p["uids"][0] if p["uids"] else None, f"{base}/{k}/s",
                     {0: devnull, 1: devnull, 2: err_w, _SOL_RFD: req_r, _SOL_WFD: rep_w},
                     role="solution", cgroup_fd=p["cgroup_fd"])
        kids[pid] = k
        socket.send_fds(sock, [_msg(b"P", k, pid)], [req_w, rep_r, err_r, err_w])
        for fd in (req_r, req_w, rep_r, rep_w, err_r, err_w):
            os.close(fd)


def _batch_main(job: dict, base: str, statuses: dict) -> None:
    """Grade every program of ``job["programs"]``, up to ``job["parallel"]`` at a time, in
    one namespace: per program its own uids, directory, memory cgroup, IPC-free pipes and
    wall-clock deadline; everything of its uids is killed and its directory removed before
    its record is written. One record per program on the verdict pipe:
    ``PROG k sol_status judge_status timed_out millis len(verdict) len(stderr)`` + bytes."""
    import gc
    import select
    import shutil
    import signal
    import socket
    import time

    vfd = job["verdict_fd"]
    progs = job["programs"]
    wall = float(job["limits"]["wall_seconds"])
    cap = int(job["limits"]["max_output_bytes"])
    # /proc lists this PID namespace only (hidepid spares the supervisor: gid=0)
    proc_dir = "/proc" if job["namespaces"] else None
    gc.freeze()  # forked children then copy fewer pages (a fork and exit costs ~4 ms here)
    isock, zsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zpid = os.fork()
    if zpid == 0:
        try:
            isock.close()
            for p in progs:
                os.close(p["cfg_fd"])
            _zygote_main(job, base, zsock)
        finally:
            os._exit(0)
    zsock.close()
    devnull = os.open("/dev/null", os.O_RDWR)
    todo = list(range(len(progs)))[::-1]
    run: dict = {}  # k -> state
    by_fd: dict = {}  # fd -> (k, "ver" | "err")
    judges: dict = {}  # judge pid -> k

    def recv(want_k: int | None = None):
        while True:
            msg, fds, _, _ = socket.recv_fds(isock, 9, 4)
            if len(msg) != 9:
                raise RuntimeError("the solution zygote is gone")
            tag, k, value = msg[:1], int.from_bytes(msg[1:5], "big"), int.from_bytes(msg[5:9], "big")
            if tag == b"X":
                if k in run and run[k]["sol"] is None:
                    run[k]["sol"] = value
                if want_k is None:
                    return None
                continue
            if tag == b"P" and k == want_k and len(fds) == 4:
                return value, fds
            raise RuntimeError(f"unexpected message {tag!r} from the solution zygote")

    def start(k: int) -> None:
        p = progs[k]
        uids = p["uids"]
        d = f"{base}/{k}"
        os.mkdir(d, 0o755)
        for i, role in enumerate("sj"):
            os.mkdir(f"{d}/{role}", 0o700)
            if uids:
                os.chown(f"{d}/{role}", uids[i], uids[i])
        with open(f"{d}/s/solution.py", "wb") as f:
            f.write(p["source"].encode("utf-8", "replace"))  # (a lone surrogate becomes "?")
        if uids:
            os.chown(f"{d}/s/solution.py", uids[0], uids[0])
        t0 = time.monotonic()
        isock.send(_msg(b"S", k, 0))
        spid, (req_w, rep_r, err_r, err_w) = recv(k)
        ver_r, ver_w = os.pipe()
        jpid = _spawn(job, uids[1] if uids else None, f"{base}/{k}/j",
                      {0: devnull, 1: devnull, 2: err_w, _JUDGE_RFD: rep_r, _JUDGE_WFD: req_w,
                       _JUDGE_VERDICT_FD: ver_w, _JUDGE_CFG_FD: p["cfg_fd"]},
                      role="judge", cgroup_fd=p["cgroup_fd"])
        for fd in (req_w, rep_r, err_w, ver_w, p["cfg_fd"]):
            os.close(fd)
        for fd, name in ((ver_r, "ver"), (err_r, "err")):
            os.set_blocking(fd, False)
            by_fd[fd] = (k, name)
        judges[jpid] = k
        run[k] = {"spid": spid, "jpid": jpid, "sol": None, "judge": None, "t0": t0, "judged_at": None,
                  "ver": bytearray(), "err": bytearray(), "fds": [ver_r, err_r]}

    def read(fd: int) -> bool:
        """Read what is there; False at EOF (the fd is closed) or when nothing is there."""
        k, name = by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not data:
            del by_fd[fd]
            run[k]["fds"].remove(fd)
            os.close(fd)
            return False
        buf = run[k][name]
        buf += data[: max(0, (1 << 16 if name == "ver" else cap) - len(buf))]
        return True

    def finish(k: int, timed_out: bool) -> None:
        st = run[k]
        uids = progs[k]["uids"]
        if uids:
            for uid, done in ((uids[0], False), (uids[1], st["judge"] is not None)):
                # A fork costs ~4 ms here: kill only where something is left. Only root can
                # start a process of that uid, so none can appear after an empty scan.
                if not done and (proc_dir is None or _uid_has_processes(uid, proc_dir)):
                    _kill_uid(uid)
        else:  # no uids: the process groups (both still unreaped, so the pids are theirs)
            for pid, done in ((st["spid"], st["sol"]), (st["jpid"], st["judge"])):
                if done is None:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
        if st["judge"] is None:
            _, st["judge"] = os.waitpid(st["jpid"], 0)
            judges.pop(st["jpid"], None)
        for fd in list(st["fds"]):
            while read(fd):  # the writers are dead: drain to EOF (or give up on a straggler)
                pass
            if fd in by_fd:
                del by_fd[fd]
                os.close(fd)
        shutil.rmtree(f"{base}/{k}", ignore_errors=True)
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        millis = int(1000 * (time.monotonic() - st["t0"]))
        head = (f"PROG {k} {fmt(st['sol'])} {fmt(st['judge'])} {int(timed_out)} {millis} "
                f"{len(st['ver'])} {len(st['err'])}\n")
        _write_all(vfd, head.encode() + bytes(st["ver"]) + bytes(st["err"]))
        del run[k]

    parallel = max(1, int(job["parallel"]))
    while todo or run:
        while todo and len(run) < parallel:
            start(todo.pop())
        now = time.monotonic()
        wait = min(0.02, max(0.0, min(st["t0"] + wall for st in run.values()) - now))
        for fd in select.select([isock, *by_fd], [], [], wait)[0]:
            if fd is isock:
                recv()
            elif fd in by_fd:
                read(fd)
        for pid, status in _reaped():  # judges, the zygote, orphans re-parented here
            statuses[pid] = status
            if pid in judges:
                k = judges.pop(pid)
                run[k]["judge"], run[k]["judged_at"] = status, time.monotonic()
        now = time.monotonic()
        for k, st in list(run.items()):
            if st["judge"] is not None and (st["sol"] is not None or now - st["judged_at"] > 0.25):
                finish(k, False)  # (the solution exits on EOF once the judge is done)
            elif now >= st["t0"] + wall:
                finish(k, True)
    isock.close()
    os.close(devnull)


def _reap(statuses: dict, block: bool) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        statuses[pid] = status


def _children_of(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                if int(stat.rsplit(b")", 1)[1].split()[1]) == ppid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: a helper drops to that uid and calls kill(-1)."""
    import signal

    if not uid or uid <= 0:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getuid() == uid and os.geteuid() == uid and uid != 0:
                for _ in range(3):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _spawn(job: dict, uid: int | None, cwd: str, fds: dict, *,
           argv: list | None = None, role: str | None = None, cgroup_fd: int = -1) -> int:
    """Fork a child that confines itself (memory cgroup, fds, limits, uid) and then
    either ``execve``-s ``argv`` or, given ``role``, runs that role of this harness in the
    forked interpreter (``_child_main``)."""
    import resource

    lim = job["limits"]
    pid = os.fork()
    if pid:
        return pid
    try:
        if cgroup_fd >= 0:  # (an fd the grader opened: the cgroup tree is not in the sandbox)
            os.write(cgroup_fd, str(os.getpid()).encode())
        # fds: move every source out of the way, then into place, then close the rest
        top = max(list(fds) + list(fds.values())) + 1
        tmp = {}
        for i, (target, source) in enumerate(fds.items()):
            tmp[target] = os.dup2(source, top + i, inheritable=False)
        for target, fd in tmp.items():
            os.dup2(fd, target, inheritable=True)
        for fd in range(3, max(fds) + 1):
            if fd not in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.closerange(max(fds) + 1, 65536)
        os.setsid()
        os.chdir(cwd)
        os.nice(10)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        cpu = int(lim["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim["max_file_bytes"], lim["max_file_bytes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (lim["max_processes"], lim["max_processes"]))
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getuid() != uid or os.geteuid() != uid:
                os._exit(126)
        if not job["namespaces"]:  # (bwrap sets it for the whole sandbox)
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        env = {"PATH": _CHILD_ENV_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd,
               "UNIOPD_MAX_MESSAGE": str(lim["max_message_bytes"])}
        if argv is not None:
            os.execve(argv[0], argv, env)
        os.environ.clear()
        os.environ.update(env)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(2, f"sandbox: cannot start {role or argv[-1]}: {e}\n".encode())
        finally:
            os._exit(127)
    status = 1
    try:
        status = _child_main(role)
    except SystemExit as e:  # as an interpreter would exit on it
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an interpreter would: traceback, status 1
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(status if isinstance(status, int) and 0 <= status < 256 else 1)


def _child_main(role: str) -> int:
    if role == "solution":
        return _solution_main()
    if role == "judge":
        return _judge_main()
    raise SystemExit(f"unknown role {role!r}")


def _kill_uids(uids: list) -> int:
    """The grader's backstop, run in a fresh single-threaded process (which may fork)."""
    for uid in uids:
        _kill_uid(int(uid))
    return 0


# Bootstrap (``python -I -S -B -c BOOT``): the supervisor and the kill helper read
# {"code": [code objects of the sandbox-side modules], "entry", "args"} from stdin and run
# the modules in one namespace. (Solution and judge are forked from the supervisor.)
_BOOT_STDIN = (
    "import marshal, sys\n"
    "m = marshal.loads(sys.stdin.buffer.read())\n"
    "g = {'__name__': 'uniopd_sandbox'}\n"
    "for c in m['code']:\n"
    "    exec(marshal.loads(c), g)\n"
    "sys.exit(g[m['entry']](*m['args']))\n"
)
