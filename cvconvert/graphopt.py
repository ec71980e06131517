"""Speed-only choices for the exported graphs, measured in docs/performance.md; nothing here changes
what a model computes beyond float rounding.

- ``custom_translations()``: pass as ``custom_translation_table`` to ``torch.onnx.export(dynamo=True)``
  (cvconvert/export.py does): max-modulus pooling's MaxPool indices without the stock second MaxPool.

The ONNX Runtime session options that go with these graphs are in ``cvconvert/ortsession.py`` (torch-free,
shared by infer, serve and bench).
"""

from __future__ import annotations

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
