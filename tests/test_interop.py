"""Interop with a server and a client nobody here wrote: KServe's Python SDK, the reference implementation of
the Open Inference Protocol's REST side (a test dependency only; the runtime never imports it).

- cvconvert's device side (`cvconvert infer --server`, cvconvert.device.remote.RemoteProcessing) against KServe's
  ModelServer hosting processing.onnx through a few-line kserve.Model on ONNX Runtime;
- KServe's InferenceRESTClient (protocol v2) against `cvconvert serve`;
- both servers' answers to the same malformed requests: the table of docs/serve.md's "Tested against".

Both servers run as subprocesses on loopback ports chosen here, and their fixture stops them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from cvconvert.cli.main import app
from cvconvert.device.keylaws import rotation_key_np
from cvconvert.errors import CvError
from cvconvert.device.remote import RemoteProcessing
from conftest import one_line_error, png

_argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses the command line when imported: not pytest's options
try:
    kserve = pytest.importorskip("kserve")  # the dev extra
finally:
    sys.argv = _argv
httpx = pytest.importorskip("httpx")
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig  # noqa: E402
from kserve.protocol.rest.v2_datamodels import (InferenceResponse, ModelMetadataResponse,  # noqa: E402
                                                ServerMetadataResponse)

ROOT = Path(__file__).resolve().parents[1]
NAME = "lenet_processing"  # what `cvconvert serve DIR` and `export --triton-repo` call it
HEADER = "Inference-Header-Content-Length"
MAX_MB = 1  # `cvconvert serve --max-request-mb`: small, so a 413 is cheap to provoke

# A KServe user's model for processing.onnx: ONNX Runtime behind kserve.Model, ORT's refusals as
# KServe's InvalidInput (400). KServe binds 0.0.0.0; the subclass keeps it on loopback.
KSERVE_SERVER = '''
import sys

import kserve
import onnxruntime as ort
from kserve.errors import InvalidInput
from kserve.protocol.rest import server as rest
from kserve.utils.utils import generate_uuid


class Processing(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.ready = True

    def predict(self, request, headers=None):
        try:
            outs = self.session.run(None, {i.name: i.as_numpy() for i in request.inputs})
        except Exception as exc:
            raise InvalidInput(str(exc).splitlines()[0])
        outputs = []
        for meta, arr in zip(self.session.get_outputs(), outs):
            out = kserve.InferOutput(meta.name, list(arr.shape), "FP32")
            out.set_data_from_numpy(arr, binary_data=request.use_binary_outputs)
            outputs.append(out)
        return kserve.InferResponse(request.id or generate_uuid(), self.name, outputs,
                                    use_binary_outputs=request.use_binary_outputs,
                                    requested_outputs=request.request_outputs)


class Loopback(rest.RESTServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


kserve.model_server.RESTServer = Loopback
kserve.ModelServer(http_port=int(sys.argv[3]), enable_grpc=False).start([Processing(sys.argv[2], sys.argv[1])])
'''


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Server:
    """A server subprocess whose output goes to a file (a pipe nobody reads could fill and stall it)."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        self.url = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> str:
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.text()[-2000:]}"
            assert time.monotonic() < deadline, f"server did not come up:\n{self.text()[-2000:]}"
            if self.url is None and "infer URL: http://127.0.0.1:" in self.text():  # `serve --port 0`
                self.url = "http://" + self.text().split("infer URL: http://")[1].split("/")[0]
            if self.url is not None:
                try:
                    if raw(self.url, "GET", "/v2/health/ready")[0] == 200:
                        return self.url
                except OSError:
                    pass
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model(lenet_exported):
    """A converted Fashion-MNIST LeNet, exported (validated), and a few PNGs."""
    base = lenet_exported
    for i in range(3):
        png(base / "images" / f"{i}.png", i, smooth=True)
    return base


