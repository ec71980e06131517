"""The KServe Open Inference Protocol v2 wire format, with Triton's binary tensor data extension.

A message (request or response) is a JSON header, optionally followed by raw tensor bytes: then the
`Inference-Header-Content-Length` HTTP header gives the JSON's length, and each binary tensor's
`parameters.binary_data_size` its share of the tail, in the order the tensors appear. Binary data is
little-endian, row-major. Without binary parts the whole body is JSON and tensors sit in `data`.

Both sides use this module: the server parses requests and encodes responses, the device's client
(`cvconvert.device.remote`) encodes requests with the same helpers. numpy and the standard library only.

Error messages (RequestError) never quote tensor content: they name inputs, shapes and sizes.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import RequestError
from .jsontensor import DataSpan, load_header

__all__ = ["HEADER_LENGTH", "V2_TO_NP", "NP_TO_V2", "RequestError", "TensorSpec", "le_bytes", "pack", "split_body",
           "parse_inputs", "requested_outputs", "encode_response", "finite"]

HEADER_LENGTH = "Inference-Header-Content-Length"

V2_TO_NP = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_,
}
NP_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NP.items()}


@dataclass
class TensorSpec:
    """One input or output of a served model as v2 metadata lists it."""

    name: str
    datatype: str
    shape: list[int]  # -1 for a dynamic dim

    def as_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def le_bytes(arr: np.ndarray) -> bytes:
    """The tensor's raw bytes as the binary extension carries them: little-endian, row-major."""
    arr = np.ascontiguousarray(arr)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def pack(header: dict, blobs: list[bytes], allow_nan: bool = False) -> tuple[bytes, int | None]:
    """(body, JSON header length) of a message; the length is None when the body is all JSON."""
    return pack_pieces([json.dumps(header, allow_nan=allow_nan, separators=(",", ":")).encode()], blobs)


def pack_pieces(header: list[bytes], blobs: list[bytes]) -> tuple[bytes, int | None]:
    """pack, for a JSON header given in pieces."""
    size = sum(len(p) for p in header)
    if not blobs:
        return b"".join(header), None
    return b"".join([*header, *blobs]), size


# ---------------------------------------------------------------------------------------------------
# Requests (server side)

def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{what} must be an integer >= {minimum}")
    return value


def split_body(body: bytes | bytearray, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON inference header, the binary tail) of a request body. Each input's JSON "data" array
    is left in the body as a DataSpan, parsed later into the declared shape (see jsontensor)."""
    if header_length is None:
        json_bytes, tail = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} is not an integer") from None
        if not 0 < n <= len(body):
            raise RequestError(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        json_bytes, tail = body[:n], memoryview(body)[n:]
    request = load_header(json_bytes)
    if not isinstance(request, dict):
        raise RequestError("the inference header must be a JSON object")
    return request, tail


def _check_shape(shape, spec: TensorSpec) -> list[int]:
    if not isinstance(shape, list):
        raise RequestError(f"input {spec.name!r}: 'shape' must be a list of integers")
    shape = [_int(d, f"input {spec.name!r}: each dim of 'shape'") for d in shape]
    if len(shape) != len(spec.shape) or any(w != -1 and d != w for d, w in zip(shape, spec.shape)):
        raise RequestError(f"input {spec.name!r}: shape {shape} does not match the model's {spec.shape}")
    if shape and shape[0] == 0:
        raise RequestError(f"input {spec.name!r}: empty batch")
    return shape


def finite(arr: np.ndarray) -> bool:
    """No NaN or +-Inf (always true for non-float tensors)."""
    return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())


def _input_spec(item, specs: dict[str, TensorSpec], feeds: dict, model_name: str) -> tuple[str, TensorSpec]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise RequestError("each input must be an object with a string 'name'")
    name = item["name"][:64]  # echoed in messages: bounded
    spec = specs.get(item["name"])
    if spec is None:
        raise RequestError(f"unknown input {name!r}; model {model_name!r} takes {sorted(specs)}")
    if name in feeds:
        raise RequestError(f"input {name!r} given twice")
    if item.get("datatype") != spec.datatype:
        got = item.get("datatype")
        raise RequestError(f"input {name!r}: datatype {got[:16] if isinstance(got, str) else type(got).__name__!r}"
                           f" does not match the model's {spec.datatype}")
    return name, spec


def _binary_input(item, name: str, params: dict, shape: list[int], dtype: np.dtype, tail: memoryview,
                  offset: int) -> np.ndarray:
    size = _int(params["binary_data_size"], f"input {name!r}: binary_data_size")
    count = math.prod(shape)
    if "data" in item:
        raise RequestError(f"input {name!r} has both binary_data_size and JSON 'data'")
    if size != count * dtype.itemsize:
        raise RequestError(f"input {name!r}: binary_data_size {size} is not shape {shape} x "
                           f"{dtype.itemsize} bytes = {count * dtype.itemsize}")
    if offset + size > len(tail):
        raise RequestError(f"input {name!r}: binary data truncated ({len(tail) - offset} of "
                           f"{size} bytes present)")
    return np.frombuffer(tail[offset:offset + size], dtype=dtype).reshape(shape)


def _only_numbers(value) -> bool:
    """A number or nested lists of numbers: no strings, booleans or null (json.loads made `value`)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif type(v) not in (int, float):
            return False
    return True


