"""The device side of serving: `RemoteProcessing(url, model)` is a callable x -> h that runs the cloud part
on a v2 inference server (`cvconvert serve`, Triton Inference Server, KServe).

It speaks the KServe Open Inference Protocol v2 with Triton's binary tensor data extension over the
standard library's http.client (no tritonclient on the device). The request carries exactly one tensor,
the rotated feature x: a JSON header naming it, then its raw bytes. theta, the image and the fooling
counterpart never leave the device.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
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


class RemoteProcessing:
    """x [N, 2, C', H', W'] float32 -> h, computed by model `model_name` on the v2 server at `url`.

    Thread-safe (one keep-alive connection per thread). `headers` are added to every request (e.g. the
    `Host` KServe's ingress routes on, or an Authorization header). Raises CvError with the server's
    message on any failure."""

    def __init__(self, url: str, model_name: str = "processing", timeout: float = 30.0, *,
                 input_name: str = "x", output_name: str | None = None, version: str | None = None,
                 headers: dict[str, str] | None = None):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CvError(f"bad server URL {url!r} (expected http://HOST:PORT or https://HOST)")
        try:
            parts.port
        except ValueError:
            raise CvError(f"bad port in server URL {url!r}") from None
        self.url, self.model_name, self.timeout = url, model_name, float(timeout)
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

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        hdrs = {**self.headers, **(headers or {})}
        for attempt in (0, 1):  # one retry when a kept-alive connection was closed by the server meanwhile
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, resp.getheader(HEADER_LENGTH), data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise CvError(f"server {self.url} closed the connection: {type(exc).__name__}") from None
            except TimeoutError:
                self.close()
                raise CvError(f"server {self.url} did not answer within {self.timeout:g} s") from None
            except OSError as exc:
                self.close()
                raise CvError(f"cannot reach server {self.url}: {exc.strerror or exc}") from None

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
        status, _, data = self._request("GET", self._model_path)
        if status != 200:
            raise CvError(f"server {self.url}, model {self.model_name!r}: {self._error(status, data)}")
        return json.loads(data)

    def ready(self) -> bool:
        try:
            status, _, _ = self._request("GET", self._model_path + "/ready")
        except CvError:
            return False
        return status == 200

    def __call__(self, x: np.ndarray) -> np.ndarray:
        body, header_len = build_request(np.asarray(x), self.input_name, self.output_name)
        status, resp_len, data = self._request(
            "POST", self._model_path + "/infer", body,
            {HEADER_LENGTH: str(header_len), "Content-Type": "application/octet-stream"})
        if status != 200:
            raise CvError(f"server {self.url}, model {self.model_name!r}: {self._error(status, data)}")
        return parse_response(data, resp_len, self.output_name)

    def __repr__(self) -> str:
        return f"RemoteProcessing({self.url!r}, {self.model_name!r})"
