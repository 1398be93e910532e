"""Code verifier: grade HumanEval/MBPP-style programs in a locked-down sandbox.

A dataset row of the ``code`` domain has ``prompt`` (signature and docstring, or the
problem text), ``tests`` (``def check(candidate): ...`` or plain ``assert`` lines) and
``entry_point`` (the function's name). The model's response is code: a completion of the
prompt or a whole function, possibly inside ```python fences. :func:`grade` answers
``(correct, reason)`` in the shape every verifier of this package has; :func:`evaluate`
answers the full :class:`CodeResult`; :func:`run_program` runs one untrusted program in
the sandbox and returns what it did (exit status, capped output, timed out or not).

Threat model
============
The response is hostile: written by a policy that is rewarded for passing, so any way of
*looking* like a pass that is easier than solving the problem will be found (reward
hacking), and any resource it can exhaust will be (by accident as often as not). It may
print "all tests passed", exit with status 0 before the tests run (``os._exit(0)``,
``sys.exit(0)``), raise ``SystemExit`` from inside the tests, monkeypatch builtins
(``builtins.abs = lambda x: 0``), return an object whose ``__eq__`` is always true,
redefine a helper that the tests call (HumanEval/32 ``poly``) or a ``check`` of its own,
loop forever, fork-bomb, allocate without bound, fill the disk, write outside its
directory, read secrets (environment, files, the answers in the dataset), open network
connections, signal or kill the grader, or leave a daemon running. The dataset (prompt
and tests) is trusted. The grader runs as root inside Ray actors (threaded processes).

Where the verdict comes from (why it cannot be forged)
======================================================
Anything that runs in the same interpreter as the response can be subverted by it
(exit early, patch builtins, patch the harness, find a secret in memory with ``gc``),
so no in-process check, exit status or stdout marker can be trusted. The tests therefore
do not run in the response's process. Two processes run under two different unprivileged
uids:

* the **solution** process executes ``prompt + response`` (the response alone when it
  defines the entry point and the prompt is not code) and then serves calls: it receives
  ``(function name, args, kwargs)`` and answers the return value or the exception;
* the **judge** process executes only trusted text: the prompt (so the helpers the tests
  call are the dataset's own, not a redefinition by the response) and the tests, with
  the entry point (and any other solution name the tests reference that is neither a
  builtin nor defined by the prompt) bound to a proxy that forwards the call.

Values cross between the two in a small tagged binary format whose decoder only builds
plain data (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset, range, Decimal, Fraction; an iterator comes back as an iterator over its
items), never objects with methods of the response's choosing: an always-equal object
cannot be sent, and monkeypatched builtins stay in the solution process. Of the sandboxed
processes only the judge holds the verdict pipe (an fd the solution process never has, in
a process it may not signal, trace or read: another uid), and it writes the verdict -- with a per-run random
nonce it received through a private pipe -- after ``check(candidate)`` returned, and only
if the tests made at least one call. Exiting early, ``SystemExit`` from the candidate and
the solution process dying all surface in the judge as a failed call (an exception of a
class the tests cannot swallow with ``except Exception``). Without a verdict, with a wrong
nonce, or with a judge that did not exit 0, the response is incorrect.

Known semantic limits (the price of the split): arguments and return values must be plain
data (a test that passes a lambda or an instance of a class to the candidate, or expects
the candidate to mutate an argument in place, is answered ``unsupported``/``failed``);
only the standard library is importable (the interpreter runs with ``-I -S``).

Defences (each enforced by the kernel, checked by ``tests/test_code_verifier.py``)
==================================================================================
* Separate processes, started without ``preexec_fn`` (unsafe in threaded processes):
  a launcher (``python -I -S -B -c BOOT``, running the sandbox-side half of this file,
  shipped as a precompiled code object) does the set-up as root; each solution and judge
  is forked from it and drops privileges in the child. A solution is forked from a
  *zygote* that the init forks before any judge runs, and the tests and nonces reach the
  judges through pipes of their own: no test, nonce or verdict is ever in the memory a
  solution inherits (it could scan it with ``gc`` or ``ctypes``).
* Batches: :func:`evaluate_many` grades up to :data:`MAX_BATCH` programs in one sandbox
  (one launcher, one set of namespaces and root), ``parallel`` at a time. Each program
  keeps everything a run of its own has: its slot's uids, a fresh directory, its memory
  cgroup, its pipes and its wall-clock deadline; when it ends, whatever is left of its
  uids is killed and its directory removed before its verdict is reported.
* Per-program uids: slot *k* uses uids ``UID_BASE + 2k`` (solution) and ``+ 2k + 1``
  (judge), ``UID_BASE`` = 61000 (env ``UNIOPD_SANDBOX_UID_BASE``). A slot is claimed by
  binding an abstract unix socket, so concurrent runs (threads, Ray actors on the host)
  never share a uid and a crashed grader frees its slot. Unprivileged uids are what make
  ``RLIMIT_NPROC`` bite (root ignores it), stop the program from signalling the grader
  or the judge, and keep it out of root's files. ``PR_SET_NO_NEW_PRIVS`` and ``nosuid``
  mounts keep set-uid binaries from giving privileges back.
* Namespaces (``unshare``): a new PID namespace whose init is the trusted supervisor --
  when it exits the kernel kills every process left inside, daemonised or not -- a new
  network namespace (no interface up: every ``connect``, even to 127.0.0.1, fails with
  ENETUNREACH), a new mount namespace, IPC and UTS namespaces.
* Filesystem: the programs are ``chroot``-ed into a fresh root made of read-only bind
  mounts of ``/usr``, ``/etc``, the ``/lib*`` links and the Python prefix, a new ``/proc``
  mounted ``hidepid=2`` (a program sees only its own processes), ``/dev/{null,zero,
  full,random,urandom}``, and a size-capped tmpfs ``/tmp`` holding the working dirs
  (``/tmp/s``, mode 0700, owned by the solution uid, is the only writable place). The
  repository, the datasets, ``/root`` and the host's ``/tmp`` are not in the tree. The
  tmpfs dies with the namespace, so nothing is left on disk. The chroot also stops the
  program from creating a user namespace (the kernel refuses ``CLONE_NEWUSER`` to a
  chrooted process), which would be the way to regain capabilities.
* Resource limits, per process: ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL one second later),
  ``RLIMIT_AS``, ``RLIMIT_NPROC`` (fork bombs stop at ``max_processes``),
  ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``, ``nice`` 10 and
  ``oom_score_adj`` 1000. For the whole run: a memory cgroup (nested in the grader's
  own cgroup) capping the total (``max_processes`` x ``RLIMIT_AS`` would otherwise be
  the bound), where the cgroup filesystem is writable; and the wall-clock limit, on
  whose expiry the grader SIGKILLs the launcher's process group (launcher and namespace
  init, hence the namespace).
* Clean environment: the programs get ``PATH``, ``LANG``, ``LC_ALL``, ``HOME`` and
  ``TMPDIR`` only, stdin is ``/dev/null``, every other fd is closed, and ``-I`` makes
  Python ignore ``PYTHON*`` variables and the user site.
* Output is read continuously and capped (``max_output_bytes`` per stream; the rest is
  drained and dropped), so a chatty program neither blocks nor fills memory.
* Nothing is left behind: after a timeout (always, without namespaces) processes of the
  slot's uids are looked for in ``/proc`` and killed -- one ``kill(-1)`` sweep per uid by
  a helper that drops to that uid (atomic against a fork bomb), then by pidfd (never a
  recycled pid) -- a backstop for the namespace; the cgroup and any host dir are removed.
* Speed (this 2-core machine, where a fork and exit of the launcher costs ~4 ms): one
  program alone ~80 ms CPU (one interpreter start, namespaces, root, three forks);
  in a batch of 32, ~20 ms CPU each (measured: 18-21 ms). A solution that does not
  compile is rejected in the grader, without a sandbox run (:func:`precompile_error`:
  ``compile`` executes nothing).

Degraded modes
==============
:func:`detect_isolation` probes the machine once (it runs a trivial program with each
candidate set-up) and logs one warning for what is missing:

* ``namespaces=False`` (no CAP_SYS_ADMIN, e.g. an unprivileged Docker container run as
  root): no network isolation, no private filesystem view (the working dir is a host
  temporary dir, removed afterwards, and files the slot uids left in ``/tmp``,
  ``/var/tmp`` and ``/dev/shm`` are deleted), cleanup by killing every process of the
  slot uids (the launcher is a child subreaper, so daemons re-parent to it). The
  programs run with a world-executable interpreter of the grader's Python version
  (``/usr/bin/python3.X``) when the grader's own is out of other uids' reach (pyenv
  under ``/root``). The verdict stays unforgeable (uids still separate the judge).
* ``setuid=False`` (not root): everything runs as the grader's user: no ``RLIMIT_NPROC``
  containment, the program can signal the grader and read or write what the grader can,
  a daemon that escapes the process group after a timeout may survive, and the judge is
  no longer protected from the solution (same uid: it may open ``/proc/<judge>/fd``), so
  a targeted attack could forge a verdict. Use a root (or CAP_SETUID) container for RL.
  (Unprivileged user namespaces could restore net/mount/PID isolation; not implemented.)
* ``cgroup=False``: no cap on the total memory of a run beyond the per-process limits
  (set ``UNIOPD_SANDBOX_NO_CGROUP=1`` to opt out of cgroups on purpose).

The tests skip the properties a degraded machine lacks, with the reason.
"""

