"""The converter: rewrite a real processing graph into its rotation-equivariant twin.

The mapping is data (like torch.ao.quantization's default mappings): each real module type maps to a
complex class that builds itself with ``from_real``. Functional calls in ``forward`` (F.relu, ``+=``
skips, torch.flatten) are rewritten on the torch.fx graph. Anything else is refused by name: a layer
that silently breaks equivariance would make decoding fail.

A model family with a layer of its own registers the layer's complex counterpart where it defines the
layer (``register_complex(ShortcutA, CShortcutA, leaf=True)`` in zoo/resnet_cifar.py, where both live), so this module
depends on no model family.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .complex import layers as C
from .errors import ConversionError
from .registry import put

DEFAULT_MAPPING: dict[type, type] = {
    nn.Conv2d: C.CConv2d,
    nn.Linear: C.CLinear,
    nn.ReLU: C.CDelta,
    nn.BatchNorm2d: C.CBatchNorm,
    nn.BatchNorm1d: C.CBatchNorm,
    nn.MaxPool2d: C.CMaxModPool2d,
    nn.AvgPool2d: C.CAvgPool2d,
    nn.AdaptiveAvgPool2d: C.CAdaptiveAvgPool2d,
    nn.Dropout: C.CDropout,
    nn.Flatten: C.CFlatten,
}
# Layers that are already linear and layout-agnostic stay as they are.
PASSTHROUGH = (nn.Identity,)
# Modules torch.fx keeps whole (not traced into) when splitting, so that they map one to one.
LEAF_MODULES: list[type] = []


def register_complex(real: type, complex_: type, *, leaf: bool = False) -> None:
    """Map the real module type `real` to `complex_` (a class with ``from_real(module, **act)``).
    leaf: trace `real` as one node (its forward uses ops the converter would refuse one by one)."""
    put(DEFAULT_MAPPING, real, complex_, "complex mapping for")
    if leaf and real not in LEAF_MODULES:
        LEAF_MODULES.append(real)


_ADD = {operator.add, operator.iadd, torch.add}
_RELU = {F.relu, torch.relu, torch.relu_}
_FLATTEN = {torch.flatten}
_CAT = {torch.cat, torch.concat}


def swap_module(mod: nn.Module, name: str, mapping=None, **act) -> nn.Module:
    mapping = DEFAULT_MAPPING if mapping is None else mapping
    if isinstance(mod, PASSTHROUGH):
        return mod
    cls = mapping.get(type(mod))
    if cls is None:
        raise ConversionError(f"layer {name} ({type(mod).__name__}) cannot be made rotation-equivariant")
    try:
        return cls.from_real(mod, **act)
    except ValueError as exc:
        raise ConversionError(f"layer {name} ({type(mod).__name__}): {exc}") from None


def _set_module(gm: nn.Module, target: str, new: nn.Module):
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _shift_dim(node: fx.Node, pos: int, key: str, default, name: str):
    """Real axis d >= 1 becomes d + 1 in the [N, 2, ...] layout; negative axes stay valid."""
    args = list(node.args)
    d = args[pos] if len(args) > pos else node.kwargs.get(key, default)
    if d == 0:
        raise ConversionError(f"op {name} works on the batch axis and cannot be made equivariant per sample")
    if d > 0:
        if len(args) > pos:
            args[pos] = d + 1
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, key: d + 1}


def to_complex(gm: fx.GraphModule, names: dict[str, str] | None = None, mapping=None, **act) -> fx.GraphModule:
    """Rewrite a real processing GraphModule in place into a complex one (same parameters carried)."""
    names, done = names or {}, set()
    for node in list(gm.graph.nodes):
        label = names.get(node.name, node.name)
        if node.op == "call_module":
            if node.target in done:  # a module called several times (torchvision's shared ReLU)
                continue
            mod = gm.get_submodule(node.target)
            _set_module(gm, node.target, swap_module(mod, label, mapping, **act))
            done.add(node.target)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            if fn in _ADD or fn in ("add", "add_", "__add__", "__iadd__"):
                if not all(isinstance(a, fx.Node) for a in node.args[:2]) or node.kwargs.get("alpha", 1) != 1:
                    raise ConversionError(f"op {label} adds a constant, which breaks rotation equivariance")
            elif fn in _RELU or fn in ("relu", "relu_"):
                sub = f"{node.name}_delta"
                gm.add_submodule(sub, C.CDelta(**act))
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_module(sub, (node.args[0],))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            elif fn in _FLATTEN or fn == "flatten":
                _shift_dim(node, 1, "start_dim", 0, label)
                if len(node.args) > 2 or "end_dim" in node.kwargs:
                    _shift_dim(node, 2, "end_dim", -1, label)
            elif fn in _CAT:
                _shift_dim(node, 1, "dim", 0, label)
            else:
                fname = getattr(fn, "__name__", str(fn))
                raise ConversionError(f"op {label} ({fname}) cannot be made rotation-equivariant")
    gm.graph.lint()
    gm.recompile()
    return gm
