"""Running the app: the listening socket, uvicorn's settings, and a background server for tests and
benchmarks."""

from __future__ import annotations

import math
import os
import threading

from ..errors import CvError


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


def default_worker_threads() -> int:
    """Inference runs at once (the server's thread pool): min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def default_intra_op_threads(threads: int) -> int:
    """Split the cores between concurrent runs rather than oversubscribing them (measured on 2 shared
    cores: one ORT thread per run was 2.3x faster per run than two, for LeNet's and ResNet-20's parts)."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))
