"""The judge process: trusted prompt and tests against proxies of the solution (sandbox side).

The judge executes only trusted text: the prompt (so the helpers the tests call are the
dataset's own, not a redefinition by the response) and the tests, with the entry point
(and any other solution name the tests reference that is neither a builtin nor defined by
the prompt) bound to a proxy that forwards the call to the solution process. Of the
sandboxed processes only the judge holds the verdict pipe (an fd the solution never has,
in a process of another uid), and it writes the verdict -- with a per-run random nonce it
received through a private pipe -- after ``check(candidate)`` returned, and only if the
tests made at least one call. Exiting early, ``SystemExit`` from the candidate and the
solution process dying all surface here as a failed call (an exception of a class the
tests cannot swallow with ``except Exception``).

Runs inside the sandbox (shipped as a code object by ``runner.py``, in one namespace with
``codec.py`` and ``protocol.py``).
"""

from __future__ import annotations

import os
import sys

if __name__ != "uniopd_sandbox":  # in the sandbox, the shipped modules share one namespace
    from .codec import _read_to_eof, _recv_msg, _send_msg, _write_all, decode_value, encode_value
    from .protocol import _JUDGE_CFG_FD, _JUDGE_RFD, _JUDGE_VERDICT_FD, _JUDGE_WFD


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

