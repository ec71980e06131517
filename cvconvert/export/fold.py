"""Step 0 of export: batch-norms folded into the layer before them, on a copy (the model is untouched)."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..complex.layers import CBatchNorm, CConv2d, CLinear


def fold_complex_batchnorm(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """Copy of `gm` with each eval-mode CBatchNorm folded into the bias-free CConv2d/CLinear before it.

    The norm-only batch-norm is a real per-channel factor s in eval mode, and W -> s W keeps the layer
    linear with real weights, hence rotation-equivariant. The model itself is not touched.
    """
    gm = copy.deepcopy(gm).eval()
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), CBatchNorm):
            continue
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, (CConv2d, CLinear)):
            continue
        bn = gm.get_submodule(node.target)
        if layer.weight.shape[0] != bn.num_features:
            continue
        scale = bn.scale().detach()
        with torch.no_grad():
            layer.weight.mul_(scale.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, folded


def fold_real_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Copy with Conv2d+BatchNorm2d fused (torch.fx's own eval-mode fusion); unchanged copy if it cannot."""
    from torch.fx.experimental.optimization import fuse

    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    try:
        fused = fuse(copy.deepcopy(module).eval(), inplace=True)
    except Exception:  # e.g. untraceable control flow: export it unfused, it is still correct
        return copy.deepcopy(module).eval(), 0
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused, before - after
