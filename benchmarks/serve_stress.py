"""Peak memory and health latency of `cvconvert serve` under its largest requests, on loopback.

    .venv/bin/python benchmarks/serve_stress.py                       # LeNet's processing part, 60 MB JSON
    .venv/bin/python benchmarks/serve_stress.py out/lenet --json-mb 30 --server-arg=--body-timeout=5

The server runs as its own process (server defaults plus --server-arg). While each load below runs,
a prober asks /v2/health/ready and the model's metadata every 20 ms on a kept-alive connection, and the
server's resident memory (VmRSS) is sampled every 10 ms:

- json xK: K concurrent JSON requests of about --json-mb MB (random floats), answers checked;
- gzip xK: K concurrent gzip bodies of about 60 KB that decode to --json-mb MB of JSON (zeros);
- slow bodies: --slow-clients connections that declare Content-Length 1000000, send one byte and stall,
  while good requests keep coming (how many got 200, how many 503);
- binary x1: the gzip rows' tensor sent as binary data, what the model itself needs for that batch;
- idle after the burst: the resident memory the server keeps.

The idle baseline is taken after three small requests (ONNX Runtime's first runs allocate for good).

Every request has a time limit; exit status 1 if any good request failed or health never answered.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_test import lenet_processing, start_server, stop_server  # noqa: E402

from cvconvert.serve.model import resolve_model_path  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Watch:
    """Samples the server's RSS and the latency of health/metadata calls until stopped."""

    def __init__(self, pid: int, host: str, port: int, meta_path: str):
        self.pid, self.host, self.port, self.meta_path = pid, host, port, meta_path
        self.rss, self.latency, self.failures = [], [], 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._sample, daemon=True),
                        threading.Thread(target=self._probe, daemon=True)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _sample(self):
        while not self.stop.is_set():
            self.rss.append(rss_mb(self.pid))
            time.sleep(0.01)

    def _probe(self):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        paths = ["/v2/health/ready", self.meta_path]
        i = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("GET", paths[i % 2])
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            if ok:
                self.latency.append(time.perf_counter() - t0)
            else:
                self.failures += 1
            i += 1
            time.sleep(0.02)
        conn.close()

    def summary(self) -> dict:
        lat = np.array(self.latency or [np.nan]) * 1000
        return {"peak_rss_mb": round(max(self.rss), 1), "health_ms_p50": round(float(np.median(lat)), 1),
                "health_ms_max": round(float(lat.max()), 1), "health_calls": len(self.latency),
                "health_failures": self.failures}


def post(host: str, port: int, path: str, body: bytes, headers: dict, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc).encode()
    finally:
        conn.close()


def json_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def rows_for(mb: float, row_bytes: int) -> int:
    return max(1, int(mb * 1e6 / row_bytes))


