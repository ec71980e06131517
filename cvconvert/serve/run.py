"""Running the app: the listening socket, uvicorn's settings, and a background server for tests and
benchmarks."""

from __future__ import annotations

import math
import os
import threading

from ..errors import CvError


KEEP_ALIVE_S = 30  # long enough for a device's stream of requests
MAX_HEAD_BYTES = 64 << 10  # request line + headers still arriving; more is a 400 (h11's limit)


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
                   log_level: str = "info"):
    """uvicorn on h11 (pure Python: a small install) with the app's deadlines and connection limit
    (`app.state.options`, a ServerOptions) and short paths in the access log."""
    import uvicorn

    from .app import ServerOptions
    from .connection import GuardedH11Protocol, install_log_filter

    options = getattr(getattr(app, "state", None), "options", None) or ServerOptions()
    protocol = GuardedH11Protocol.with_limits(options.header_timeout, options.body_timeout,
                                              options.max_request_bytes)
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                            http=protocol, timeout_keep_alive=KEEP_ALIVE_S, server_header=False, lifespan="off",
                            limit_concurrency=options.max_connections,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    install_log_filter()  # after uvicorn.Config, which (re)configures its loggers
    return config


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

    from .body import keep_big_buffers_mapped

    keep_big_buffers_mapped()  # this process is the server: its allocator may be tuned for it
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


def max_request_bytes(mb: float, option: str = "--max-request-mb") -> int:
    if not (mb > 0 and math.isfinite(mb)):
        raise CvError(f"{option} must be a positive number, not {mb}")
    return int(mb * 2 ** 20)


def server_options(max_request_mb: float = 64.0, threads: int | None = None, max_inflight: int = 64,
                   allow_nonfinite: bool = False, max_batch: int = 1, batch_delay_ms: float = 2.0,
                   max_inflight_mb: float | None = None, header_timeout: float = 10.0, body_timeout: float = 30.0,
                   max_connections: int = 1000):
    """ServerOptions from `cvconvert serve`'s options, or a one-line CvError naming the bad one."""
    from .app import ServerOptions

    if threads is not None and threads < 1:
        raise CvError("--threads must be >= 1")
    if max_inflight < 1 or max_connections < 1:
        raise CvError("--max-inflight and --max-connections must be >= 1")
    if max_batch < 1 or not 0 <= batch_delay_ms <= 1000:
        raise CvError("--max-batch must be >= 1 and --batch-delay-ms in [0, 1000]")
    for option, seconds in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout)):
        if not (0 < seconds <= 86400):
            raise CvError(f"{option} must be a number of seconds in (0, 86400], not {seconds}")
    limit = max_request_bytes(max_request_mb)
    budget = None if max_inflight_mb is None else max_request_bytes(max_inflight_mb, "--max-inflight-mb")
    if budget is not None and budget < limit:
        raise CvError("--max-inflight-mb must be at least --max-request-mb (else the largest request never fits)")
    return ServerOptions(max_request_bytes=limit, threads=threads or default_worker_threads(),
                         max_inflight=max_inflight, allow_nonfinite=allow_nonfinite, max_batch=max_batch,
                         batch_delay_ms=batch_delay_ms, max_inflight_bytes=budget, header_timeout=header_timeout,
                         body_timeout=body_timeout, max_connections=max_connections)


def default_worker_threads() -> int:
    """Inference runs at once (the server's thread pool): min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def default_intra_op_threads(threads: int) -> int:
    """Split the cores between concurrent runs rather than oversubscribing them (measured on 2 shared
    cores: one ORT thread per run was 2.3x faster per run than two, for LeNet's and ResNet-20's parts)."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))
