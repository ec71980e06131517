"""The Starlette app: one module-level handler per endpoint, working on `request.app.state` (the models by
name, the options, the thread pool, the batchers, the in-flight count), so each can be tested alone.

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
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import __version__
from ..errors import CvError, one_line
from .batching import Batcher, rows_independent
from .model import ServedModel
from .protocol import (HEADER_LENGTH, RequestError, encode_response, finite, parse_inputs, requested_outputs,
                       split_body)

log = logging.getLogger("cvconvert.serve")

DEFAULT_MAX_REQUEST_MB = 64.0


@dataclass
class ServerOptions:
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2 ** 20)
    threads: int = 2  # inference runs at once (a thread pool off the event loop)
    max_inflight: int = 64  # requests parsed/queued/running at once; more get 503
    allow_nonfinite: bool = False
    max_batch: int = 1  # > 1: dynamic batching of concurrent requests up to this many rows
    batch_delay_ms: float = 2.0  # how long the first request of a batch waits for company


def _json(obj, status: int = 200):
    from starlette.responses import Response
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(message: str, status: int):
    return _json({"error": message}, status)


# ---------------------------------------------------------------------------------------------------
# Request bodies

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


# ---------------------------------------------------------------------------------------------------
# Handlers

def model_of(request) -> ServedModel:
    """The model the URL names (and its version, when given), or a 404."""
    name = request.path_params["model"]
    model = request.app.state.models.get(name)
    if model is None:
        raise RequestError(f"unknown model {name[:100]!r}", 404)
    version = request.path_params.get("version")
    if version is not None and version not in model.versions:
        raise RequestError(f"model {name!r} has no version {version[:20]!r} (versions: {model.versions})", 404)
    return model


def guarded(handler):
    """The endpoint for `handler`: RequestError -> its status; any other exception -> 500, logged by type
    only (never the request), and the server keeps serving."""
    from starlette.requests import ClientDisconnect

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
    endpoint.__name__ = handler.__name__
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


async def _run_model(state, model: ServedModel, feeds, names):
    try:
        if model.name in state.batchers:
            return await state.batchers[model.name].run(feeds, names)
        return await asyncio.get_running_loop().run_in_executor(state.executor, model.run, feeds, names)
    except Exception as exc:  # ORT rejects what the metadata checks let through (e.g. batch mismatch)
        raise RequestError(f"inference failed: {type(exc).__name__}: {one_line(exc)}") from None


async def infer(request):
    from starlette.responses import Response

    state = request.app.state
    options = state.options
    model = model_of(request)
    if state.inflight >= options.max_inflight:
        raise RequestError(f"server busy: {options.max_inflight} requests in flight, retry later", 503)
    state.inflight += 1
    try:
        body = await read_body(request, options.max_request_bytes)
        req, tail = split_body(body, request.headers.get(HEADER_LENGTH))
        feeds = parse_inputs(req, tail, model, options.allow_nonfinite)
        wanted = requested_outputs(req, model)
        results = await _run_model(state, model, feeds, [n for n, _ in wanted])
        if not options.allow_nonfinite and not all(finite(r) for r in results):
            raise RequestError("the model's output holds non-finite values (inputs out of range?)")
        rid = req.get("id")
        body, header_len = encode_response(model, rid if isinstance(rid, str) else None,
                                           [(n, b, r) for (n, b), r in zip(wanted, results)],
                                           allow_nan=options.allow_nonfinite)
    finally:
        state.inflight -= 1
    if header_len is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})


async def http_error(request, exc):
    return _error(str(exc.detail), exc.status_code)


# ---------------------------------------------------------------------------------------------------
# The app

def routes() -> list:
    """The v2 endpoints, each handler wrapped by `guarded`."""
    from starlette.routing import Route

    table = [Route("/v2/health/live", guarded(live)), Route("/v2/health/ready", guarded(ready)),
             Route("/v2", guarded(server_metadata))]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [
            Route(prefix, guarded(model_metadata)),
            Route(prefix + "/ready", guarded(model_ready)),
            Route(prefix + "/config", guarded(model_config)),
            Route(prefix + "/infer", guarded(infer), methods=["POST"]),
        ]
    return table


def build_app(models: list[ServedModel] | ServedModel, options: ServerOptions | None = None):
    """The Starlette app serving `models` (by name)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    options = options or ServerOptions()
    if isinstance(models, ServedModel):
        models = [models]
    executor = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="cvconvert-infer")
    batchers = {}
    if options.max_batch > 1:
        for m in models:
            if not rows_independent(m):
                raise CvError(f"model {m.name!r} cannot be batched dynamically: its batch axis is not dynamic "
                              f"or its rows are not independent (serve it with --max-batch 1)")
            batchers[m.name] = Batcher(m, executor, options.max_batch, options.batch_delay_ms / 1000,
                                       max(1, options.threads))
    app = Starlette(routes=routes(), exception_handlers={HTTPException: http_error})
    app.state.models = {m.name: m for m in models}
    app.state.options = options
    app.state.executor = executor
    app.state.batchers = batchers
    app.state.inflight = 0  # touched only on the event loop's thread
    return app
