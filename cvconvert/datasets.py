"""The data-set registry: what each data set looks like to a model, how to load it, how to get its files.

A data set is one ``DatasetEntry(info, loader, how_to_get)`` in ``DATASETS`` (or ``register_dataset``):

    info        {task: DatasetInfo}: input shape, classes, normalisation, hidden property per task
    loader      "module:function" (imported on first use) or the function itself;
                loader(train: bool, data_dir: str | None, info: DatasetInfo) -> torch Dataset of
                (image float32 [C,H,W] in [0,1], target, prop) items (cvconvert/data.py has the built-in ones)
    how_to_get  the one line a "data not found" error ends with

A name ending in ":" is a scheme (``folder:PATH``); its ``info`` is a function (name, task) -> DatasetInfo.
This module reads no files and imports no torch, so ``convert --data NAME`` and the CLI's help work
before any data is downloaded.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .errors import CvError
from .registry import put

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# --task coarse: tops; trousers and dresses; footwear; bags (property = the 10 fine classes)
FASHION_COARSE = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
FASHION_COARSE_NAMES = ["tops", "trousers-dresses", "footwear", "bags"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_SUPERCLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2"]
# CelebA's 40 attributes (list_attr_celeba.txt order). The paper's audit hides 10 of them and trains on
# the other 30; it does not say which 10, so we hide the ones about who the person is.
CELEBA_ATTRS = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young"]
CELEBA_PROPERTY_ATTRS = ["Male", "Young", "Attractive", "Pale_Skin", "Chubby", "Double_Chin", "Oval_Face", "Big_Nose",
                         "Pointy_Nose", "Bald"]
CELEBA_TASK_ATTRS = [a for a in CELEBA_ATTRS if a not in CELEBA_PROPERTY_ATTRS]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    task: str = "fine"
    multilabel: bool = False
    property_classes: int | None = None  # hidden property for the privacy audit, when the paper has one
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetEntry:
    """One data set: its DatasetInfo per task, its loader and how to get its files (module docstring)."""

    info: Mapping[str, DatasetInfo] | Callable[[str, str], DatasetInfo]
    loader: str | Callable
    how_to_get: str = ""

    def info_for(self, name: str, task: str) -> DatasetInfo:
        if callable(self.info):
            return self.info(name, task)
        if task not in self.info:
            raise CvError(f"data set {name!r} has no task {task!r}")
        return self.info[task]

    def load(self, train: bool, data_dir, info: DatasetInfo):
        fn = self.loader
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(train, data_dir, info)


def _folder_info(name: str, task: str) -> DatasetInfo:
    """folder:PATH: the class sub-folders of PATH/train (or PATH), 32x32 RGB."""
    root = name.split(":", 1)[1]
    train = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    if not os.path.isdir(train):
        raise CvError(f"image folder {root!r} does not exist")
    classes = sorted(d.name for d in os.scandir(train) if d.is_dir())
    if not classes:
        raise CvError(f"image folder {root!r} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    return DatasetInfo(name, (3, 32, 32), len(classes), classes, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


_FASHION = dict(input_shape=(1, 32, 32), mean=[0.2860], std=[0.3530], multilabel=False, property_classes=10)
# The paper's CIFAR-100 task is the 20 superclasses; the 100 fine classes are the hidden property.
_CIFAR100 = DatasetInfo("cifar100", (3, 32, 32), 20, CIFAR100_SUPERCLASSES, [0.5071, 0.4865, 0.4409],
                        [0.2673, 0.2564, 0.2762], "coarse", False, 100)
_TORONTO = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS: dict[str, DatasetEntry] = {
    "fashion-mnist": DatasetEntry(
        {"fine": DatasetInfo("fashion-mnist", num_classes=10, class_names=FASHION_CLASSES, task="fine", **_FASHION),
         "coarse": DatasetInfo("fashion-mnist", num_classes=4, class_names=FASHION_COARSE_NAMES, task="coarse",
                               **_FASHION)},
        "cvconvert.data:load_fashion_mnist",
        "install it with `apt-get install dataset-fashion-mnist` (to /usr/share/datasets/fashion-mnist) "
        "or pass --data-dir with the four idx .gz files"),
    "cifar10": DatasetEntry(
        {"fine": DatasetInfo("cifar10", (3, 32, 32), 10, CIFAR10_CLASSES, [0.4914, 0.4822, 0.4465],
                             [0.2470, 0.2435, 0.2616])},
        "cvconvert.data:load_cifar",
        f"download cifar-10-python.tar.gz from {_TORONTO}, unpack it and pass --data-dir (the folder holding "
        "cifar-10-batches-py)"),
    "cifar100": DatasetEntry(
        {"fine": _CIFAR100, "coarse": _CIFAR100}, "cvconvert.data:load_cifar",
        f"download cifar-100-python.tar.gz from {_TORONTO}, unpack it and pass --data-dir (the folder holding "
        "cifar-100-python)"),
    "celeba": DatasetEntry(
        {"fine": DatasetInfo("celeba", (3, 64, 64), 30, list(CELEBA_TASK_ATTRS), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5],
                             "attributes", True, 10)},
        "cvconvert.data:load_celeba",
        "download CelebA (img_align_celeba and the list_*.txt / identity_CelebA.txt files) and pass --data-dir "
        "(the folder holding celeba/)"),
    "cub200": DatasetEntry(
        {"fine": DatasetInfo("cub200", (3, 64, 64), 200, [f"class{i}" for i in range(200)], [0.485, 0.456, 0.406],
                             [0.229, 0.224, 0.225])},
        "cvconvert.data:load_cub",
        "download CUB_200_2011.tgz, unpack it and pass --data-dir (the folder holding CUB_200_2011/)"),
    "folder:": DatasetEntry(_folder_info, "cvconvert.data:load_folder"),
}


def register_dataset(name: str, entry: DatasetEntry) -> DatasetEntry:
    """Add a data set (a name registered twice warns and replaces); a name ending in ":" registers a scheme
    such as ``folder:``."""
    return put(DATASETS, name, entry, "data set")


def dataset_names() -> list[str]:
    """The names `--data` accepts, schemes written as SCHEME:PATH."""
    return [n + "PATH" if n.endswith(":") else n for n in DATASETS]


def get_entry(name: str) -> DatasetEntry:
    if ":" in name:
        scheme = name.split(":", 1)[0] + ":"
        if scheme in DATASETS:
            return DATASETS[scheme]
    elif name in DATASETS:
        return DATASETS[name]
    raise CvError(f"unknown data set {name!r} (choose from {', '.join(dataset_names())})")


def dataset_info(name: str, task: str = "fine") -> DatasetInfo:
    """What data set NAME looks like to a model for TASK (no file is read, except a folder's class list)."""
    return get_entry(name).info_for(name, task)
