"""A fault-injecting KServe v2 proxy for the device's fault tests: it sits in front of a real server
(`cvconvert serve` in a background thread), records every x it receives, and misbehaves as told.

    with FaultProxy(upstream_url) as proxy:
        proxy.fault("503", times=2)       # the next 2 infer requests get 503, then it forwards again
        ... proxy.url ... proxy.seen      # the x arrays that reached it, in order

Faults (each for `times` infer requests, None = until changed): "503", "reset" (reads the whole body, lets
the server compute, then resets the connection without answering), "nan" (the server's h with NaN),
"shape" (h with one row too few), "drip" (the answer one byte every `drip` seconds), "hang" (never
answers), "die" (after `after` good infer requests it stops listening: every later connection is refused),
"sha" (the model metadata reports another graph's sha256), "slow" (the answer after `delay` seconds).
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import numpy as np

HEADER = "Inference-Header-Content-Length"


def parse_x(body: bytes, header_len: int) -> np.ndarray:
    """The one FP32 input of a binary v2 infer request."""
    head = json.loads(body[:header_len])
    (inp,) = head["inputs"]
    return np.frombuffer(body, np.float32, count=int(np.prod(inp["shape"])), offset=header_len).reshape(inp["shape"])


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: "FaultProxy"

    def log_message(self, *args):
        pass

    def _upstream(self, method, body=None, headers=None):
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=30)
        try:
            conn.request(method, self.path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def _answer(self, status, headers, data, drip=None):
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() in ("content-type", "connection", HEADER.lower()):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if drip is None:
            self.wfile.write(data)
            return
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(drip)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        status, headers, data = self._upstream("GET")
        if self.proxy.mode == "sha" and status == 200 and not self.path.endswith("/ready"):
            meta = json.loads(data)
            meta["parameters"] = {"sha256": "0" * 64}
            data = json.dumps(meta).encode()
        self._answer(status, headers, data)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        header_len = int(self.headers[HEADER])
        p = self.proxy
        p.seen.append(parse_x(body, header_len).copy())
        mode = p.take_fault()
        if mode == "503":
            data = json.dumps({"error": "server busy, retry later"}).encode()
            return self._answer(503, {"Content-Type": "application/json"}, data)
        if mode == "hang":
            time.sleep(p.delay)
            return
        if mode == "slow":
            time.sleep(p.delay)
        status, headers, data = self._upstream("POST", body, {HEADER: str(header_len),
                                                              "Content-Type": "application/octet-stream"})
        if mode == "reset":  # the server computed the answer; the client never sees it
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if mode in ("nan", "shape") and status == 200:
            data = self._tamper(data, int(headers[HEADER.lower()]), mode)
            headers[HEADER.lower()] = str(self._tampered_len)
        if mode == "die":  # stop listening first, so that every later connection is refused
            p.stop_listening()
            self.close_connection = True
            headers["connection"] = "close"
        self._answer(status, headers, data, drip=p.drip if mode == "drip" else None)

    def _tamper(self, data, n, mode):
        head = json.loads(data[:n])
        (out,) = head["outputs"]
        h = np.frombuffer(data, np.float32, offset=n).reshape(out["shape"]).copy()
        if mode == "nan":
            h[:] = np.nan
        else:
            h = h[:-1] if len(h) > 1 else np.concatenate([h, h])
            out["shape"] = list(h.shape)
            out["parameters"]["binary_data_size"] = h.nbytes
        head_bytes = json.dumps(head).encode()
        self._tampered_len = len(head_bytes)
        return head_bytes + h.tobytes()


class FaultProxy:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.seen: list[np.ndarray] = []
        self.mode, self.times, self.after, self.drip, self.delay = "pass", None, 0, 1.0, 30.0
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that hung up: nothing to report
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fault(self, mode: str, times: int | None = None, *, after: int = 0, drip: float = 1.0,
              delay: float = 30.0) -> "FaultProxy":
        with self._lock:
            self.mode, self.times, self.after, self.drip, self.delay = mode, times, after, drip, delay
        return self

    def take_fault(self) -> str:
        """The fault for this infer request (and count it down)."""
        with self._lock:
            if self.mode == "die":
                if self.after > 0:
                    self.after -= 1
                    return "die" if self.after == 0 else "pass"
                return "die"
            if self.mode in ("pass", "sha") or self.times == 0:
                return "pass"
            if self.times is not None:
                self.times -= 1
            return self.mode

    def stop_listening(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.server.shutdown()
        except Exception:
            pass
        self.server.server_close()
