"""The near-duplicate guard: the device's private memory of the features it has sent (torch-free).

Two transmissions that carry the same feature vector are exposed exactly by intersecting their spans,
and two that carry nearly the same one almost exactly: measured on a Fashion-MNIST LeNet, an image sent
twice after pixel noise of 4/255, JPEG quality 90 or +5% brightness gives its feature back to |cos| =
1.000. So before an image is sent, its feature a is compared with every feature this device has sent
(images' a and fools' b). At cosine >= ``threshold`` it is not sent again: an image that matches an
earlier image is answered with that image's cached logits, one that matches a fool is refused. The same
test burns pool fools that lie too close to something already sent.

The index lives on the device only (a 0600 file, never sent, never logged) and is bounded: it keeps
the ``capacity`` most recent features and forgets the oldest, so a repeat of something forgotten is
no longer caught. Features are stored as a fixed count sketch of at most ``SKETCH_DIM`` numbers: for
unit vectors it keeps cosines near 1 to within about (1 - cos^2) / sqrt(SKETCH_DIM), far below the gap
the threshold decides on, at 2-4 KB per entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CvError
from .artifacts import locked

DEFAULT_THRESHOLD = 0.995  # measured: distinct Fashion-MNIST test images reach 0.993, near-duplicates 0.998+
DEFAULT_CAPACITY = 10000
SKETCH_DIM = 1024
SKETCH_SEED = 20200214  # public and fixed: the sketch only has to be the same on every call
IMAGE, FOOL = 0, 1


def sketch(features: np.ndarray) -> np.ndarray:
    """[n, ...] features -> [n, k] unit vectors (a count sketch to k = min(D, SKETCH_DIM) numbers)."""
    features = np.asarray(features, dtype=np.float32)
    flat = features.reshape(len(features), int(np.prod(features.shape[1:])))
    d = flat.shape[1]
    if d > SKETCH_DIM:
        rng = np.random.default_rng(SKETCH_SEED)
        bucket = rng.integers(0, SKETCH_DIM, d)
        sign = rng.choice(np.array([-1.0, 1.0], np.float32), d)
        order = np.argsort(bucket, kind="stable")
        starts = np.searchsorted(bucket[order], np.arange(SKETCH_DIM))
        flat = np.add.reduceat((flat * sign)[:, order], starts, axis=1)  # every bucket is non-empty for d >> k
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return (flat / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass
class Verdict:
    """What the guard says about each image of a request: "send", "cached" (logits from an earlier
    send), "same" (a near-duplicate of image `ref` of this request) or "refuse" (too close to a fool)."""
    action: list
    ref: list
    cosine: np.ndarray
    logits: list
    fool_keys: np.ndarray | None = None  # the index keys of the fools reserved for the images to send


class SentGuard:
    """The bounded index of sent features; ``path`` None keeps it in memory for this process only.

    What the journal (cvconvert/device/journal.py, state.py) relies on, whatever the index keeps: ``stamp``
    written into the file as ``generation`` and read back by ``stored_generation()``; ``forget(keys)`` and
    ``pending_keys()``; a "busy" verdict carrying the entry's key in ``ref``; ``Verdict.fool_keys``; and a
    damaged file raising one CvError line (never an empty index: an emptied guard reads as a deleted one).
    """

    def __init__(self, path=None, threshold: float = DEFAULT_THRESHOLD, capacity: int = DEFAULT_CAPACITY):
        if not 0.0 < threshold <= 1.0:
            raise CvError(f"guard threshold {threshold} must lie in (0, 1] (a cosine; 1 catches exact repeats only)")
        if capacity < 1:
            raise CvError(f"guard size {capacity} must be at least 1")
        self.path = Path(path) if path is not None else None
        self.threshold, self.capacity = float(threshold), int(capacity)
        self._mem = None  # in-memory state when path is None
        self.stamp = 0  # the device state's generation, written with the index (cvconvert.device.state)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- storage -----------------------------------------------------------------------------------
    def _empty(self, classes: int = 0) -> dict:
        return {"sketch": np.zeros((0, 0), np.float16), "kind": np.zeros(0, np.uint8),
                "logits": np.zeros((0, classes), np.float32), "seq": np.zeros(0, np.int64)}

    def _load(self) -> dict:
        if self.path is None:
            return self._mem if self._mem is not None else self._empty()
        if not self.path.is_file():
            return self._empty()
        try:
            with np.load(self.path) as z:
                return {k: z[k] for k in ("sketch", "kind", "logits", "seq")}
        except Exception:  # BadZipFile, EOFError, OSError, ...: any damage reads the same to the user
            raise CvError(f"the guard index {self.path} is damaged or unreadable: restore it from a backup taken "
                          "after the last request (do not delete it: without it this device would send earlier "
                          "images again, which exposes them); cvconvert refuses to send meanwhile") from None

    def stored_generation(self) -> int | None:
        """The generation the index file was last written at (None: no file, 0: written before generations)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with np.load(self.path) as z:
                return int(z["generation"]) if "generation" in z.files else 0
        except Exception:
            self._load()  # raises the one-line error
            return 0

    def _save(self, state: dict) -> None:
        keep = np.argsort(state["seq"])[-self.capacity:]  # the most recent `capacity` entries
        state = {k: v[keep] if len(v) else v for k, v in state.items() if k != "generation"}
        if self.path is None:
            self._mem = state
            return
        from .artifacts import atomic_write
        from .state import disk_error

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, generation=np.int64(self.stamp), **state)
                f.flush()
                os.fsync(f.fileno())
        try:
            atomic_write(self.path, write, mode=0o600)
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def _lock(self):
        if self.path is None:
            import contextlib
            return contextlib.nullcontext()
        return locked(self.path.parent, self.path.name + ".lock")

    def __len__(self) -> int:
        return len(self._load()["seq"])

    # -- the checks --------------------------------------------------------------------------------
    @staticmethod
    def _best(sk: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(index) == 0 or index.shape[1] != sk.shape[1]:
            return np.full(len(sk), -1), np.full(len(sk), -1.0)
        sims = sk @ index.astype(np.float32).T
        best = sims.argmax(1)
        return best, sims[np.arange(len(sk)), best]

    def too_close(self, sketches: np.ndarray) -> np.ndarray:
        """bool [n]: which sketched features (see `sketch`) lie within the threshold of something sent."""
        return self._best(sketches, self._load()["sketch"])[1] >= self._limit

    @property
    def _limit(self) -> float:
        return min(self.threshold, 1.0 - 1e-5)  # exact repeats pass 1 - 1e-5 despite float rounding

    def screen_and_reserve(self, features: np.ndarray, send_fools) -> tuple[Verdict, object, np.ndarray]:
        """Decide per image (see Verdict), then record every image to be sent and its fool before
        anything leaves the device. send_fools(mask) -> fools (an object with .features, or an array
        [k, ...]) for the images to send, called under the lock so that the fools' check and the images'
        check see one state. Returns the verdict, the fools and the index keys of the images to send
        (verdict.fool_keys: those of the fools, so that a caller can `forget` a reservation never sent)."""
        with self._lock():
            state = self._load()
            sk = sketch(features)
            best, cos = self._best(sk, state["sketch"])
            action, ref, logits = [], [], []
            for i in range(len(sk)):
                earlier = [j for j in range(i) if action[j] == "send"]
                inner = sk[earlier] @ sk[i] if earlier else np.zeros(0)
                if len(inner) and inner.max() >= self._limit and inner.max() >= cos[i]:
                    action.append("same"), ref.append(earlier[int(inner.argmax())]), logits.append(None)
                    cos[i] = inner.max()
                elif cos[i] >= self._limit:
                    self._known(state, best[i], action, ref, logits)
                else:
                    action.append("send"), ref.append(None), logits.append(None)
            send = np.array([a == "send" for a in action])
            fools, keys, fool_keys = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
            if send.any():
                fools = send_fools(send)
                keys = self._append(state, sk[send], IMAGE)
                fool_keys = self._append(state, sketch(getattr(fools, "features", fools)), FOOL)
                self._save(state)
        return Verdict(action, ref, cos, logits, fool_keys), fools, keys

    def _known(self, state, j, action, ref, logits) -> None:
        if state["kind"][j] == FOOL:
            action.append("refuse"), ref.append(None), logits.append(None)
        elif state["logits"].shape[1] == 0 or np.isnan(state["logits"][j]).any():  # no answer recorded yet
            action.append("busy"), ref.append(int(state["seq"][j])), logits.append(None)
        else:
            action.append("cached"), ref.append(int(state["seq"][j])), logits.append(state["logits"][j].copy())

    def _append(self, state: dict, sk: np.ndarray, kind: int) -> np.ndarray:
        if state["sketch"].shape[1] != sk.shape[1]:  # a first entry (or another model's features)
            state.update(self._empty(state["logits"].shape[1]))
            state["sketch"] = np.zeros((0, sk.shape[1]), np.float16)
        n = len(sk)
        start = int(state["seq"].max()) + 1 if len(state["seq"]) else 0
        keys = np.arange(start, start + n, dtype=np.int64)
        state["sketch"] = np.concatenate([state["sketch"], sk.astype(np.float16)])
        state["kind"] = np.concatenate([state["kind"], np.full(n, kind, np.uint8)])
        state["seq"] = np.concatenate([state["seq"], keys])
        width = state["logits"].shape[1]
        state["logits"] = np.concatenate([state["logits"], np.full((n, width), np.nan, np.float32)])
        return keys

    def pending_keys(self) -> set:
        """Index keys of the images whose answer is not recorded (sent or reserved, no logits yet)."""
        state = self._load()
        if not len(state["seq"]):
            return set()
        nan = np.isnan(state["logits"]).any(1) if state["logits"].shape[1] else np.ones(len(state["seq"]), bool)
        return {int(s) for s in state["seq"][(state["kind"] == IMAGE) & nan]}

    def forget(self, keys) -> None:
        """Drop entries (a reservation released because nothing left the device): as if never seen."""
        drop = {int(k) for k in keys}
        if not drop:
            return
        with self._lock():
            state = self._load()
            keep = np.array([int(s) not in drop for s in state["seq"]], dtype=bool)
            self._save({k: v[keep] if len(v) else v for k, v in state.items()})

    def store_logits(self, keys: np.ndarray, logits: np.ndarray) -> None:
        """Cache the answers of the images just sent, under the keys screen_and_reserve gave them."""
        logits = np.asarray(logits, np.float32)
        with self._lock():
            state = self._load()
            if state["logits"].shape[1] != logits.shape[1]:
                state["logits"] = np.full((len(state["seq"]), logits.shape[1]), np.nan, np.float32)
            pos = {int(s): i for i, s in enumerate(state["seq"])}
            for key, row in zip(keys, logits):
                if int(key) in pos:  # not yet forgotten
                    state["logits"][pos[int(key)]] = row
            self._save(state)


class NoGuard:
    """The guard turned off (an audit's 'no guard' baseline, or `--guard-threshold` not wanted): every
    image is sent. The fool rules still hold."""

    path, threshold, capacity, stamp = None, None, 0, 0

    def stored_generation(self):
        return None

    def pending_keys(self) -> set:
        return set()

    def forget(self, keys) -> None:
        pass

    def too_close(self, sketches: np.ndarray) -> np.ndarray:
        return np.zeros(len(sketches), dtype=bool)

    def screen_and_reserve(self, features, send_fools):
        n = len(features)
        send = np.ones(n, dtype=bool)
        return Verdict(["send"] * n, [None] * n, np.full(n, -1.0), [None] * n), send_fools(send), np.zeros(0)

    def store_logits(self, keys, logits) -> None:
        pass


def default_guard_path(features_sha256: str) -> Path:
    """Where a device keeps its guard index: the device state folder (cvconvert.device.state), one file per
    features graph."""
    from .state import guard_path

    return guard_path(features_sha256)
