"""`cvconvert serve`: the processing part behind a KServe v2 / Triton-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import command, info


@command("serve")
def serve(
    model: Path = typer.Argument(..., help="PROCESSING.onnx, a model dir (DIR/onnx/processing.onnx), or a Triton "
                                           "model folder (NAME/1/model.onnx) as `export --triton-repo` writes."),
    name: Optional[str] = typer.Option(None, help="Model name in the URL /v2/models/NAME (default: ARCH_processing for a "
                                                  "model dir, as `export --triton-repo` names it; the Triton folder's "
                                                  "name; else the file name without .onnx)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed at start)."),
    max_request_mb: float = typer.Option(64.0, help="Largest request body accepted (MiB); larger ones get 413."),
    threads: Optional[int] = typer.Option(None, help="Inference runs at once (thread pool off the event loop); "
                                                     "default min(4, CPUs)."),
    intra_op_threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads per run (default: CPUs / "
                                                              "--threads; 0: ONNX Runtime's own default)."),
    max_inflight: int = typer.Option(64, help="Requests with a complete body parsed, queued or run at once; more "
                                              "get 503."),
    max_inflight_mb: Optional[float] = typer.Option(None, help="Request bodies held at once, in MiB (after "
                                                               "decompression); a request that would pass it gets "
                                                               "503 (default 4 x --max-request-mb)."),
    header_timeout: float = typer.Option(10.0, help="Seconds for a request's headers to arrive; then the "
                                                    "connection is closed."),
    body_timeout: float = typer.Option(30.0, help="Seconds for a request's whole body to arrive, from the end of "
                                                  "its headers; then 408 and the connection is closed."),
    max_connections: int = typer.Option(1000, help="Open connections at once; uvicorn answers 503 beyond."),
    max_batch: int = typer.Option(1, help="Dynamic batching: stack concurrent requests up to this many rows "
                                          "(1: off). Refused for graphs whose rows are not independent."),
    batch_delay_ms: float = typer.Option(2.0, help="With --max-batch: how long a request waits for company."),
    allow_nonfinite: bool = typer.Option(False, help="Accept NaN/Inf in inputs and outputs (refused by default)."),
    access_log: bool = typer.Option(True, help="Log one line per request (method, path, status; never bodies)."),
    cuda: bool = typer.Option(False, help="Run on the CUDA execution provider (falls back to CPU if absent)."),
):
    """Serve PROCESSING.onnx over the KServe Open Inference Protocol v2 (REST + Triton binary tensors)."""
    from cvconvert.errors import CvError
    from cvconvert.serve.app import build_app
    from cvconvert.serve import run as srv_run
    from cvconvert.serve.model import load_served_model

    if not 0 <= port <= 65535:
        raise CvError(f"--port {port} is not a TCP port")
    options = srv_run.server_options(
        max_request_mb=max_request_mb, threads=threads, max_inflight=max_inflight, allow_nonfinite=allow_nonfinite,
        max_batch=max_batch, batch_delay_ms=batch_delay_ms, max_inflight_mb=max_inflight_mb,
        header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    if intra_op_threads is None:
        intra_op_threads = srv_run.default_intra_op_threads(options.threads)
    served = load_served_model(model, name, intra_op_threads=intra_op_threads, providers=providers)
    app = build_app(served, options)
    sock = srv_run.bind(host, port)
    port = sock.getsockname()[1]  # the real one when --port 0
    if cuda and served.session.get_providers()[0] != "CUDAExecutionProvider":
        info("warning: --cuda: the CUDA execution provider did not start (no GPU or CUDA libraries); using CPU")
    shapes = ", ".join(f"{t.name} {t.datatype}{t.shape}" for t in served.inputs + served.outputs)
    info(f"serving {served.path} as model {served.name!r} ({shapes}) on "
         f"{served.session.get_providers()[0]}")
    where = f"[{host}]" if ":" in host else host
    info(f"infer URL: http://{where}:{port}/v2/models/{served.name}/infer  (Ctrl-C stops)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        info("note: no TLS or authentication here; put it behind a reverse proxy or a private network")
    try:
        srv_run.serve(app, sock, access_log=access_log)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    info("stopped")
