"""The bounded JSON reader of `cvconvert serve` (cvconvert.serve.jsontensor) against json.loads: on any
text built from number-like tokens, it accepts exactly what json.loads accepts as a regular array of
numbers and gives the same float32 values, and refuses the rest with a 400 (never another exception)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvconvert.serve import jsontensor
from cvconvert.serve.errors import RequestError
from cvconvert.serve.protocol import TensorSpec, parse_inputs, split_body


class Model:
    name = "m"

    def __init__(self, shape, datatype="FP32"):
        self.inputs = [TensorSpec("x", datatype, list(shape))]


def served(data_text: bytes, shape, datatype="FP32"):
    """What the server makes of `"data": data_text` for an input of `shape`: an array or 'refused'."""
    body = (b'{"inputs":[{"name":"x","datatype":"' + datatype.encode() + b'","shape":'
            + json.dumps(list(shape)).encode() + b',"data":' + data_text + b"}]}")
    try:
        req, tail = split_body(body, None)
        return parse_inputs(req, tail, Model(shape, datatype), allow_nonfinite=True)["x"]
    except RequestError as exc:
        assert exc.status == 400
        return "refused"


def reference(data_text: bytes, shape, dtype=np.float32):
    """json.loads + numpy, refusing anything but a regular array of JSON numbers of the right size."""
    try:
        value = json.loads(data_text)
    except ValueError:
        return "refused"
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif type(v) not in (int, float):
            return "refused"
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(value, dtype)
    except (ValueError, OverflowError):
        return "refused"
    return arr.reshape(shape) if arr.size == int(np.prod(shape)) else "refused"


def same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


TOKENS = ["0", "1", "-1", "12", "0.5", "-0.25", "1e3", "1E-3", "2e+2", "-0", "1.5e-7", "3.4e38", "1e400", "NaN",
          "Infinity", "-Infinity", "00", "+1", ".5", "1.", "1e", "--1", "1.2.3", "1e5e5", "1-2", "0x1", "nan",
          "", " ", "\t", "\n"]


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(TOKENS), min_size=0, max_size=8), seps=st.lists(
    st.sampled_from([",", ", ", " ,", ",,", " ", "\n,\t"]), min_size=8, max_size=8), size=st.integers(1, 6))
def test_flat_number_lists_match_json_loads(tokens, seps, size):
    text = "[" + "".join(t + s for t, s in zip(tokens, seps))[:-1] + "]" if tokens else "[]"
    data = text.encode()
    assert same(served(data, [size]), reference(data, [size])), text


@settings(max_examples=200, deadline=None)
@given(value=st.recursive(st.floats(allow_nan=False, width=32) | st.integers(-10 ** 6, 10 ** 6),
                          lambda c: st.lists(c, min_size=1, max_size=3), max_leaves=12),
       indent=st.sampled_from([None, 1]))
def test_nested_arrays_match_json_loads(value, indent):
    """Regular or ragged nestings (and bare numbers), numbers of every form json.dumps writes, compact or
    pretty-printed, against the declared shape, flat, and one shape of the wrong size."""
    data = json.dumps(value, indent=indent).encode()
    try:
        arr = np.asarray(value, np.float32)
    except ValueError:  # ragged
        arr = np.zeros(2)
    for shape in ([arr.size], list(arr.shape) or [1], [1, arr.size], [arr.size + 1]):
        assert same(served(data, shape), reference(data, shape)), (data, shape)


def test_large_flat_array_in_chunks_equals_json_loads(monkeypatch):
    """Chunk boundaries (made small here) fall inside numbers' neighbourhoods without changing anything."""
    monkeypatch.setattr(jsontensor, "PARSE_CHUNK", 37)
    monkeypatch.setattr(jsontensor, "SCAN_CHUNK", 53)
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 7)).astype(np.float32) * 1e3
    for text in (json.dumps(x.ravel().tolist()), json.dumps(x.tolist()), json.dumps(x.tolist(), indent=2)):
        np.testing.assert_array_equal(served(text.encode(), x.shape), x)
    assert served(json.dumps(x.tolist()).replace("]], [[", "], [", 1).encode(), x.shape) == "refused"


@pytest.mark.parametrize("data, words", [
    (b"[" * 40 + b"1" + b"]" * 40, "nested deeper"),
    (b'["0.5"]', "JSON numbers only"),
    (b"[true]", "JSON numbers only"),
    (b"[1, 2", "not closed"),
])
def test_refusals_name_the_problem(data, words):
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + data + b"}]}"
    with pytest.raises(RequestError, match=words):
        split_body(body, None)


def test_integer_datatypes_are_exact_and_range_checked():
    assert served(b"[9007199254740993, -1]", [2], "INT64").tolist() == [9007199254740993, -1]
    assert served(b"[1.5, 2]", [2], "INT32") == "refused"  # no silent truncation
    assert served(b"[300, 1]", [2], "UINT8") == "refused"
    assert served(b"[0, 1]", [2], "BOOL").tolist() == [False, True]


def test_header_without_data_is_bounded():
    body = b'{"inputs":[],"id":"' + b"a" * (jsontensor.HEAD_LIMIT + 10) + b'"}'
    with pytest.raises(RequestError, match="over the limit"):
        split_body(body, None)