def _json_input(item, name: str, spec: TensorSpec, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if "data" not in item:
        raise RequestError(f"input {name!r} has neither 'data' nor binary_data_size")
    if isinstance(item["data"], DataSpan):  # the usual case: an array, still text
        return item["data"].parse(shape, dtype, name, spec.datatype)
    count = math.prod(shape)
    if not _only_numbers(item["data"]):
        raise RequestError(f"input {name!r}: 'data' is not a regular array of {spec.datatype} numbers")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf, refused by the caller
            arr = np.asarray(item["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError):  # their messages may quote the data
        raise RequestError(f"input {name!r}: 'data' is not a regular array of {spec.datatype} numbers") from None
    if arr.size != count:
        raise RequestError(f"input {name!r}: 'data' holds {arr.size} elements, shape {shape} needs {count}")
    return arr.reshape(shape)


def parse_inputs(request: dict, tail: memoryview, model, allow_nonfinite: bool = False
                 ) -> dict[str, np.ndarray]:
    """The feeds of an infer request, checked against `model` (anything with `.name` and `.inputs`,
    a list of TensorSpec): names, datatypes (no implicit casts), ranks and fixed dims, sizes."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list")
    specs = {t.name: t for t in model.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        name, spec = _input_spec(item, specs, feeds, model.name)
        shape = _check_shape(item.get("shape"), spec)
        dtype = np.dtype(V2_TO_NP[spec.datatype]).newbyteorder("<")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"input {name!r}: 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise RequestError("shared-memory inputs are not supported by this server")
        if "binary_data_size" in params:
            arr = _binary_input(item, name, params, shape, dtype, tail, offset)
            offset += arr.nbytes
        else:
            arr = _json_input(item, name, spec, shape, dtype)
        if not allow_nonfinite and not finite(arr):
            raise RequestError(f"input {name!r} holds non-finite values (NaN or Inf), which this server refuses")
        feeds[name] = arr
    if offset != len(tail):
        raise RequestError(f"{len(tail) - offset} bytes of binary data after the last binary input")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise RequestError(f"missing input(s) {missing}")
    return feeds


def requested_outputs(request: dict, model) -> list[tuple[str, bool]]:
    """[(output name, as binary)]; no 'outputs' means every output."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise RequestError("binary_data_output must be true or false")
    wanted = request.get("outputs")
    names = [t.name for t in model.outputs]
    if wanted is None:
        return [(n, default_binary) for n in names]
    if not isinstance(wanted, list) or not wanted:
        raise RequestError("'outputs' must be a non-empty list when given")
    out = []
    for item in wanted:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError("each requested output must be an object with a string 'name'")
        if item["name"] not in names:
            raise RequestError(f"unknown output {item['name'][:64]!r}; model {model.name!r} gives {names}")
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise RequestError(f"output {item['name']!r}: 'parameters' must be an object")
        if p.get("classification"):
            raise RequestError("the classification extension is not supported")
        if "shared_memory_region" in p:
            raise RequestError("shared-memory outputs are not supported by this server")
        binary = p.get("binary_data", default_binary)  # per-output wins over the request-level flag
        if not isinstance(binary, bool):
            raise RequestError(f"output {item['name']!r}: binary_data must be true or false")
        out.append((item["name"], binary))
    return out


# ---------------------------------------------------------------------------------------------------
# Responses (server side)

JSON_CHUNK = 1 << 16  # output elements turned into JSON text per step


def _json_numbers(arr: np.ndarray, allow_nan: bool) -> list[bytes]:
    """arr's values as the JSON array json.dumps(arr.ravel().tolist()) writes, in pieces: no list of
    Python floats for the whole tensor."""
    flat, pieces = arr.ravel(), [b"["]
    for i in range(0, flat.size, JSON_CHUNK):
        text = json.dumps(flat[i:i + JSON_CHUNK].tolist(), allow_nan=allow_nan, separators=(",", ":"))
        pieces += [b"," if i else b"", text[1:-1].encode()]
    return pieces + [b"]"]


def encode_response(model, request_id, outputs: list[tuple[str, bool, np.ndarray]],
                    allow_nan: bool = False) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON)."""
    entries, blobs, texts = [], [], {}
    nonce = secrets.token_hex(8)  # marks where each output's JSON data goes; a client cannot forge it
    for i, (name, binary, arr) in enumerate(outputs):
        arr = np.ascontiguousarray(arr)
        datatype = NP_TO_V2.get(np.dtype(arr.dtype.type))
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = le_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = mark = f"{nonce}:{i}"
            texts[json.dumps(mark)] = _json_numbers(arr, allow_nan)
        entries.append(entry)
    reply = {"model_name": model.name, "model_version": model.versions[0], "outputs": entries}
    if request_id is not None:
        reply["id"] = request_id
    head, pieces = json.dumps(reply, allow_nan=allow_nan, separators=(",", ":")), []
    for mark, numbers in texts.items():
        before, head = head.split(mark, 1)
        pieces += [before.encode(), *numbers]
    return pack_pieces([*pieces, head.encode()], blobs)
