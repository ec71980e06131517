"""`cvconvert serve` against NVIDIA's own client (tritonclient.http), raw HTTP for the bad requests, and the
device-side RemoteProcessing. Loopback only; every server is shut down by its fixture."""

from __future__ import annotations

import gzip
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvconvert.serve import app as srv
from cvconvert.serve import run as srv_run
from cvconvert.serve.batching import rows_independent
from cvconvert.serve.model import load_served_model
from cvconvert.serve.protocol import HEADER_LENGTH
from cvconvert.errors import CvError
from cvconvert.device.remote import RemoteProcessing, build_request

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_MB = 1.0  # small, so an oversized body is cheap to make
NAME = "processing"


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers


def run_in_threads(worker, n: int, timeout: float = 60) -> None:
    """worker(i) for i < n, each in its own thread, all started before any is joined."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


@pytest.fixture(scope="module")
def exported(lenet_exported):
    """A converted LeNet (the paper's split: delta, max-modulus pool, conv, linears) exported with
    `export` (encoder/processing/decoder graphs, validated) plus the Triton repository it writes, and a
    few grey PNGs."""
    from PIL import Image

    base = lenet_exported
    rng = np.random.default_rng(0)
    (base / "images").mkdir()
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    for i in range(3):  # smooth patterns, unlike each other
        img = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
        Image.fromarray((img * 255).astype(np.uint8), "L").save(base / "images" / f"{i}.png")
    return base


@pytest.fixture(scope="module")
def processing_onnx(exported) -> Path:
    """DESIGN.md's processing.onnx contract: x [N,2,C',H',W'] -> h, batch axis dynamic."""
    return exported / "lenet" / "onnx" / "processing.onnx"


@pytest.fixture(scope="module")
def local(processing_onnx):
    return ort.InferenceSession(str(processing_onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def live(processing_onnx):
    model = load_served_model(processing_onnx, NAME)
    app = srv.build_app(model, srv.ServerOptions(max_request_bytes=srv_run.max_request_bytes(MAX_MB), threads=2))
    with srv_run.BackgroundServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    c = tritonclient_http.InferenceServerClient(f"{live.host}:{live.port}", network_timeout=30)
    yield c
    c.close()


def feature(local, n=3, seed=0):
    shape = [n] + [d for d in local.get_inputs()[0].shape[1:]]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference(local, x):
    return local.run(None, {"x": x})[0]


def triton_infer(client, x, binary_in=True, outputs=None, **kw):
    inp = tritonclient_http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    return client.infer(NAME, [inp], outputs=outputs, **kw)


def raw(live, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(live.host, live.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def assert_still_serves(live, local):
    """After any bad request, a good one still gets the right answer."""
    x = feature(local, 2, seed=99)
    np.testing.assert_allclose(RemoteProcessing(live.url, NAME)(x), reference(local, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# tritonclient, unchanged, against the live server

def test_readiness_and_metadata(client, local):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, model_version="1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(NAME, model_version="7")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == ["1"]
    (inp,), (out,) = meta["inputs"], meta["outputs"]
    want = local.get_inputs()[0]
    assert inp["name"] == "x" and inp["datatype"] == "FP32"
    assert inp["shape"] == [-1] + list(want.shape[1:])  # batch axis dynamic
    assert out["name"] == "h" and out["datatype"] == "FP32"
    assert client.get_model_metadata(NAME, model_version="1") == meta
    assert client.get_model_config(NAME)["input"][0]["dims"] == inp["shape"]


def test_infer_binary_in_and_out_equals_local(client, local):
    x = feature(local, 3)
    result = triton_infer(client, x)  # tritonclient's defaults: binary input, binary_data_output
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0
    np.testing.assert_allclose(result.as_numpy("h"), reference(local, x), rtol=1e-6, atol=1e-6)


def test_infer_json_in_and_out_equals_local(client, local):
    x = feature(local, 2, seed=1)
    out = tritonclient_http.InferRequestedOutput("h", binary_data=False)
    result = triton_infer(client, x, binary_in=False, outputs=[out], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == NAME
    assert "data" in response["outputs"][0] and "parameters" not in response["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("h"), reference(local, x), rtol=1e-6, atol=1e-6)
    # JSON in, binary out (per-output flag), through the versioned URL
    out = tritonclient_http.InferRequestedOutput("h", binary_data=True)
    result = triton_infer(client, x, binary_in=False, outputs=[out], model_version="1")
    assert "binary_data_size" in result.get_response()["outputs"][0]["parameters"]
    np.testing.assert_allclose(result.as_numpy("h"), reference(local, x), rtol=1e-6, atol=1e-6)


def test_gzip_request_accepted(client, local):
    x = feature(local, 2, seed=2)
    result = triton_infer(client, x, request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("h"), reference(local, x), rtol=1e-6, atol=1e-6)


def test_served_graph_is_rotation_equivariant(live, local):
    """The cloud part commutes with the secret rotation: what the server sees is e^{i theta} x."""
    x, t = feature(local, 4, seed=3), np.float32(1.1)
    remote = RemoteProcessing(live.url, NAME)

    def rot(v):
        return np.stack([v[:, 0] * np.cos(t) - v[:, 1] * np.sin(t), v[:, 0] * np.sin(t) + v[:, 1] * np.cos(t)], 1)

    h = remote(x)
    np.testing.assert_allclose(remote(rot(x)), rot(h), rtol=1e-4, atol=1e-4 * np.abs(h).max())


def test_concurrent_clients_get_their_own_answers(live, local):
    xs = [feature(local, 1 + i % 3, seed=10 + i) for i in range(8)]
    remote, errors, results = RemoteProcessing(live.url, NAME), [], {}

    def worker(i):
        try:
            for _ in range(3):
                results[i] = remote(xs[i])
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    run_in_threads(worker, 8)
    assert not errors
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], reference(local, x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# bad requests: status + JSON {"error"}, then a good request still succeeds

def _body(x, *, name="x", datatype="FP32", shape=None, size=None, extra=b"", header_len=None):
    raw_x = x.tobytes()
    header = {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape) if shape is None else shape,
                          "parameters": {"binary_data_size": len(raw_x) if size is None else size}}],
              "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    return head + raw_x + extra, {HEADER_LENGTH: str(len(head) if header_len is None else header_len)}


def _json_body(x, data=None, **item):
    entry = {"name": "x", "datatype": "FP32", "shape": list(x.shape),
             "data": x.ravel().tolist() if data is None else data, **item}
    return json.dumps({"inputs": [entry]}).encode(), {}


def bad_requests(x):
    """(label, method, path, body, headers, status, words the error must contain)."""
    infer = f"/v2/models/{NAME}/infer"
    nan = x.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[-1, 1, 0, 0, 0] = np.inf
    big = np.zeros((int(MAX_MB * 2 ** 20 / x[0].nbytes) + 2,) + x.shape[1:], np.float32)
    yield "unknown model", "POST", "/v2/models/nope/infer", *_body(x), 404, "unknown model"
    yield "unknown version", "POST", f"/v2/models/{NAME}/versions/3/infer", *_body(x), 404, "no version"
    yield "unknown route", "GET", "/v2/nothing/here", None, {}, 404, "not found"
    yield "wrong method", "GET", infer, None, {}, 405, "method not allowed"
    yield "wrong input name", "POST", infer, *_body(x, name="theta"), 400, "unknown input"
    yield "wrong rank", "POST", infer, *_body(x, shape=list(x.shape[1:])), 400, "does not match"
    wrong_dims = [x.shape[0], 2, x.shape[2] + 1] + list(x.shape[3:])
    yield "wrong dims", "POST", infer, *_body(x, shape=wrong_dims, size=x.nbytes), 400, "does not match"
    yield "wrong datatype", "POST", infer, *_body(x.astype(np.float64), datatype="FP64"), 400, "datatype"
    yield "truncated binary", "POST", infer, *_body(x, size=x.nbytes + 8), 400, "binary_data_size"
    body, headers = _body(x)
    yield "body cut short", "POST", infer, body[:-100], headers, 400, "truncated"
    yield "size mismatch", "POST", infer, *_body(x, size=x.nbytes - 4, extra=b""), 400, "binary_data_size"
    yield "trailing bytes", "POST", infer, *_body(x, extra=b"\0" * 12), 400, "after the last binary input"
    yield "header length past body", "POST", infer, *_body(x, header_len=10 ** 9), 400, "outside the body"
    yield "header length not a number", "POST", infer, *_body(x, header_len="ten"), 400, "not an integer"
    yield "NaN in binary", "POST", infer, *_body(nan), 400, "non-finite"
    yield "Inf in binary", "POST", infer, *_body(inf), 400, "non-finite"
    yield "NaN in JSON", "POST", infer, *_json_body(x, data=[float("nan")] + x.ravel().tolist()[1:]), 400, "non-finite"
    yield "overflow in JSON", "POST", infer, *_json_body(x, data=[1e300] + x.ravel().tolist()[1:]), 400, "non-finite"
    yield "malformed JSON", "POST", infer, b'{"inputs": [', {}, 400, "malformed json"
    yield "JSON not an object", "POST", infer, b"[1, 2]", {}, 400, "json object"
    yield "no inputs", "POST", infer, b'{"outputs": []}', {}, 400, "inputs"
    yield "data too short", "POST", infer, *_json_body(x, data=[0.0, 1.0]), 400, "elements"
    yield "data not numbers", "POST", infer, *_json_body(x, data=["secret-text"] * x.size), 400, "not a regular array"
    yield "unknown output", "POST", infer, json.dumps(
        {"inputs": json.loads(_json_body(x)[0])["inputs"], "outputs": [{"name": "logits"}]}).encode(), {}, 400, "unknown output"
    yield "oversized body", "POST", infer, *_body(big), 413, "limit"
    yield "oversized gzip bomb", "POST", infer, gzip.compress(b" " * int(3 * MAX_MB * 2 ** 20)), \
        {"Content-Encoding": "gzip"}, 413, "limit"
    yield "unknown encoding", "POST", infer, _json_body(x)[0], {"Content-Encoding": "br"}, 400, "content-encoding"


@pytest.mark.timeout(120)
def test_bad_requests_get_json_errors_and_server_keeps_serving(live, local):
    x = feature(local, 2, seed=4)
    for label, method, path, body, headers, status, words in bad_requests(x):
        got, resp_headers, data = raw(live, method, path, body, headers)
        assert got == status, (label, got, data[:200])
        assert resp_headers.get("content-type", "").startswith("application/json"), label
        error = json.loads(data)["error"]
        assert isinstance(error, str) and words in error.lower(), (label, error)
        assert "secret-text" not in error  # never echo request content
        assert_still_serves(live, local)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bodies_get_4xx_json_never_5xx(live, local, data):
    """Arbitrary bytes, mangled valid requests and odd header lengths: always a 4xx JSON error (or a
    correct 200), never a 5xx or a dropped connection."""
    x = feature(local, 1, seed=50)
    good, headers = _body(x)
    kind = data.draw(st.sampled_from(["bytes", "flip", "cut", "json"]))
    if kind == "bytes":
        body = data.draw(st.binary(max_size=2048))
    elif kind == "flip":  # corrupt one byte of the JSON header
        i = data.draw(st.integers(0, int(headers[HEADER_LENGTH]) - 1))
        body = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1:]
    elif kind == "cut":
        body = good[:data.draw(st.integers(0, len(good)))]
    else:  # structurally odd JSON
        body = json.dumps(data.draw(st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                ["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "binary_data_size"]), c,
                max_size=4), max_leaves=12))).encode()
        headers = {}
    if data.draw(st.booleans()):
        headers = {HEADER_LENGTH: str(data.draw(st.integers(-5, len(body) + 5)))}
    status, resp_headers, reply = raw(live, "POST", f"/v2/models/{NAME}/infer", body, headers)
    assert status == 200 or 400 <= status < 500, (status, reply[:200])
    if status != 200:
        assert isinstance(json.loads(reply)["error"], str)


def test_oversized_body_sent_chunked_gets_413(live, local):
    """No Content-Length up front: the limit is enforced while streaming."""
    chunk = b"\0" * 2 ** 16
    n = int(MAX_MB * 2 ** 20 / len(chunk)) + 4
    conn = http.client.HTTPConnection(live.host, live.port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{NAME}/infer", body=(chunk for _ in range(n)), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    finally:
        conn.close()
    assert_still_serves(live, local)


def test_tritonclient_sees_the_server_errors(client, local):
    x = feature(local, 2, seed=5)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [tritonclient_http.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x)])
    assert exc.value.status() == "404" and "unknown model" in exc.value.message()
    bad = x[:, :, :-1]  # a fixed dim off by one
    with pytest.raises(InferenceServerException) as exc:
        triton_infer(client, np.ascontiguousarray(bad))
    assert exc.value.status() == "400" and "does not match" in exc.value.message()
    np.testing.assert_allclose(triton_infer(client, x).as_numpy("h"), reference(local, x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the device side

class _Capture(http.server.BaseHTTPRequestHandler):
    """Records each request the device sends, then forwards it to the real server (a transparent proxy)."""

    seen: list = []
    upstream: tuple = ()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, dict(self.headers), body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        conn.request("POST", self.path, body=body,
                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-type", "content-length", HEADER_LENGTH.lower()):
                self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    def log_message(self, *args):
        pass


@pytest.fixture
def capture(live):
    _Capture.seen, _Capture.upstream = [], (live.host, live.port)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", _Capture.seen
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)


def test_remote_processing_sends_only_x(capture, local):
    url, seen = capture
    x = feature(local, 3, seed=6)
    h = RemoteProcessing(url, NAME)(x)
    np.testing.assert_allclose(h, reference(local, x), rtol=1e-6, atol=1e-6)
    (path, headers, body), = seen
    assert path == f"/v2/models/{NAME}/infer"
    n = int(headers[HEADER_LENGTH])
    header = json.loads(body[:n])
    # exactly one tensor, named x, and the body is its JSON header plus x's bytes and nothing else
    assert [i["name"] for i in header["inputs"]] == ["x"]
    assert set(header) <= {"inputs", "parameters", "outputs"}
    assert header["parameters"] == {"binary_data_output": True}
    assert set(header["inputs"][0]) == {"name", "shape", "datatype", "parameters"}
    assert body[n:] == x.tobytes() and len(body) == n + x.nbytes
    assert build_request(x)[0] == body


def test_remote_processing_errors(live, local):
    remote = RemoteProcessing(live.url, NAME, timeout=10)
    assert remote.ready() and remote.metadata()["inputs"][0]["name"] == "x"
    with pytest.raises(CvError, match="does not match"):
        remote(feature(local, 2)[:, :, :-1].copy())
    with pytest.raises(CvError, match="unknown model"):
        RemoteProcessing(live.url, "nope")(feature(local, 1))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(CvError, match="cannot reach"):
        RemoteProcessing(f"http://127.0.0.1:{dead}", NAME, timeout=5)(feature(local, 1))
    assert not RemoteProcessing(f"127.0.0.1:{dead}", NAME, timeout=5).ready()
    with pytest.raises(CvError, match="bad server URL"):
        RemoteProcessing("ftp://example", NAME)
    assert_still_serves(live, local)


def test_server_and_client_need_no_torch():
    code = ("import sys, cvconvert.serve.app, cvconvert.serve.run, cvconvert.serve.model, cvconvert.serve.batching,"
            " cvconvert.device.remote, cli.serve, starlette, uvicorn, onnxruntime;"
            "bad = [m for m in ('torch', 'torchvision', 'tritonclient') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ---------------------------------------------------------------------------------------------------
# the command line

@pytest.mark.timeout(90)
def test_cli_serve_model_dir_end_to_end(processing_onnx, local, tmp_path):
    """`cvconvert serve DIR` for a Triton-style model folder, reached by RemoteProcessing, stopped by Ctrl-C."""
    folder = tmp_path / "repo" / "lenet_processing"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(processing_onnx.read_bytes())
    cmd = [sys.executable, "-m", "cvconvert.cli", "serve", str(folder), "--port", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    head = []
    try:
        for line in proc.stderr:  # --port 0: the port the OS gave is printed in the "infer URL" line
            head.append(line.decode())
            if line.startswith(b"infer URL:"):
                break
        assert head and head[-1].startswith("infer URL: http://127.0.0.1:"), "".join(head)
        port = int(head[-1].split("http://127.0.0.1:")[1].split("/")[0])
        remote = RemoteProcessing(f"http://127.0.0.1:{port}", "lenet_processing", timeout=10)
        deadline = time.monotonic() + 60
        while not remote.ready():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        x = feature(local, 2, seed=8)
        np.testing.assert_allclose(remote(x), reference(local, x), rtol=1e-6, atol=1e-6)
        remote.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    log = "".join(head) + err.decode()
    assert proc.returncode == 0 and log.rstrip().endswith("stopped"), log[-500:]  # Ctrl-C is a clean stop
    assert "lenet_processing" in log and "/v2/models/lenet_processing/infer" in log
    assert "Traceback" not in log
    assert x.tobytes()[:64].hex() not in log and "binary_data_size" not in log  # no bodies logged


@pytest.mark.parametrize("args, words", [
    (["/nonexistent/processing.onnx"], "does not exist"),
    (["{onnx}", "--max-request-mb", "0"], "max-request-mb"),
    (["{onnx}", "--port", "70000"], "not a tcp port"),
    (["{txt}"], "not an .onnx file"),
    (["{onnx}", "--port", "{busy}"], "cannot listen"),
    (["{onnx}", "--name", "a/b"], "bad model name"),
])
def test_cli_serve_bad_arguments(args, words, processing_onnx, tmp_path):
    from typer.testing import CliRunner

    from cvconvert.cli.main import app

    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.format(onnx=processing_onnx, txt=txt, busy=busy.getsockname()[1]) for a in args]
        result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2
    assert words in result.output.lower()
    assert "Traceback" not in result.output


def test_broken_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "processing.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CvError, match="cannot load"):
        load_served_model(bad)


# ---------------------------------------------------------------------------------------------------
# dynamic batching (opt-in)

def test_dynamic_batching_gives_each_client_its_own_rows(processing_onnx, local):
    model = load_served_model(processing_onnx, NAME)
    assert rows_independent(model)
    run, stacked = model.run, []

    def counting_run(feeds, names):
        stacked.append(len(feeds["x"]))
        return run(feeds, names)

    model.run = counting_run
    app = srv.build_app(model, srv.ServerOptions(threads=1, max_batch=8, batch_delay_ms=50))
    stacked.clear()  # build_app's own row-independence check ran the model too
    xs = [feature(local, 1 + i % 2, seed=30 + i) for i in range(6)]
    results, errors = {}, []
    with srv_run.BackgroundServer(app) as server:
        remote = RemoteProcessing(server.url, NAME)
        barrier = threading.Barrier(len(xs))

        def worker(i):
            try:
                barrier.wait(10)  # arrive together, so the batcher stacks them
                results[i] = remote(xs[i])
            except Exception as exc:  # asserted below
                errors.append(exc)

        run_in_threads(worker, len(xs))
    assert not errors
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], reference(local, x), rtol=1e-5, atol=1e-5)
    assert max(stacked) > 2 and sum(stacked) == sum(len(x) for x in xs)  # requests were stacked


def test_dynamic_batching_refused_for_batch_coupled_graph(tmp_path):
    """A graph that mixes rows (x - mean over the batch) would leak between clients: refused."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 2, 3])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["h"])]
    graph = helper.make_graph(nodes, "coupled", [x], [h])
    path = tmp_path / "coupled.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    model = load_served_model(path)
    assert not rows_independent(model)
    with pytest.raises(CvError, match="cannot be batched"):
        srv.build_app(model, srv.ServerOptions(max_batch=4))
    srv.build_app(model, srv.ServerOptions(max_batch=1))  # unbatched serving is fine


