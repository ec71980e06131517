"""The device side of serving: `RemoteProcessing(url, model)` is a callable x -> h that runs the cloud part
on a v2 inference server (`cvconvert serve`, Triton Inference Server, KServe).

It speaks the KServe Open Inference Protocol v2 with Triton's binary tensor data extension over the
standard library's http.client (no tritonclient on the device). The request carries exactly one tensor,
the rotated feature x: a JSON header naming it, then its raw bytes. theta, the image and the fooling
counterpart never leave the device.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import socket
import threading
import time
from urllib.parse import quote, urlsplit

import numpy as np

from ..errors import CvError
from ..serve.protocol import HEADER_LENGTH, NP_TO_V2, V2_TO_NP, le_bytes, pack

_FLOATS = ("FP32", "FP16", "FP64")  # what a processing part takes and gives


def build_request(x: np.ndarray, input_name: str = "x", output_name: str | None = None) -> tuple[bytes, int]:
    """(body, JSON header length) of an infer request carrying only x, asking for binary output."""
    x = np.ascontiguousarray(x)
    datatype = NP_TO_V2.get(x.dtype)
    if datatype not in _FLOATS:
        raise CvError(f"x has dtype {x.dtype}; the processing part takes float32")
    raw = le_bytes(x)
    header = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": datatype,
                          "parameters": {"binary_data_size": len(raw)}}]}
    if output_name is None:
        header["parameters"] = {"binary_data_output": True}
    else:
        header["outputs"] = [{"name": output_name, "parameters": {"binary_data": True}}]
    return pack(header, [raw])


def parse_response(body: bytes, header_length: str | None, output_name: str | None = None) -> np.ndarray:
    """The output tensor of a v2 infer response (binary or JSON data)."""
    n = len(body) if header_length is None else int(header_length)
    if not 0 < n <= len(body):
        raise CvError("the server's response is truncated")
    try:
        reply = json.loads(body[:n])
        outputs = reply["outputs"]
    except (ValueError, KeyError, TypeError):
        raise CvError("the server's response is not a v2 inference response") from None
    offset = 0
    for out in outputs:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if output_name is None and len(outputs) != 1:
            raise CvError(f"the model has {len(outputs)} outputs: name the one to use")
        if output_name is not None and out.get("name") != output_name:
            offset += size or 0
            continue
        datatype = out.get("datatype")
        dtype = np.dtype(V2_TO_NP[datatype]) if datatype in _FLOATS else None
        shape = out.get("shape")
        if dtype is None or not isinstance(shape, list):
            raise CvError(f"the server's output has datatype {out.get('datatype')!r}; expected FP32")
        if size is not None:
            if size != math.prod(shape) * dtype.itemsize or n + offset + size > len(body):
                raise CvError("the server's binary output does not match its shape (truncated response?)")
            arr = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=math.prod(shape), offset=n + offset)
        else:
            arr = np.asarray(out.get("data"), dtype=dtype)
            if arr.size != math.prod(shape):
                raise CvError("the server's JSON output does not match its shape")
        return arr.reshape(shape).astype(np.float32)  # a writable copy
    raise CvError(f"the server's response has no output {output_name!r}")


class NotSent(CvError):
    """The request provably never left the device (connection refused, DNS failure, a local error before
    the first byte was written): whatever was reserved for it may be released."""


class OutcomeUnknown(CvError):
    """The request may have reached the server (timeout, reset, an error status, a bad answer): the x sent
    must be kept and only ever sent again as it is."""


class _Retry(Exception):
    """An attempt the client may repeat with the same body (a reset, or 503)."""


def _dropped(sock) -> bool:
    """Whether the peer closed an idle kept-alive socket: between requests it has nothing to say, so a
    readable socket means end of file (or garbage); either way a new connection is the safe choice."""
    import select

    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class RemoteProcessing:
    """x [N, 2, C', H', W'] float32 -> h, computed by model `model_name` on the v2 server at `url`.

    Thread-safe (one keep-alive connection per thread). `headers` are added to every request (e.g. the
    `Host` KServe's ingress routes on, or an Authorization header). timeout: seconds for one request's whole
    response (every attempt together; a server that drips its answer is cut off); retries: further attempts
    with the same body after a 503 or a connection reset, after backoff, 2 x backoff, ... seconds. Raises
    NotSent when nothing left the device, OutcomeUnknown (with the server's message) on any other failure."""

    def __init__(self, url: str, model_name: str = "processing", timeout: float = 30.0, *,
                 input_name: str = "x", output_name: str | None = None, version: str | None = None,
                 headers: dict[str, str] | None = None, retries: int = 2, backoff: float = 0.5):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CvError(f"bad server URL {url!r} (expected http://HOST:PORT or https://HOST)")
        try:
            parts.port
        except ValueError:
            raise CvError(f"bad port in server URL {url!r}") from None
        if not timeout > 0 or retries < 0 or backoff < 0:
            raise CvError("the timeout must be positive, retries and backoff at least 0")
        self.url, self.model_name, self.timeout = url, model_name, float(timeout)
        self.retries, self.backoff = int(retries), float(backoff)
        self.input_name, self.output_name = input_name, output_name
        self._parts = parts
        model = f"{parts.path.rstrip('/')}/v2/models/{quote(model_name, safe='')}"
        if version is not None:
            model += f"/versions/{quote(str(version), safe='')}"
        self._model_path = model
        self.headers = dict(headers or {})
        self._local = threading.local()

    # -- transport -------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _connect(self, conn, remaining: float) -> None:
        """Open the connection; every failure here proves nothing was sent."""
        if conn.sock is not None and _dropped(conn.sock):
            self.close()  # the server closed the kept-alive connection meanwhile: a new one, nothing sent
            conn = self._connection()
        if conn.sock is not None:
            return
        conn.timeout = remaining
        try:
            conn.connect()
        except socket.gaierror:
            self.close()
            raise NotSent(f"cannot resolve the server's host name in {self.url}; nothing was sent") from None
        except TimeoutError:
            self.close()
            raise NotSent(f"server {self.url} did not accept a connection within {remaining:.3g} s; "
                          "nothing was sent") from None
        except OSError as exc:
            self.close()
            raise NotSent(f"cannot reach server {self.url}: {exc.strerror or exc}; nothing was sent") from None

    def _attempt(self, method: str, path: str, body, hdrs: dict, deadline: float):
        """One request on a (new or kept-alive) connection, cut off at `deadline` (time.monotonic)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._connect(self._connection(), remaining)
        conn = self._connection()
        expired = threading.Event()

        def cut_off():  # a watchdog: per-read timeouts alone let a dripping server go on for ever
            expired.set()
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        timer = threading.Timer(remaining, cut_off)
        timer.daemon = True
        timer.start()
        try:
            conn.sock.settimeout(remaining)
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            if expired.is_set():
                raise TimeoutError
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, resp.getheader(HEADER_LENGTH), data
        except (TimeoutError, socket.timeout):
            self.close()
            raise TimeoutError from None
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            if expired.is_set():
                raise TimeoutError from None
            raise _Retry(f"server {self.url} closed the connection ({exc.strerror or 'reset'})"
                         if isinstance(exc, OSError) else f"server {self.url} closed the connection") from None
        finally:
            timer.cancel()

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, binary header length, body), retried after resets and 503 with the same body."""
        hdrs = {**self.headers, **(headers or {})}
        deadline, maybe_sent, last = time.monotonic() + self.timeout, False, ""
        for attempt in range(self.retries + 1):
            try:
                status, header_len, data = self._attempt(method, path, body, hdrs, deadline)
                if status != 503:
                    return status, header_len, data
                maybe_sent, last = True, f"server {self.url} answered 503 ({self._error(status, data)})"
            except NotSent as exc:
                if not maybe_sent:
                    raise
                last = str(exc).replace("; nothing was sent", "")
                break
            except TimeoutError:
                raise OutcomeUnknown(f"server {self.url} did not answer within {self.timeout:g} s") from None
            except _Retry as exc:
                maybe_sent, last = True, str(exc)
            if attempt < self.retries:
                wait = self.backoff * 2 ** attempt
                time.sleep(wait)
                deadline += wait  # the timeout is for the server's answers; the backoff comes on top
        raise OutcomeUnknown(f"{last} (after {self.retries + 1} attempt(s))")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def _error(status: int, data: bytes) -> str:
        try:
            return str(json.loads(data)["error"])[:500]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status}"

    # -- API ---------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The model's v2 metadata (CvError on any failure: nothing about x is sent here)."""
        try:
            status, _, data = self._request("GET", self._model_path)
        except CvError as exc:
            raise CvError(str(exc).replace("; nothing was sent", "")) from None
        if status != 200:
            raise CvError(f"server {self.url}, model {self.model_name!r}: {self._error(status, data)}")
        try:
            meta = json.loads(data)
            if not isinstance(meta, dict):
                raise ValueError
            return meta
        except ValueError:
            raise CvError(f"server {self.url} sent model metadata that is not JSON") from None

    def check_model(self, sha256: str | None, x_shape=None) -> dict:
        """Refuse a server whose model is not the one exported here: the processing graph's sha256 (when the
        server reports one, as `cvconvert serve` does) and the shape of x. Call before anything is sent."""
        meta = self.metadata()
        served = (meta.get("parameters") or {}).get("sha256") if isinstance(meta.get("parameters"), dict) else None
        if sha256 and served and served != sha256:
            raise CvError(f"server {self.url} serves a model {self.model_name!r} other than the one exported here "
                          f"(processing graph sha256 {str(served)[:12]}..., export.json says {sha256[:12]}...): "
                          "serve this export's processing.onnx, or point --server at the right model; nothing was sent")
        inputs = meta.get("inputs") if isinstance(meta.get("inputs"), list) else []
        shape = next((i.get("shape") for i in inputs if isinstance(i, dict) and i.get("name") == self.input_name), None)
        if x_shape is not None and isinstance(shape, list) and len(shape) == len(x_shape) + 1 and any(
                d not in (-1, w) for d, w in zip(shape[1:], x_shape)):
            raise CvError(f"server {self.url}, model {self.model_name!r} takes x of shape {shape}, this model sends "
                          f"[-1, {', '.join(map(str, x_shape))}]: it serves another model; nothing was sent")
        return meta

    def ready(self) -> bool:
        try:
            status, _, _ = self._request("GET", self._model_path + "/ready")
        except CvError:
            return False
        return status == 200

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            body, header_len = build_request(np.asarray(x), self.input_name, self.output_name)
        except CvError as exc:
            raise NotSent(str(exc)) from None
        status, resp_len, data = self._request(
            "POST", self._model_path + "/infer", body,
            {HEADER_LENGTH: str(header_len), "Content-Type": "application/octet-stream"})
        if status != 200:
            raise OutcomeUnknown(f"server {self.url}, model {self.model_name!r}: {self._error(status, data)}")
        try:
            return parse_response(data, resp_len, self.output_name)
        except CvError as exc:
            raise OutcomeUnknown(f"server {self.url}: {exc}") from None

    def __repr__(self) -> str:
        return f"RemoteProcessing({self.url!r}, {self.model_name!r})"
