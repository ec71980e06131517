"""Data sets for training, evaluation and the privacy audit, read with torchvision's classes and formats.

``get_dataset(name, train, data_dir=None, task="fine")`` looks NAME up in the registry of
cvconvert/datasets.py and calls its loader; the built-in loaders are the ``load_*`` functions below, each
``loader(train, data_dir, info)``. It returns a torch Dataset whose items are
``(image, target, prop)``: image float32 [C,H,W] in [0,1] at ``dataset_info(name).input_shape``,
target an int (a float multi-hot tensor for multi-label data), prop the hidden property label used by
the privacy audit (int or multi-hot) or -1 where the data set has none.

    fashion-mnist  idx .gz files (torchvision FashionMNIST); 28x28 padded to 32x32
                   task fine = 10 classes, coarse = 4 superclasses; property = the 10 classes
    cifar10        CIFAR python pickles (cifar-10-batches-py); no property
    cifar100       CIFAR python pickles (cifar-100-python); task = 20 superclasses, property = 100 classes
    celeba         torchvision CelebA layout (celeba/img_align_celeba + list_*.txt); 64x64;
                   task = 30 attributes, property = the other 10 (both multi-hot)
    cub200         CUB_200_2011/images (ImageFolder) split by train_test_split.txt; 64x64
    folder:PATH    ImageFolder with PATH/train and PATH/test (or PATH itself for both); 32x32 RGB

Where the files are: ``data_dir`` (a folder that holds the data set, or its torchvision root), else
``$CVCONVERT_DATA`` (the same, or a root with one sub-folder per data set name), else for
Fashion-MNIST ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), else
torchvision's download into the cache folder (``$CVCONVERT_CACHE``, default ~/.cache/cvconvert).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import CELEBA_PROPERTY_ATTRS, CELEBA_TASK_ATTRS, FASHION_COARSE, dataset_info, get_entry
from .errors import CvError, one_line
from .device.preprocess import apply_steps, spec_for

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def cache_dir() -> Path:
    return Path(os.environ.get("CVCONVERT_CACHE") or Path.home() / ".cache" / "cvconvert")


class TensorItems(Dataset):
    """Decoded images held as one uint8 tensor [N,C,H,W]: items are built without PIL per sample."""

    def __init__(self, images: torch.Tensor, targets, props, info):
        self.images, self.targets, self.props, self.info = images, targets, props, info

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].float().div_(255), self.targets[i], self.props[i]


class ItemsView(Dataset):
    """(image, label) data set -> (image, target, prop) through a function of the label."""

    def __init__(self, base, fn, info):
        self.base, self.fn, self.info = base, fn, info

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        target, prop = self.fn(label)
        return image, target, prop


def _candidates(name: str, data_dir) -> list[Path]:
    """Folders to look in, in order. An explicit --data-dir is the only one looked at."""
    if data_dir is not None:
        return [Path(data_dir)]
    out = []
    env = os.environ.get("CVCONVERT_DATA")
    if env:
        out += [Path(env) / name, Path(env)]
    return out


def _missing(name: str, where: list[Path]) -> CvError:
    places = ", ".join(str(p) for p in where) or "nowhere"
    return CvError(f"{name} data not found (looked in {places}): {get_entry(name).how_to_get}")


# --- Fashion-MNIST ------------------------------------------------------------------------------

def _fashion_source(folder: Path) -> Path | None:
    """A folder with the four idx files (.gz or extracted), directly or in torchvision's FashionMNIST/raw."""
    for d in (folder, folder / "FashionMNIST" / "raw", folder / "fashion-mnist"):
        if all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in FASHION_FILES):
            return d
    return None


