"""Data sets: tiny files in each real on-disk format, loaded through cvconvert.data's real code path."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cvconvert.data import get_dataset
from cvconvert.datasets import CELEBA_ATTRS, CELEBA_PROPERTY_ATTRS, CELEBA_TASK_ATTRS, FASHION_COARSE
from cvconvert.errors import CvError


def write_fashion(folder, n_train=12, n_test=6, seed=0, gz=True):
    """The four Fashion-MNIST idx files (big-endian magic 2051/2049), gzipped like the Debian package."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        files = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
        for name, raw in files.items():
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(raw)
            else:
                (folder / name).write_bytes(raw)
        out[prefix] = (images, labels)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CVCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CVCONVERT_DATA", raising=False)


def test_fashion_idx_gz_padded_with_targets(tmp_path):
    raw = write_fashion(tmp_path / "fm")
    ds = get_dataset("fashion-mnist", True, data_dir=tmp_path / "fm")
    assert len(ds) == 12
    image, target, prop = ds[3]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.equal(image[0, 2:30, 2:30], torch.from_numpy(raw["train"][0][3]).float() / 255)
    assert float(image[0, :2].abs().sum()) == 0 and float(image[0, :, 30:].abs().sum()) == 0  # zero padding
    assert (target, prop) == (3, 3)
    test = get_dataset("fashion-mnist", False, data_dir=tmp_path / "fm")
    assert len(test) == 6 and torch.equal(test[5][0][0, 2:30, 2:30], torch.from_numpy(raw["t10k"][0][5]).float() / 255)


def test_fashion_coarse_task_keeps_fine_property(tmp_path):
    write_fashion(tmp_path / "fm")
    ds = get_dataset("fashion-mnist", True, data_dir=tmp_path / "fm", task="coarse")
    got = [(ds[i][1], ds[i][2]) for i in range(10)]
    assert got == [(FASHION_COARSE[i], i) for i in range(10)]
    assert {t for t, _ in got} == {0, 1, 2, 3}