def concurrent(k: int, send) -> list:
    out = [None] * k
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, send()), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def slow_bodies(host: str, port: int, n: int, path: str, good, seconds: float) -> dict:
    """n stalled uploads; good() sends one good request -> status. Counts the statuses over `seconds`."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=60)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode() + b"{")
        socks.append(s)
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = good()
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(0.05)
    answers = {}
    for s in socks:  # what each stalled upload got, waiting at most 30 s more in all
        s.settimeout(max(0.1, deadline + 30 - time.monotonic()))
        try:
            head = s.recv(64).split(b"\r\n")[0].decode() or "closed"
        except TimeoutError:
            head = "no answer"
        except OSError:
            head = "reset"
        answers[head] = answers.get(head, 0) + 1
        s.close()
    return {"good_requests": statuses, "stalled_connections_got": answers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="processing.onnx or a model dir (default: a converted LeNet's)")
    ap.add_argument("--json-mb", type=float, default=60.0, help="size of each big JSON body (MB)")
    ap.add_argument("--max-request-mb", type=float, default=64.0, help="the server's --max-request-mb")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--slow-clients", type=int, default=64)
    ap.add_argument("--slow-seconds", type=float, default=8.0, help="how long good requests are sent meanwhile")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `cvconvert serve` argument")
    ap.add_argument("--server-root", default=str(ROOT), help="checkout whose `cvconvert serve` runs (for before/after)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    import onnxruntime as ort

    tmp = tempfile.TemporaryDirectory(prefix="cvconvert-stress-")
    model = Path(args.model) if args.model else lenet_processing(Path(tmp.name))
    onnx_path, name = resolve_model_path(model)
    local = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    row = list(local.get_inputs()[0].shape[1:])
    rng = np.random.default_rng(0)
    x = rng.standard_normal([rows_for(args.json_mb, len(json_body(rng.standard_normal([1] + row).astype(np.float32))))]
                            + row).astype(np.float32)
    big, want = json_body(x), local.run(None, {"x": x})[0]
    zeros = np.zeros([rows_for(args.json_mb, len(json_body(np.zeros([1] + row, np.float32))))] + row, np.float32)
    bomb = gzip.compress(json_body(zeros), 9)
    zeros_head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(zeros.shape),
                                         "parameters": {"binary_data_size": zeros.nbytes}}]}).encode()
    zeros_binary, zeros_headers = zeros_head + zeros.tobytes(), {"Inference-Header-Content-Length": str(len(zeros_head))}
    good_x = x[:1]
    good = json_body(good_x)

    proc, url = start_server(model, name, None, ["--max-request-mb", str(args.max_request_mb), *args.server_arg],
                             Path(args.server_root))
    host, port = url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])
    infer, meta = f"/v2/models/{name}/infer", f"/v2/models/{name}"
    results, failed = {"json_mb": round(len(big) / 1e6, 1), "gzip_kb": round(len(bomb) / 1e3, 1),
                       "gzip_decoded_mb": round(len(json_body(zeros)) / 1e6, 1)}, False

    def check(status_body) -> bool:
        status, body = status_body
        if status != 200:
            return False
        out = json.loads(body)["outputs"][0]
        return np.allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), want, rtol=1e-4, atol=1e-4)

    try:
        for _ in range(3):  # the model's first runs allocate for good (ONNX Runtime's kernels): not a request's cost
            post(host, port, infer, good, {}, 30)
        with Watch(proc.pid, host, port, meta) as w:
            time.sleep(1.0)
        results["idle"] = w.summary()
        with Watch(proc.pid, host, port, meta) as w:  # the gzip rows' tensor, sent binary: the model's share
            status = post(host, port, infer, zeros_binary, zeros_headers)[0]
        results["binary x1 (gzip tensor)"] = {**w.summary(), "statuses": [status]}
        for k in args.concurrency:
            with Watch(proc.pid, host, port, meta) as w:
                answers = concurrent(k, lambda: post(host, port, infer, big, {}))
            results[f"json x{k}"] = {**w.summary(), "answers_ok": sum(map(check, answers))}
            failed |= results[f"json x{k}"]["answers_ok"] != k
            with Watch(proc.pid, host, port, meta) as w:
                answers = concurrent(k, lambda: post(host, port, infer, bomb, {"Content-Encoding": "gzip"}))
            results[f"gzip x{k}"] = {**w.summary(), "statuses": sorted(a[0] for a in answers)}
        with Watch(proc.pid, host, port, meta) as w:
            results["slow bodies"] = {**slow_bodies(host, port, args.slow_clients, infer,
                                                    lambda: post(host, port, infer, good, {}, 30)[0],
                                                    args.slow_seconds)}
        results["slow bodies"].update(w.summary())
        with Watch(proc.pid, host, port, meta) as w:
            time.sleep(3.0)
        results["idle after"] = w.summary()
        failed |= any(r.get("health_calls", 1) == 0 for r in results.values() if isinstance(r, dict))
    finally:
        stop_server(proc)
        tmp.cleanup()
    print(json.dumps(results, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in results.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