from __future__ import annotations

import __future__
import ast
import functools
import hmac
import logging
import marshal
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal


# ======================================================================================
# Part 1 -- code that runs inside the sandbox (launcher, namespace init, solution and
# judge processes). The grader compiles the text between the two SANDBOX-SIDE markers
# (with only ``os`` and ``sys`` imported) and ships the code object: the sandboxed
# interpreters neither import the grader's modules nor recompile this file.
# ======================================================================================
# --- SANDBOX-SIDE BEGIN ---

_MAX_DEPTH = 200  # nesting depth of a value that may cross the process boundary
_MAX_ITER_ITEMS = 1_000_000  # an iterator returned by the candidate is materialised up to this


class _Unencodable(TypeError):
    pass


def _encode(x: object, out: bytearray, depth: int = 0) -> None:
    """Append the tagged binary encoding of plain-data value ``x`` to ``out``."""
    if depth > _MAX_DEPTH:
        raise _Unencodable("value nested too deeply")
    t = type(x)
    if x is None:
        out += b"N"
    elif t is bool:
        out += b"T" if x else b"F"
    elif t is int:
        _put_text(out, b"i", str(x))
    elif t is float:
        _put_text(out, b"f", x.hex())
    elif t is str:
        _put_bytes(out, b"s", x.encode("utf-8", "surrogatepass"))
    elif t is list:
        _put_items(out, b"l", x, depth)
    elif t is tuple:
        _put_items(out, b"t", x, depth)
    elif t is dict:
        _put_count(out, b"d", len(x))
        for k, v in x.items():
            _encode(k, out, depth + 1)
            _encode(v, out, depth + 1)
    elif t is set:
        _put_items(out, b"S", x, depth)
    elif t is frozenset:
        _put_items(out, b"Z", x, depth)
    elif t is complex:
        _put_text(out, b"c", x.real.hex() + " " + x.imag.hex())
    elif t is bytes:
        _put_bytes(out, b"b", x)
    elif t is bytearray:
        _put_bytes(out, b"B", bytes(x))
    elif t is range:
        _put_text(out, b"r", f"{x.start} {x.stop} {x.step}")
    else:
        _encode_other(x, out, depth)


def _encode_other(x: object, out: bytearray, depth: int) -> None:
    """Subclasses of the plain types and a few stdlib types, converted to plain data."""
    mods = sys.modules
    dec, frac = mods.get("decimal"), mods.get("fractions")
    if dec is not None and isinstance(x, dec.Decimal):
        _put_text(out, b"D", str(x))
    elif frac is not None and isinstance(x, frac.Fraction):
        _put_text(out, b"Q", f"{x.numerator} {x.denominator}")
    elif isinstance(x, bool):
        _encode(bool(x), out, depth)
    elif isinstance(x, int):
        _encode(int(x), out, depth)
    elif isinstance(x, float):
        _encode(float(x), out, depth)
    elif isinstance(x, str):
        _encode(str.__str__(x), out, depth)
    elif isinstance(x, dict):  # OrderedDict, defaultdict, Counter
        _encode(dict(x.items()), out, depth)
    elif isinstance(x, list):
        _encode(list(x), out, depth)
    elif isinstance(x, tuple):  # namedtuple
        _encode(tuple(x), out, depth)
    elif isinstance(x, (set, frozenset)):
        _encode(frozenset(x) if isinstance(x, frozenset) else set(x), out, depth)
    elif hasattr(type(x), "__next__") and hasattr(type(x), "__iter__"):  # generator, map, zip...
        items = []
        for item in x:  # type: ignore[attr-defined]
            items.append(item)
            if len(items) > _MAX_ITER_ITEMS:
                raise _Unencodable("iterator too long")
        _put_items(out, b"I", items, depth)
    else:
        raise _Unencodable(
            f"a {type(x).__name__} cannot cross to the tests: only plain data (numbers, strings, "
            "bytes, lists, tuples, dicts, sets, ...) can"
        )


def _put_count(out: bytearray, tag: bytes, n: int) -> None:
    out += tag
    out += n.to_bytes(4, "big")