def test_fashion_env_and_torchvision_layout(tmp_path, monkeypatch):
    # extracted idx files in torchvision's own ROOT/FashionMNIST/raw layout, found through $CVCONVERT_DATA
    raw = write_fashion(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    monkeypatch.setenv("CVCONVERT_DATA", str(tmp_path / "root"))
    ds = get_dataset("fashion-mnist", False)
    assert len(ds) == 6 and ds[1][1] == 1
    assert torch.equal(ds[1][0][0, 2:30, 2:30], torch.from_numpy(raw["t10k"][0][1]).float() / 255)


def _cifar_pickle(path, n, seed, fine_key, extra=None):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    entry = {"data": data, fine_key: [int(v) for v in rng.integers(0, 10 if fine_key == "labels" else 100, n)]}
    entry.update(extra(entry) if extra else {})
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return entry


def test_cifar10_python_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    entries = [_cifar_pickle(base / f"data_batch_{i}", 3, i, "labels") for i in range(1, 6)]
    test = _cifar_pickle(base / "test_batch", 4, 9, "labels")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    ds = get_dataset("cifar10", True, data_dir=tmp_path)
    assert len(ds) == 15
    image, target, prop = ds[4]  # second image of data_batch_2
    want = torch.from_numpy(entries[1]["data"][1].reshape(3, 32, 32)).float() / 255  # CHW planes, R then G then B
    assert image.shape == (3, 32, 32) and torch.equal(image, want)
    assert target == entries[1]["labels"][1] and prop == -1
    # the batches folder itself works as --data-dir too
    ts = get_dataset("cifar10", False, data_dir=base)
    assert len(ts) == 4 and ts[3][1] == test["labels"][3]


def test_cifar100_superclass_task_fine_property(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    coarse = lambda e: {"coarse_labels": [v // 5 for v in e["fine_labels"]]}  # noqa: E731
    train = _cifar_pickle(base / "train", 5, 1, "fine_labels", coarse)
    _cifar_pickle(base / "test", 3, 2, "fine_labels", coarse)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    ds = get_dataset("cifar100", True, data_dir=tmp_path)
    assert [(ds[i][1], ds[i][2]) for i in range(5)] == \
        [(train["coarse_labels"][i], train["fine_labels"][i]) for i in range(5)]
    assert len(get_dataset("cifar100", False, data_dir=tmp_path)) == 3


def _png(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_train_test(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / "imgs" / split / cls / f"{i}.png", (10, 14), color)
    ds = get_dataset(f"folder:{tmp_path / 'imgs'}", True)
    assert len(ds) == 4
    image, target, prop = ds[3]
    assert image.shape == (3, 32, 32) and target == 1 and prop == -1
    assert float(image[2].min()) == 1.0 and float(image[0].max()) == 0.0  # blue dog, resized
    assert len(get_dataset(f"folder:{tmp_path / 'imgs'}", False)) == 2


def test_cub200_split_by_file(tmp_path):
    base = tmp_path / "CUB_200_2011"
    paths = []
    for c in range(2):
        for i in range(2):
            rel = f"{c:03d}.Bird{c}/img{i}.jpg"
            _png(base / "images" / rel, (20, 16), (40 * c, 80, 120))
            paths.append(rel)
    (base / "images.txt").write_text("".join(f"{j + 1} {p}\n" for j, p in enumerate(paths)))
    (base / "train_test_split.txt").write_text("".join(f"{j + 1} {int(j % 2 == 0)}\n" for j in range(4)))
    train, test = get_dataset("cub200", True, data_dir=tmp_path), get_dataset("cub200", False, data_dir=tmp_path)
    assert len(train) == 2 and len(test) == 2
    assert train[0][0].shape == (3, 64, 64) and [train[i][1] for i in range(2)] == [0, 1]


def test_celeba_attributes_split_into_task_and_property(tmp_path):
    base = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 5)]  # 2 train, 2 test (torchvision fails on 1)
    for n in names:
        _png(base / "img_align_celeba" / n, (178, 218), (200, 150, 100))
    attrs = np.random.default_rng(0).choice([-1, 1], size=(4, 40))
    (base / "list_attr_celeba.txt").write_text(
        "4\n" + " ".join(CELEBA_ATTRS) + "\n" + "".join(f"{n} " + " ".join(map(str, a)) + "\n"
                                                       for n, a in zip(names, attrs)))
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {(0, 0, 2, 2)[i]}\n" for i, n in enumerate(names)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text("4\nimage_id x_1 y_1 width height\n" +
                                               "".join(f"{n} 1 2 3 4\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text("4\nlefteye_x lefteye_y\n" +
                                                          "".join(f"{n} 1 2\n" for n in names))
    ds = get_dataset("celeba", True, data_dir=tmp_path)
    assert len(ds) == 2
    image, target, prop = ds[1]
    assert image.shape == (3, 64, 64)
    bits = (attrs[1] + 1) // 2
    assert target.dtype == torch.float32 and target.shape == (30,) and prop.shape == (10,)
    assert target.tolist() == [float(bits[CELEBA_ATTRS.index(a)]) for a in CELEBA_TASK_ATTRS]
    assert prop.tolist() == [float(bits[CELEBA_ATTRS.index(a)]) for a in CELEBA_PROPERTY_ATTRS]
    assert len(get_dataset("celeba", False, data_dir=tmp_path)) == 2


@pytest.mark.parametrize("name,pattern", [
    ("fashion-mnist", "dataset-fashion-mnist"), ("cifar10", "cifar-10-python"), ("cifar100", "cifar-100-python"),
    ("celeba", "CelebA"), ("cub200", "CUB_200_2011")])
def test_missing_files_say_how_to_get_them(tmp_path, name, pattern):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvError, match=pattern) as exc:
        get_dataset(name, True, data_dir=tmp_path / "empty")
    assert "\n" not in str(exc.value)


def test_bad_names_and_dirs(tmp_path):
    with pytest.raises(CvError, match="unknown data set 'mnist'"):
        get_dataset("mnist", True)
    with pytest.raises(CvError, match="not a directory"):
        get_dataset("fashion-mnist", True, data_dir=tmp_path / "nope")
    with pytest.raises(CvError, match="does not exist"):
        get_dataset(f"folder:{tmp_path / 'nope'}", True)


def test_a_new_data_set_is_one_registry_entry(tmp_path, monkeypatch):
    """Register a data set (info per task, loader, how to get it): it converts, loads and names itself
    in errors like the built-in ones, and --data lists it."""
    from cvconvert import datasets
    from cvconvert.data import TensorItems
    from cvconvert.datasets import DatasetEntry, DatasetInfo, dataset_info, dataset_names, register_dataset

    monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))  # undone after the test
    info = DatasetInfo("toy", (1, 16, 16), 3, ["a", "b", "c"], [0.5], [0.5])

    def load_toy(train, data_dir, info):
        if data_dir is None:
            raise CvError(f"toy data not found: {datasets.get_entry('toy').how_to_get}")
        n = 6 if train else 3
        images = torch.arange(n * 256, dtype=torch.uint8).reshape(n, 1, 16, 16)
        return TensorItems(images, [i % 3 for i in range(n)], [-1] * n, info)

    register_dataset("toy", DatasetEntry({"fine": info}, load_toy, "make it with `toy-maker`"))
    assert "toy" in dataset_names() and dataset_info("toy") is info
    ds = get_dataset("toy", True, data_dir=tmp_path)
    image, target, prop = ds[4]
    assert len(ds) == 6 and image.shape == (1, 16, 16) and (target, prop) == (1, -1)
    assert len(get_dataset("toy", False, data_dir=tmp_path)) == 3
    with pytest.raises(CvError, match="toy-maker"):
        get_dataset("toy", True)
    with pytest.raises(CvError, match="has no task 'coarse'"):
        dataset_info("toy", "coarse")
    from cvconvert.build import convert_to_dir
    manifest = convert_to_dir("lenet", tmp_path / "m", data="toy", variant="original")
    assert manifest["input_shape"] == [1, 16, 16] and manifest["class_names"] == ["a", "b", "c"]


def test_builtin_infos_per_task():
    from cvconvert.datasets import dataset_info, dataset_names

    assert dataset_names() == ["fashion-mnist", "cifar10", "cifar100", "celeba", "cub200", "folder:PATH"]
    fm, coarse = dataset_info("fashion-mnist"), dataset_info("fashion-mnist", "coarse")
    assert (fm.num_classes, coarse.num_classes, coarse.property_classes, fm.input_shape) == (10, 4, 10, (1, 32, 32))
    c100 = dataset_info("cifar100")
    assert c100.task == "coarse" and c100.num_classes == 20 and c100.property_classes == 100
    assert dataset_info("celeba").multilabel and dataset_info("cub200").num_classes == 200
    with pytest.raises(CvError, match="has no task 'coarse'"):
        dataset_info("cifar10", "coarse")
    with pytest.raises(CvError, match=r"choose from fashion-mnist, .*, folder:PATH"):
        dataset_info("svhn")
