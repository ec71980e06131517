"""The model zoo: one file per family, registered by name (``cvconvert list``)."""

from . import alexnet, lenet, resnet_cifar, vgg  # noqa: F401  (registration side effects)
from ._registry import ModelEntry, create_model, get_entry, list_models, register_model, resolve_split
from .resnet_cifar import ShortcutA

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model", "resolve_split", "ShortcutA"]