def _fashion_root(src: Path) -> Path:
    """A torchvision root (ROOT/FashionMNIST/raw/<extracted idx files>) for the files in src.

    torchvision reads only extracted idx files, so .gz files are extracted once, with torchvision's
    own extract_archive, into a cache folder keyed by the source (swapped into place atomically).
    """
    from torchvision.datasets.utils import extract_archive

    if all((src / f).is_file() for f in FASHION_FILES) and src.name == "raw" and src.parent.name == "FashionMNIST":
        return src.parent.parent
    stats = [(f, (src / f"{f}.gz").stat().st_size if (src / f"{f}.gz").is_file() else (src / f).stat().st_size)
             for f in FASHION_FILES]
    key = hashlib.sha256(repr((str(src.resolve()), stats)).encode()).hexdigest()[:16]
    root = cache_dir() / "fashion-mnist" / key
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_FILES):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
    try:
        tmp_raw = tmp / "FashionMNIST" / "raw"
        tmp_raw.mkdir(parents=True)
        for f in FASHION_FILES:
            if (src / f).is_file():
                os.symlink((src / f).resolve(), tmp_raw / f)
            else:
                extract_archive(str(src / f"{f}.gz"), str(tmp_raw))
        try:
            tmp.rename(root)
        except OSError:  # another process won the race: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_fashion_mnist(train: bool, data_dir, info):
    from torchvision.datasets import FashionMNIST

    where = _candidates("fashion-mnist", data_dir)
    if data_dir is None:
        where.append(SYSTEM_FASHION)
    src = next((s for s in map(_fashion_source, where) if s is not None), None)
    if src is not None:
        root = _fashion_root(src)
        try:
            ds = FashionMNIST(str(root), train=train, download=False)
        except (RuntimeError, ValueError, OSError, AssertionError) as exc:
            raise CvError(f"cannot read Fashion-MNIST from {src}: {one_line(exc)}") from None
    elif data_dir is not None:
        raise _missing("fashion-mnist", where)
    else:  # torchvision's download, as a last resort
        root = cache_dir() / "torchvision"
        try:
            ds = FashionMNIST(str(root), train=train, download=True)
        except Exception:
            raise _missing("fashion-mnist", where + [root]) from None
    # 28x28 -> 32x32 (zero border) by the steps the manifest records and infer applies
    images = torch.from_numpy(apply_steps(ds.data.unsqueeze(1).numpy(), spec_for("fashion-mnist", info.input_shape)))
    fine = ds.targets.long()
    if info.task == "coarse":
        table = torch.tensor([FASHION_COARSE[i] for i in range(10)])
        targets = table[fine]
    else:
        targets = fine
    return TensorItems(images, targets.tolist(), fine.tolist(), info)


# --- CIFAR ----------------------------------------------------------------------------------------

