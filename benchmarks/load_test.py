"""Bounded load test of `cvconvert serve` on loopback: C concurrent clients x R requests each, a time limit,
every answer checked against local ONNX Runtime; prints requests/s and p50/p99 latency.

    .venv/bin/python benchmarks/load_test.py                      # LeNet's processing part, 8 x 50
    .venv/bin/python benchmarks/load_test.py out/lenet --clients 8 --requests 50 --batch 4   # a model dir
    .venv/bin/python benchmarks/load_test.py --url http://HOST:8000 --name NAME MODEL.onnx   # any v2 server

The server runs as a separate process (`python -m cvconvert.cli serve`), as in production, so the clients' Python
threads do not share its GIL. Exit status 1 on any error, wrong answer or time-limit overrun.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvconvert.device.remote import RemoteProcessing  # noqa: E402
from cvconvert.serve.model import resolve_model_path  # noqa: E402


def lenet_processing(folder: Path) -> Path:
    """A converted LeNet, exported by `cvconvert export` (its processing.onnx is what gets served)."""
    from cvconvert.build import convert_to_dir
    from cvconvert.export import export_model_dir

    convert_to_dir("lenet", folder / "lenet", force=True)
    export_model_dir(folder / "lenet")
    return folder / "lenet"


def start_server(model: Path, name: str, threads: int | None, extra: list[str], root: Path = ROOT
                 ) -> tuple[subprocess.Popen, str]:
    """`cvconvert serve` (from the checkout `root`) as its own process; (the process, its URL)."""
    cmd = [sys.executable, "-m", "cvconvert.cli", "serve", str(model), "--name", name, "--port", "0", "--no-access-log"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(cmd + extra, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url, text = None, ""
    for line in proc.stderr:  # "infer URL: http://127.0.0.1:PORT/..." once it listens
        text = line.decode()
        if text.startswith("infer URL: "):
            url = text.split()[2].split("/v2/")[0]
            break
    if url is None:
        raise SystemExit(f"server did not start: {text.strip()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
    probe = RemoteProcessing(url, name, timeout=5)
    deadline = time.monotonic() + 60
    while not probe.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not come up within 60 s")
        time.sleep(0.1)
    probe.close()
    return proc, url


def stop_server(proc: subprocess.Popen, wait: float = 30) -> None:
    """Ctrl-C (uvicorn finishes what is in flight), then kill if it takes longer than `wait` seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="processing.onnx or a model dir (default: a converted LeNet's)")
    ap.add_argument("--url", help="benchmark this running v2 server instead of starting one")
    ap.add_argument("--name", help="model name (default: what `cvconvert serve MODEL` names it)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--batch", type=int, default=1, help="samples per request")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds for the whole run")
    ap.add_argument("--threads", type=int, help="the server's --threads")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `cvconvert serve` argument")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    import onnxruntime as ort

    tmp = tempfile.TemporaryDirectory(prefix="cvconvert-load-")
    model = Path(args.model) if args.model else lenet_processing(Path(tmp.name))
    onnx_path, default_name = resolve_model_path(model)
    args.name = args.name or default_name
    local = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = [args.batch] + list(local.get_inputs()[0].shape[1:])
    rng = np.random.default_rng(0)
    # A few distinct inputs per client, answers computed before the clock starts.
    pool = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    answers = [local.run(None, {"x": x})[0] for x in pool]

    proc = None
    if args.url:
        url = args.url
    else:
        proc, url = start_server(model, args.name, args.threads, args.server_arg)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        remote = RemoteProcessing(url, args.name, timeout=30)
        mine = []
        try:
            for r in range(args.requests):
                if stop.is_set():
                    break
                k = (i + r) % len(pool)
                t0 = time.perf_counter()
                h = remote(pool[k])
                mine.append(time.perf_counter() - t0)
                if not np.allclose(h, answers[k], rtol=1e-5, atol=1e-5):
                    raise AssertionError("wrong answer")
        except Exception as exc:  # counted, reported
            with lock:
                errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        finally:
            remote.close()
            with lock:
                latencies.extend(mine)

    try:
        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(0.0, args.time_limit - (time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
        overrun = any(w.is_alive() for w in workers)
        stop.set()
    finally:
        if proc is not None:
            stop_server(proc)
        tmp.cleanup()

    expected = args.clients * args.requests
    lat = np.array(latencies) * 1000
    result = {
        "model": str(onnx_path if args.model else "lenet processing (converted, untrained)"),
        "input_shape": shape, "clients": args.clients, "requests_per_client": args.requests,
        "completed": len(latencies), "expected": expected, "errors": len(errors), "time_limit_hit": overrun,
        "seconds": round(elapsed, 3), "requests_per_s": round(len(latencies) / elapsed, 1),
        "samples_per_s": round(len(latencies) * args.batch / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['completed']}/{expected} requests in {elapsed:.2f} s from {args.clients} clients "
              f"(batch {args.batch}): {result['requests_per_s']} requests/s, {result['samples_per_s']} samples/s, "
              f"latency p50 {result['latency_ms_p50']} ms, p99 {result['latency_ms_p99']} ms, "
              f"errors {len(errors)}{', TIME LIMIT HIT' if overrun else ''}")
    for e in errors[:5]:
        print(e, file=sys.stderr)
    return 0 if not errors and not overrun and len(latencies) == expected else 1


if __name__ == "__main__":
    from cvconvert.errors import CvError

    try:
        sys.exit(main())
    except CvError as exc:
        sys.exit(f"error: {exc}")
