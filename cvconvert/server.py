"""`cvconvert serve`: an ONNX graph behind the KServe Open Inference Protocol v2 (REST) with Triton's
binary tensor data extension, so `tritonclient.http` and any v2 client work unchanged.

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{name}[/versions/{v}] | .../ready | .../config
    POST /v2/models/{name}[/versions/{v}]/infer

Needs only onnxruntime, numpy and the ASGI stack (Starlette on uvicorn): no torch, so the cloud machine
stays small. The server sees only what the device sends (the rotated feature x), never theta.

Policies (README "Serve"):
- every error is a JSON body {"error": "..."}; 400 bad request, 404 unknown model/version/route,
  413 body over --max-request-mb, 503 too many requests in flight, 500 a bug (the server keeps serving);
- inputs must match the model's metadata exactly: names, datatype (no implicit casts), rank, fixed dims;
- non-finite values (NaN, +-Inf) are refused with 400, in inputs and in outputs: a correct encoder never
  produces them and they would only propagate to a meaningless answer;
- nothing from a request body (tensor values, ids, parameters) is logged or echoed in an error message;
  the access log (method, path, status) is uvicorn's and can be switched off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CvError, one_line

log = logging.getLogger("cvconvert.serve")

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"  # one version per served model, as in the Triton repository `export --triton-repo` writes
DEFAULT_MAX_REQUEST_MB = 64.0

# ONNX Runtime type strings <-> v2 datatype names (BYTES/BF16 are not served: no such inputs here).
ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
}
V2_TO_NP = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_,
}
NP_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NP.items()}


class RequestError(Exception):
    """A problem with one request: becomes {"error": message} with this status. Messages never quote
    tensor content."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 for a dynamic dim

    def as_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(node) -> TensorSpec:
    dtype = ORT_TO_V2.get(node.type)
    if dtype is None:
        raise CvError(f"tensor {node.name!r} has type {node.type}, which this server does not serve")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or [])]
    return TensorSpec(node.name, dtype, shape)


@dataclass
class ServedModel:
    """One ONNX graph in an ONNX Runtime session, with the v2 metadata of its inputs and outputs."""

    name: str
    path: Path
    session: object
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str = "onnxruntime_onnx"
    versions: list[str] = field(default_factory=lambda: [VERSION])

    def metadata(self) -> dict:
        return {"name": self.name, "versions": self.versions, "platform": self.platform,
                "inputs": [t.as_json() for t in self.inputs], "outputs": [t.as_json() for t in self.outputs]}

    def config(self) -> dict:
        """A Triton-style model config (tritonclient's get_model_config), dims including the batch axis."""
        def dims(t):
            return {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": t.shape}
        return {"name": self.name, "platform": self.platform, "backend": "onnxruntime", "max_batch_size": 0,
                "input": [dims(t) for t in self.inputs], "output": [dims(t) for t in self.outputs]}

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, feeds)


def resolve_model_path(path: Path | str, name: str | None = None) -> tuple[Path, str]:
    """PROCESSING.onnx, a model dir (DIR/onnx/processing.onnx), a Triton model folder (M/1/model.onnx)
    or a Triton repository holding one model -> (onnx file, model name)."""
    path = Path(path)
    if not path.exists():
        raise CvError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".onnx":
            raise CvError(f"{path} is not an .onnx file (give PROCESSING.onnx or a model directory)")
        if path.name == "model.onnx" and path.parent.name.isdigit():  # a Triton model folder's NAME/1/model.onnx
            default = path.parent.parent.name
        elif path.parent.name == "onnx" and (path.parent.parent / "cvconvert.json").is_file():
            default = _manifest_name(path.parent.parent)  # DIR/onnx/processing.onnx
        else:
            default = path.stem
        return path, name or default
    if (path / "onnx" / "processing.onnx").is_file():
        return path / "onnx" / "processing.onnx", name or _manifest_name(path)
    if (path / VERSION / "model.onnx").is_file():
        return path / VERSION / "model.onnx", name or path.name
    found = sorted(path.glob(f"*/{VERSION}/model.onnx"))
    if len(found) == 1:
        return found[0], name or found[0].parent.parent.name
    if (path / "cvconvert.json").is_file():
        raise CvError(f"{path} has no onnx/processing.onnx: run `cvconvert export {path}` first")
    raise CvError(f"{path} holds no processing.onnx, no {VERSION}/model.onnx and no single Triton model")


