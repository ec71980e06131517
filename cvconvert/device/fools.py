"""Where every fooling image I' comes from (numpy only: the device runtime uses it, torch-free).

Threat model: the cloud keeps every x it receives and compares them. Re(x) and Im(x) span {a, b}, so a
feature vector that appears in two transmissions (a reused fool, a batch image used as another's fool,
the same image sent twice) is exposed exactly by intersecting the two spans. Hence the device's rule:
no feature vector appears in two transmissions. This module is the fool half of that rule:

- ``FoolPool``: a device-private folder of fool images with their precomputed features b = g(I'). Each
  fool is used at most once, ever: a ledger records what has been taken, written atomically under an
  exclusive file lock, so two processes never take the same fool. An empty pool refuses in one line.
- ``choose_fools``: the single-transmission simulation that training and the audit use (a fool is another
  image of the same batch); it is never used to build what a device sends.

The picking rules (``random``, ``match``) live in ``cvconvert.device.foolrules``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sketches import sketch
from .foolrules import (FOOL_RULES, MATCH_LAMBDA, MATCH_SET, check_rule, choose_fools, draw,  # noqa: F401
                        fallback_fool, l1_distances, match_law, pairing_law, pick)
from .artifacts import atomic_json, atomic_write, locked, sha256

# ---------------------------------------------------------------------------------------------------
# The fool pool: device-private fools, each used once.

POOL_FORMAT = "cvconvert-fool-pool"
POOL_VERSION = 1
POOL_FILES = {"meta": "pool.json", "images": "images.npy", "features": "features.npy", "ledger": "ledger.npy",
              "sketches": "sketches.npy"}


def low_water(count: int) -> int:
    """Below this many unused fools the device warns (a tenth of the pool, at least 16)."""
    return max(16, count // 10)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from .state import disk_error

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    try:
        atomic_write(path, write, mode=0o600)
    except OSError as exc:
        raise disk_error(path, exc) from None


def _save_meta(meta: dict, path: Path) -> None:
    from .state import disk_error

    try:
        atomic_json(meta, path, mode=0o600)
    except OSError as exc:
        raise disk_error(path, exc) from None


_DAMAGED = ("restore the pool folder from a backup taken after its last use (cvconvert detects an older ledger), "
            "or create a new pool; its fools must never be used again elsewhere")


def image_digests(images: np.ndarray) -> list[str]:
    """One sha256 per image of its 8-bit pixels: the same picture gives the same digest."""
    q = np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8)
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in q]


@dataclass
class Taken:
    """Fools handed out by FoolPool.take: their pool indices, images and precomputed features."""
    index: np.ndarray
    images: np.ndarray
    features: np.ndarray
    remaining: int


class FoolPool:
    """A device-private folder of fool images and their features, each fool used at most once:

        POOL/pool.json      format, sha256 of the graph that computed the features, shapes, options
        POOL/images.npy     [M, C, H, W] float32 fool images (the match rule needs their pixels)
        POOL/features.npy   [M, C', H', W'] float32 b = g(I'), computed once when the fools were added
        POOL/ledger.npy     uint8 [M]: 1 = used (or burned); only ever goes from 0 to 1
        POOL/sketches.npy   [M, d] float16 sketches of the features, for the near-duplicate checks

    Every read-modify-write holds an exclusive flock on POOL/.lock and replaces files by rename, so two
    processes never take the same fool and a crash never leaves a half-written file. Files are 0600.
    """

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self.created: dict | None = None  # create(): what add() said about the first images

    # -- creating and opening --------------------------------------------------------------------
    @classmethod
    def create(cls, path, images: np.ndarray, features: np.ndarray, *, features_sha256: str,
               input_shape, feature_shape) -> "FoolPool":
        """A new pool at `path` (which must not exist, or be an empty folder), built in a temporary
        sibling folder and renamed into place, so an interrupted create leaves nothing behind."""
        import shutil
        import tempfile

        from ..errors import CvError

        path = Path(path)
        if (path / POOL_FILES["meta"]).exists():
            raise CvError(f"{path} is already a fool pool (add fools with `cvconvert fools refill {path} ...`)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CvError(f"{path} exists and is not an empty folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))  # mode 0700
        try:
            meta = {"format": POOL_FORMAT, "version": POOL_VERSION, "id": secrets.token_hex(16),
                    "features_sha256": features_sha256,
                    "input_shape": list(input_shape), "feature_shape": list(feature_shape), "count": 0,
                    "digests": []}
            _save_npy(tmp / POOL_FILES["images"], np.zeros((0, *input_shape), np.float32))
            _save_npy(tmp / POOL_FILES["features"], np.zeros((0, *feature_shape), np.float32))
            _save_npy(tmp / POOL_FILES["ledger"], np.zeros(0, np.uint8))
            _save_npy(tmp / POOL_FILES["sketches"], sketch(np.zeros((0, *feature_shape))).astype(np.float16))
            _save_meta(meta, tmp / POOL_FILES["meta"])
            stats = cls(tmp, meta).add(images, features)
            if path.exists():
                path.rmdir()
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pool = cls.open(path)
        pool.created = stats
        return pool

    @classmethod
    def open(cls, path, features_sha256: str | None = None) -> "FoolPool":
        """The pool at `path`; CvError when it is not one, or when its features came from another graph."""
        from ..errors import CvError

        path = Path(path)
        meta_path = path / POOL_FILES["meta"]
        if not meta_path.is_file():
            hint = " (a folder of images: make it a pool with `cvconvert fools create`)" if path.is_dir() else ""
            raise CvError(f"{path} is not a fool pool{hint}")
        meta = cls._read_meta(meta_path)
        if meta.get("format") != POOL_FORMAT or meta.get("version") != POOL_VERSION:
            raise CvError(f"{path} is not a fool pool of a version this cvconvert reads")
        if features_sha256 is not None and meta.get("features_sha256") != features_sha256:
            raise CvError(f"the fool pool {path} holds features of another model (features graph sha256 differs): "
                          f"create a new pool for this model with `cvconvert fools create`")
        return cls(path, meta)

    # -- state -------------------------------------------------------------------------------------
    @staticmethod
    def _read_meta(path: Path) -> dict:
        from ..errors import CvError

        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError
            return meta
        except (OSError, ValueError, UnicodeDecodeError):
            raise CvError(f"the fool pool's {path} is damaged or unreadable: {_DAMAGED}") from None

    def _read(self, key: str, mmap: bool = False) -> np.ndarray:
        """One of the pool's arrays; a damaged, missing or unreadable file is a one-line CvError naming it."""
        from ..errors import CvError

        path = self.path / POOL_FILES[key]
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception:  # EOFError, ValueError, OSError, ...: the same advice for all
            what = "missing" if not path.exists() else "damaged or unreadable"
            raise CvError(f"the fool pool's {path} is {what}: {_DAMAGED}") from None
        count = int(self.meta.get("count", len(arr)))
        if not isinstance(arr, np.ndarray) or len(arr) != count or (key == "ledger" and (
                arr.dtype != np.uint8 or arr.ndim != 1 or (arr > 1).any())):
            raise CvError(f"the fool pool's {path} is damaged (it does not hold {count} entries of the expected "
                          f"kind): {_DAMAGED}")
        return arr

    def _ledger(self) -> np.ndarray:
        return np.array(self._read("ledger"))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read("images", mmap=True), self._read("features", mmap=True)

    @property
    def pool_id(self) -> str:
        """A stable name for this pool in the device state (its id; older pools: its absolute path)."""
        return str(self.meta.get("id") or self.path.resolve())

    def _lock_or_readonly(self):
        """The pool's lock; on a read-only pool (nothing can change it meanwhile) none."""
        import contextlib
        import errno

        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return contextlib.nullcontext()
            raise
        return locked(self.path)

    def _locked(self):
        from .state import disk_error

        try:
            os.close(os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise disk_error(self.path / ".lock", exc, "lock the fool pool with") from None
        return locked(self.path)

    def verify(self) -> dict:
        """Check every file of the pool: readable, consistent counts and shapes, the sha256 recorded at
        the last add. CvError naming the first bad file. Returns the ledger and the meta."""
        from ..errors import CvError

        meta = self._read_meta(self.path / POOL_FILES["meta"])
        self.meta = meta
        ledger = self._ledger()
        for key in ("images", "features", "sketches"):
            arr = self._read(key, mmap=True)
            shape = {"images": meta.get("input_shape"), "features": meta.get("feature_shape")}.get(key)
            if shape is not None and list(arr.shape[1:]) != list(shape):
                raise CvError(f"the fool pool's {self.path / POOL_FILES[key]} has shape {list(arr.shape)}, "
                              f"pool.json says [{meta.get('count')}, {', '.join(map(str, shape))}]: {_DAMAGED}")
            want = (meta.get("sha256") or {}).get(key)
            if want is not None and want != sha256(self.path / POOL_FILES[key]):
                raise CvError(f"the fool pool's {self.path / POOL_FILES[key]} was changed after it was written "
                              f"(sha256 differs from pool.json): {_DAMAGED}")
        return {"ledger": ledger, "meta": meta}

    def status(self) -> dict:
        with self._lock_or_readonly():
            checked = self.verify()
        ledger, meta = checked["ledger"], checked["meta"]
        used = int(ledger.sum())
        mode = (self.path / POOL_FILES["meta"]).stat().st_mode & 0o777
        return {"pool": str(self.path), "count": int(len(ledger)), "used": used, "remaining": int(len(ledger)) - used,
                "low_water": low_water(len(ledger)), "features_sha256": meta["features_sha256"],
                "input_shape": meta["input_shape"], "feature_shape": meta["feature_shape"], "verified": True,
                "writable": os.access(self.path, os.W_OK), "private": mode & 0o077 == 0}

    @property
    def remaining(self) -> int:
        return self.status()["remaining"]

    # -- changing it -------------------------------------------------------------------------------
    def add(self, images: np.ndarray, features: np.ndarray, threshold: float | None = None) -> dict:
        """Append fools. Pictures the pool already holds, and near-duplicates (feature cosine >= threshold,
        default the guard's) of a pool fool or of each other, are skipped: two such fools in two
        transmissions would expose each other. Returns {"added": K, "duplicates": D, "near_duplicates": E}."""
        from .guard import DEFAULT_THRESHOLD

        limit = min(DEFAULT_THRESHOLD if threshold is None else threshold, 1 - 1e-5)
        images = np.ascontiguousarray(images, dtype=np.float32)
        features = np.ascontiguousarray(features, dtype=np.float32)
        new_sk = sketch(features)
        with self._locked():
            meta = self._read_meta(self.path / POOL_FILES["meta"])
            self.meta = meta
            old_sk = np.array(self._read("sketches")).astype(np.float32)
            seen, keep, digests, dup, near = set(meta["digests"]), [], [], 0, 0
            for i, d in enumerate(image_digests(images)):
                others = np.concatenate([old_sk, new_sk[keep]])
                if d in seen:
                    dup += 1
                elif len(others) and (others @ new_sk[i]).max() >= limit:
                    near += 1
                else:
                    seen.add(d)
                    keep.append(i)
                    digests.append(d)
            old_images, old_feats = self._arrays()
            ledger = self._ledger()
            _save_npy(self.path / POOL_FILES["images"], np.concatenate([old_images, images[keep]]))
            _save_npy(self.path / POOL_FILES["features"], np.concatenate([old_feats, features[keep]]))
            _save_npy(self.path / POOL_FILES["sketches"], np.concatenate([old_sk, new_sk[keep]]).astype(np.float16))
            _save_npy(self.path / POOL_FILES["ledger"], np.concatenate([ledger, np.zeros(len(keep), np.uint8)]))
            meta["digests"] += digests
            meta["count"] = len(ledger) + len(keep)
            meta["sha256"] = {k: sha256(self.path / POOL_FILES[k]) for k in ("images", "features", "sketches")}
            _save_meta(meta, self.path / POOL_FILES["meta"])
            self.meta = meta
        return {"added": len(keep), "duplicates": dup, "near_duplicates": near}

    def take(self, n: int, images: np.ndarray | None = None, rule: str = "random", reject=None, accept=None,
             tries: int = 4) -> Taken | None:
        """n fools, never used before and never again (marked in the ledger before they are returned).

        images: the request's images ([n, C, H, W]), which the ``match`` rule pairs against. reject: an
        optional ``(sketches [k, d], pictures [k, C, H, W]) -> bool [k]`` (see cvconvert.device.guard) that
        burns candidates never to be sent, e.g. a fool too close to something already sent; burned fools are
        marked used too. accept: an optional ``(sketches [k, d], chosen [j, d]) -> bool [k]``: which
        candidates may be the next fool, given the sketches of those chosen so far (the guard's geometric
        screen); candidates it turns down stay unused. Returns None when, after `tries` draws of candidates,
        no candidate passes `accept` for some fool (nothing is taken then). CvError when the pool cannot
        supply n fools.
        """
        check_rule(rule)
        with self._locked():
            self.meta = self._read_meta(self.path / POOL_FILES["meta"])  # another process may have refilled it
            ledger = self._ledger()
            pool_images, pool_feats = self._arrays()
            sketches = self._read("sketches", mmap=True)
            free = set(int(i) for i in np.flatnonzero(ledger == 0))
            try:
                chosen = self._choose(n, images, rule, reject, accept, tries, free, ledger, pool_images, sketches)
                for j in chosen or []:
                    ledger[j] = 1
            finally:  # taken and burned fools are marked even when the request fails half-way
                _save_npy(self.path / POOL_FILES["ledger"], ledger)
            if chosen is None:
                return None
            return Taken(np.asarray(chosen), np.array(pool_images[chosen], dtype=np.float32),
                         np.array(pool_feats[chosen], dtype=np.float32), len(free))

    def _choose(self, n, images, rule, reject, accept, tries, free, ledger, pool_images, sketches):
        if len(free) < n:  # refuse before anything is taken
            self._candidates(free, ledger, sketches, pool_images, reject, 0, n)
        chosen = []
        for i in range(n):
            seen, good = set(), []
            for _ in range(tries if accept is not None else 1):
                cands = self._candidates(free - seen, ledger, sketches, pool_images, reject, i, n, free)
                seen.update(cands)
                if accept is None:
                    good = cands
                    break
                picked = np.asarray(sketches[chosen], np.float32) if chosen else np.zeros((0, sketches.shape[1]), np.float32)
                ok = np.asarray(accept(np.asarray(sketches[cands], np.float32), picked), dtype=bool)
                good = [j for j, k in zip(cands, ok) if k]
                if good or len(seen) >= len(free):
                    break
            if not good:
                return None
            image = images[i] if images is not None else None
            j = good[pick(image, np.asarray(pool_images[good]), rule)] if image is not None else good[0]
            chosen.append(j)
            free.discard(j)
        return chosen

    def take_where(self, choose) -> Taken | None:
        """Fools picked by ``choose(free, sketches, images) -> indices or None`` (free: the unused pool
        indices; sketches and images: the whole pool's, read-only), marked used before they are returned.
        The guard's mirror (cvconvert.device.mirror) picks a pool fool at a given cosine this way."""
        with self._locked():
            self.meta = self._read_meta(self.path / POOL_FILES["meta"])
            ledger = self._ledger()
            pool_images, pool_feats = self._arrays()
            free = np.flatnonzero(ledger == 0)
            chosen = choose(free, self._read("sketches", mmap=True), pool_images)
            if chosen is None or not len(chosen):
                return None
            chosen = np.asarray(chosen, np.int64)
            if ledger[chosen].any():
                raise ValueError("take_where: a chosen fool is used already")
            ledger[chosen] = 1
            _save_npy(self.path / POOL_FILES["ledger"], ledger)
            return Taken(chosen, np.array(pool_images[chosen], dtype=np.float32),
                         np.array(pool_feats[chosen], dtype=np.float32), len(free) - len(chosen))

    def used_like(self, sketches: np.ndarray, limit: float = 0.9999) -> list:
        """Per sketch [k, d]: the pool image of the used fool with (about) that sketch, or None (the fool came
        from another pool or another model version)."""
        with self._lock_or_readonly():
            ledger = self._ledger()
            mine = np.asarray(self._read("sketches", mmap=True), np.float32)
            used = np.flatnonzero(ledger == 1)
            images, out = None, []
            for s in np.asarray(sketches, np.float32).reshape(len(sketches), -1):
                cos = mine[used] @ s if len(used) and mine.shape[1] == len(s) else np.zeros(0)
                if not len(cos) or cos.max() < limit:
                    out.append(None)
                    continue
                images = self._arrays()[0] if images is None else images  # read once, only when needed
                out.append(np.array(images[int(used[int(np.argmax(cos))])], np.float32))
            return out

    def release(self, index) -> None:
        """Give fools back (a request that provably never left the device): only the journal calls this."""
        with self._locked():
            ledger = self._ledger()
            ledger[np.asarray(index, dtype=np.int64)] = 0
            _save_npy(self.path / POOL_FILES["ledger"], ledger)

    def _candidates(self, free: set, ledger, sketches, pool_images, reject, i: int, n: int, every: set | None = None) -> list:
        """Up to MATCH_SET - 1 unused fools drawn with the CSPRNG; those `reject` refuses are burned
        (taken out of `every`, the pool's free set, too)."""
        from ..errors import CvError

        rand = secrets.SystemRandom()
        every = free if every is None else every
        while True:
            if len(every) < n - i:
                raise CvError(f"fool pool {self.path} has {len(every)} unused fool(s), this request needs {n - i} more: "
                              f"refill it with `cvconvert fools refill {self.path} IMAGES...` (device-private images, "
                              "never used elsewhere)")
            if not free:
                return []
            cands = rand.sample(sorted(free), min(len(free), MATCH_SET - 1))
            if reject is None:
                return cands
            bad = np.asarray(reject(np.asarray(sketches[cands], dtype=np.float32), np.asarray(pool_images[cands])),
                             dtype=bool)
            for j in np.asarray(cands)[bad]:
                free.discard(int(j))
                every.discard(int(j))
                ledger[int(j)] = 1
            good = [j for j, b in zip(cands, bad) if not b]
            if good:
                return good
