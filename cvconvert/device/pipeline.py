"""The device's policy over the graph runner: where fools come from, which keys are drawn, what the guard
lets through. Every rule a device follows before anything leaves it lives here (or in the modules it calls:
`fools`, `guard`, `keys`), so the CLI and any library caller get the same behaviour.

    pipe = Pipeline.from_model_dir("out/lenet", pool=FoolPool.open("pool"))
    logits = pipe.predict(images)                 # a fresh secret key per image, each fool used once
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CvError, one_line
from .artifacts import ONNX_DIR, read_manifest
from .fools import FoolPool, fallback_fool, low_water
from .graphs import GraphRunner
from .guard import SentGuard
from .verdict import NoGuard
from .journal import Journal, NoJournal
from .keylaws import draw_keys
from .remote import NotSent
from .state import DeviceState, guard_path


class Pipeline(GraphRunner):
    """GraphRunner plus the device's rules. pool: a FoolPool (device-private fools, each used once).
    guard: True (the device's one guard, in the state folder $CVCONVERT_STATE_DIR), a SentGuard (path None:
    in memory, for this process only), or None (off).
    """

    def __init__(self, encoder, processing, decoder, manifest: dict, *, provider: str = "auto",
                 verify: bool = True, features=None, pool: FoolPool | None = None, guard=True):
        super().__init__(encoder, processing, decoder, manifest, provider=provider, verify=verify, features=features)
        self.last = {}  # what the last predict did: sent / cached counts, fool source, pool remaining
        self.pool = self._check_pool(pool)
        self.guard = self._make_guard(guard)
        self.journal = self._make_journal()

    def _check_pool(self, pool):
        if pool is None:
            return None
        if not self.complex:
            raise CvError(f"a fool pool is for complex models; this one is {self.manifest.get('variant')!r}")
        if pool.meta.get("features_sha256") != self.features_sha256:
            raise CvError(f"the fool pool {pool.path} holds features of another model (or of an earlier export): "
                          "create a new pool for these graphs with `cvconvert fools create`")
        return pool

    def _make_guard(self, guard):
        if guard is None or guard is False or not self.complex:
            return NoGuard()
        if guard is True:  # the device's one guard, on disk (every pool, model version and process)
            return SentGuard(guard_path())
        return guard

    def _make_journal(self):
        """The journal lives next to the guard's file (the device state folder); no file, no journal."""
        path = getattr(self.guard, "path", None)
        if path is None:
            return NoJournal(self.guard)
        return Journal(DeviceState(path.parent), self.guard, self.pool, self.features_sha256)

    @classmethod
    def from_model_dir(cls, model_dir, *, provider: str = "auto", processing=None, verify: bool = True,
                       pool: FoolPool | None = None, guard=True):
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        onnx_dir = model_dir / ONNX_DIR
        if not onnx_dir.is_dir():
            raise CvError(f"{model_dir} has no {ONNX_DIR}/ folder: run `cvconvert export {model_dir}` first")
        feats = onnx_dir / "features.onnx"
        return cls(onnx_dir / "encoder.onnx", processing if processing is not None else onnx_dir / "processing.onnx",
                   onnx_dir / "decoder.onnx", manifest, provider=provider, verify=verify,
                   features=feats if feats.is_file() else None, pool=pool, guard=guard)

    def new_keys(self, n: int) -> np.ndarray:
        """n fresh secret keys from os.urandom: angles, or Haar orthogonal [n, P, P] for P parts."""
        return draw_keys(self.law, n, self.parts)

    # -- the device's rules ----------------------------------------------------------------------------
    def predict(self, images: np.ndarray, fools: np.ndarray | None = None, key: np.ndarray | None = None, *,
                names=None) -> np.ndarray:
        """Logits for a batch of images (pixels in [0, 1], [N, C, H, W]).

        Complex models follow the device's rule that no feature vector appears in two transmissions: each
        image's fool comes from the pool and is never used again (no pool: a fresh noise fool, which the
        exchange and Haar key laws refuse); the key is fresh per image (os.urandom); an image whose feature lies
        within the guard's threshold of one already sent is not sent again (its cached answer is returned,
        it is refused when it matches a fool, and one whose answer never came is sent again with the very x
        and key of the first time, from the journal). `self.last` says what happened. Passing
        `fools` [N, P-1, C, H, W] / `key` [N, P, P] is the low-level path with none of these rules (tests and
        audits). names: a label per image, kept in the journal for `cvconvert fools status`.
        """
        images = self._check_images(images)
        self.last = {}
        if not self.complex:
            return self.decode(self.process(self.encode(images)))
        if fools is not None or key is not None:
            if fools is None or key is None:
                raise CvError("pass both fools and key, or neither (then the device's rules pick them)")
            return self.decode(self.process(self.encode(images, fools, key)), key)
        a = self.features(images)
        names = [str(i) for i in range(len(images))] if names is None else [str(n) for n in names]
        with self.journal.transaction() as st:
            request = self._reserve(st, images, a, names)
        h = self._send(request)
        logits = self._answer(request, h)
        return self._assemble(request, logits, len(images))

    # -- one request: reserve, send, answer (cvconvert.device.journal keeps the state) ------------------
    def _reserve(self, st, images, a, names) -> _Request:
        """Reserve fools, guard entries, keys and x for the images to send; a request that cannot be sent
        as a whole (a refused image, a blocked pending one) gives everything back before it says so."""
        self._taken_index = np.zeros(0, np.int64)
        self.last["pool_fools"] = 0
        try:  # a screen that fails part-way (pool used up, a bad image) saved no guard entry: give its fools back
            verdict, fools_b, seq = self.guard.screen_and_reserve(
                a, lambda i, accept, burn: self._fools_for(images[i], accept, burn), images=images,
                model=self.features_sha256[:16], parts=self.parts, embed=self._embed,
                mirror_fools=lambda i, sources, windows, ok, final: self._mirror_for(sources, windows, ok, final),
                give_back=self._give_back)
        except BaseException:
            if self.pool is not None and len(self._taken_index):
                self.pool.release(self._taken_index)
            raise
        try:
            self._refusals(verdict)
            resend = self._pending_rows(verdict)
        except CvError:
            self.guard.forget(list(seq) + list(verdict.fool_keys if verdict.fool_keys is not None else []))
            if self.pool is not None and len(self._taken_index):
                self.pool.release(self._taken_index)  # an unsendable request costs no fool
            raise
        send = np.array([act == "send" for act in verdict.action])
        self.last["how"] = [w for w, s in zip(verdict.why, send) if s]  # per image sent: how its fools were found
        self.last["mirrored"] = self.last["how"].count("mirror")
        self.last["why_similar"] = [w for w, a in zip(verdict.why, verdict.action) if a == "similar"]
        req = _Request(verdict, send, resend)
        if send.any():
            req.key = self.new_keys(int(send.sum()))  # one secret key per image; stays on this device
            b = np.stack(fools_b)  # [n, P-1, ...] (every key law takes P-1 fools per image)
            req.x, req.seq = self.combine(a[send], b, req.key), np.asarray(seq, np.int64)
            req.rid = self.journal.record(st, req.x, req.key, req.seq, verdict.fool_keys, self._taken_index,
                                          [n for n, s in zip(names, send) if s])
        return req

    def _pending_rows(self, verdict) -> dict:
        """{guard key: (x, key)} of this request's images whose first transmission was never answered."""
        rows = {}
        for i, (act, ref) in enumerate(zip(verdict.action, verdict.ref)):
            if act != "busy" or ref in rows:
                continue
            hit = self.journal.lookup(ref)
            if hit is None:
                raise CvError(f"image {i} is a near-duplicate of an image sent by a request this device has no "
                              "journal of (sent by an older cvconvert, still running, or interrupted): it is not "
                              "sent again; nothing was sent")
            rid, entry, row = hit
            if entry.get("abandoned", 0):
                raise CvError(f"image {i} is a near-duplicate of an image of request {rid}, given up with "
                              "`cvconvert fools resolve --abandon` (its answer never came and its key is gone): it "
                              "is never sent again, since a fresh key or fool would expose it; nothing was sent")
            rows[ref] = (entry["x"][row], entry["key"][row])
        return rows

    def _send(self, req: _Request) -> np.ndarray:
        """h for the new rows then the pending ones. Nothing left the device: the new reservation is
        released. Outcome unknown: everything stays pending, to be resent as it is."""
        x = req.all_x()
        if not len(x):
            return np.zeros((0,), np.float32)
        try:
            return self.process(x)
        except Exception as exc:
            new = int(req.send.sum())
            if isinstance(exc, NotSent) or not self.remote:
                if req.rid is not None:
                    self.journal.release(req.rid)
                pending = f"; {len(req.resend)} image(s) of an earlier request stay pending" if req.resend else ""
                raise CvError(f"{one_line(exc)}: nothing left this device, {new} fool(s) went back to the pool"
                              f"{pending}; run the command again") from None
            raise CvError(f"{one_line(exc)}: the outcome is unknown, so {len(x)} image(s) stay pending with the x "
                          "and key already sent; run the same command again (or `cvconvert fools resolve`) to "
                          "resend that identical x") from None

    def _answer(self, req: _Request, h: np.ndarray) -> np.ndarray:
        """Check h, decode it with the stored keys, record the answers (a failure to store them is a
        warning: the answer is still returned and the journal keeps the request)."""
        n = len(req.all_x())  # new and resent rows (all_x concatenates them)
        if not n:
            return np.zeros((0, len(self.class_names)), np.float32)
        want = self.sessions["decoder"].get_inputs()[0].shape[1:]
        bad = None
        if all(isinstance(d, int) for d in want) and tuple(h.shape) != (n, *want):
            bad = f"an h of shape {list(h.shape)}, the contract says [{n}, {', '.join(map(str, want))}]"
        elif not np.isfinite(h).all():
            bad = "an h that is not finite (NaN or inf)"
        logits = None if bad else self.decode(h, req.all_keys())
        if logits is not None and not np.isfinite(logits).all():
            bad = "an h whose decoded logits are not finite"
        if bad:
            raise CvError(f"the server answered {bad}: nothing was used or cached; the {n} image(s) stay pending "
                          "with the x and key already sent; fix the server and run the command again")
        try:
            self.journal.commit(dict(zip(req.all_seq(), logits)))
        except CvError as exc:
            self.on_warning(f"{exc}; the answers are shown but not stored: the request stays pending and a "
                            "retry resends the identical x")
        return logits

    def _assemble(self, req: _Request, logits: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros((n, len(self.class_names)), np.float32)
        k = int(req.send.sum())
        out[req.send] = logits[:k]
        row = {s: k + j for j, s in enumerate(req.resend)}
        verdict = req.verdict
        for i, (act, ref, cached) in enumerate(zip(verdict.action, verdict.ref, verdict.logits)):
            if act in ("cached", "similar") and cached is not None:
                out[i] = cached
            elif act == "busy":
                out[i] = logits[row[ref]]
        for i, (act, ref, cached) in enumerate(zip(verdict.action, verdict.ref, verdict.logits)):
            if act == "same" or (act == "similar" and cached is None):  # an image of this request
                out[i] = out[ref]
        self.last.update(sent=k, resent=[i for i, act in enumerate(verdict.action) if act == "busy"],
                         cached=int(n - k), repeats=[i for i, act in enumerate(verdict.action) if act != "send"],
                         similar=[i for i, act in enumerate(verdict.action) if act == "similar"],
                         answered_from=[verdict.ref[i] if act in ("cached", "similar", "same") else None
                                        for i, act in enumerate(verdict.action)])
        return out

    def resolve(self, abandon: bool = False) -> list[dict]:
        """Every pending request of this model: sent again as it is (the same x, decoded with the stored
        key) or, with abandon, given up (its x and key deleted; its images stay blocked). Returns per
        request {"id", "names", "logits" (None when abandoned)}."""
        out = []
        for rec in self.journal.pending():
            if rec["abandoned"]:
                continue
            if abandon:
                self.journal.abandon(rec["id"])
                out.append({"id": rec["id"], "names": rec["names"], "logits": None})
                continue
            entry = self.journal.entries[rec["id"]]
            req = _Request(None, np.zeros(0, bool), {int(s): (x, k) for s, x, k in
                                                     zip(entry["seq"], entry["x"], entry["key"])})
            try:
                h = self.process(req.all_x())
            except Exception as exc:
                raise CvError(f"{one_line(exc)}: request {rec['id']} stays pending; run the command again") from None
            out.append({"id": rec["id"], "names": rec["names"], "logits": self._answer(req, h)})
        return out

    def _embed(self, pictures: np.ndarray) -> np.ndarray:
        """Features of the guard's kept pictures (sent under another model version) under these graphs."""
        from .sketches import unpicture

        return self.features(unpicture(pictures, self.input_shape))

    def _fools_for(self, image: np.ndarray, accept, burn):
        """The P-1 fools of one image to send: never-used pool fools that the guard's screen accepts (burning
        any it must never send), else fresh noise where allowed; None when no pool fool keeps the geometry
        symmetric (the guard then answers from a related earlier image, or refuses)."""
        images = np.repeat(image[None], self.parts - 1, 0)
        if self.pool is None:
            if self.law.private_fools:
                raise CvError(f"this model's key law ({self.law.name}) needs a device-private fool pool (a noise "
                              "fool would show which reading is the image): create one with `cvconvert fools create "
                              "POOL --model-dir DIR IMAGES...` and pass --fool-dir POOL")
            self.last["fools"] = "noise"
            return self.features(np.stack([fallback_fool(im) for im in images]))
        taken = self.pool.take(len(images), images, self.fool_rule, reject=burn, accept=accept)
        self.last.update(fools="pool")
        if taken is None:
            return None
        self.last["pool_fools"] = self.last.get("pool_fools", 0) + len(taken.index)
        self._taken_index = np.concatenate([self._taken_index, taken.index])
        self.last["pool_remaining"] = taken.remaining
        if taken.remaining < low_water(self.pool.meta.get("count", 0)):
            self.on_warning(f"fool pool {self.pool.path} is running low: {taken.remaining} unused fool(s) left; refill "
                            f"it with `cvconvert fools refill {self.pool.path} IMAGES...`")
        return taken

    def _give_back(self, taken) -> None:
        """Pool fools the guard handed out and then answered from an earlier image instead: unused again."""
        index = np.asarray(getattr(taken, "index", []), np.int64)
        if self.pool is not None and len(index):
            self.pool.release(index)
            self._taken_index = self._taken_index[~np.isin(self._taken_index, index)]
            self.last["pool_fools"] = self.last.get("pool_fools", 0) - len(index)

    def _mirror_for(self, sources, windows, ok, final, tries: int = 6):
        """The guard's mirror fools (cvconvert.device.mirror): per source fool (sketch, picture), a pool fool
        in its cosine window, else an affine variant of the source's image; ``final`` judges the whole set.
        Pool fools of a set ``final`` turns down go back. None when no set passes."""
        from .sketches import sketch, unpicture
        from .mirror import Mirrored, derived, pool_choice

        if self.pool is None:
            return None
        originals = self.pool.used_like(np.stack([s for s, _ in sources]))
        for _ in range(tries):
            got = Mirrored()
            for j, ((src, pic), (lo, hi)) in enumerate(zip(sources, windows)):
                taken = self.pool.take_where(pool_choice(src, lo, hi, ok(j)))
                if taken is not None:
                    got.add(taken.images[0], taken.features[0], int(taken.index[0]))
                    continue
                image = originals[j] if originals[j] is not None else \
                    unpicture(pic[None], self.input_shape)[0] if self.input_shape[0] == 1 else None
                made = None if image is None else derived(image, src, lo, hi, self.features, ok(j))
                if made is None:
                    break
                got.add(made[0], made[1], None)  # the variant's features, computed once in derived
            if len(got.images) == len(sources) and final(sketch(np.stack(got.features))):
                self._taken_index = np.concatenate([self._taken_index, np.asarray(got.index, np.int64)])
                self.last["pool_fools"] = self.last.get("pool_fools", 0) + len(got.index)
                return got.done()
            if got.index:
                self.pool.release(got.index)
        return None

    @staticmethod
    def _refusals(verdict) -> None:
        for i, act in enumerate(verdict.action):
            if act == "refuse":
                raise CvError(f"image {i} is a near-duplicate (cosine {verdict.cosine[i]:.4f}) of a fooling image this "
                              "device already sent: sending it would expose both; nothing was sent")
            if act == "tells":
                raise CvError(f"image {i} would be told from its fools: its transmission and an earlier one share a "
                              "direction no unused pool fool can match (a near-duplicate or look-alike of an image "
                              "sent before); nothing was sent")


class _Request:
    """What one predict sends: the new rows (x, key, guard keys, journal id) and pending rows resent."""

    def __init__(self, verdict, send, resend: dict):
        self.verdict, self.send, self.resend = verdict, send, resend
        self.rid, self.x, self.key, self.seq = None, None, None, np.zeros(0, np.int64)

    def all_x(self) -> np.ndarray:
        parts = ([self.x] if self.x is not None else []) + [x[None] for x, _ in self.resend.values()]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0,), np.float32)

    def all_keys(self) -> np.ndarray:
        parts = ([self.key] if self.key is not None else []) + [k[None] for _, k in self.resend.values()]
        return np.concatenate(parts).astype(np.float32)

    def all_seq(self) -> list:
        return [int(s) for s in self.seq] + [int(s) for s in self.resend]