def _cifar_classes():
    """torchvision's CIFAR classes with the md5 checks relaxed to presence checks (files are still parsed
    by torchvision; the md5 pins only the official release and would refuse re-packed or test copies)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    class LooseCIFAR10(CIFAR10):
        train_list = [(f, None) for f, _ in CIFAR10.train_list]
        test_list = [(f, None) for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    class LooseCIFAR100(CIFAR100):
        train_list = [(f, None) for f, _ in CIFAR100.train_list]
        test_list = [(f, None) for f, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    return LooseCIFAR10, LooseCIFAR100


def load_cifar(train: bool, data_dir, info):
    import pickle

    name = info.name
    cls = _cifar_classes()[name == "cifar100"]
    where = _candidates(name, data_dir)
    for d in where:
        for root in (d, d.parent):  # the root, or the batches folder itself
            if (root / cls.base_folder).is_dir():
                try:
                    ds = cls(str(root), train=train, download=False)
                except RuntimeError:
                    continue  # files missing: keep looking, then fail below
                except Exception as exc:
                    raise CvError(f"cannot read {name} from {root / cls.base_folder}: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
                images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
                fine = list(ds.targets)
                if name == "cifar10":
                    return TensorItems(images, fine, [-1] * len(fine), info)
                # torchvision keeps only the fine labels: read the superclasses from the same pickles
                coarse = []
                for file, _ in (ds.train_list if train else ds.test_list):
                    with open(root / cls.base_folder / file, "rb") as f:
                        coarse += list(pickle.load(f, encoding="latin1")["coarse_labels"])
                return TensorItems(images, coarse, fine, info)
    raise _missing(name, where)


# --- image files (CelebA, CUB-200, ImageFolder) -----------------------------------------------------

def _image_transform(shape, crop: int | None = None):
    from torchvision import transforms as T

    c, h, w = shape
    steps = [T.CenterCrop(crop)] if crop else []
    steps += [T.Resize((h, w)), T.ToTensor()]
    if c == 1:
        steps.insert(0, T.Grayscale(1))
    return T.Compose(steps)


def load_celeba(train: bool, data_dir, info):
    from torchvision.datasets import CelebA

    class LooseCelebA(CelebA):
        file_list = [(fid, None, name) for fid, _, name in CelebA.file_list]

    where = _candidates("celeba", data_dir)
    for d in where:
        for root in (d, d.parent):
            if (root / "celeba").is_dir():
                try:
                    ds = LooseCelebA(str(root), split="train" if train else "test", target_type="attr",
                                     transform=_image_transform(info.input_shape, crop=178))
                except RuntimeError:
                    continue
                except Exception as exc:
                    raise CvError(f"cannot read CelebA from {root / 'celeba'}: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}") from None
                names = list(ds.attr_names)
                missing = [a for a in CELEBA_TASK_ATTRS + CELEBA_PROPERTY_ATTRS if a not in names]
                if missing:
                    raise CvError(f"CelebA attribute file lacks {missing[:5]}")
                prop_idx = torch.tensor([names.index(a) for a in CELEBA_PROPERTY_ATTRS])
                task_idx = torch.tensor([names.index(a) for a in CELEBA_TASK_ATTRS])
                return ItemsView(ds, lambda attr: (attr[task_idx].float(), attr[prop_idx].float()), info)
    raise _missing("celeba", where)


def load_cub(train: bool, data_dir, info):
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    where = _candidates("cub200", data_dir)
    for d in where:
        for base in (d / "CUB_200_2011", d):
            if (base / "images").is_dir() and (base / "train_test_split.txt").is_file() \
                    and (base / "images.txt").is_file():
                folder = ImageFolder(str(base / "images"), transform=_image_transform(info.input_shape))
                paths = dict(ln.split() for ln in (base / "images.txt").read_text().splitlines() if ln.strip())
                is_train = dict(ln.split() for ln in (base / "train_test_split.txt").read_text().splitlines()
                                if ln.strip())
                want = {str(base / "images" / p) for i, p in paths.items() if (is_train.get(i) == "1") == train}
                keep = [j for j, (p, _) in enumerate(folder.samples) if p in want]
                return ItemsView(Subset(folder, keep), lambda y: (y, -1), info)
    raise _missing("cub200", where)


def load_folder(train: bool, data_dir, info):
    from torchvision.datasets import ImageFolder

    root = Path(info.name.split(":", 1)[1])
    sub = root / ("train" if train else "test")
    if (root / "train").is_dir() and not sub.is_dir():
        raise CvError(f"image folder {root} has train/ but no {sub.name}/")
    path = sub if sub.is_dir() else root
    try:
        ds = ImageFolder(str(path), transform=_image_transform(info.input_shape))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CvError(f"image folder {path}: {one_line(exc)}") from None
    if ds.classes != info.class_names:
        raise CvError(f"image folder {path} has classes {ds.classes[:5]}..., train/ has {info.class_names[:5]}...")
    return ItemsView(ds, lambda y: (y, -1), info)


def get_dataset(name: str, train: bool, data_dir=None, task: str = "fine") -> Dataset:
    """The train or test split of a data set as (image [C,H,W] in [0,1], target, prop) items."""
    info = dataset_info(name, task)  # unknown names / tasks fail here, before any file access
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CvError(f"--data-dir {data_dir} is not a directory")
    return get_entry(name).load(train, data_dir, info)
