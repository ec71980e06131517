"""JSON inference headers, read with bounded memory and without holding the GIL for long.

A v2 JSON request carries each input's values as `"data": [...]`, flat or nested as any regular array.
`json.loads` would make one Python float per number (about 32 bytes each, three times the text) and hold
the GIL for the whole parse, stalling the event loop. Instead:

1. `load_header` finds each array that follows a "data" key, checks on the way that it holds nothing but
   numbers, brackets, commas and whitespace (a JSON string, boolean, null or object there is a 400), and
   cuts it out of the JSON. What is left (names, shapes, parameters) must fit in HEAD_LIMIT bytes; it
   goes to `json.loads`, whose RecursionError (deep nesting) and ValueError (integers of thousands of
   digits) become 400s.
2. `DataSpan.parse` fills an array of the declared shape and datatype, preallocated, one chunk of text
   at a time: numpy checks each chunk against the JSON number grammar, then `numpy.fromstring` parses it
   in C with the GIL released. Peak memory: the body, the array, and a few chunk-sized buffers.

Nested data is checked for regularity by reducing it to its skeleton (each number becomes `n`,
whitespace goes) and comparing that with the skeleton of the regular array it must be.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import RequestError

HEAD_LIMIT = 1 << 20  # bytes of JSON left once the data arrays are cut out
MAX_DEPTH = 32  # nesting of a data array
SCAN_CHUNK = 1 << 20  # bytes looked at per step when finding where an array ends
PARSE_CHUNK = 1 << 18  # bytes of number text parsed per step

_DATA_KEY = re.compile(rb'"data"[ \t\n\r]*:[ \t\n\r]*\[')
_ARRAY_BYTES = re.compile(rb"[-+.0-9eE,\[\] \t\n\rNaIfinty]*")  # numbers, NaN, Infinity, structure
_BLANK = re.compile(rb"[ \t\n\r]*")
_NO_BRACKETS = bytes.maketrans(b"[]", b"  ")


def _table(chars: bytes) -> np.ndarray:
    t = np.zeros(256, bool)
    t[list(chars)] = True
    return t


_WS = _table(b" \t\n\r")
_DIGIT = _table(b"0123456789")
_NUMBER = _table(b"0123456789+-.eENaIfinty")
_SEP = _table(b" \t\n\r,")
_EXP = _table(b"eE")
_LETTER = _table(b"NaIfinty")  # in NaN and Infinity, which only json.loads parses


def _malformed(where: str) -> RequestError:
    return RequestError(f"malformed JSON in the inference header: {where}")


def _not_numbers(name: str, datatype: str) -> RequestError:
    return RequestError(f"input {name!r}: 'data' is not a regular array of {datatype} numbers")


# ---------------------------------------------------------------------------------------------------
# Finding the data arrays

@dataclass
class DataSpan:
    """A "data" array left in the body text: buf[start:end] runs from its '[' to its ']'."""

    buf: bytes | bytearray
    start: int
    end: int
    opens: int  # '[' in it, its own included: 1 for a flat array

    def parse(self, shape: list[int], dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
        """The values, as an array of `shape` and `dtype` (400 for anything but a regular array of
        JSON numbers holding exactly the elements `shape` needs)."""
        count = math.prod(shape)
        found = self._flat_count() if self.opens == 1 else self._nested_count(name, datatype)
        if found != count:
            raise RequestError(f"input {name!r}: 'data' holds {found} elements, shape {shape} needs {count}")
        out = np.empty(count, dtype)
        filled = 0
        for a, b in _chunks(self.buf, self.start + 1, self.end - 1) if count else ():
            text = bytes(memoryview(self.buf)[a:b])
            values = _numbers(text.translate(_NO_BRACKETS) if self.opens > 1 else text, a, dtype, name, datatype)
            if filled + len(values) > count:
                raise _malformed(f"'data' of input {name!r}")
            with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf, refused by the caller
                out[filled:filled + len(values)] = values
            filled += len(values)
        if filled != count:
            raise _malformed(f"'data' of input {name!r}")
        return out.reshape(shape)

    def _flat_count(self) -> int:
        a, b = self.start + 1, self.end - 1
        if _BLANK.fullmatch(self.buf, a, b):
            return 0
        return sum(self.buf.count(b",", i, min(b, i + SCAN_CHUNK)) for i in range(a, b, SCAN_CHUNK)) + 1

    def _nested_count(self, name: str, datatype: str) -> int:
        """The number of elements of a nested array, which must be regular."""
        parts = [_skeleton(bytes(memoryview(self.buf)[a:b])) for a, b in _chunks(self.buf, self.start + 1,
                                                                                  self.end - 1)]
        skeleton = b"[" + b",".join(parts) + b"]"
        dims = _dims(skeleton)
        if dims is None or skeleton != _regular_skeleton(dims):
            raise _not_numbers(name, datatype)
        return math.prod(dims)


def _escaped(buf, i: int) -> bool:
    """Is the quote at buf[i] escaped (inside a string), i.e. preceded by an odd number of backslashes?"""
    k = i
    while k > 0 and buf[k - 1] == 0x5C:
        k -= 1
    return (i - k) % 2 == 1


def _array_end(buf, start: int) -> tuple[int, int]:
    """(the index after the ']' that closes the '[' at buf[start], the number of '[' up to there).
    Looks at SCAN_CHUNK bytes per step, with numpy, so the GIL is held only briefly."""
    depth, opens, pos, n = 0, 0, start, len(buf)
    view = memoryview(buf)
    while pos < n:
        window = min(n, pos + SCAN_CHUNK)
        stop = _ARRAY_BYTES.match(buf, pos, window).end()
        v = np.frombuffer(view[pos:stop], np.uint8)
        marks = np.flatnonzero((v == 0x5B) | (v == 0x5D))
        if marks.size:
            steps = np.where(v[marks] == 0x5B, 1, -1)
            level = depth + np.cumsum(steps)
            closed = np.flatnonzero(level == 0)
            upto = int(closed[0]) + 1 if closed.size else marks.size
            if int(level[:upto].max()) > MAX_DEPTH:
                raise RequestError(f"a 'data' array is nested deeper than {MAX_DEPTH} levels")
            opens += int((steps[:upto] == 1).sum())
            if closed.size:
                return pos + int(marks[closed[0]]) + 1, opens
            depth = int(level[-1])
        if stop < window:  # a byte that is none of: number, bracket, comma, whitespace
            if chr(buf[stop]).isalpha() or buf[stop] in b'"{':
                raise RequestError("'data' is not a regular array of numbers (JSON numbers only: no strings, "
                                   "booleans, null or objects)")
            raise _malformed(f"a 'data' array is not closed (byte {stop})")
        pos = stop
    raise _malformed("a 'data' array is not closed")


def load_header(buf: bytes | bytearray) -> dict:
    """The JSON inference header in `buf`, with each input's "data" array left in the text as a DataSpan.

    RequestError (400) for malformed JSON, nesting too deep, numbers too long, a header over HEAD_LIMIT
    bytes once the data arrays are cut out, or a data array holding anything but numbers."""
    buf = _utf8(buf)
    nonce = secrets.token_hex(8)
    cuts, spans, kept, pos = [], {}, [], 0
    m = _DATA_KEY.search(buf)
    while m:
        if _escaped(buf, m.start()):
            m = _DATA_KEY.search(buf, m.start() + 1)
            continue
        start = m.end() - 1
        end, opens = _array_end(buf, start)
        key = f"\x00{nonce}:{len(spans)}"
        spans[key] = DataSpan(buf, start, end, opens)
        cuts.append((start, end, json.dumps(key).encode()))
        pos = end
        m = _DATA_KEY.search(buf, pos)
    size = len(buf) - sum(e - s - len(k) for s, e, k in cuts)
    if size > HEAD_LIMIT:
        raise RequestError(f"the inference header is {size} bytes without its 'data' arrays, over the limit "
                           f"of {HEAD_LIMIT}")
    pos = 0
    for s, e, k in cuts:
        kept += [buf[pos:s], k]
        pos = e
    kept.append(buf[pos:])
    request = _loads(b"".join(kept), cuts)
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for item in inputs if isinstance(inputs, list) else ():
        if isinstance(item, dict) and isinstance(item.get("data"), str) and item["data"] in spans:
            item["data"] = spans[item["data"]]
    return request


def _utf8(buf):
    """`buf` as UTF-8 without a BOM (json.loads also takes UTF-16 and UTF-32, so this does too)."""
    encoding = json.detect_encoding(bytes(buf[:4]))
    if encoding == "utf-8":
        return buf
    try:
        return bytes(buf).decode(encoding).encode()
    except UnicodeError:
        raise RequestError("the inference header is not UTF-8 JSON") from None


def _loads(text: bytes, cuts: list[tuple[int, int, bytes]]):
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise RequestError("the inference header is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:  # the message holds a position, never content
        pos = exc.pos
        for s, e, k in cuts:  # back to a position in the body as sent
            if pos >= s + len(k):
                pos += (e - s) - len(k)
        raise _malformed(f"{exc.msg} at byte {pos}") from None
    except RecursionError:
        raise RequestError("the inference header is nested too deeply") from None
    except ValueError:  # int() of thousands of digits
        raise RequestError("the inference header holds a number with too many digits") from None


# ---------------------------------------------------------------------------------------------------
# Parsing numbers

def _chunks(buf, a: int, b: int):
    """(start, stop) pieces of buf[a:b] of about PARSE_CHUNK bytes, cut at commas (which are dropped)."""
    pos = a
    while True:
        cut = buf.find(b",", min(pos + PARSE_CHUNK, b), b) if pos + PARSE_CHUNK < b else -1
        cut = b if cut < 0 else cut
        yield pos, cut
        if cut >= b:
            return
        pos = cut + 1


def _skeleton(text: bytes) -> bytes:
    """text without whitespace, each number (or NaN/Infinity) written `n`: '[1.5, -2]' -> '[n,n]'."""
    v = np.frombuffer(text, np.uint8)
    num = _NUMBER[v]
    first = num.copy()
    first[1:] &= ~num[:-1]
    keep = first | ~(num | _WS[v])
    out = v[keep].copy()
    out[first[keep]] = ord("n")
    return out.tobytes()


def _dims(skeleton: bytes) -> list[int] | None:
    """The shape a regular nested array would have, read off the first element at each depth."""
    k = len(skeleton) - len(skeleton.lstrip(b"["))
    dims, inner = [], 1  # inner: length of one element one level down ('n')
    for r in range(1, k + 1):
        f = skeleton.find(b"]" * r)
        if f < 0:
            return None
        length = f + 2 * r - k  # of the first array at depth k - r + 1
        d, rest = divmod(length - 1, inner + 1)
        if rest or d < 1:
            return None
        dims.append(d)
        inner = length
    return dims[::-1] or None


def _regular_skeleton(dims: list[int]) -> bytes:
    sub = b"n"
    for d in reversed(dims):
        sub = b"[" + b",".join([sub] * d) + b"]"
    return sub


def _numbers(text: bytes, offset: int, dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
    """The comma-separated JSON numbers in `text` (no brackets), as float64 or int64."""
    v = np.frombuffer(text, np.uint8)
    if dtype.kind != "f" or _LETTER[v].any():
        return _numbers_json(text, dtype, name, datatype)
    bad = _first_violation(v)
    if bad >= 0:
        raise _malformed(f"a bad number at byte {offset + bad}")
    values = np.fromstring(text, np.float64, sep=",")
    if values.size != text.count(b",") + 1:
        raise _malformed(f"a bad number after byte {offset}")
    return values


def _numbers_json(text: bytes, dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
    """The slow exact path: NaN/Infinity for floats (json.loads reads them), and integer datatypes."""
    try:
        values = json.loads(b"[" + text + b"]")
    except json.JSONDecodeError:
        raise _malformed(f"'data' of input {name!r}") from None
    except ValueError:
        raise RequestError("the inference header holds a number with too many digits") from None
    if dtype.kind == "f":
        if not all(type(x) in (int, float) for x in values):
            raise _not_numbers(name, datatype)
        return np.asarray(values, np.float64)
    if not all(type(x) is int for x in values):
        raise _not_numbers(name, datatype)
    lo, hi = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    if values and (min(values) < lo or max(values) > hi):
        raise RequestError(f"input {name!r}: a value in 'data' is out of the range of {datatype}")
    return np.asarray(values, dtype)


def _first_violation(v: np.ndarray) -> int:
    """Index of the first byte where the JSON number grammar breaks in a comma-separated list of numbers
    (bytes: digits, + - . e E, commas, whitespace), or -1. What passes, numpy.fromstring parses exactly
    as json.loads would."""
    p = np.concatenate(([32, 32], v, [32]))  # whitespace pads: prev2, prev, c, nxt
    prev2, prev, c, nxt = p[:-3], p[1:-2], p[2:-1], p[3:]
    digit_before, digit_after, exp_before = _DIGIT[prev], _DIGIT[nxt], _EXP[prev]
    starts = _SEP[prev] | ((prev == 0x2D) & _SEP[prev2])  # where a number starts (after an optional '-')
    bad = (((c == 0x2B) & ~(exp_before & digit_after))  # '+' only in an exponent
           | ((c == 0x2D) & ~((_SEP[prev] | exp_before) & digit_after))  # '-' leads a number or an exponent
           | ((c == 0x2E) & ~(digit_before & digit_after))  # '.' between digits
           | (_EXP[c] & ~(digit_before & (digit_after | (nxt == 0x2B) | (nxt == 0x2D))))
           | ((c == 0x30) & starts & digit_after))  # no leading zeros
    found = [np.flatnonzero(bad)[:1]]
    sig = np.flatnonzero(~_WS[v])  # one number per comma-separated item, no space inside it
    if sig.size == 0:
        return 0
    comma = v[sig] == 0x2C
    found += [sig[:1][comma[:1]], sig[-1:][comma[-1:]], sig[1:][comma[:-1] & comma[1:]],
              sig[1:][~comma[:-1] & ~comma[1:] & (np.diff(sig) != 1)]]
    item = np.cumsum(v == 0x2C)  # one '.' and one exponent per number, the '.' first
    dots, exps = np.flatnonzero(c == 0x2E), np.flatnonzero(_EXP[c])
    found += [dots[1:][np.diff(item[dots]) == 0], exps[1:][np.diff(item[exps]) == 0]]
    if dots.size and exps.size:
        i = np.minimum(np.searchsorted(item[exps], item[dots]), exps.size - 1)
        found.append(dots[(item[exps][i] == item[dots]) & (exps[i] < dots)])
    found = np.concatenate(found)
    return int(found.min()) if found.size else -1