@pytest.fixture(scope="module")
def servers(model):
    """(KServe ModelServer URL, `cvconvert serve` URL), both serving processing.onnx, started together."""
    onnx = model / "lenet" / "onnx" / "processing.onnx"
    script = model / "kserve_server.py"
    script.write_text(KSERVE_SERVER)
    ks = Server([sys.executable, str(script), str(onnx), NAME, str(free_port())], model / "kserve.log")
    ks.url = f"http://127.0.0.1:{ks.proc.args[-1]}"
    ours = Server([sys.executable, "-m", "cvconvert.cli", "serve", str(model / "lenet"), "--port", "0", "--threads", "1",
                   "--max-request-mb", str(MAX_MB), "--max-inflight-mb", str(MAX_MB), "--no-access-log"], model / "serve.log")
    try:
        deadline = time.monotonic() + 90
        yield ks.wait_ready(deadline), ours.wait_ready(deadline)
    finally:
        ks.stop()
        ours.stop()


@pytest.fixture(scope="module")
def local(model):
    return ort.InferenceSession(str(model / "lenet" / "onnx" / "processing.onnx"), providers=["CPUExecutionProvider"])


def feature(local, n=2, seed=0) -> np.ndarray:
    shape = [n] + list(local.get_inputs()[0].shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def href(local, x):
    return local.run(None, {"x": x})[0]


# ---------------------------------------------------------------------------------------------------
# our client against KServe's server


def test_remote_processing_against_kserve_model_server(servers, local):
    kserve_url, _ = servers
    remote = RemoteProcessing(kserve_url, NAME, timeout=30)
    assert remote.ready() and remote.metadata()["name"] == NAME
    for n, seed in ((1, 1), (3, 2)):
        x = feature(local, n, seed)
        np.testing.assert_allclose(remote(x), href(local, x), rtol=1e-6, atol=1e-6)
    remote.close()


def test_infer_server_on_kserve_matches_local_infer(model, servers):
    """The Pipeline `infer` runs gives the same logits with processing on KServe as locally (same fools and
    keys); `cvconvert infer --server` runs end to end against it."""
    from cvconvert.cli.infer import collect_images, load_image
    from cvconvert.device.pipeline import Pipeline

    kserve_url, _ = servers
    manifest = json.loads((model / "lenet" / "cvconvert.json").read_text())
    x = np.stack([load_image(f, manifest, False) for f in collect_images([model / "images"])])
    fools = np.roll(x, 1, axis=0)[:, None]
    theta = rotation_key_np(np.random.default_rng(0).uniform(0, 2 * np.pi, len(x)))  # the paper's angles, as keys
    here = Pipeline.from_model_dir(model / "lenet", provider="cpu", guard=None)
    there = Pipeline.from_model_dir(model / "lenet", provider="cpu", guard=None,
                                    processing=RemoteProcessing(kserve_url, NAME))
    np.testing.assert_allclose(there.predict(x, fools, theta), here.predict(x, fools, theta), rtol=1e-5, atol=1e-6)

    res = CliRunner().invoke(app, ["infer", "--model-dir", str(model / "lenet"), str(model / "images"),
                                   "--server", kserve_url, "--json", "--top-k", "10"])
    assert res.exit_code == 0, res.stderr
    assert f"processing on remote {kserve_url}" in res.stderr
    report = json.loads(res.stdout)
    assert report["processing"] == kserve_url and len(report["predictions"]) == len(x)
    for p in report["predictions"]:
        assert p["sent"] and abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4


def test_our_client_errors_from_kserve_are_one_line(model, servers, local):
    kserve_url, _ = servers
    with pytest.raises(CvError, match=r"model 'nope': Model with name nope does not exist") as missing:
        RemoteProcessing(kserve_url, "nope")(feature(local))
    bad = feature(local)[:, :, :3].copy()  # wrong channel count: KServe's 400 (InvalidInput)
    with pytest.raises(CvError, match=r"INVALID_ARGUMENT.*dimensions for input: x") as wrong:
        RemoteProcessing(kserve_url, NAME)(bad)
    with pytest.raises(CvError, match="cannot reach server") as unreachable:
        RemoteProcessing(f"http://127.0.0.1:{free_port()}", NAME, timeout=5)(feature(local))
    for exc in (missing, wrong, unreachable):
        assert "\n" not in str(exc.value) and len(str(exc.value)) < 600
    res = CliRunner().invoke(app, ["infer", "--model-dir", str(model / "lenet"), str(model / "images"),
                                   "--server", kserve_url, "--model-name", "nope"])
    one_line_error(res, "Model with name nope does not exist", code=2)


# ---------------------------------------------------------------------------------------------------
# KServe's client against our server


def kserve_infer(url, x, *, binary, model=NAME, request_id="req-1"):
    """(InferResponse, response headers) from KServe's own REST client."""
    async def go():
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30)) as client:
            inp = InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            req = InferRequest(model_name=model, infer_inputs=[inp], request_id=request_id,
                               parameters={"binary_data_output": True} if binary else None)
            headers = {}
            out = await client.infer(url, req, model_name=model, response_headers=headers)
            return out, {k.lower(): v for k, v in headers.items()}
    return asyncio.run(go())


