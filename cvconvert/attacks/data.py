"""The audit's view of the data: a seeded subset of a split, stacked into tensors.

``load_split`` is the one place the audit reads data (tests replace it with a synthetic set)."""

from __future__ import annotations

import torch

from ..errors import CvError


def load_split(name: str, train: bool, data_dir=None, task: str = "fine"):
    from ..data import get_dataset
    return get_dataset(name, train=train, data_dir=data_dir, task=task)


def stack_subset(ds, n: int, gen: torch.Generator) -> dict:
    """n random items of ds (all of them when n >= len) as {"images", "targets", "props"} tensors."""
    total = len(ds)
    if total < 2:
        raise CvError(f"the data split has {total} item(s); the audit needs at least 2")
    idx = torch.randperm(total, generator=gen)[:min(n, total)].tolist()
    images, targets, props = [], [], []
    for i in idx:
        image, target, prop = ds[i]
        images.append(torch.as_tensor(image, dtype=torch.float32))
        targets.append(torch.as_tensor(target))
        props.append(torch.as_tensor(prop))
    return {"images": torch.stack(images), "targets": torch.stack(targets), "props": torch.stack(props)}


def has_property(props: torch.Tensor) -> bool:
    """False when the data set has no hidden property (every prop is -1)."""
    return not bool((props.float() == -1).all())
