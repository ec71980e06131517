"""The Starlette app: one module-level handler per endpoint, working on `request.app.state` (the models by
name, the options, the thread pool, the batchers, the in-flight count, the byte budget), so each can be
tested alone.

Policies (README "Serve"):
- every error is a JSON body {"error": "..."}; 400 bad request, 404 unknown model/version/route,
  408 body not received within --body-timeout, 413 body over --max-request-mb, 503 too many requests in
  flight or too many body bytes held, 500 a bug (the server keeps serving);
- a request takes an in-flight slot only once its whole body has arrived, so slow senders cannot
  starve the others; decoding, parsing and encoding run in the worker pool, never on the event loop;
- inputs must match the model's metadata exactly: names, datatype (no implicit casts), rank, fixed dims;
  JSON `data` holds JSON numbers only;
- non-finite values (NaN, +-Inf) are refused with 400, in inputs and in outputs: a correct encoder never
  produces them and they would only propagate to a meaningless answer;
- nothing from a request body (tensor values, ids, parameters) is logged or echoed in an error message;
  the access log (method, path cut to 200 characters, status) is uvicorn's and can be switched off.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import __version__
from ..errors import CvError, one_line
from .batching import Batcher, rows_independent
from .body import ByteBudget, Reservation, decode_body, read_body, return_memory
from .connection import short_path
from .model import ServedModel
from .protocol import (HEADER_LENGTH, RequestError, encode_response, finite, parse_inputs, requested_outputs,
                       split_body)

log = logging.getLogger("cvconvert.serve")

DEFAULT_MAX_REQUEST_MB = 64.0
TRIM_AFTER_BYTES = 1 << 20  # a request that held this much hands freed memory back to the OS when idle


@dataclass
class ServerOptions:
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2 ** 20)
    threads: int = 2  # inference runs at once (a thread pool off the event loop)
    max_inflight: int = 64  # requests with a complete body being parsed/queued/run at once; more get 503
    allow_nonfinite: bool = False
    max_batch: int = 1  # > 1: dynamic batching of concurrent requests up to this many rows
    batch_delay_ms: float = 2.0  # how long the first request of a batch waits for company
    max_inflight_bytes: int | None = None  # request body bytes held at once (None: 4 x max_request_bytes)
    header_timeout: float = 10.0  # seconds for a request's headers
    body_timeout: float = 30.0  # seconds for a request's whole body, from the end of its headers
    max_connections: int = 1000  # open connections; uvicorn answers 503 beyond

    def budget_bytes(self) -> int:
        return self.max_inflight_bytes or 4 * self.max_request_bytes


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=headers)


def _error(message: str, status: int, close: bool = False):
    return _json({"error": message}, status, {"Connection": "close"} if close else None)


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
            return _error(str(exc), exc.status, exc.close)
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
            return _error("client disconnected", 400)
        except Exception as exc:  # a bug: answer, log its type only (never the request), keep serving
            log.error("internal error handling %s: %s", short_path(request.url.path), type(exc).__name__)
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


async def _in_pool(state, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.executor, functools.partial(fn, *args))


def prepare(body: bytearray, encoding: str, header_length: str | None, model: ServedModel,
            options: ServerOptions, reservation: Reservation):
    """(feeds, [(output, as binary)], request id) of a complete request body. Runs in the worker pool."""
    body = decode_body(body, encoding, options.max_request_bytes, reservation)
    req, tail = split_body(body, header_length)
    feeds = parse_inputs(req, tail, model, options.allow_nonfinite)
    wanted = requested_outputs(req, model)
    rid = req.get("id")
    return feeds, wanted, rid if isinstance(rid, str) else None


def finish(model: ServedModel, rid, wanted, results, allow_nonfinite: bool) -> tuple[bytes, int | None]:
    """The response body of a run (and its JSON header length). Runs in the worker pool."""
    if not allow_nonfinite and not all(finite(r) for r in results):
        raise RequestError("the model's output holds non-finite values (inputs out of range?)")
    return encode_response(model, rid, [(n, b, r) for (n, b), r in zip(wanted, results)], allow_nan=allow_nonfinite)


async def _run_model(state, model: ServedModel, feeds, names):
    try:
        if model.name in state.batchers:
            return await state.batchers[model.name].run(feeds, names)
        return await _in_pool(state, model.run, feeds, names)
    except Exception as exc:  # ORT rejects what the metadata checks let through (e.g. batch mismatch)
        raise RequestError(f"inference failed: {type(exc).__name__}: {one_line(exc)}") from None


async def _answer(request, model: ServedModel, body: bytearray, reservation: Reservation):
    """Parse, run and encode a request whose whole body has arrived, in one of the in-flight slots."""
    from starlette.responses import Response

    state, options = request.app.state, request.app.state.options
    if state.inflight >= options.max_inflight:
        raise RequestError(f"server busy: {options.max_inflight} requests in flight, retry later", 503)
    state.inflight += 1
    try:
        feeds, wanted, rid = await _in_pool(state, prepare, body, request.headers.get("content-encoding", "identity"),
                                            request.headers.get(HEADER_LENGTH), model, options, reservation)
        del body  # the feeds keep what they need of it
        results = await _run_model(state, model, feeds, [n for n, _ in wanted])
        out, header_len = await _in_pool(state, finish, model, rid, wanted, results, options.allow_nonfinite)
    finally:
        state.inflight -= 1
    if header_len is None:
        return Response(out, media_type="application/json")
    return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})


async def infer(request):
    state = request.app.state
    model = model_of(request)
    reservation = Reservation(state.budget)
    try:  # the body is passed on, not kept here, so that it is freed as soon as it is parsed
        return await _answer(request, model, await read_body(request, state.options.max_request_bytes,
                                                             state.options.body_timeout, reservation), reservation)
    finally:
        if reservation.release() >= TRIM_AFTER_BYTES and state.budget.used == 0:
            try:
                asyncio.get_running_loop().run_in_executor(state.executor, return_memory)
            except RuntimeError:  # the pool is shut down: the server is stopping
                pass


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
    app.state.budget = ByteBudget(options.budget_bytes())
    return app