def test_kserve_client_health_and_metadata(servers, local):
    _, url = servers

    async def go():
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30)) as client:
            return (await client.is_server_live(url), await client.is_server_ready(url),
                    await client.is_model_ready(url, NAME), await client.is_model_ready(url, "nope"))
    assert asyncio.run(go()) == (True, True, True, False)
    server = ServerMetadataResponse.model_validate_json(raw(url, "GET", "/v2")[2])  # KServe's own data model
    assert "binary_tensor_data" in server.extensions
    meta = ModelMetadataResponse.model_validate_json(raw(url, "GET", f"/v2/models/{NAME}")[2])
    assert meta.name == NAME and [(t.name, t.datatype) for t in meta.inputs] == [("x", "FP32")]
    assert meta.inputs[0].shape == [-1] + list(local.get_inputs()[0].shape[1:])
    assert [t.name for t in meta.outputs] == ["h"] and meta.outputs[0].shape[0] == -1


def test_kserve_client_json_and_binary_infer(servers, local):
    _, url = servers
    x = feature(local, 2, seed=5)
    for binary in (False, True):
        res, headers = kserve_infer(url, x, binary=binary, request_id=f"id-{binary}")
        assert res.id == f"id-{binary}" and res.model_name == NAME
        assert [o.name for o in res.outputs] == ["h"]
        np.testing.assert_allclose(res.outputs[0].as_numpy(), href(local, x), rtol=1e-6, atol=1e-6)
        assert (HEADER.lower() in headers) == binary  # binary out only when asked
    status, _, body = raw(url, "POST", f"/v2/models/{NAME}/infer", json.dumps(
        {"id": "j", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}]}).encode(), {"Content-Type": "application/json"})
    assert status == 200 and InferenceResponse.model_validate_json(body).id == "j"  # KServe's response model


def _status_error(url, x, model=NAME):
    with pytest.raises(httpx.HTTPStatusError) as err:
        kserve_infer(url, x, binary=True, model=model)
    return err.value


