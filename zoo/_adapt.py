"""Adapting torchvision definitions to other input channel counts."""

from __future__ import annotations

from torch import nn


def replace_first_conv(model: nn.Module, in_channels: int, **overrides) -> nn.Module:
    """Swap the first Conv2d for one with `in_channels` inputs (and optional kernel/stride/padding)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if in_channels == mod.in_channels and not overrides:
                return model
            kw = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, bias=mod.bias is not None)
            kw.update(overrides)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, nn.Conv2d(in_channels, mod.out_channels, **kw))
            return model
    return model