def _manifest_name(model_dir: Path) -> str:
    """ARCH_processing, the name `cvconvert export --triton-repo` gives the same graph by default, so a
    client uses one model name whether it talks to `cvconvert serve` or to Triton/KServe."""
    try:
        arch = json.loads((model_dir / "cvconvert.json").read_text())["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        return "processing"
    return f"{arch}_processing" if isinstance(arch, str) and arch and "/" not in arch else "processing"


def load_model(path: Path | str, name: str | None = None, intra_op_threads: int = 0,
               providers: list[str] | None = None) -> ServedModel:
    """intra_op_threads: ONNX Runtime threads per run; 0 = the CPUs this process may use."""
    from .ortsession import create_session

    onnx_path, model_name = resolve_model_path(path, name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name or ""):
        raise CvError(f"bad model name {model_name!r}: use letters, digits, '_', '-', '.'")
    session = create_session(onnx_path, providers or ["CPUExecutionProvider"], intra_op_threads or None)
    return ServedModel(model_name, onnx_path, session,
                       [_spec(i) for i in session.get_inputs()], [_spec(o) for o in session.get_outputs()])


# ---------------------------------------------------------------------------------------------------
# Request parsing: v2 JSON + Triton binary tensor extension

def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{what} must be an integer >= {minimum}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON inference header, the binary tail) of a request body."""
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
    try:
        request = json.loads(json_bytes)
    except UnicodeDecodeError:
        raise RequestError("the inference header is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:  # the message holds a position, never content
        raise RequestError(f"malformed JSON in the inference header: {exc.msg} at byte {exc.pos}") from None
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


def _finite(arr: np.ndarray) -> bool:
    return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())


def parse_inputs(request: dict, tail: memoryview, model: ServedModel, allow_nonfinite: bool = False
                 ) -> dict[str, np.ndarray]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list")
    specs = {t.name: t for t in model.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError("each input must be an object with a string 'name'")
        name = item["name"][:64]  # echoed in messages: bounded
        spec = specs.get(item["name"])
        if spec is None:
            raise RequestError(f"unknown input {name!r}; model {model.name!r} takes {sorted(specs)}")
        if name in feeds:
            raise RequestError(f"input {name!r} given twice")
        if item.get("datatype") != spec.datatype:
            got = item.get("datatype")
            raise RequestError(f"input {name!r}: datatype {got[:16] if isinstance(got, str) else type(got).__name__!r}"
                               f" does not match the model's {spec.datatype}")
        shape = _check_shape(item.get("shape"), spec)
        dtype = np.dtype(V2_TO_NP[spec.datatype]).newbyteorder("<")
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"input {name!r}: 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise RequestError("shared-memory inputs are not supported by this server")
        if "binary_data_size" in params:
            size = _int(params["binary_data_size"], f"input {name!r}: binary_data_size")
            if "data" in item:
                raise RequestError(f"input {name!r} has both binary_data_size and JSON 'data'")
            if size != count * dtype.itemsize:
                raise RequestError(f"input {name!r}: binary_data_size {size} is not shape {shape} x "
                                   f"{dtype.itemsize} bytes = {count * dtype.itemsize}")
            if offset + size > len(tail):
                raise RequestError(f"input {name!r}: binary data truncated ({len(tail) - offset} of "
                                   f"{size} bytes present)")
            arr = np.frombuffer(tail[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise RequestError(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf, refused below
                    arr = np.asarray(item["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError):  # their messages may quote the data
                raise RequestError(f"input {name!r}: 'data' is not a regular array of {spec.datatype} numbers") from None
            if arr.size != count:
                raise RequestError(f"input {name!r}: 'data' holds {arr.size} elements, shape {shape} needs {count}")
            arr = arr.reshape(shape)
        if not allow_nonfinite and not _finite(arr):
            raise RequestError(f"input {name!r} holds non-finite values (NaN or Inf), which this server refuses")
        feeds[name] = arr
    if offset != len(tail):
        raise RequestError(f"{len(tail) - offset} bytes of binary data after the last binary input")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise RequestError(f"missing input(s) {missing}")
    return feeds


def requested_outputs(request: dict, model: ServedModel) -> list[tuple[str, bool]]:
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


def encode_response(model: ServedModel, request_id, outputs: list[tuple[str, bool, np.ndarray]],
                    allow_nan: bool = False) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON)."""
    entries, blobs = [], []
    for name, binary, arr in outputs:
        arr = np.ascontiguousarray(arr)
        datatype = NP_TO_V2.get(np.dtype(arr.dtype.type))
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    reply = {"model_name": model.name, "model_version": VERSION, "outputs": entries}
    if request_id is not None:
        reply["id"] = request_id
    header = json.dumps(reply, allow_nan=allow_nan, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# ---------------------------------------------------------------------------------------------------
# The ASGI app

@dataclass
class ServerOptions:
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2 ** 20)
    threads: int = 2  # inference runs at once (a thread pool off the event loop)
    max_inflight: int = 64  # requests parsed/queued/running at once; more get 503
    allow_nonfinite: bool = False
    max_batch: int = 1  # > 1: dynamic batching of concurrent requests up to this many rows
    batch_delay_ms: float = 2.0  # how long the first request of a batch waits for company


