"""The query guard: the device's private memory of what it has sent, and the checks it runs on it before
anything leaves (torch-free). One memory per device, shared by every pool and model version.

Two transmissions that carry the same feature vector are exposed exactly by intersecting their spans;
two that carry related ones (a near-duplicate or a look-alike of an earlier image, with unrelated fools)
share a direction that is the image's. So for each image the device

1. answers an exact repeat (feature cosine >= ``threshold`` with an image sent before) from its cache, and
   refuses one that matches a fool it sent;
2. runs the cloud's attack on the transmission it would send (``screen.History``: principal directions
   against every past span) and picks the fools from the pool so that the geometry stays symmetric, a fool
   kept on top landing the best pair in the image's own band (``History.cap``: else the cosine tells the coin)
   and the two best pairs agreeing or not as a second coin says (else their agreement tells the first);
3. when no pool fool does and the image is related to one sent before, mirrors that transmission's fools
   (``cvconvert.device.mirror``); else answers from the earlier related image (``similar``) when the image
   stands out against the fools sent (``screen.fool_floor``) or when sending would lift the share of
   transmissions naming their image (or a fool) at its level over 1/P (``History.over_share``); else sends.

What is kept (a 0600 npz in the device's state folder, ``cvconvert.device.state.guard_path()``, never sent, never logged), per vector sent (images and
fools): its feature (unit, float16) up to ``sketches.EXACT_DIM`` numbers, else a fixed count sketch of
``sketches.SKETCH_DIM`` numbers (a count sketch keeps inner products, and with them principal cosines, to
about 1/sqrt(SKETCH_DIM); the margin follows, ``sketches.default_margin``), its transmission, its current
best match, which model computed it, the image's answer, and a model-independent picture (grey, at most
32 x 32, 8-bit). A new model version re-embeds the pictures with its own features graph, so what was sent
under another version is screened too, and no fool whose picture was sent before (in any pool) is sent.
Bounded: the ``capacity`` most recent vectors (whole transmissions) are kept, the oldest forgotten.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import numpy as np

from ..errors import CvError
from .artifacts import atomic_write, locked
from .screen import DEFAULT_FLOOR, DEFAULT_MARGIN, FOOL_QUANTILE, LIFT, History, fool_floor, nearest, raise_nearest
from .sketches import PICTURE, PICTURE_THRESHOLD, default_margin, picture, picture_sketch, sketch
from .verdict import Verdict

DEFAULT_THRESHOLD = 0.995  # measured: distinct Fashion-MNIST test images reach 0.993, near-duplicates 0.998+
DEFAULT_CAPACITY = 10000
IMAGE, FOOL = 0, 1
FIELDS = ("sketch", "kind", "group", "seq", "logits", "best", "model", "picture", "top", "near")


class SentGuard:
    """The device's memory of what it sent; ``path`` None keeps it in memory for this process only.

    What the journal (cvconvert/device/journal.py, state.py) relies on, whatever the index keeps: ``stamp``
    written into the file as ``generation`` and read back by ``stored_generation()``; ``forget(keys)`` and
    ``pending_keys()``; a "busy" verdict carrying the entry's key in ``ref``; ``Verdict.fool_keys``; and a
    damaged file raising one CvError line (never an empty index: an emptied guard reads as a deleted one).
    """

    def __init__(self, path=None, threshold: float = DEFAULT_THRESHOLD, capacity: int = DEFAULT_CAPACITY,
                 floor: float = DEFAULT_FLOOR, margin: float | None = None, quantile: float = FOOL_QUANTILE):
        if not 0.0 < threshold <= 1.0:
            raise CvError(f"guard threshold {threshold} must lie in (0, 1] (a cosine; 1 catches exact repeats only)")
        if capacity < 1:
            raise CvError(f"guard size {capacity} must be at least 1")
        if not 0.0 < floor <= 1.0 or (margin is not None and not 0.0 <= margin < 1.0):
            raise CvError(f"guard floor {floor} must lie in (0, 1] and margin {margin} in [0, 1)")
        if not 0.0 <= quantile <= 1.0:
            raise CvError(f"guard quantile {quantile} must lie in [0, 1] (0: the fixed floor alone)")
        self.quantile = float(quantile)
        self.path = Path(path) if path is not None else None
        self.threshold, self.capacity, self.floor = float(threshold), int(capacity), float(floor)
        # None: by what is kept (sketches.default_margin: 0.005 for exact features, 0.02 for count sketches)
        self.margin_option = None if margin is None else float(margin)
        self.margin = DEFAULT_MARGIN if margin is None else float(margin)
        self._mem = None  # in-memory state when path is None
        self.stamp = 0  # the device state's generation, written with the index (cvconvert.device.state)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- storage -----------------------------------------------------------------------------------
    @staticmethod
    def _empty(k: int = 0, classes: int = 0) -> dict:
        return {"sketch": np.zeros((0, k), np.float16), "kind": np.zeros(0, np.uint8), "group": np.zeros(0, np.int64),
                "seq": np.zeros(0, np.int64), "logits": np.zeros((0, classes), np.float32),
                "best": np.zeros(0, np.float32), "model": np.zeros(0, "<U16"),
                "picture": np.zeros((0, PICTURE, PICTURE), np.uint8), "top": np.zeros(0, bool),
                "near": np.zeros(0, np.float32)}

    def _load(self) -> dict:
        if self.path is None:
            return dict(self._mem) if self._mem is not None else self._empty()
        if not self.path.is_file():
            return self._empty()
        try:
            with np.load(self.path) as z:
                state = {k: z[k] for k in FIELDS if k != "near" or "near" in z.files}
        except Exception:  # BadZipFile, EOFError, OSError, KeyError ...: any damage reads the same to the user
            raise CvError(f"the guard index {self.path} is damaged or unreadable: restore it from a backup taken "
                          "after the last request (do not delete it: without it this device would send earlier "
                          "images again, which exposes them); cvconvert refuses to send meanwhile") from None
        if "near" not in state:  # written before the fools' nearest matches were kept: computed once
            state["near"] = nearest(state["sketch"], state["group"])
        return state

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
        if len(state["seq"]) > self.capacity:  # forget the oldest transmissions, whole
            cutoff = np.sort(state["seq"])[-self.capacity]
            keep = np.isin(state["group"], state["group"][state["seq"] >= cutoff])
            # a pending image is never forgotten: forgotten, it would be sent again with a fresh key and fool
            # instead of its journaled x
            keep |= np.isin(state["group"], state["group"][self._unanswered(state)])
            state = {k: v[keep] for k, v in state.items()}
        state = {k: v for k, v in state.items() if k != "generation"}
        if self.path is None:
            self._mem = state
            return
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
            return contextlib.nullcontext()
        return locked(self.path.parent, self.path.name + ".lock")

    def __len__(self) -> int:
        return len(self._load()["seq"])

    def _current(self, state: dict, model: str, embed, width: int) -> np.ndarray:
        """Bring every entry to `model`'s feature space: entries of another model version are re-embedded from
        their pictures with `embed` (images -> features), or dropped from the feature checks when it is None."""
        other = state["model"] != model
        if other.any() and embed is not None:
            feats = sketch(embed(state["picture"][other]))
            if state["sketch"].shape[1] != feats.shape[1]:
                state["sketch"] = np.zeros((len(state["seq"]), feats.shape[1]), np.float16)
            state["sketch"][other] = feats.astype(np.float16)
            state["model"] = np.where(other, model, state["model"])
            state["best"] = History(state["sketch"], state["group"], None, self.floor, self.margin).best.astype(np.float32)
            state["near"] = nearest(state["sketch"], state["group"])
            return np.ones(len(other), dtype=bool)
        if state["sketch"].shape[1] != width:  # another feature width and nothing to re-embed with
            state["sketch"] = np.zeros((len(other), width), np.float16)
            return np.zeros(len(other), dtype=bool)
        return ~other

    def sent_images(self, model: str, embed=None) -> np.ndarray:
        """Sketches of the images this device has sent, in `model`'s feature space (`fools audit`)."""
        with self._lock():
            state = self._load()
            if not len(state["seq"]):
                return np.zeros((0, 0), np.float32)
            width = state["sketch"].shape[1]
            mine = self._current(state, model, embed, width)
        return state["sketch"][mine & (state["kind"] == IMAGE)].astype(np.float32)

    # -- the checks --------------------------------------------------------------------------------
    def burn(self, sketches: np.ndarray, pics: np.ndarray | None, state: dict, mine: np.ndarray,
             own: np.ndarray, source: int | None = None) -> np.ndarray:
        """bool [k]: candidate fools never to send: within the threshold of a vector sent (or of this
        request's images `own`), or a copy of a picture sent before under any model. ``source``: the entry a
        mirror fool mirrors, whose picture it may resemble (cvconvert.device.mirror)."""
        limit = min(self.threshold, 1.0 - 1e-5)
        sent = state["sketch"][mine].astype(np.float32)
        out = np.zeros(len(sketches), dtype=bool)
        for ref in (sent, own):
            if len(ref) and ref.shape[1] == sketches.shape[1]:
                out |= (sketches @ ref.T).max(1) >= limit
        others = np.arange(len(state["picture"])) != (-1 if source is None else source)
        if pics is not None and np.ndim(pics) == 4:  # model inputs [k, C, H, W]: to the kept pictures' form
            pics = picture(pics)
        if pics is not None and others.any():
            out |= (picture_sketch(pics) @ picture_sketch(state["picture"][others]).T).max(1) >= PICTURE_THRESHOLD
        return out

    def screen_and_reserve(self, features: np.ndarray, send_fools, images: np.ndarray | None = None,
                           model: str = "", parts: int = 2, embed=None, mirror_fools=None, give_back=None):
        """Decide per image (see Verdict) and record every image to be sent with its fools before anything
        leaves the device. send_fools(i, accept, burn) -> the fools of image i (an object with .features
        [P-1, ...] and .images, or an array of features), or None when no pool fool passes; ``accept(cands,
        chosen)`` says which candidate fool sketches keep the geometry symmetric, ``burn(cands, pictures)``
        which may never be sent. mirror_fools(i, sources, windows, ok, final): the mirror fools of image i
        (cvconvert.device.mirror) for an image related to one sent before, or None (then the earlier image
        answers). give_back(taken): return fools send_fools handed out that will not be sent. Runs under the
        lock. Returns (verdict, [fools per sent image], keys)."""
        with self._lock():
            state = self._load()
            sk = sketch(features)
            self.margin = default_margin(sk.shape[1]) if self.margin_option is None else self.margin_option
            mine = self._current(state, model, embed, sk.shape[1])
            pics = picture(images) if images is not None else np.zeros((len(sk), PICTURE, PICTURE), np.uint8)
            hist = History(state["sketch"][mine], state["group"][mine], state["best"][mine], self.floor, self.margin,
                           state["top"][mine])
            related = fool_floor(state["near"][mine & (state["kind"] == FOOL)], self.floor, self.quantile)
            verdict = Verdict([], [], np.full(len(sk), -1.0), [], [])
            fools, keys, here, fool_keys = [], [], {}, []  # here: entry seq -> index of this request's images sent
            for i in range(len(sk)):
                if self._repeat(state, mine, sk, i, verdict, here):
                    continue
                own = hist.relation(sk[i])  # where the image on top puts the best pair (hist is unchanged until sent)
                taken, top = self._choose(send_fools, i, sk, hist, state, mine, parts, own)
                how = "coin"
                partner = self._partner(state, mine, sk[i], self.floor) if taken is None else None
                if partner is not None:  # related to an image sent before: mirror its fools
                    taken, top = self._mirror(mirror_fools, give_back, i, sk, hist, state, mine, parts, partner)
                    how = "mirror"
                    if taken is None and partner[1] >= related:  # it stands out against the fools: its answer
                        self._similar(state, partner, verdict, here, "stands out")
                        continue
                if taken is None:  # no earlier image nearer than the fools sent lie to theirs (screen.fool_floor):
                    # what the best pair names is the geometry of exchangeable pictures; send, record the vector it
                    # names as its coin, unless that would lift its kind's share at its level over 1/P (or (P-1)/P)
                    taken, top, how = *self._balanced(send_fools, give_back, i, sk, hist, state, mine, parts,
                                                      self._answerable(state, partner, here), own), "typical"
                    if taken is None:
                        self._similar(state, partner, verdict, here, "share")
                        continue
                b = getattr(taken, "features", taken)
                fool_pics = getattr(taken, "images", None)
                vecs = np.concatenate([sk[i:i + 1], sketch(b)])
                group = int(state["group"].max()) + 1 if len(state["group"]) else 0
                hist.add(vecs, group, top)
                mine = self._append(state, vecs, group, model, hist, mine,
                                    np.concatenate([pics[i:i + 1], picture(fool_pics) if fool_pics is not None
                                                    else np.zeros((len(b), PICTURE, PICTURE), np.uint8)]))
                keys.append(int(state["seq"][-len(vecs)]))
                fool_keys += [int(k) for k in state["seq"][-len(vecs) + 1:]]
                here[keys[-1]] = i
                fools.append(b)
                verdict.action.append("send"), verdict.ref.append(None), verdict.logits.append(None)
                verdict.why.append(how)
            self._save(state)
        verdict.fool_keys = np.asarray(fool_keys, np.int64)
        return verdict, fools, np.asarray(keys, np.int64)

    def _repeat(self, state, mine, sk, i, verdict, here: dict) -> bool:
        """An exact repeat of this request's earlier image, or of something sent: decided here. This request's
        images are in the index already (float16), so a repeat of one of them is told by its entry, not by
        comparing cosines that rounding can order either way."""
        limit = min(self.threshold, 1.0 - 1e-5)  # exact repeats pass 1 - 1e-5 despite float rounding
        earlier = [j for j in range(i) if verdict.action[j] == "send"]
        inner = sk[earlier] @ sk[i] if earlier else np.zeros(0)
        sent = state["sketch"][mine].astype(np.float32)
        cos = sent @ sk[i] if len(sent) else np.zeros(0)
        if len(inner) and inner.max() >= limit and (not len(cos) or inner.max() >= cos.max()):
            self._say(verdict, "same", earlier[int(inner.argmax())], None, float(inner.max()))
            return True
        if not len(cos) or cos.max() < limit:
            return False
        j = np.flatnonzero(mine)[int(cos.argmax())]
        if int(state["seq"][j]) in here:  # an image of this request, reserved a moment ago
            self._say(verdict, "same", here[int(state["seq"][j])], None, float(cos.max()))
        elif state["kind"][j] == FOOL:
            self._say(verdict, "refuse", None, None, float(cos.max()))
        elif state["logits"].shape[1] == 0 or np.isnan(state["logits"][j]).any():  # no answer recorded yet
            self._say(verdict, "busy", int(state["seq"][j]), None, float(cos.max()))
        else:
            self._say(verdict, "cached", int(state["seq"][j]), state["logits"][j].copy(), float(cos.max()))
        return True

    def _choose(self, send_fools, i, sk, hist, state, mine, parts, own: float):
        cap = hist.cap(own, LIFT * self.margin)  # own: the image's relation; a fool on top stays near it
        top = hist.coin(parts, own, (1 + LIFT) / 2 * self.margin)  # the secret coin: which vector is to be named
        agree = secrets.randbelow(2) == 0  # and whether its two best pairs' principal vectors agree (History.fine)

        def accept(cands, chosen):
            chosen = np.concatenate([sk[i:i + 1], np.asarray(chosen, np.float32).reshape(-1, sk.shape[1])])
            return hist.accept(chosen, cands, top, final=len(chosen) == parts - 1, cap=cap, agree=agree)

        def burn(cands, pics=None):
            return self.burn(np.asarray(cands, np.float32), pics, state, mine, sk)
        return send_fools(i, accept, burn), top

    def _partner(self, state, mine, a, floor: float):
        """The entries (image first) of the transmission whose image lies nearest `a`, and that cosine, when
        it reaches `floor`; else None."""
        imgs = np.flatnonzero(mine & (state["kind"] == IMAGE))
        if not len(imgs):
            return None
        cos = state["sketch"][imgs].astype(np.float32) @ a
        if float(cos.max()) < floor:
            return None
        j = imgs[int(cos.argmax())]
        return np.flatnonzero(state["group"] == state["group"][j]), float(cos.max())

    def _typical(self, send_fools, i, sk, hist, state, mine, parts, coin: int, only: bool = False):
        """Fools for a transmission sent although no pool fool keeps a coin in full (``coin``: the one asked first).
        Tried in turn: a fresh coin named (no margin) with every earlier transmission's coin kept; earlier
        coins kept; neither. Each prefers fools whose nearest match among what was sent is as near as the
        image's (within the margin): image and fools then look alike to the cloud's statistic whatever the
        pool's and the stream's distributions (a skewed stream against a pool of all kinds named its fools
        85% of the time at P = 3). Any unused fool when no candidate is that typical (``only``: the first
        stage alone, else None)."""
        def burn(c, p=None):
            return self.burn(np.asarray(c, np.float32), p, state, mine, sk)
        sent = state["sketch"][mine].astype(np.float32)
        if not len(sent):
            return send_fools(i, None, burn) if not only else None
        own = float(np.abs(sent @ sk[i]).max())

        def accept_with(coin, asked: bool):
            def accept(cands, chosen):
                cands = np.asarray(cands, np.float32)
                ok = np.abs(np.abs(cands @ sent.T).max(1) - own) <= self.margin
                if asked and ok.any():
                    chosen = np.concatenate([sk[i:i + 1], np.asarray(chosen, np.float32).reshape(-1, sk.shape[1])])
                    ok[ok] = hist.accept(chosen, cands[ok], coin, len(chosen) == parts - 1, strict=False)
                return ok
            return accept
        stages = ((coin, True),) if only else ((coin, True), (None, True), (None, False))
        for want, asked in stages:
            taken = send_fools(i, accept_with(want, asked), burn)
            if taken is not None:
                return taken
        return None if only else send_fools(i, None, burn)

    def _balanced(self, send_fools, give_back, i, sk, hist, state, mine, parts, answerable: bool, own: float):
        """(fools, the vector their transmission names) for a transmission sent without a kept coin, keeping
        each kind's share at its level near chance (History.over_share): when the first fools would
        lift it, fools naming the other kind are sought; failing those, (None, 0) when the related earlier
        image can answer instead, else the first fools (a leak the audit counts)."""
        def reading(taken):
            return hist.reading(np.concatenate([sk[i:i + 1], sketch(getattr(taken, "features", taken))]))
        # the coin asked first leans like a kept coin's: with a uniform one the typical path named its image
        # 0.23-0.24 of the time at P = 3 (a search asked for the image fails more often than one asked for a
        # fool), and the share rule then answered distinct images from another (20 of 210; leaning: 17, 0.30)
        taken = self._typical(send_fools, i, sk, hist, state, mine, parts, hist.coin(parts, own))
        top, s0 = reading(taken)
        if give_back is None or not hist.over_share(s0, parts, top == 0):
            return taken, top
        want = 1 + secrets.randbelow(parts - 1) if top == 0 else 0  # the other kind
        again = self._typical(send_fools, i, sk, hist, state, mine, parts, want, only=True)
        if again is not None:
            top2, s02 = reading(again)
            if not hist.over_share(s02, parts, top2 == 0):
                give_back(taken)
                return again, top2
            give_back(again)
        if answerable:
            give_back(taken)
            return None, 0
        return taken, top

    @staticmethod
    def _answerable(state, partner, here: dict) -> bool:
        """Whether the partner's image has an answer to give (recorded, or an image of this request)."""
        if partner is None:
            return False
        j = int(partner[0][0])
        return int(state["seq"][j]) in here or (state["logits"].shape[1] > 0 and not np.isnan(state["logits"][j]).any())

    def _mirror(self, mirror_fools, give_back, i, sk, hist, state, mine, parts, partner):
        """Fools that mirror the partner transmission's on a ladder of cosines (cvconvert.device.mirror),
        and the new coin; (None, 0) when the ladder does not fit or no mirror keeps every coin. A mirror is
        sent only when one with the other kind on top fits too: else whether a related image is mirrored
        (rather than sent with typical fools or answered) would follow its coin (at P = 3 mirrored
        transmissions named the image 0.18 of the time, 90 of them, against 1/3)."""
        from .mirror import TAPER, _uniform, ladder

        rows, c = partner
        if mirror_fools is None or len(rows) != parts:
            return None, 0
        ceiling = self.threshold - self.margin - TAPER * _uniform()  # a secret, tapered ceiling (mirror.TAPER)
        lad = ladder(c, parts, self.margin, ceiling)
        if lad is None:
            return None, 0
        if give_back is not None:
            other = ladder(c, parts, self.margin, ceiling, image_top=lad[1] != 0)
            probe = self._mirror_on(mirror_fools, i, sk, hist, state, mine, rows, other)
            if probe is None:
                return None, 0
            give_back(probe)
        return self._mirror_on(mirror_fools, i, sk, hist, state, mine, rows, lad), lad[1]

    def _mirror_on(self, mirror_fools, i, sk, hist, state, mine, rows, lad):
        """The mirror fools of image i on ladder ``lad`` (targets, top) against the partner's entries, or None."""
        targets, top = lad
        tol = self.margin / 2
        sources = [(state["sketch"][r].astype(np.float32), state["picture"][r]) for r in rows[1:]]

        def ok(j):
            return lambda cands, pics: ~self.burn(np.asarray(cands, np.float32), pics, state, mine, sk, rows[1 + j])

        def final(fool_sketches):
            # the partner, renamed, names top's counterpart: a fresh coin for it too
            return hist.fine(np.concatenate([sk[i:i + 1], np.asarray(fool_sketches, np.float32)]), top,
                             renamed=(int(state["group"][rows[0]]), top))[0]
        return mirror_fools(i, sources, [(t - tol, t + tol) for t in targets], ok, final)

    def _similar(self, state, partner, verdict, here: dict, why: str) -> None:
        """The related earlier image (``partner``, from _partner) answers, if it has an answer (``ref``: its
        guard entry; or, with logits None, the index of an image of this request); else "tells"."""
        j, cos = int(partner[0][0]), partner[1]
        if int(state["seq"][j]) in here:
            self._say(verdict, "similar", here[int(state["seq"][j])], None, cos, why)
        elif self._answerable(state, partner, here):
            self._say(verdict, "similar", int(state["seq"][j]), state["logits"][j].copy(), cos, why)
        else:
            self._say(verdict, "tells", None, None, cos, why)

    @staticmethod
    def _say(verdict, action, ref, logits, cos, why: str = "") -> None:
        verdict.cosine[len(verdict.action)] = cos
        verdict.action.append(action), verdict.ref.append(ref), verdict.logits.append(logits), verdict.why.append(why)

    def _append(self, state, vecs, group, model, hist, mine, pics) -> np.ndarray:
        n = len(vecs)
        start = int(state["seq"].max()) + 1 if len(state["seq"]) else 0
        width = state["logits"].shape[1]
        new = {"sketch": vecs.astype(np.float16), "kind": np.array([IMAGE] + [FOOL] * (n - 1), np.uint8),
               "group": np.full(n, group, np.int64), "seq": np.arange(start, start + n, dtype=np.int64),
               "logits": np.full((n, width), np.nan, np.float32), "best": np.zeros(n, np.float32),
               "model": np.full(n, model, "<U16"), "picture": pics, "top": hist.top[-n:]}
        state["near"][mine], new["near"] = raise_nearest(state["near"][mine], state["sketch"][mine], vecs)
        for k, v in new.items():
            state[k] = np.concatenate([state[k], v])
        rows = np.flatnonzero(np.append(mine, np.ones(n, bool)))
        state["best"][rows] = hist.best  # the raised best matches
        state["top"][rows] = hist.top    # and what the transmissions they belong to name now
        return np.append(mine, np.ones(n, dtype=bool))

    @staticmethod
    def _unanswered(state: dict) -> np.ndarray:
        """bool [n]: the images whose answer is not recorded (sent or reserved, no logits yet)."""
        if not len(state["seq"]):
            return np.zeros(0, dtype=bool)
        nan = np.isnan(state["logits"]).any(1) if state["logits"].shape[1] else np.ones(len(state["seq"]), bool)
        return (state["kind"] == IMAGE) & nan

    def pending_keys(self) -> set:
        """Index keys of the images whose answer is not recorded (sent or reserved, no logits yet)."""
        state = self._load()
        return {int(s) for s in state["seq"][self._unanswered(state)]}

    def forget(self, keys) -> None:
        """Drop entries (a reservation released because nothing left the device): as if never seen."""
        drop = {int(k) for k in keys}
        if not drop:
            return
        with self._lock():
            state = self._load()
            keep = np.array([int(s) not in drop for s in state["seq"]], dtype=bool)
            self._save({k: v[keep] for k, v in state.items()})

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