# ---------------------------------------------------------------------------------------------------
# end to end: convert -> export --triton-repo -> serve the Triton model folder -> infer --server

@pytest.fixture(scope="module")
def triton_folder_server(exported):
    """`cvconvert serve` on the folder `export --triton-repo` wrote (what Triton itself would load)."""
    model = load_served_model(exported / "repo" / "lenet_processing")
    assert model.name == "lenet_processing"
    with srv_run.BackgroundServer(srv.build_app(model)) as server:
        yield server


def _predictions(args):
    from typer.testing import CliRunner

    from cvconvert.cli.main import app

    result = CliRunner().invoke(app, ["infer", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.timeout(180)
def test_cli_infer_server_end_to_end(exported, triton_folder_server):
    """`cvconvert infer --server` against the served Triton model folder (default name ARCH_processing).
    Its fools are drawn and used once per run, so two runs cannot be compared image by image here; the
    same-key, same-fools comparison with local processing is the library test below."""
    res = _predictions([str(exported / "images"), "--model-dir", str(exported / "lenet"), "--top-k", "10",
                        "--server", triton_folder_server.url])
    assert res["processing"] == triton_folder_server.url and len(res["predictions"]) == 3
    for p in res["predictions"]:
        assert abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4


def test_pipeline_with_remote_processing_same_key_same_logits(exported, triton_folder_server):
    """Library level, one fixed key: the remote pipeline's logits equal the local one's, and the only
    thing that crossed the wire is x (header + x's bytes), never the key, images or fools."""
    from cvconvert.device.pipeline import Pipeline

    _Capture.seen, _Capture.upstream = [], (triton_folder_server.host, triton_folder_server.port)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        remote = RemoteProcessing(f"http://127.0.0.1:{proxy.server_address[1]}", "lenet_processing")
        local_pipe = Pipeline.from_model_dir(exported / "lenet", provider="cpu")
        remote_pipe = Pipeline.from_model_dir(exported / "lenet", provider="cpu", processing=remote)
        rng = np.random.default_rng(1)
        images = rng.uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
        fools = rng.uniform(0, 1, (4, 1, 1, 32, 32)).astype(np.float32)
        key = local_pipe.new_keys(4)
        want = local_pipe.predict(images, fools, key)
        got = remote_pipe.predict(images, fools, key)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        x = local_pipe.encode(images, fools, key)
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)
    (path, headers, body), = _Capture.seen
    n = int(headers[HEADER_LENGTH])
    assert [i["name"] for i in json.loads(body[:n])["inputs"]] == ["x"]
    assert body[n:] == x.tobytes()
    assert key.tobytes() not in body and images.tobytes()[:256] not in body


# ---------------------------------------------------------------------------------------------------
# server options

def test_busy_server_answers_503_then_recovers(processing_onnx, local):
    """--max-inflight: while one request is inside the model (held there by a gate), the next gets 503 + JSON;
    a request still uploading its body holds no slot, and completes once the slot is free."""
    model = load_served_model(processing_onnx, NAME)
    run, entered, release, results = model.run, threading.Event(), threading.Event(), []

    def gated_run(feeds, names):
        entered.set()
        release.wait(20)
        return run(feeds, names)

    model.run = gated_run
    app = srv.build_app(model, srv.ServerOptions(max_inflight=1, threads=2))
    x = feature(local, 1, seed=40)
    body, headers = _body(x)
    with srv_run.BackgroundServer(app) as server:
        slow = socket.create_connection((server.host, server.port), timeout=30)
        try:
            head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                    f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\n\r\n").encode()
            slow.sendall(head + body[:100])  # uploading, slowly: no slot yet
            first = threading.Thread(target=lambda: results.append(RemoteProcessing(server.url, NAME)(x)))
            first.start()
            assert entered.wait(20)  # the first request holds the only slot, inside the model
            status, _, data = raw(server, "POST", f"/v2/models/{NAME}/infer", *_body(x))
            assert status == 503 and "busy" in json.loads(data)["error"]
            release.set()
            first.join(30)
            slow.sendall(body[100:])
            reply = slow.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
        finally:
            release.set()
            slow.close()
        np.testing.assert_allclose(results[0], reference(local, x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(RemoteProcessing(server.url, NAME)(x), reference(local, x), rtol=1e-6, atol=1e-6)


def test_runs_are_concurrent_and_off_the_event_loop(processing_onnx, local):
    """Two requests are inside ONNX Runtime at the same moment (a barrier in the run only opens when both
    arrive), and the health endpoint answers while they are running."""
    model = load_served_model(processing_onnx, NAME)
    run, gate, release, inside = model.run, threading.Barrier(2, timeout=20), threading.Event(), []

    def gated_run(feeds, names):
        gate.wait()  # BrokenBarrierError (-> the request fails) if runs were serialised
        inside.append(1)
        release.wait(20)
        return run(feeds, names)

    model.run = gated_run
    app = srv.build_app(model, srv.ServerOptions(threads=2))
    xs = [feature(local, 1, seed=60 + i) for i in range(2)]
    results, errors = {}, []
    with srv_run.BackgroundServer(app) as server:
        def worker(i):
            try:
                results[i] = RemoteProcessing(server.url, NAME)(xs[i])
            except Exception as exc:  # asserted below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(inside) < 2 and not gate.broken and time.monotonic() < deadline:
            time.sleep(0.01)
        # both runs are parked in the pool now: the event loop must still answer
        status, _, data = raw(server, "GET", "/v2/health/live")
        assert status == 200 and json.loads(data) == {"live": True}
        assert all(t.is_alive() for t in threads)
        release.set()
        for t in threads:
            t.join(30)
    assert not errors
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], reference(local, x), rtol=1e-6, atol=1e-6)


def test_handlers_work_alone(processing_onnx, local):
    """Each handler is a module-level function over app.state: called here on a bare ASGI request, with no
    server, socket or routing."""
    import asyncio

    from starlette.requests import Request

    app = srv.build_app(load_served_model(processing_onnx, NAME))
    x = feature(local, 2, seed=42)
    body, headers = _body(x)

    def request(model, method="GET", content=b"", extra=()):
        scope = {"type": "http", "app": app, "method": method, "path": "/", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in extra], "path_params": {"model": model}}

        async def receive():
            return {"type": "http.request", "body": content, "more_body": False}
        return Request(scope, receive)

    try:
        assert json.loads(asyncio.run(srv.model_metadata(request(NAME))).body)["name"] == NAME
        with pytest.raises(srv.RequestError) as exc:
            asyncio.run(srv.model_ready(request("nope")))
        assert exc.value.status == 404
        reply = asyncio.run(srv.infer(request(NAME, "POST", body, [*headers.items(), ("Content-Length", str(len(body)))])))
        n = int(reply.headers[HEADER_LENGTH])
        h = np.frombuffer(reply.body[n:], np.float32).reshape(reference(local, x).shape)
        np.testing.assert_allclose(h, reference(local, x), rtol=1e-6, atol=1e-6)
        assert app.state.inflight == 0 and app.state.budget.used == 0  # slot and body bytes given back
    finally:
        app.state.executor.shutdown()


def test_allow_nonfinite_passes_nan_through(processing_onnx, local):
    app = srv.build_app(load_served_model(processing_onnx, NAME), srv.ServerOptions(allow_nonfinite=True))
    x = feature(local, 2, seed=41)
    x[1] = np.nan
    with srv_run.BackgroundServer(app) as server:
        h = RemoteProcessing(server.url, NAME)(x)
    assert np.isnan(h[1]).all() and np.isfinite(h[0]).all()
    np.testing.assert_allclose(h[0], reference(local, x[:1])[0], rtol=1e-6, atol=1e-6)