class Batcher:
    """Dynamic batching: concurrent requests with the same per-row shapes are stacked along the batch axis,
    run once, and split back. Only for graphs whose rows are independent (checked at start-up by
    `rows_independent`), so a client's answer never depends on who else was in the batch."""

    def __init__(self, model: ServedModel, executor, max_batch: int, delay_s: float, concurrency: int):
        self.model, self.executor, self.max_batch, self.delay_s = model, executor, max_batch, delay_s
        self.queue: asyncio.Queue | None = None
        self.slots: asyncio.Semaphore | None = None
        self.concurrency = concurrency
        self.task = None
        self.running: set = set()

    def _start(self):
        self.queue = asyncio.Queue()
        self.slots = asyncio.Semaphore(self.concurrency)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if self.task is None:
            self._start()
        fut = asyncio.get_running_loop().create_future()
        key = (tuple(names), tuple((k, v.shape[1:]) for k, v in sorted(feeds.items())))
        await self.queue.put((key, feeds, names, fut))
        return await fut

    async def _loop(self):
        pending = None
        while True:
            first = pending or await self.queue.get()
            pending, batch = None, [first]
            rows = len(next(iter(first[1].values())))
            deadline = asyncio.get_running_loop().time() + self.delay_s
            while rows < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                n = len(next(iter(item[1].values())))
                if item[0] != first[0] or rows + n > self.max_batch:
                    pending = item  # starts the next batch
                    break
                batch.append(item)
                rows += n
            await self.slots.acquire()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.running.discard)

    async def _run(self, batch):
        try:
            names = batch[0][2]
            counts = [len(next(iter(b[1].values()))) for b in batch]
            feeds = {k: np.concatenate([b[1][k] for b in batch]) if len(batch) > 1 else batch[0][1][k]
                     for k in batch[0][1]}
            try:
                outs = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.run, feeds, names)
            except Exception as exc:
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(exc)
                return
            if any(o.shape[:1] != (sum(counts),) for o in outs):
                err = RuntimeError("an output's batch axis does not match the stacked inputs")
                for b in batch:
                    b[3].set_exception(err)
                return
            cuts = np.cumsum(counts)[:-1]
            parts = [np.split(o, cuts) for o in outs]
            for i, b in enumerate(batch):
                if not b[3].done():  # the client may have gone away
                    b[3].set_result([p[i] for p in parts])
        finally:
            self.slots.release()