def _put_bytes(out: bytearray, tag: bytes, data: bytes) -> None:
    _put_count(out, tag, len(data))
    out += data


def _put_text(out: bytearray, tag: bytes, text: str) -> None:
    _put_bytes(out, tag, text.encode("ascii"))


def _put_items(out: bytearray, tag: bytes, items, depth: int) -> None:
    items = items if type(items) is list else list(items)
    if tag == b"l" and len(items) >= 8:  # fast paths: homogeneous lists decode at C speed
        kinds = {type(v) for v in items}
        if kinds == {int}:
            _put_text(out, b"L", ",".join(map(str, items)))
            return
        if kinds == {float}:
            _put_text(out, b"R", ",".join(map(float.hex, items)))
            return
        if kinds == {str}:
            _put_text(out, b"W", ",".join(str(len(v)) for v in items))
            _put_bytes(out, b"s", "".join(items).encode("utf-8", "surrogatepass"))
            return
    _put_count(out, tag, len(items))
    for v in items:
        _encode(v, out, depth + 1)


def encode_value(x: object) -> bytes:
    """Encode plain data; raises TypeError for anything else."""
    out = bytearray()
    _encode(x, out)
    return bytes(out)


_CONTAINER_TAGS = frozenset(b"ltSZI")


def decode_value(data: bytes) -> object:
    """Decode :func:`encode_value`'s output into plain data; ValueError/TypeError on bad input.

    Strict: it builds None, bool, int, float, complex, str, bytes, bytearray, list, tuple,
    dict, set, frozenset, range, Decimal, Fraction and list iterators, and nothing else."""
    data = bytes(data)
    end = len(data)
    pos = 0

    def count() -> int:
        nonlocal pos
        if pos + 4 > end:
            raise ValueError("truncated value")
        n = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if n > end - pos:  # every item takes at least one byte
            raise ValueError("bad length")
        return n

    def raw() -> bytes:
        nonlocal pos
        n = count()
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def text() -> str:
        return raw().decode("ascii")

    def value(depth: int) -> object:
        nonlocal pos
        if depth > _MAX_DEPTH:
            raise ValueError("value nested too deeply")
        if pos >= end:
            raise ValueError("truncated value")
        tag = data[pos]
        pos += 1
        if tag in _CONTAINER_TAGS:
            items = [value(depth + 1) for _ in range(count())]
            if tag == 0x6C:  # l
                return items
            if tag == 0x74:  # t
                return tuple(items)
            if tag == 0x53:  # S
                return set(items)
            if tag == 0x5A:  # Z
                return frozenset(items)
            return iter(items)  # I
        if tag == 0x4E:  # N
            return None
        if tag == 0x54:  # T
            return True
        if tag == 0x46:  # F
            return False
        if tag == 0x69:  # i
            t = raw()
            if not t.lstrip(b"-").isdigit():
                raise ValueError("bad int")
            return int(t)
        if tag == 0x66:  # f
            return float.fromhex(text())
        if tag == 0x73:  # s
            return raw().decode("utf-8", "surrogatepass")
        if tag == 0x64:  # d
            result = {}
            for _ in range(count()):
                k = value(depth + 1)
                result[k] = value(depth + 1)
            return result
        if tag == 0x4C:  # L: ints
            t = raw()
            if not t:
                raise ValueError("bad int list")
            ints = t.split(b",")
            if not all(v.lstrip(b"-").isdigit() for v in ints):
                raise ValueError("bad int")
            return list(map(int, ints))
        if tag == 0x52:  # R: floats
            return list(map(float.fromhex, text().split(",")))
        if tag == 0x57:  # W: strs (lengths, then the concatenation)
            lengths = [int(v) for v in text().split(",")]
            if pos >= end or data[pos] != 0x73:
                raise ValueError("bad str list")
            pos += 1
            joined = raw().decode("utf-8", "surrogatepass")
            if sum(lengths) != len(joined) or min(lengths) < 0:
                raise ValueError("bad str list")
            out, i = [], 0
            for n in lengths:
                out.append(joined[i : i + n])
                i += n
            return out
        if tag == 0x63:  # c
            re_, im = text().split(" ")
            return complex(float.fromhex(re_), float.fromhex(im))
        if tag == 0x62:  # b
            return raw()
        if tag == 0x42:  # B
            return bytearray(raw())
        if tag == 0x72:  # r
            start, stop, step = (int(v) for v in text().split(" "))
            return range(start, stop, step)
        if tag == 0x44:  # D
            import decimal

            return decimal.Decimal(text())
        if tag == 0x51:  # Q
            import fractions

            num, den = (int(v) for v in text().split(" "))
            return fractions.Fraction(num, den)
        raise ValueError(f"unknown tag {tag!r}")

    result = value(0)
    if pos != end:
        raise ValueError("trailing bytes")
    return result


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _send_msg(fd: int, payload: bytes) -> None:
    _write_all(fd, len(payload).to_bytes(4, "big") + payload)


def _recv_msg(fd: int, limit: int) -> bytes:
    n = int.from_bytes(_read_exact(fd, 4), "big")
    if n > limit:
        raise ValueError(f"message of {n} bytes over the {limit}-byte limit")
    return _read_exact(fd, n)


def _read_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# --- the solution process ---------------------------------------------------------------

_SOL_RFD, _SOL_WFD = 3, 4  # requests in, replies out
_JUDGE_RFD, _JUDGE_WFD, _JUDGE_VERDICT_FD, _JUDGE_CFG_FD = 3, 4, 5, 6


def _describe_exception(e: BaseException) -> tuple:
    """(nearest builtin base name, class name, message, where) of an exception."""
    import builtins

    base = "Exception"
    try:
        for klass in type(e).__mro__:
            if getattr(builtins, klass.__name__, None) is klass and issubclass(klass, BaseException):
                base = klass.__name__
                break
    except Exception:  # noqa: BLE001 - hostile classes may break introspection
        pass
    try:
        msg = str(e)[:500]
    except BaseException:  # noqa: BLE001
        msg = "<unprintable>"
    where = ""
    try:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "solution.py":
                where = f"solution.py:{tb.tb_lineno}"
            tb = tb.tb_next
    except Exception:  # noqa: BLE001
        pass
    return (base, type(e).__name__[:100], msg, where)


