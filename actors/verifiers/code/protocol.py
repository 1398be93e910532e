"""The solution process and the fds of the solution/judge protocol (sandbox side).

The **solution** process executes ``prompt + response`` (the response alone when it defines
the entry point and the prompt is not code), announces its names (callables, stdlib
modules, plain-data values), then serves calls until EOF: it receives ``(function name,
args, kwargs)`` and answers ``("r", return value)`` or ``("e", exception description)``,
encoded by ``codec.py``. It runs under its own unprivileged uid and never holds the tests,
the nonce or the verdict pipe (``judge.py`` does).

Runs inside the sandbox (shipped as a code object by ``runner.py``, in one namespace with
``codec.py``): it imports only ``os`` at module level.
"""

from __future__ import annotations

import os

if __name__ != "uniopd_sandbox":  # in the sandbox, the shipped modules share one namespace
    from .codec import _recv_msg, _send_msg, decode_value, encode_value

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