def rows_independent(model: ServedModel, rows: int = 3) -> bool:
    """Does row i of the output depend only on row i of the input? (Needed for dynamic batching.)
    Checked once on random inputs: the stacked run must equal the per-row runs."""
    if any(t.shape[:1] != [-1] for t in model.inputs + model.outputs):
        return False
    rng = np.random.default_rng(0)
    feeds = {}
    for t in model.inputs:
        if -1 in t.shape[1:] or t.datatype not in ("FP32", "FP16", "FP64"):
            return False
        feeds[t.name] = rng.standard_normal([rows] + t.shape[1:]).astype(V2_TO_NP[t.datatype])
    names = [t.name for t in model.outputs]
    try:
        together = model.run(feeds, names)
        alone = [model.run({k: v[i:i + 1] for k, v in feeds.items()}, names) for i in range(rows)]
    except Exception:
        return False
    for j, out in enumerate(together):
        if out.shape[0] != rows:
            return False
        for i in range(rows):
            if not np.allclose(out[i:i + 1], alone[i][j], rtol=1e-4, atol=1e-5):
                return False
    return True


def _json(obj, status: int = 200):
    from starlette.responses import Response
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(message: str, status: int):
    return _json({"error": message}, status)


async def read_body(request, limit: int) -> bytes:
    """The request body, at most `limit` bytes after decoding (gzip/deflate as tritonclient can send)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, limit)
        raise RequestError(f"request body of {declared} bytes is over the server's limit of {limit} bytes", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            await _drain(request, limit)
            raise RequestError(f"request body is over the server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"unsupported Content-Encoding {encoding[:40]!r} (use gzip, deflate or none)")
    # Bounded decompression: a small compressed body must not expand past the limit.
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise RequestError(f"the body is not valid {encoding} data") from None
    if len(out) > limit:
        raise RequestError(f"decompressed request body is over the server's limit of {limit} bytes", 413)
    if not d.eof:
        raise RequestError(f"the {encoding} body is truncated")
    return out


async def _drain(request, limit: int) -> None:
    """Read (and drop) the rest of an oversized body, up to a bound, so the client gets our 413 reply
    rather than a connection reset while it is still sending."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > 8 * limit + 2 ** 26:
                break
    except Exception:  # the client went away: nothing to answer
        pass