def _solution_main() -> int:
    """Execute the solution, announce its names, then answer calls until EOF."""
    import builtins

    limit = int(os.environ.get("UNIOPD_MAX_MESSAGE", str(1 << 24)))
    ns: dict = {"__name__": "solution", "__builtins__": builtins, "__file__": "solution.py"}
    try:
        with open("solution.py", encoding="utf-8", errors="surrogateescape") as f:
            source = f.read()
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - reported to the judge, whatever it is
        _send_msg(_SOL_WFD, encode_value(("error", _describe_exception(e))))
        return 0
    names = {}
    for name, value in list(ns.items()):
        if name.startswith("__"):
            continue
        try:
            if type(value).__name__ == "module":
                names[name] = ("module", str(value.__name__))
            elif callable(value):
                names[name] = ("callable",)
            else:
                names[name] = ("value", encode_value(value))
        except Exception:  # noqa: BLE001 - an unencodable global is simply not offered
            continue
    _send_msg(_SOL_WFD, encode_value(("ok", names)))
    while True:
        try:
            request = decode_value(_recv_msg(_SOL_RFD, limit))
        except EOFError:
            return 0
        name, args, kwargs = request  # type: ignore[misc]
        try:
            fn = ns.get(name)
            if fn is None:
                raise NameError(f"name {name!r} is not defined")
            reply = encode_value(("r", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - SystemExit included: it is an answer
            reply = encode_value(("e", _describe_exception(e)))
        _send_msg(_SOL_WFD, reply)


# --- the judge process --------------------------------------------------------------------


class _SolutionGone(BaseException):
    """The solution process exited or died; BaseException so ``except Exception`` in tests misses it."""


class _ProtocolError(BaseException):
    """The solution process answered something that is not a well-formed reply."""


class _Unsupported(BaseException):
    """The tests pass something that cannot cross to the solution process."""


class _SolutionAbort(BaseException):
    """The candidate raised a BaseException that is not an Exception (SystemExit, ...)."""


class _FromSolution:
    """Mixin marking an exception re-raised in the judge from the solution process."""

    where = ""


def _judge_main() -> int:
    """Run the trusted prompt and tests against proxies; write the verdict last."""
    import builtins
    import marshal

    cfg = marshal.loads(_read_to_eof(_JUDGE_CFG_FD))
    os.close(_JUDGE_CFG_FD)
    nonce: str = cfg["nonce"]
    entry_point: str | None = cfg["entry_point"]
    prompt: str = cfg["prompt"]
    tests: str = cfg["tests"]
    limit: int = cfg["max_message"]
    exc_classes: dict = {}
    state = {"calls": 0, "gone": False, "broken": False, "aborted": False}

    def finish(status: str, detail: str) -> int:
        body = detail.encode("utf-8", "replace")[:8192]
        _write_all(_JUDGE_VERDICT_FD, f"JUDGE {nonce} {status} {len(body)}\n".encode() + body)
        os.close(_JUDGE_VERDICT_FD)
        os._exit(0)

    def recv():
        if state["gone"]:
            raise _SolutionGone("the solution process is gone")
        try:
            return decode_value(_recv_msg(_JUDGE_RFD, limit))
        except EOFError:
            state["gone"] = True
            raise _SolutionGone("the solution process exited or died") from None
        except Exception as e:  # noqa: BLE001
            state["broken"] = True
            raise _ProtocolError(f"malformed reply from the solution process: {e}") from None

    def exc_class(base_name: str, name: str) -> type:
        base = getattr(builtins, base_name, Exception)
        if not (isinstance(base, type) and issubclass(base, BaseException)):
            base = Exception
        if not issubclass(base, Exception):
            return _SolutionAbort
        key = (base, name)
        if key not in exc_classes:
            try:
                exc_classes[key] = type(name if name.isidentifier() else base.__name__, (base, _FromSolution), {})
            except TypeError:  # a builtin with an incompatible layout
                exc_classes[key] = type(base.__name__, (Exception, _FromSolution), {})
        return exc_classes[key]

    def call(name: str, args: tuple, kwargs: dict):
        try:
            request = encode_value((name, list(args), dict(kwargs)))
        except TypeError as e:
            raise _Unsupported(f"the tests pass a value that cannot cross to the solution: {e}") from None
        if state["gone"]:
            raise _SolutionGone("the solution process is gone")
        state["calls"] += 1
        try:
            _send_msg(_JUDGE_WFD, request)
        except OSError:
            state["gone"] = True
            raise _SolutionGone("the solution process exited or died") from None
        reply = recv()
        if not (type(reply) is tuple and len(reply) == 2 and reply[0] in ("r", "e")):
            state["broken"] = True
            raise _ProtocolError("malformed reply from the solution process")
        if reply[0] == "r":
            return reply[1]
        info = reply[1]
        if not (type(info) is tuple and len(info) == 4 and all(type(v) is str for v in info)):
            state["broken"] = True
            raise _ProtocolError("malformed exception from the solution process")
        base_name, class_name, msg, where = info
        klass = exc_class(base_name, class_name)
        if klass is _SolutionAbort:
            state["aborted"] = True
            raise _SolutionAbort(f"{class_name}({msg})" + (f" at {where}" if where else ""))
        try:
            err = klass(msg)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError wants five arguments
            err = exc_class("Exception", class_name)(msg)
        err.where = where
        raise err

    def proxy(name: str):
        def candidate(*args, **kwargs):
            return call(name, args, kwargs)

        candidate.__name__ = candidate.__qualname__ = name
        return candidate

    def referenced(code) -> set:
        names = set(code.co_names)
        for const in code.co_consts:
            if type(const) is type(code):
                names |= referenced(const)
        return names

    def describe(e: BaseException) -> str:
        line = ""
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "tests.py":
                lineno = tb.tb_lineno
                lines = tests.splitlines()
                src = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
                line = f" at tests.py:{lineno}: {src[:300]}"
            tb = tb.tb_next
        where = getattr(e, "where", "")
        msg = str(e)[:500]
        return f"{type(e).__name__}{': ' + msg if msg else ''}{line}{' (raised at ' + where + ')' if where else ''}"

    # 1. the solution's definitions
    try:
        hello = recv()
    except _SolutionGone:
        return finish("crashed", "the solution process exited before its definitions were complete")
    except _ProtocolError as e:
        return finish("error", str(e))
    if not (type(hello) is tuple and len(hello) == 2 and hello[0] in ("ok", "error")):
        return finish("error", "malformed hello from the solution process")
    if hello[0] == "error":
        info = hello[1]
        base_name = info[0] if type(info) is tuple and info and type(info[0]) is str else "Exception"
        text = " ".join(str(v) for v in info[1:]) if type(info) is tuple else ""
        if base_name in ("SyntaxError", "IndentationError", "TabError"):
            return finish("syntax_error", text)
        if base_name == "MemoryError":
            return finish("memory", text)
        return finish("error", f"while defining the solution: {text}")
    offered = hello[1] if type(hello[1]) is dict else {}

    # 2. the trusted namespace: the prompt's own definitions, then proxies
    # (not "__main__", as in the reference harness: ``if __name__ == "__main__":`` blocks stay off)
    ns: dict = {"__name__": "judge", "__builtins__": builtins}
    try:
        prompt_code = compile(prompt, "prompt.py", "exec") if prompt else None
    except (SyntaxError, ValueError):
        prompt_code = None
    if prompt_code is not None:
        try:
            exec(prompt_code, ns)
        except Exception:  # noqa: BLE001 - prose that happens to parse, a missing import...
            pass
    prompt_names = set(ns)
    try:
        tests_code = compile(tests, "tests.py", "exec")
    except (SyntaxError, ValueError) as e:
        return finish("harness_error", f"the tests do not compile: {e}")
    if entry_point:
        if type(offered.get(entry_point)) is not tuple or offered[entry_point][:1] != ("callable",):
            return finish("error", f"the solution does not define a function {entry_point!r}")
    builtin_names = set(dir(builtins))
    for name in referenced(tests_code):
        kind = offered.get(name)
        if type(kind) is not tuple or not kind or type(name) is not str:
            continue
        if name.startswith("__") or name in builtin_names or name in prompt_names:
            continue  # never let the solution shadow a builtin or a dataset helper
        if kind[0] == "callable":
            ns[name] = proxy(name)
        elif kind[0] == "module" and len(kind) == 2 and type(kind[1]) is str:
            top = kind[1].split(".")[0]
            # only a stdlib module under its own name (no ``import cmath as math`` games)
            if top in sys.stdlib_module_names and kind[1].rsplit(".", 1)[-1] == name:
                try:
                    __import__(kind[1])
                    ns[name] = sys.modules[kind[1]]
                except Exception:  # noqa: BLE001
                    pass
        elif kind[0] == "value" and len(kind) == 2 and type(kind[1]) is bytes:
            try:
                ns[name] = decode_value(kind[1])
            except Exception:  # noqa: BLE001
                pass
    candidate = proxy(entry_point) if entry_point else None
    if entry_point:
        ns[entry_point] = candidate

    # 3. the tests; the verdict is written only after they returned
    try:
        exec(tests_code, ns)
        check = ns.get("check")
        if candidate is not None and type(check) is type(proxy) and check.__code__.co_filename == "tests.py":
            check(candidate)
    except _SolutionGone as e:
        return finish("crashed", str(e))
    except _ProtocolError as e:
        return finish("error", str(e))
    except _Unsupported as e:
        return finish("unsupported", str(e))
    except _SolutionAbort as e:
        return finish("error", f"the candidate raised {e}")
    except BaseException as e:  # noqa: BLE001 - any other failure of the tests fails the response
        if isinstance(e, _FromSolution):
            return finish("memory" if isinstance(e, MemoryError) else "error", describe(e))
        return finish("failed", describe(e))
    if state["gone"]:
        return finish("crashed", "the solution process died during the tests")
    if state["broken"]:
        return finish("error", "the solution process sent malformed replies")
    if state["aborted"]:
        return finish("error", "the candidate raised SystemExit/KeyboardInterrupt during the tests")
    if state["calls"] == 0:
        return finish("no_tests", "the tests never called the solution")
    return finish("passed", f"{state['calls']} calls")


# --- the launcher and the namespace init (run as root, trusted) ---------------------------

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_ROOT_TOP = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_NEWROOT = "/tmp"  # mount point of the new root, inside the private mount namespace only
_CHILD_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self.check(self.lib.unshare(self.ctypes.c_int(flags)), "unshare")

    def mount(self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        rc = self.lib.mount(enc(src), enc(dst), enc(fstype), self.ctypes.c_ulong(flags), enc(data))
        self.check(rc, f"mount {fstype or src} on {dst}")

    def prctl(self, option: int, arg: int) -> None:
        c_ulong = self.ctypes.c_ulong
        self.check(self.lib.prctl(option, c_ulong(arg), c_ulong(0), c_ulong(0), c_ulong(0)), f"prctl {option}")

    def sethostname(self, name: str) -> None:
        self.check(self.lib.sethostname(name.encode(), len(name)), "sethostname")


def _launcher_main(job: dict) -> int:
    """Set up isolation for the job (from the trusted grader), run it, report."""
    import signal

    libc = _Libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the grader's thread
    if os.getppid() != job["parent_pid"]:
        return 1
    vfd = job["verdict_fd"]
    try:
        for procs in job["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if job["namespaces"]:
            libc.unshare(_CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS)
            alive_r, alive_w = os.pipe()  # EOF on alive_r once the launcher is gone
            pid = os.fork()  # the first child is pid 1 of the new PID namespace
            if pid == 0:
                try:
                    # (getppid() is 0 across the namespace boundary, hence the pipe)
                    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                    os.close(alive_w)
                    import select

                    if select.select([alive_r], [], [], 0)[0]:
                        os._exit(1)
                    os.close(alive_r)
                    _init_main(job, libc)
                except BaseException as e:  # noqa: BLE001
                    _report(vfd, f"ERROR init: {type(e).__name__}: {e}")
                os._exit(1)
            os.close(alive_r)
            _, status = os.waitpid(pid, 0)
            os.close(alive_w)
            return os.waitstatus_to_exitcode(status) if status else 0
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans (daemons) re-parent to us
        _init_main(job, libc)
    except BaseException as e:  # noqa: BLE001
        _report(vfd, f"ERROR launcher: {type(e).__name__}: {e}")
        return 1
    return 0


def _report(fd: int, line: str) -> None:
    try:
        _write_all(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _build_root(job: dict, libc: _Libc) -> None:
    """Private mount namespace: a read-only skeleton root with a fresh tmpfs /tmp."""
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    r = _NEWROOT
    tops = [p for p in _ROOT_TOP if os.path.lexists(p)]
    extra = [p for p in job["binds"] if not any(p == t or p.startswith(t + "/") for t in tops)]
    sources = {}
    for path in [p for p in tops if not os.path.islink(p)] + extra:
        sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
    for dev in _DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            sources[f"/dev/{dev}"] = os.open(f"/dev/{dev}", os.O_PATH | os.O_CLOEXEC)
    libc.mount("uniopd-root", r, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path in tops:
        if os.path.islink(path):
            os.symlink(os.readlink(path), r + path)
    for path, fd in sources.items():
        target = r + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID
        if path.startswith("/dev/"):
            open(target, "w").close()
        else:
            os.makedirs(target, mode=0o755, exist_ok=True)
            flags |= _MS_NODEV
        libc.mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
        libc.mount(None, target, None, flags)
        os.close(fd)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{r}/dev/{name}")
    os.mkdir(r + "/proc", 0o555)
    try:
        libc.mount("proc", r + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
    except OSError:
        libc.mount("proc", r + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(r + "/tmp", 0o755)
    lim = job["limits"]
    libc.mount("uniopd-tmp", r + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={lim['tmpfs_bytes']},nr_inodes={lim['tmpfs_inodes']},mode=755")
    try:
        libc.sethostname("sandbox")
    except OSError:
        pass


def _init_main(job: dict, libc: _Libc) -> None:
    """Supervisor: pid 1 of the namespace (or the subreaper launcher without namespaces)."""
    vfd = job["verdict_fd"]
    ns_mode = job["namespaces"]
    if ns_mode:
        _build_root(job, libc)
        root, base = _NEWROOT, "/tmp"
    else:
        root, base = None, job["host_dir"]
    host_base = (root or "") + base
    if job["mode"] == "batch":
        if ns_mode:
            libc.mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        statuses: dict[int, int] = {}
        _batch_main(job, libc, root, base, host_base, statuses)
        _teardown(ns_mode, [u for p in job["programs"] if p["uids"] for u in p["uids"]], statuses)
        _report(vfd, "DONE")
        os.close(vfd)
        os._exit(0)
    uids = job["uids"]  # the slot's [solution uid, judge uid] (only the first runs here), or None
    d = host_base + "/s"
    os.mkdir(d, 0o700)
    with open(d + "/" + job["filename"], "wb") as f:
        f.write(job["source"].encode("utf-8", "replace"))  # (a lone surrogate becomes "?")
    if uids:
        os.chown(d, uids[0], uids[0])
        os.chown(d + "/" + job["filename"], uids[0], uids[0])
    if ns_mode:
        libc.mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)

    devnull = os.open("/dev/null", os.O_RDONLY)
    spid = _spawn(job, libc, uids[0] if uids else None, root, base + "/s", {0: devnull, 1: 1, 2: 2},
                  argv=[job["python"], "-I", "-S", "-B", job["filename"]])
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
    a zombie). Used on both sides: the grader's backstops and the init's per-program sweep."""
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


def _zygote_main(job: dict, libc: _Libc, root: str | None, base: str, sock) -> None:
    """Forks the solution processes of a batch, on the init's request, and reports their exits.

    It is forked from the init before any judge exists, so no test, nonce or verdict was
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
            os._exit(0)  # the init closed the socket: the batch is over
        k = int.from_bytes(msg[1:5], "big")
        p = progs[k]
        req_r, req_w = os.pipe()  # judge -> solution
        rep_r, rep_w = os.pipe()  # solution -> judge
        err_r, err_w = os.pipe()  # stderr of solution and judge -> init
        pid = _spawn(job, libc, p["uids"][0] if p["uids"] else None, root, f"{base}/{k}/s",
                     {0: devnull, 1: devnull, 2: err_w, _SOL_RFD: req_r, _SOL_WFD: rep_w},
                     role="solution", cgroup=p["cgroup_procs"])
        kids[pid] = k
        socket.send_fds(sock, [_msg(b"P", k, pid)], [req_w, rep_r, err_r, err_w])
        for fd in (req_r, req_w, rep_r, rep_w, err_r, err_w):
            os.close(fd)


def _batch_main(job: dict, libc: _Libc, root: str | None, base: str, host_base: str, statuses: dict) -> None:
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
    # the new root's /proc lists this PID namespace only (init is root: hidepid spares it)
    proc_dir = root + "/proc" if job["namespaces"] else None
    gc.freeze()  # forked children then copy fewer pages (a fork and exit costs ~4 ms here)
    isock, zsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zpid = os.fork()
    if zpid == 0:
        try:
            isock.close()
            for p in progs:
                os.close(p["cfg_fd"])
            _zygote_main(job, libc, root, base, zsock)
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
        d = f"{host_base}/{k}"
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
        jpid = _spawn(job, libc, uids[1] if uids else None, root, f"{base}/{k}/j",
                      {0: devnull, 1: devnull, 2: err_w, _JUDGE_RFD: rep_r, _JUDGE_WFD: req_w,
                       _JUDGE_VERDICT_FD: ver_w, _JUDGE_CFG_FD: p["cfg_fd"]},
                      role="judge", cgroup=p["cgroup_procs"])
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
        shutil.rmtree(f"{host_base}/{k}", ignore_errors=True)
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


def _spawn(job: dict, libc: _Libc, uid: int | None, root: str | None, cwd: str, fds: dict, *,
           argv: list | None = None, role: str | None = None, cgroup: str = "") -> int:
    """Fork a child that confines itself (fds, memory cgroup, chroot, limits, uid) and then
    either ``execve``-s ``argv`` or, given ``role``, runs that role of this harness in the
    forked interpreter (``_child_main``)."""
    import resource

    lim = job["limits"]
    pid = os.fork()
    if pid:
        return pid
    try:
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
        if cgroup:
            with open(cgroup, "w") as f:
                f.write(str(os.getpid()))
        if root:
            os.chroot(root)
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
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
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


# Bootstrap (``python -I -S -B -c BOOT``): the launcher and the kill helper read
# {"code", "entry", "args"} from stdin. (Solution and judge are forked from the init.)
_BOOT_STDIN = (
    "import marshal, sys\n"
    "m = marshal.loads(sys.stdin.buffer.read())\n"
    "g = {'__name__': 'uniopd_sandbox'}\n"
    "exec(marshal.loads(m['code']), g)\n"
    "sys.exit(g[m['entry']](*m['args']))\n"
)
# --- SANDBOX-SIDE END ---


# ======================================================================================
# Part 2 -- the grader's API (runs in the verifier actor).
# ======================================================================================

logger = logging.getLogger(__name__)

UID_BASE = int(os.environ.get("UNIOPD_SANDBOX_UID_BASE", "61000"))
N_SLOTS = 128
_HARNESS = os.path.abspath(__file__)
_harness_lock = threading.Lock()
_harness_code: bytes | None = None


def _harness() -> bytes:
    """The sandbox-side part of this file, compiled once, as marshal bytes."""
    global _harness_code
    with _harness_lock:
        if _harness_code is None:
            with open(_HARNESS, encoding="utf-8") as f:
                text = f.read()
            begin = text.index("# --- SANDBOX-SIDE BEGIN ---\n")
            end = text.index("# --- SANDBOX-SIDE END ---\n")
            header = "from __future__ import annotations\nimport os, sys\n"
            pad = "\n" * (text.count("\n", 0, begin) - header.count("\n"))  # keep line numbers
            _harness_code = marshal.dumps(compile(header + pad + text[begin:end], _HARNESS, "exec", dont_inherit=True))
        return _harness_code


def _boot_payload(entry: str, *args: object) -> bytes:
    return marshal.dumps({"code": _harness(), "entry": entry, "args": list(args)})


Reason = Literal[
    "passed",  # the judge ran the tests to the end, with at least one call of the solution
    "failed",  # an assertion (or other error) in the tests
    "error",  # the solution raised, or is missing the entry point, or sent garbage
    "syntax_error",  # the solution does not compile
    "timeout",  # wall-clock or CPU limit
    "memory",  # MemoryError or the memory cgroup's OOM killer
    "crashed",  # the solution process exited or died before the tests were done
    "no_code",  # nothing that looks like code in the response
    "no_tests",  # the tests never called the solution (a dataset problem)
    "unsupported",  # the tests pass a non-data value to the solution (see the module doc)
    "harness_error",  # the sandbox itself failed: a bug or a misconfigured machine
]


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
    """Which kernel mechanisms a run uses (see "Degraded modes" in the module doc)."""

    namespaces: bool = True
    setuid: bool = True
    cgroup: bool = True


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


@dataclass(frozen=True)
class CodeResult:
    correct: bool
    reason: Reason
    detail: str
    seconds: float


# --- isolation detection ---------------------------------------------------------------

_detect_lock = threading.Lock()
_detected: Isolation | None = None
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


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
            _warn_once("ns", "code sandbox: no namespaces (need root with CAP_SYS_ADMIN): programs are NOT "
                       "network-isolated and see the host filesystem; see actors/verifiers/code.py")
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
    reaches its judge through a pipe of its own, never through the launcher's memory)."""
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
        procs = [f"{c}/cgroup.procs" if c else "" for c in cgroups] + [""] * (n - len(cgroups))
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
            binds=_binds(),
            cgroup_procs=[procs[0]] if procs[0] and not batch else [],
            limits=_limits_dict(limits),
        )
        if batch:
            full_job["programs"] = [
                dict(p, uids=list(slots[k].uids) if slots else None, cfg_fd=cfg_pipes[k][0], cgroup_procs=procs[k])
                for k, p in enumerate(job["programs"])
            ]
        payload = _boot_payload("_launcher_main", full_job)
        # The launcher runs the programs' interpreter: solution and judge are forked from it,
        # so they import the stdlib the sandbox uids can read (see _sandbox_python).
        proc = subprocess.Popen(
            [full_job["python"], "-I", "-S", "-B", "-c", _BOOT_STDIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(vw, *(r for r, _ in cfg_pipes)),
            env={"PATH": _CHILD_ENV_PATH, "LANG": "C.UTF-8"},
            cwd="/",
            start_new_session=True,
        )
        os.close(vw)
        vw = -1
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
        for fd in (vr, vw, *(fd for pair in cfg_pipes for fd in pair)):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.poll() is None:
            _killpg(proc.pid)
            proc.wait()
        if slots:
            # Backstop: the namespace init kills everything on a normal exit; after a
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
        error = f"launcher exited with {proc.returncode}: {bytes(streams['stderr'][-500:]).decode('utf-8', 'replace')}"
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
    """What the init reported of one program of a batch."""

    sol_status: str  # wait status of the solution process, or "-"
    judge_status: str
    timed_out: bool
    seconds: float
    verdict: bytes  # what the judge wrote on its verdict pipe
    stderr: bytes  # solution's and judge's, capped


def _verdict_items(verdict: bytes):
    """The init's lines on the verdict pipe (ERROR, INIT, DONE, PROG), each with the bytes
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
                return  # cut short (the launcher was killed while writing)
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
                break  # launcher gone, a straggler holds a pipe: the backstop will kill it
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


# --- grading ----------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S)
_CODE_LANGS = {"", "python", "py", "python3", "py3"}


def _defines(code: str, name: str | None) -> bool:
    if not name:
        return False
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code of a response: fenced blocks if any (the last one that defines the entry
    point, else all python blocks joined), else the response itself, untouched (a bare
    completion keeps its indentation)."""
    text = _THINK.sub("", response)
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if not blocks:
        return text
    code_blocks = [body for lang, body in blocks if lang in _CODE_LANGS] or [body for _, body in blocks]
    defining = [b for b in code_blocks if _defines(b, entry_point)]
    if defining:
        return defining[-1]
    return "\n\n".join(code_blocks)


def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError):
        return False


def build_solution(response: str, prompt: str, entry_point: str | None) -> str | None:
    """The solution program: ``prompt + completion``; ``prompt`` then the response's own
    definition when it defines the entry point (the prompt's imports and helpers stay); the
    response alone when the prompt is not code. None when the response has no code."""
    code = extract_code(response, entry_point)
    if not code.strip():
        return None
    if not prompt or not _compiles(prompt):  # the prompt is prose (MBPP): the response is the program
        return code
    if _defines(code, entry_point):
        return prompt.rstrip() + "\n\n\n" + code.strip("\n") + "\n"
    return prompt + code  # a completion of the prompt's function


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)


# A solution program shorter than this is compiled in the grader before any sandbox run:
# one that does not compile is a ``syntax_error`` without a sandbox run (~20-80 ms CPU). ``compile`` parses and emits bytecode and runs none of it.
# The bound caps the grader's time on hostile text: the worst case measured on the loaded
# 2-core machine, nested lambdas (superlinear), took 0.5 s at 10 kB and 2.5 s at 20 kB;
# typical solutions are well under 5 kB.
PRECOMPILE_MAX_CHARS = 10_000
_precompile_lock = threading.Lock()


def precompile_error(source: str) -> str | None:
    """The ``SyntaxError`` that the sandbox's solution process would hit on ``source``, or
    None when it compiles, is too long to check here, or fails otherwise (the sandbox
    then decides).

    Sound: it only ever says "incorrect", and only for a program the solution process
    would also fail to compile: the same text (the file is written as UTF-8 with
    ``replace`` and read back with universal newlines), the same file name and the same
    ``annotations`` future flag (inherited from the harness). Warnings are ignored while
    compiling: a grader run with ``-W error`` must not turn a ``SyntaxWarning`` into a
    verdict (the sandbox runs with the default filters). The filters are process-global
    before Python 3.14, so this module's uses are serialized.
    """
    if len(source) >= PRECOMPILE_MAX_CHARS:
        return None
    text = source.encode("utf-8", "replace").decode("utf-8", "surrogateescape")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        with _precompile_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(text, "solution.py", "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    except SyntaxError as e:  # IndentationError and TabError included, as in the judge
        return f"{type(e).__name__} {e}"
    except Exception:  # noqa: BLE001 - RecursionError, MemoryError...: let the sandbox judge
        return None
    return None


def grading_inputs(response: str, row: Any) -> tuple[str | None, str, str, str | None]:
    """(solution source, prompt, tests, entry point): everything a verdict of
    :func:`evaluate` depends on besides the limits. Equal inputs, equal verdicts: a caller
    may grade a repeated tuple once (``actors/verifier.py`` does, per batch)."""
    prompt = _field(row, "prompt") or ""
    tests = _field(row, "tests") or ""
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(tests)
    entry_point = _field(row, "entry_point") or None
    return build_solution(response, prompt, entry_point), prompt, tests, entry_point


MAX_BATCH = 32  # programs per sandbox run (a slot, i.e. two uids, each)


def evaluate(response: str, row: Any, limits: SandboxLimits | None = None, *,
             isolation: Isolation | None = None) -> CodeResult:
    """Run ``response`` against the row's tests in the sandbox; see the module doc.

    A program that does not compile is rejected without a sandbox run
    (:func:`precompile_error`)."""
    return evaluate_many([(response, row)], limits, isolation=isolation, parallel=1)[0]


def evaluate_many(items: list[tuple[str, Any]], limits: SandboxLimits | None = None, *,
                  isolation: Isolation | None = None, parallel: int = 2) -> list[CodeResult]:
    """:func:`evaluate` of every ``(response, row)``, the programs graded together: one
    sandbox (launcher, namespaces, root) per :data:`MAX_BATCH` programs, ``parallel`` of them
    running at once, each with the isolation and limits of a run of its own (module doc).
    About 10 ms CPU per program instead of ~60 for a sandbox each. ``seconds`` of a result
    is its program's own run time in the batch."""
    limits = limits or SandboxLimits()
    results: list[CodeResult | None] = [None] * len(items)
    todo = []  # (index, source, judge config, nonce)
    for i, (response, row) in enumerate(items):
        t0 = time.perf_counter()
        source, prompt, tests, entry_point = grading_inputs(response, row)
        if source is None:
            results[i] = CodeResult(False, "no_code", "no code in the response", time.perf_counter() - t0)
            continue
        error = precompile_error(source)
        if error is not None:
            results[i] = CodeResult(False, "syntax_error", error, time.perf_counter() - t0)
            continue
        nonce = secrets.token_hex(16)
        cfg = marshal.dumps({"nonce": nonce, "entry_point": entry_point, "prompt": prompt, "tests": tests,
                             "max_message": limits.max_message_bytes})
        todo.append((i, source, cfg, nonce))
    if todo:
        isolation = isolation or detect_isolation()
    parallel = max(1, int(parallel))
    for start in range(0, len(todo), MAX_BATCH):
        part = todo[start : start + MAX_BATCH]
        job = {"mode": "batch", "programs": [{"source": source} for _, source, _, _ in part], "parallel": parallel}
        # every program has its own deadline in the init; this one is the backstop
        wall = -(-len(part) // parallel) * (limits.wall_seconds + 0.5) + 5.0
        raw = _run(job, limits, isolation, [cfg for _, _, cfg, _ in part], wall_seconds=wall)
        records = _batch_records(raw.verdict)
        for k, (i, _, _, nonce) in enumerate(part):
            rec = records.get(k)
            if rec is None:  # the batch failed before this program's record
                res = raw.result
                reason: Reason = "timeout" if res.timed_out else "harness_error"
                detail = ("the batch ran over its wall-clock limit" if res.timed_out else
                          res.sandbox_error or f"no record of the program; {res.stderr[-300:]!r}")
                results[i] = CodeResult(False, reason, detail, res.seconds)
                continue
            res = RunResult(returncode=None, stdout=b"", stderr=rec.stderr, timed_out=rec.timed_out,
                            seconds=rec.seconds, oom_killed=raw.oom_killed[k])
            verdict = rec.verdict + f"\nINIT {rec.sol_status} {rec.judge_status}\n".encode()
            reason, detail = _judge_outcome(verdict, nonce, res, limits)
            results[i] = CodeResult(reason == "passed", reason, detail, rec.seconds)
    return results  # type: ignore[return-value]


def _judge_outcome(verdict: bytes, nonce: str, res: RunResult, limits: SandboxLimits) -> tuple[Reason, str]:
    judged: tuple[str, str] | None = None
    sol_status = judge_status = None
    pos = 0
    while pos < len(verdict):
        end = verdict.find(b"\n", pos)
        if end < 0:
            break
        header = verdict[pos:end].split()
        pos = end + 1
        if header[:1] == [b"JUDGE"] and len(header) == 4 and header[3].isdigit():
            body = verdict[pos : pos + int(header[3])]
            pos += int(header[3])
            if hmac.compare_digest(header[1], nonce.encode()):
                judged = (header[2].decode("ascii", "replace"), body.decode("utf-8", "replace"))
        elif header[:1] == [b"INIT"] and len(header) == 3:
            sol_status = int(header[1]) if header[1] != b"-" else None
            judge_status = int(header[2]) if header[2] != b"-" else None
    sol_signal = _signal_of(sol_status)
    tail = res.stderr[-300:].decode("utf-8", "replace").strip()
    if judged is not None and judge_status in (0, None) and judged[0] == "passed":
        return "passed", judged[1]  # written after the tests returned; teardown may have run late
    if res.timed_out:
        return "timeout", f"over the {limits.wall_seconds:g} s wall-clock limit"
    if res.sandbox_error:
        return "harness_error", res.sandbox_error
    if judged is None or judge_status != 0:
        if sol_signal == signal.SIGXCPU:
            return "timeout", "CPU limit"
        if res.oom_killed:
            return "memory", "killed by the memory cgroup"
        return "harness_error", f"the judge gave no verdict (status {judge_status}); {tail}"
    status, detail = judged
    if status == "passed":
        return "passed", detail
    if status == "crashed":
        if sol_signal == signal.SIGXCPU:
            return "timeout", "CPU limit"
        if res.oom_killed:
            return "memory", "killed by the memory cgroup"
        how = (f"killed by {signal.Signals(sol_signal).name}" if sol_signal
               else f"exited with status {os.waitstatus_to_exitcode(sol_status)}" if sol_status is not None else "died")
        return "crashed", f"{detail}: the solution process {how}" + (f"; stderr: {tail}" if tail else "")
    if status in Reason.__args__:  # type: ignore[attr-defined]
        return status, detail  # type: ignore[return-value]
    return "harness_error", f"unknown judge status {status!r}"


def _signal_of(status: int | None) -> int | None:
    if status is None:
        return None
    code = os.waitstatus_to_exitcode(status)
    return -code if code < 0 else None


def grade(response: str, row: Any, limits: SandboxLimits | None = None) -> tuple[bool, str]:
    """Grade a code response against the row's tests; return (correct, reason).

    ``row`` has ``prompt``, ``tests`` and ``entry_point`` (attributes or keys). The reason
    is ``"<Reason>: <detail>"``, e.g. ``"failed: AssertionError at tests.py:3: ..."``.
    """
    return _as_verdict(evaluate(response, row, limits))


def grade_many(items: list[tuple[str, Any]], limits: SandboxLimits | None = None,
               parallel: int = 2) -> list[tuple[bool, str]]:
    """:func:`grade` of every ``(response, row)``, graded together (:func:`evaluate_many`)."""
    return [_as_verdict(r) for r in evaluate_many(items, limits, parallel=parallel)]


def _as_verdict(result: CodeResult) -> tuple[bool, str]:
    detail = result.detail.replace("\n", " ")
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return result.correct, f"{result.reason}: {detail}" if detail else result.reason
