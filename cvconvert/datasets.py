"""What each data set looks like to a model (shape, classes, normalisation); loaders live in data.py.

Kept free of file access so that ``convert --data NAME`` works before any data is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CvError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# --task coarse: tops; trousers and dresses; footwear; bags (property = the 10 fine classes)
FASHION_COARSE = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
FASHION_COARSE_NAMES = ["tops", "trousers-dresses", "footwear", "bags"]
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "celeba", "cub200")
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


def dataset_info(name: str, task: str = "fine") -> DatasetInfo:
    if name == "fashion-mnist":
        if task == "coarse":
            return DatasetInfo(name, (1, 32, 32), 4, FASHION_COARSE_NAMES, [0.2860], [0.3530], "coarse", False, 10)
        if task == "fine":
            return DatasetInfo(name, (1, 32, 32), 10, FASHION_CLASSES, [0.2860], [0.3530], "fine", False, 10)
    elif name == "cifar10" and task == "fine":
        return DatasetInfo(name, (3, 32, 32), 10, CIFAR10_CLASSES, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    elif name == "cifar100" and task in ("fine", "coarse"):
        # The paper's task is the 20 superclasses; the 100 fine classes are the hidden property.
        return DatasetInfo(name, (3, 32, 32), 20, CIFAR100_SUPERCLASSES, [0.5071, 0.4865, 0.4409],
                           [0.2673, 0.2564, 0.2762], "coarse", False, 100)
    elif name == "celeba" and task == "fine":
        return DatasetInfo(name, (3, 64, 64), 30, list(CELEBA_TASK_ATTRS), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5],
                           "attributes", True, 10)
    elif name == "cub200" and task == "fine":
        return DatasetInfo(name, (3, 64, 64), 200, [f"class{i}" for i in range(200)], [0.485, 0.456, 0.406],
                           [0.229, 0.224, 0.225])
    elif name.startswith("folder:"):
        import os
        root = name.split(":", 1)[1]
        train = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        if not os.path.isdir(train):
            raise CvError(f"image folder {root!r} does not exist")
        classes = sorted(d.name for d in os.scandir(train) if d.is_dir())
        if not classes:
            raise CvError(f"image folder {root!r} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
        return DatasetInfo(name, (3, 32, 32), len(classes), classes, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    if name in DATASETS:
        raise CvError(f"data set {name!r} has no task {task!r}")
    raise CvError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)}, folder:PATH)")
