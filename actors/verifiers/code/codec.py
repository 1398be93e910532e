"""Value codec and message framing between the solution and judge processes (sandbox side).

Values cross the process boundary in a small tagged binary format whose decoder builds
plain data only (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset, range, Decimal, Fraction; an iterator comes back as an iterator over its
items), never objects with methods of the sender's choosing: an always-equal object cannot
be sent, and monkeypatched builtins stay in the solution process. Messages are a 4-byte
length and the encoded bytes, refused over a limit.

This module runs inside the sandbox too (shipped as a code object by ``runner.py``): it
imports only ``os`` and ``sys``.
"""

from __future__ import annotations

import os
import sys

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

