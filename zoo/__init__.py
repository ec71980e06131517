"""The model zoo: one file per family, registered by name into cvconvert's architecture registry
(``cvconvert.archs``; ``cvconvert list`` shows them).

A new family is one module here (imported below) whose builder carries ``@register_model(splits=...)``.
A layer of its own that the converter does not know is defined next to the family with its complex twin,
registered with ``cvconvert.convert.register_complex`` (see resnet_cifar.py's option-A shortcut).
Imports run one way: the zoo imports cvconvert; cvconvert imports the zoo only in ``archs._zoo()``, on
the first lookup.
"""

from cvconvert.archs import ModelEntry, create_model, get_entry, list_models, register_model, resolve_split

from . import alexnet, lenet, resnet_cifar, vgg  # noqa: F401  (registration side effects)
from .resnet_cifar import CShortcutA, ShortcutA
from .torchvision_models import torchvision_model

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model", "resolve_split", "ShortcutA",
           "CShortcutA", "torchvision_model"]
