"""The model zoo: one file per family, registered by name (``cvconvert list``).

A new family is one module here (imported below) whose builder carries ``@register_model(splits=...)``.
A layer of its own that the converter does not know gets its complex counterpart registered next to it
with ``cvconvert.convert.register_complex`` (see resnet_cifar.py's option-A shortcut). The zoo imports
only cvconvert's errors, converter and layers; cvconvert's model builder imports the zoo, never the
other way round.
"""

from . import alexnet, lenet, resnet_cifar, vgg  # noqa: F401  (registration side effects)
from ._registry import ModelEntry, create_model, get_entry, list_models, register_model, resolve_split
from .resnet_cifar import ShortcutA

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model", "resolve_split", "ShortcutA"]
