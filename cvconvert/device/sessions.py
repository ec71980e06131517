"""ONNX Runtime sessions for infer, serve, bench and export's validation, made in one place (torch-free).

The session options were chosen by measurement (docs/performance.md): all graph optimisations (the NCHWc
conv layout and fusions), sequential execution, a fixed intra-op pool the size of the CPUs this process
may use, and no busy-waiting workers. `cvconvert export` stores them in each graph's metadata
(``cvconvert.ort_session``), so a graph carries the settings it was measured with, and every session
made here reads them back.
"""

from __future__ import annotations

import json
import os

import onnxruntime as ort

from ..errors import CvError, one_line

SESSION_CONFIG_KEY = "cvconvert.ort_session"
SESSION_CONFIG = {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL", "spin": False}


def default_threads() -> int:
    """Physical-core-sized intra-op pool: ORT's default spins one thread per logical CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, config: dict | None = None) -> ort.SessionOptions:
    cfg = {**SESSION_CONFIG, **(config or {})}
    so = ort.SessionOptions()
    try:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["graph_optimization_level"])
        so.execution_mode = getattr(ort.ExecutionMode, cfg["execution_mode"])
    except (AttributeError, TypeError):
        raise CvError(f"bad ONNX Runtime session config {cfg}") from None
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not cfg.get("spin", False):
        # Busy-waiting worker threads steal the cores from whatever runs next (the next part, PyTorch,
        # other processes): on a small shared CPU that costs more than the wake-up latency it saves.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def add_session_config(proto, config: dict | None = None) -> None:
    """Record the session options in an onnx ModelProto's metadata_props (before it is serialised)."""
    for p in list(proto.metadata_props):
        if p.key == SESSION_CONFIG_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=SESSION_CONFIG_KEY, value=json.dumps({**SESSION_CONFIG, **(config or {})}))


def session_config(sess: ort.InferenceSession) -> dict:
    """The options a graph was exported with ({} for graphs from elsewhere or a bad entry)."""
    try:
        cfg = json.loads(sess.get_modelmeta().custom_metadata_map.get(SESSION_CONFIG_KEY, "{}"))
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def create_session(what, providers: list[str], threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession with the options above, re-made once if the graph records other ones.

    what: a path or the serialised graph. Raises CvError (one line) when ONNX Runtime cannot load it.
    """
    what = what if isinstance(what, (bytes, bytearray)) else str(what)
    name = "graph" if isinstance(what, (bytes, bytearray)) else what
    cuda = "CUDAExecutionProvider" in providers
    if cuda:
        # onnxruntime-gpu logs a multi-line error when the CUDA libraries are missing, then falls back to
        # CPU; callers report the provider that actually runs instead, in one line.
        ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(what, sess_options=session_options(threads), providers=providers)
        cfg = session_config(sess)
        if {**SESSION_CONFIG, **cfg} != SESSION_CONFIG:
            sess = ort.InferenceSession(what, sess_options=session_options(threads, cfg), providers=providers)
    except CvError:
        raise
    except Exception as exc:  # ORT raises several of its own types
        raise CvError(f"cannot load {name} with ONNX Runtime: {one_line(exc)}") from None
    finally:
        if cuda:
            ort.set_default_logger_severity(2)  # onnxruntime's default (warning)
    return sess


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def make_session(path, provider: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the chosen execution provider; CvError when it cannot load or run there."""
    if provider not in ("auto", "cpu", "cuda"):
        raise CvError(f"unknown provider {provider!r} (auto, cpu or cuda)")
    avail = ort.get_available_providers()
    want_cuda = provider == "cuda" or (provider == "auto" and PROVIDERS["cuda"] in avail)
    if provider == "cuda" and PROVIDERS["cuda"] not in avail:
        raise CvError(f"--provider cuda: this onnxruntime has no CUDA execution provider (has {', '.join(avail)})")
    providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if want_cuda else [PROVIDERS["cpu"]]
    sess = create_session(path, providers, threads)
    if provider == "cuda" and sess.get_providers()[0] != PROVIDERS["cuda"]:
        raise CvError("--provider cuda: the CUDA execution provider failed to start (CUDA/cuDNN libraries "
                      "missing?); use --provider auto or cpu")
    return sess
