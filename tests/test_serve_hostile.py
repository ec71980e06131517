"""`cvconvert serve` against hostile clients, as its own process on loopback: each attack a security tester
tried (docs/serve.md, errors and limits) gets a 4xx or a closed connection within its deadline, never
a 500 or a hang, and the server keeps answering everyone else. Raw sockets for the slow, stalled and
lying-length cases. The model is a tiny ONNX graph (x [N,2,8,8] -> h = sum over the last two axes), so
the server starts in a second; short deadlines (--header-timeout/--body-timeout) keep the suite fast."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
INFER = f"/v2/models/{NAME}/infer"
MAX_MB = 16  # --max-request-mb: big enough for the "largest request" rows, quick to send on loopback
HEADER_S, BODY_S = 1.0, 1.0  # --header-timeout, --body-timeout
ROW = (2, 8, 8)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *ROW])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["h"], keepdims=0)], "tiny", [x], [h],
                              [axes])
    path = tmp_path_factory.mktemp("hostile") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


class Server:
    """`cvconvert serve` as a process: its address, pid and access log."""

    def __init__(self, model: Path, log: Path):
        self.log = log
        cmd = [sys.executable, "-m", "cvconvert.cli", "serve", str(model), "--name", NAME, "--port", "0", "--threads", "2",
               "--max-request-mb", str(MAX_MB), "--max-inflight", "4", "--max-inflight-mb", str(4 * MAX_MB),
               "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S)]
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = []
        for line in self.proc.stderr:  # the port the OS gave is in the "infer URL" line
            lines.append(line.decode())
            if line.startswith(b"infer URL:"):
                break
        assert lines and lines[-1].startswith("infer URL: http://127.0.0.1:"), "".join(lines)
        self.port = int(lines[-1].split("127.0.0.1:")[1].split("/")[0])
        self.host, self.pid = "127.0.0.1", self.proc.pid
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    srv = Server(tiny_onnx, tmp_path_factory.mktemp("hostile-log") / "access.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if call(srv, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------
# helpers

def call(srv, method, path, body=None, headers=None, timeout=5.0):
    """(status, body) over a fresh connection; a TimeoutError is a hang."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def good(n=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, *ROW)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return x, head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def assert_serves(srv, seed=99):
    x, body, headers = good(3, seed)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request("POST", INFER, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data[:200]
        n = int(resp.getheader("Inference-Header-Content-Length"))
    finally:
        conn.close()
    np.testing.assert_allclose(np.frombuffer(data[n:], np.float32).reshape(3, 2), x.sum(axis=(2, 3)), rtol=1e-5, atol=1e-5)


def json_request(data_text: bytes, shape=(1, *ROW), extra: bytes = b"") -> bytes:
    return (b'{"inputs":[{"name":"x","datatype":"FP32","shape":' + json.dumps(list(shape)).encode()
            + b',"data":' + data_text + b"}]" + extra + b"}")


def assert_4xx(status, body, *words):
    assert 400 <= status < 500, (status, body[:200])
    error = json.loads(body)["error"].lower()
    assert all(w in error for w in words), error


def _complete(got: bytes) -> bool:
    """Whether the headers and as much of the body as their Content-Length says have arrived (the body
    may come in a later packet than the headers)."""
    head, _, body = got.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def answer_within(sock: socket.socket, seconds: float) -> bytes:
    """The server's first response (status line, headers and the body their Content-Length announces),
    or b'CLOSED' if it closes the connection first, or b'HANG' if `seconds` pass first."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                return got or b"CLOSED"
            got += part
            if b"\r\n\r\n" in got and _complete(got):
                return got
    except (ConnectionResetError, BrokenPipeError):
        return got or b"CLOSED"
    except TimeoutError:
        return got or b"HANG"


def raw(srv, data: bytes) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=5)
    sock.sendall(data)
    return sock


def head(content_length: int | None = None, extra: str = "") -> bytes:
    length = "" if content_length is None else f"Content-Length: {content_length}\r\n"
    return f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{length}{extra}\r\n".encode()


# ---------------------------------------------------------------------------------------------------
# the rows of the attack table

@pytest.mark.timeout(60)
def test_huge_integers_are_400(server):
    digits = b"9" * 5000
    x = np.zeros((1, *ROW), np.float32)
    assert_4xx(*call(server, "POST", INFER, json_request(b"[" + digits + b"," + b"0," * (x.size - 2) + b"0]")),
               "non-finite")
    shape_body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[' + digits + b',2,8,8],"data":[0]}]}'
    assert_4xx(*call(server, "POST", INFER, shape_body), "digits")
    assert_4xx(*call(server, "POST", INFER, json_request(b"[0]", extra=b',"parameters":{"n":' + digits + b"}")),
               "digits")
    assert_serves(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["data", "body", "parameters"])
def test_deep_nesting_is_400(server, where):
    deep = b"[" * 10000 + b"]" * 10000
    body = {"data": json_request(deep), "body": deep,
            "parameters": json_request(b"[0]", extra=b',"parameters":{"p":' + deep + b"}")}[where]
    assert_4xx(*call(server, "POST", INFER, body), "nested")
    assert_serves(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [b'"0.5"', b'" 1_000.5e-3 "', b"true", b"null", b"{}", b"[1]"])
def test_only_numbers_in_data(server, value):
    n = int(np.prod(ROW))
    assert_4xx(*call(server, "POST", INFER, json_request(b"[" + value + b"," + b"0," * (n - 2) + b"0]")))
    assert_4xx(*call(server, "POST", INFER, json_request(b"[" + b"0," * (n - 1) + value + b"]")))
    assert_serves(server)


@pytest.mark.timeout(60)
def test_stalled_bodies_take_no_slot_and_time_out(server):
    """More stalled uploads than in-flight slots: good requests still get 200 (no 503) while they stall,
    and each stalled one gets a 408 (or a closed connection) once --body-timeout passes."""
    stalled = [raw(server, head(1000000) + b"{") for _ in range(12)]
    t0 = time.monotonic()
    try:
        for i in range(10):
            assert_serves(server, seed=i)
        assert time.monotonic() - t0 < BODY_S  # all of that while the uploads stalled
        answers = [answer_within(s, BODY_S + 4) for s in stalled]
    finally:
        for s in stalled:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"CLOSED" for a in answers), answers
    assert time.monotonic() - t0 < BODY_S + 3


@pytest.mark.timeout(60)
def test_short_slow_and_chunked_bodies_hit_the_deadline(server):
    cases = {
        "body shorter than Content-Length": head(1000) + b'{"inputs"',
        "chunked, a huge chunk declared": head(None, "Transfer-Encoding: chunked\r\n") + b"FFFFFF\r\n{\"in",
        "headers never finished": f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode(),
        "nothing sent": b"",
    }
    socks = {k: raw(server, v) for k, v in cases.items()}
    trickle = raw(server, b"P")  # one header byte at a time: the deadline is not reset by each byte
    t0 = time.monotonic()
    try:
        for c in f"OST {INFER} HTTP/1.1\r\nHost: x\r\n"[:12]:
            time.sleep(0.1)
            try:
                trickle.sendall(c.encode())
            except OSError:
                break
        answers = {k: answer_within(s, 5) for k, s in socks.items()}
        answers["header trickle"] = answer_within(trickle, 5)
    finally:
        for s in [*socks.values(), trickle]:
            s.close()
    for label, a in answers.items():
        assert a.startswith(b"HTTP/1.1 408") or a == b"CLOSED", (label, a[:100])
    assert time.monotonic() - t0 < max(HEADER_S, BODY_S) + 3
    assert_serves(server)


@pytest.mark.timeout(60)
def test_oversized_content_length_gets_413_before_100_continue(server):
    sock = raw(server, head(100000000, "Expect: 100-continue\r\n"))
    try:
        t0 = time.monotonic()
        reply = answer_within(sock, 2)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:100]  # not "HTTP/1.1 100 Continue"
        assert time.monotonic() - t0 < 1
        assert b"limit" in reply
    finally:
        sock.close()
    assert_serves(server)


@pytest.mark.timeout(60)
def test_chunked_upload_refused_as_soon_as_it_passes_the_limit(server):
    limit = MAX_MB << 20
    sock = raw(server, head(None, "Transfer-Encoding: chunked\r\n"))
    chunk = b"10000\r\n" + b"0" * 0x10000 + b"\r\n"
    sent, reply = 0, b""
    try:
        while sent < 8 * limit:
            if select.select([sock], [], [], 0)[0]:
                reply = answer_within(sock, 2)
                break
            try:
                sock.sendall(chunk)
            except OSError:
                reply = answer_within(sock, 2)
                break
            sent += 0x10000
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert sent < limit + (8 << 20), sent  # answered at the limit, not after draining the upload
    assert_serves(server)


def _big_json(mb: float, zeros: bool = False) -> bytes:
    row = np.zeros(ROW, np.float32) if zeros else np.random.default_rng(1).standard_normal(ROW).astype(np.float32)
    text = json.dumps(row.ravel().tolist()).encode()[1:-1]
    n = int(mb * 2 ** 20 / (len(text) + 1))
    return json_request(b"[" + b",".join([text] * n) + b"]", shape=(n, *ROW))


def _probe_health(server, stop: threading.Event, latencies: list) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/v2/health/ready" if len(latencies) % 2 else f"/v2/models/{NAME}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    conn.close()


@pytest.mark.timeout(120)
def test_health_stays_fast_while_the_largest_json_requests_parse(server):
    body = _big_json(MAX_MB * 0.95)
    stop, latencies, statuses = threading.Event(), [], []
    prober = threading.Thread(target=_probe_health, args=(server, stop, latencies))
    prober.start()
    time.sleep(0.2)
    n = len(latencies)
    senders = [threading.Thread(target=lambda: statuses.append(call(server, "POST", INFER, body, timeout=60)[0]))
               for _ in range(3)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(90)
    stop.set()
    prober.join(20)
    during = np.array(latencies[n:]) * 1000
    assert statuses == [200, 200, 200]
    assert during.size > 10
    # old server: 16 s behind three 60 MB JSON requests; the target is 100 ms (a shared CI box adds noise)
    assert np.median(during) < 50 and during.max() < 250, (np.median(during), during.max())


def _peak_rss_during(server, work) -> tuple[float, float]:
    """(peak RSS while work() runs, RSS at the start), in MB."""
    stop, peak = threading.Event(), [server.rss_mb()]

    def sample():
        while not stop.is_set():
            peak.append(server.rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        stop.set()
        sampler.join(10)
    return max(peak), peak[0]


@pytest.mark.timeout(120)
def test_gzip_bombs_memory_bounded_and_returned(server):
    """Small gzip bodies that decode to the largest allowed JSON: the peak resident memory stays within a
    few times the decoded bodies (the old server: 14x, and it never came back), and returns near its
    baseline once they are answered."""
    body = gzip.compress(_big_json(MAX_MB * 0.95, zeros=True), 9)
    assert len(body) < 200_000
    assert_serves(server)
    time.sleep(0.5)
    baseline = server.rss_mb()
    statuses = []

    def burst():
        senders = [threading.Thread(target=lambda: statuses.append(
            call(server, "POST", INFER, body, {"Content-Encoding": "gzip"}, timeout=60)[0])) for _ in range(3)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(90)

    peak, _ = _peak_rss_during(server, burst)
    assert statuses == [200, 200, 200]
    decoded = 3 * MAX_MB
    # each: the decoded text + its float32 tensor (4 bytes per "0.0," of text) + a little for the chunks
    assert peak - baseline < 2.5 * decoded, (baseline, peak)
    time.sleep(1.0)
    assert server.rss_mb() - baseline < 0.5 * decoded, (baseline, server.rss_mb())


@pytest.mark.timeout(60)
def test_long_query_string_is_logged_short(server):
    path = "/v2/health/live?q=" + "a" * 100_000
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (200, 400, 414)
    time.sleep(0.3)
    lines = server.log.read_bytes().splitlines()
    assert any(b"GET /v2/health/live?q=aaa" in line for line in lines) or status != 200
    assert max(len(line) for line in lines) < 500
    assert_serves(server)


# ---------------------------------------------------------------------------------------------------
# fuzzing: header and body mutations of a good request

def _mutate(data) -> tuple[bytes, bytes]:
    """(head, body) of a mutated request: lying or odd lengths, encodings and framing; cut, flipped or
    swapped bodies (deep nesting, huge numbers, strings in data)."""
    x, body, hdrs = good(2, seed=data.draw(st.integers(0, 3)))
    body = data.draw(st.sampled_from([
        body, json_request(json.dumps(x.ravel().tolist()).encode(), shape=x.shape),
        json_request(b"[" * 40 + b"1" + b"]" * 40), json_request(b'["1",2]'), json_request(b"[1e999999]"),
        b"[" * 3000, b"{}", b"", gzip.compress(body)]))
    how = data.draw(st.sampled_from(["keep", "cut", "flip", "append"]))
    if how == "cut" and body:
        body = body[:data.draw(st.integers(0, len(body) - 1))]
    elif how == "flip" and body:
        i = data.draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1:]
    elif how == "append":
        body += data.draw(st.binary(max_size=64))
    lines = [f"POST {data.draw(st.sampled_from([INFER, '/v2/models/x/infer', '/v2/health/live', '/%00']))} HTTP/1.1",
             "Host: x"]
    framing = data.draw(st.sampled_from(["length", "lie-short", "lie-long", "chunked", "garbage"]))
    if framing == "chunked":
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        lines.append("Transfer-Encoding: chunked")
    else:
        n = {"length": len(body), "lie-short": max(0, len(body) - 7), "lie-long": len(body) + 5}.get(framing, "1x")
        lines.append(f"Content-Length: {n}")
    for name, values in [("Inference-Header-Content-Length", [hdrs["Inference-Header-Content-Length"], "-1", "0",
                                                               "99999999999999999999", "ab"]),
                         ("Content-Encoding", ["gzip", "deflate", "br", "identity, gzip"]),
                         ("Expect", ["100-continue"])]:
        if data.draw(st.booleans()):
            lines.append(f"{name}: {data.draw(st.sampled_from(values))}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


@pytest.mark.timeout(180)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_requests_no_500_no_hang(server, data):
    head_bytes, body = _mutate(data)
    sock = raw(server, head_bytes + body)
    try:
        reply = answer_within(sock, 5)
    finally:
        sock.close()
    assert reply != b"HANG", head_bytes
    if reply != b"CLOSED":
        status = int(reply.split(b" ", 2)[1])
        assert status < 500, reply[:300]
    assert_serves(server)