def build_app(models: list[ServedModel] | ServedModel, options: ServerOptions | None = None):
    """The Starlette app serving `models` (by name)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    options = options or ServerOptions()
    if isinstance(models, ServedModel):
        models = [models]
    by_name = {m.name: m for m in models}
    executor = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="cvconvert-infer")
    inflight = {"n": 0}  # touched only on the event loop's thread
    batchers = {}
    if options.max_batch > 1:
        for m in models:
            if not rows_independent(m):
                raise CvError(f"model {m.name!r} cannot be batched dynamically: its batch axis is not dynamic "
                              f"or its rows are not independent (serve it with --max-batch 1)")
            batchers[m.name] = Batcher(m, executor, options.max_batch, options.batch_delay_ms / 1000,
                                       max(1, options.threads))

    def model_of(request) -> ServedModel:
        name = request.path_params["model"]
        model = by_name.get(name)
        if model is None:
            raise RequestError(f"unknown model {name[:100]!r}", 404)
        version = request.path_params.get("version")
        if version is not None and version not in model.versions:
            raise RequestError(f"model {name!r} has no version {version[:20]!r} (versions: {model.versions})", 404)
        return model

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except RequestError as exc:
                return _error(str(exc), exc.status)
            except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
                return _error("client disconnected", 400)
            except Exception as exc:  # a bug: answer, log its type only (never the request), keep serving
                log.error("internal error handling %s: %s", request.url.path, type(exc).__name__)
                return _error(f"internal server error ({type(exc).__name__})", 500)
        return endpoint

    async def live(request):
        return _json({"live": True})

    async def ready(request):
        return _json({"ready": True})

    async def server_metadata(request):
        return _json({"name": "cvconvert", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(request):
        return _json(model_of(request).metadata())

    async def model_ready(request):
        return _json({"name": model_of(request).name, "ready": True})

    async def model_config(request):
        return _json(model_of(request).config())

    async def infer(request):
        model = model_of(request)
        if inflight["n"] >= options.max_inflight:
            raise RequestError(f"server busy: {options.max_inflight} requests in flight, retry later", 503)
        inflight["n"] += 1
        try:
            body = await read_body(request, options.max_request_bytes)
            req, tail = split_body(body, request.headers.get(HEADER_LENGTH))
            feeds = parse_inputs(req, tail, model, options.allow_nonfinite)
            wanted = requested_outputs(req, model)
            names = [n for n, _ in wanted]
            loop = asyncio.get_running_loop()
            try:
                if model.name in batchers:
                    results = await batchers[model.name].run(feeds, names)
                else:
                    results = await loop.run_in_executor(executor, model.run, feeds, names)
            except Exception as exc:  # ORT rejects what the metadata checks let through (e.g. batch mismatch)
                first = one_line(exc)
                raise RequestError(f"inference failed: {type(exc).__name__}: {first}") from None
            if not options.allow_nonfinite and not all(_finite(r) for r in results):
                raise RequestError("the model's output holds non-finite values (inputs out of range?)")
            rid = req.get("id")
            body, header_len = encode_response(model, rid if isinstance(rid, str) else None,
                                               [(n, b, r) for (n, b), r in zip(wanted, results)],
                                               allow_nan=options.allow_nonfinite)
        finally:
            inflight["n"] -= 1
        if header_len is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})

    async def http_error(request, exc):
        return _error(str(exc.detail), exc.status_code)

    routes = [
        Route("/v2/health/live", guarded(live)),
        Route("/v2/health/ready", guarded(ready)),
        Route("/v2", guarded(server_metadata)),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, guarded(model_metadata)),
            Route(prefix + "/ready", guarded(model_ready)),
            Route(prefix + "/config", guarded(model_config)),
            Route(prefix + "/infer", guarded(infer), methods=["POST"]),
        ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.models = by_name
    app.state.executor = executor
    return app


# ---------------------------------------------------------------------------------------------------
# Running it

def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
                   log_level: str = "info"):
    import uvicorn
    # h11 (pure Python) keeps the install small; keep-alive long enough for a device's stream of requests.
    return uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                          timeout_keep_alive=30, server_header=False, lifespan="off")


def bind(host: str = "127.0.0.1", port: int = 8000):
    """A listening socket, or a one-line CvError (port in use, unknown host) before anything is printed."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise CvError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CvError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(app, sock, access_log: bool = True) -> None:
    """Run until Ctrl-C / SIGTERM (uvicorn finishes the requests in flight first)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    try:
        uvicorn.Server(uvicorn_config(app, host, port, access_log)).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """The server on a loopback port chosen by the OS, in a thread (tests, benchmarks):

        with BackgroundServer(app) as srv:  srv.url == "http://127.0.0.1:PORT"
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound here, so there is no race for a "free" port
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, access_log=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        self.close()
        raise RuntimeError("the server did not start")

    def close(self):
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.sock.close()
        executor = getattr(getattr(self.server.config.app, "state", None), "executor", None)
        if executor is not None:
            executor.shutdown(wait=False)

    def __exit__(self, *exc):
        self.close()


def max_request_bytes(mb: float) -> int:
    if not (mb > 0 and math.isfinite(mb)):
        raise CvError(f"--max-request-mb must be a positive number, not {mb}")
    return int(mb * 2 ** 20)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def default_intra_op_threads(threads: int) -> int:
    """Split the cores between concurrent runs rather than oversubscribing them (measured on 2 shared
    cores: one ORT thread per run was 2.3x faster per run than two, for LeNet's and ResNet-20's parts)."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))
