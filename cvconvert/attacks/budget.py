"""How much work the audit does (attacker and victim set sizes, epochs, network widths) and whether it
fits in memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import CvError


@dataclass
class Budget:
    name: str
    n_train: int
    n_eval: int
    epoch_counts: dict
    unet_width: int
    unet_convs: int
    grid: tuple            # (coarse angles over the circle, fine angles around the best one)
    whitebox_n: int
    whitebox_steps: int
    epochs_override: int | None = None

    def epochs(self, kind: str) -> int:
        return self.epochs_override or self.epoch_counts[kind]


BUDGETS = {
    # quick: the LeNet audit in < 10 min on 2 CPU cores
    "quick": Budget("quick", 2000, 500, {"unet": 5, "classifier": 5, "dprime": 3, "regressor": 5}, 8, 1, (24, 13),
                    32, 100),
    "full": Budget("full", 20000, 5000, {"unet": 15, "classifier": 12, "dprime": 8, "regressor": 12}, 32, 2,
                   (360, 21), 256, 400),
}


def make_budget(name: str, train_size=None, eval_size=None, epochs=None) -> Budget:
    if name not in BUDGETS:
        raise CvError(f"unknown budget {name!r} (choose from {', '.join(BUDGETS)})")
    for opt, v in (("--train-size", train_size), ("--eval-size", eval_size), ("--epochs", epochs)):
        if v is not None and v < (2 if opt != "--epochs" else 1):
            raise CvError(f"{opt} must be at least {2 if opt != '--epochs' else 1}, got {v}")
    b = BUDGETS[name]
    return Budget(**{**asdict(b), "n_train": train_size or b.n_train, "n_eval": eval_size or b.n_eval,
                     "epochs_override": epochs})


def available_memory() -> int:
    """Bytes of RAM the OS says are available (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def estimate_memory(budget: Budget, n_tr: int, n_ev: int, image_shape, feature_shape, n_baselines: int) -> int:
    """Rough peak bytes: the tensors the audit keeps plus the largest working set."""
    from .invariant import channel_pairs

    img, feat = math.prod(image_shape), math.prod(feature_shape)
    c = feature_shape[0]
    inv = c + 2 * len(channel_pairs(c))
    per_tr = img * 3 + feat * (4 + 3 * n_baselines)
    per_ev = img * (12 + 2 * n_baselines) + feat * (8 + 3 * n_baselines) + inv * math.prod(feature_shape[1:])
    store = 4 * (n_tr * per_tr + n_ev * per_ev)
    hw = math.prod(image_shape[1:])
    unet = 4 * 64 * budget.unet_width * hw * 6 * budget.unet_convs * 3      # activations, fwd + bwd
    grid = 4 * (1 << 22) * 6                                                # angle search chunks
    knn = 4 * 256 * n_tr
    return int(store + max(unet, grid, knn) + (256 << 20))                  # + the libraries' own use