def test_kserve_client_shows_our_error_bodies(servers, local):
    """Each status we return reaches KServe's client with our {"error": ...} message."""
    _, url = servers
    cases = {400: (feature(local)[:, :, :3].copy(), NAME, "input 'x': shape [2, 2, 3, 28, 28] does not match"),
             404: (feature(local), "nope", "unknown model 'nope'"),
             413: (feature(local, 30), NAME, "over the server's limit")}  # 30 x 37.6 kB > 1 MiB
    for status, (x, name, words) in cases.items():
        exc = _status_error(url, x, name)
        assert exc.response.status_code == status
        body = exc.response.json()
        assert list(body) == ["error"] and words in body["error"]
        assert str(exc).startswith(body["error"])  # KServe's client puts our message first
    # 503: one request held open mid-body, with almost all of --max-inflight-mb 1 received, fills the budget
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as held:
        sent = 1_040_000  # of the 1,048,576-byte budget; a 1-image request (~38 kB) no longer fits
        held.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {sent + 100}\r\n\r\n"
                     .encode() + b"{" + b" " * (sent - 1))
        deadline = time.monotonic() + 20
        while True:  # until the held request is counted
            try:
                kserve_infer(url, feature(local, 1), binary=True)
            except httpx.HTTPStatusError as exc:
                assert exc.response.status_code == 503 and "server busy" in exc.response.json()["error"]
                break
            assert time.monotonic() < deadline, "the held request never filled the server"
            time.sleep(0.1)
    status, headers, body = raw(url, "GET", f"/v2/models/{NAME}/infer")
    assert status == 405 and list(json.loads(body)) == ["error"]
    deadline = time.monotonic() + 20
    while True:  # the held request is gone: the server serves again
        try:
            res, _ = kserve_infer(url, feature(local, 1, 7), binary=True)
            break
        except httpx.HTTPStatusError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    np.testing.assert_allclose(res.outputs[0].as_numpy(), href(local, feature(local, 1, 7)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the same malformed requests to both servers


def _binary(x, name="x", datatype="FP32", cut=0):
    data = x.tobytes()
    head = json.dumps({"id": "m", "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                              "parameters": {"binary_data_size": len(data)}}]}).encode()
    body = head + data
    return body[:len(body) - cut], {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def _json(x, datatype="FP32"):
    body = {"id": "m", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _nan(x):
    return _binary(np.full_like(x, np.nan))


# docs/serve.md row label -> (request, model, our status, KServe's status, words our message must hold)
MALFORMED = {
    "wrong shape": (lambda x: _binary(x[:, :, :3].copy()), NAME, 400, 400, "shape [2, 2, 3, 28, 28] does not match"),
    "wrong datatype": (lambda x: _json(x, "FP64"), NAME, 400, 400, "datatype 'FP64' does not match the model's FP32"),
    "unknown input": (lambda x: _binary(x, name="y"), NAME, 400, 400, "unknown input 'y'"),
    "unknown model": (_binary, "nope", 404, 404, "unknown model 'nope'"),
    "truncated binary data": (lambda x: _binary(x, cut=100), NAME, 400, 500, "binary data truncated"),
    "binary_data_size not shape x 4 bytes": (
        lambda x: (lambda b, h: (b.replace(b'"binary_data_size": 75264', b'"binary_data_size": 75000'), h))(
            *_binary(x)), NAME, 400, 500, "binary_data_size 75000 is not shape"),
    "bytes after the binary data": (lambda x: (_binary(x)[0] + b"\0" * 8, _binary(x)[1]), NAME, 400, 200,
                                    "8 bytes of binary data after the last binary input"),
    "NaN in x": (_nan, NAME, 400, 200, "non-finite values"),
    "malformed JSON": (lambda x: (b'{"inputs": [', {"Content-Type": "application/json"}), NAME, 400, 422,
                       "malformed JSON"),
    "JSON body without Content-Type": (lambda x: (_json(x)[0], {}), NAME, 200, 400, ""),
}


def test_malformed_requests_on_both_servers(servers, local):
    kserve_url, url = servers
    x = feature(local, 2, seed=3)
    assert len(x.tobytes()) == 75264  # the size the binary_data_size row rewrites
    for label, (make, name, ours, theirs, words) in MALFORMED.items():
        body, headers = make(x)
        got = []
        for server in (url, kserve_url):
            status, got_headers, reply = raw(server, "POST", f"/v2/models/{name}/infer", body, headers)
            got.append((status, json.loads(reply[:int(got_headers.get(HEADER.lower(), len(reply)))])))
        (status, answer), (k_status, k_answer) = got
        assert status == ours, (label, got)
        if status == 200:
            np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"]).reshape(x.shape[0], 2, -1),
                                       href(local, x).reshape(x.shape[0], 2, -1), rtol=1e-6, atol=1e-6)
        else:  # the spec's error object, naming the problem
            assert list(answer) == ["error"] and words in answer["error"], (label, answer)
        assert k_status == theirs, (label, got)
        assert k_status == 200 or list(k_answer) == (["detail"] if k_status == 422 else ["error"]), (label, k_answer)
    # docs/serve.md "Tested against": one row per case, our status then KServe's
    readme = (ROOT / "docs" / "serve.md").read_text()
    section = readme.split("## Tested against", 1)[1].split("\n# ", 1)[0]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:4]]
            for r in section.splitlines() if r.startswith("| ") and not r.startswith("| request")}
    for label, (_, _n, ours, theirs, _w) in MALFORMED.items():
        assert label in rows, f"docs/serve.md row for {label!r} missing"
        assert rows[label][0].startswith(str(ours)) and rows[label][1].startswith(str(theirs)), rows[label]
