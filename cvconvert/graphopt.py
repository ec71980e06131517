"""Speed-only choices for the exported graphs, measured in docs/performance.md; nothing here changes
what a model computes beyond float rounding.

- ``custom_translations()``: pass as ``custom_translation_table`` to ``torch.onnx.export(dynamo=True)``
  (cvconvert/export.py does): max-modulus pooling's MaxPool indices without the stock second MaxPool.
- ``session_options()``: the ONNX Runtime session options (all graph optimisations, fixed intra-op
  pool, no spinning); ``save_session_config`` stores them in a graph's metadata.
"""

from __future__ import annotations

import os

# Saved in the ONNX metadata by `save_session_config` and read back by `session_options`.
SESSION_CONFIG_KEY = "cvconvert.ort_session"
SESSION_CONFIG = {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL"}


def default_threads() -> int:
    """Physical-core-sized intra-op pool: ORT's default spins one thread per logical CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, config: dict | None = None):
    """ONNX Runtime session options: all graph optimisations (NCHWc conv layout and fusions), sequential
    execution, a fixed intra-op pool with no inter-op pool."""
    import onnxruntime as ort

    cfg = {**SESSION_CONFIG, **(config or {})}
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["graph_optimization_level"])
    so.execution_mode = getattr(ort.ExecutionMode, cfg["execution_mode"])
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not cfg.get("spin", False):
        # Busy-waiting worker threads steal the cores from whatever runs next (the next part, PyTorch,
        # other processes): on a small shared CPU that costs more than the wake-up latency it saves.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def save_session_config(onnx_path, config: dict | None = None) -> None:
    """Store the chosen session options in the model's metadata_props (read by `read_session_config`)."""
    import json

    import onnx

    from .modeldir import atomic_write

    model = onnx.load(str(onnx_path))
    for p in list(model.metadata_props):
        if p.key == SESSION_CONFIG_KEY:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=SESSION_CONFIG_KEY, value=json.dumps({**SESSION_CONFIG, **(config or {})}))
    atomic_write(onnx_path, lambda tmp: onnx.save(model, tmp))


def read_session_config(session_or_path) -> dict:
    import json

    if isinstance(session_or_path, (str, os.PathLike)):
        import onnx
        props = {p.key: p.value for p in onnx.load(str(session_or_path), load_external_data=False).metadata_props}
    else:
        props = session_or_path.get_modelmeta().custom_metadata_map
    try:
        return json.loads(props.get(SESSION_CONFIG_KEY, "{}"))
    except ValueError:
        return {}


def _pair(v, default):
    v = list(v) if v else list(default)
    return v * 2 if len(v) == 1 else v


def _max_pool2d_with_indices(self, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """aten.max_pool2d_with_indices as ONNX MaxPool + Mod.

    ONNX MaxPool counts indices over the whole flattened N*C*H*W tensor, PyTorch per (N, C) plane; the
    stock translation converts with a second, kernel-1 MaxPool over the full input (plus Slice, Sub).
    The per-plane index is simply the global one modulo H*W. Ties: ONNX Runtime keeps the first maximum
    in row-major window order, like PyTorch (tests/test_bench.py checks it).
    """
    from onnxscript import opset18 as op

    k = _pair(kernel_size, ())
    s = _pair(stride, k)
    p = _pair(padding, (0, 0))
    d = _pair(dilation, (1, 1))
    y, idx = op.MaxPool(self, kernel_shape=k, strides=s, pads=p + p, dilations=d, ceil_mode=int(bool(ceil_mode)))
    hw = op.ReduceProd(op.Shape(self, start=-2), keepdims=1)
    return y, op.Mod(idx, hw)


def custom_translations() -> dict:
    """`custom_translation_table` for torch.onnx.export(dynamo=True): faster ONNX for max-modulus pooling."""
    import torch

    return {torch.ops.aten.max_pool2d_with_indices.default: _max_pool2d_with_indices}
