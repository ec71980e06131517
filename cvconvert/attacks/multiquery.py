"""The multi-query audit: the cloud keeps every x it receives and compares them.

For each usage mode (``queries.modes``) the victims' transmissions are built twice through the device
runtime, by the old device ("before") and by the shipped one ("after"), and attacked with the span
intersection over all pairs plus the public-set membership test (``span``). Per mode and device the
report gets: the share of images whose feature the attacker holds exactly (|cos| >= 0.999 with the true
feature), what that feature gives it (the image through the audit's inverter, and the device's answer
through the public decoder at the recovered angle), whether it can tell which vector of a pair is the
image, and a verdict. The modes a device meets over time (a skewed stream, a second pool of the same
photos, a second model version: ``queries.later_modes``) are scored the same way; under two model versions
the cloud's attack runs over both versions' transmissions together (see ``score``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..device.keylaws import rotation_key_np
from . import queries, span


def skipped(model_dir) -> str | None:
    """Why the multi-query audit cannot run (None when it can)."""
    if not (Path(model_dir) / "onnx" / "encoder.onnx").is_file():
        return (f"{model_dir} has no exported graphs: run `cvconvert export {model_dir}` and audit again (the "
                "multi-query audit builds the victims' transmissions with the device runtime)")
    return None


def split_images(sizes: dict, images: np.ndarray, labels: np.ndarray | None = None, classes=()):
    """Victim images first, the rest as the device's private fools (no one else holds them). With `labels`,
    victims of `classes` are added from the rest until the skewed stream has its size (at most a quarter
    of the rest), so the fools stay of every class. Returns (victims, private, the victims' labels)."""
    want = max(sizes["requests"], sizes["batch"], sizes["repeat_images"], sizes["near_images"],
               2 * sizes.get("second_images", 0))
    n_v = min(want, len(images) // 3)
    idx = list(range(n_v))
    if labels is not None:
        labels = np.asarray(labels)
        have = int(np.isin(labels[:n_v], list(classes)).sum())
        more = max(0, min(sizes.get("skewed", sizes["requests"]) - have, (len(images) - n_v) // 4))
        idx += [int(j) for j in np.flatnonzero(np.isin(labels, list(classes))) if j >= n_v][:more]
    rest = np.setdiff1d(np.arange(len(images)), idx)
    return images[idx], images[rest], None if labels is None else labels[idx]


def measure(model_dir, run, sizes: dict) -> tuple[list, dict]:
    """One row per mode: {"id", "mode", "before": {...}, "after": {...}} (see ``score``), and the setup.
    ``run``: the audit so far (its victims, its public images and features, its trained inverter)."""
    import tempfile

    from ..device.pipeline import Pipeline

    pub = run.public
    local = Pipeline.from_model_dir(model_dir, guard=None)
    classes = queries.skewed_classes(local.class_names)
    targets = run.ev["targets"].numpy()
    victims, private, labels = split_images(sizes, run.ev["images"].numpy(), targets if targets.ndim == 1 else None,
                                            classes)  # labels of one class per image: the skewed stream
    public = run.tr["images"].numpy()
    fools = {"private": private, "small": private[:sizes["small_pool"]], "large": private[:sizes["large_pool"]],
             "public": public[:sizes["large_pool"]]}
    kit = Kit(local, victims, torch.from_numpy(local.features(victims)), pub.tr["a"], run.inverter)
    all_modes = queries.modes(sizes, victims, pub.seed, labels, classes, local.class_names)
    rows, dirs, setup = [], [Path(model_dir)], {}
    with tempfile.TemporaryDirectory(prefix="cvconvert-mq-version-") as tmp:
        if max(m.versions for m in all_modes) > 1:
            setup["second_version"] = _second(model_dir, Path(tmp) / "v2", kit, public, dirs)
        for mode in all_modes:
            t0 = time.time()
            ids = sorted({i for r in mode.requests for i in r[0]})
            runtimes = kit.runtimes[:mode.versions]
            before = score(queries.run_before(runtimes, mode, fools, local.fool_rule), ids, kit)
            after = score(queries.run_after(dirs[:mode.versions], runtimes, mode, fools), ids, kit)
            for col in (before, after):
                col["verdict"] = verdict(col, mode.id)
            rows.append({"id": mode.id, "mode": mode.label, "before": before, "after": after,
                         "wall_s": round(time.time() - t0, 2)})
    setup.update({"victims": len(victims), "private_fools": len(private), "public_images": len(public),
                  "sizes": sizes, "detect_cosine": span.DETECT, "exact_cosine": span.EXACT,
                  "guard_threshold": _guard_threshold(), "fool_rule": local.fool_rule,
                  "skewed_classes": [str(local.class_names[c]) for c in classes],
                  "defense": local.law.name})  # the key law: rotation (the paper's angle) or exchange
    return rows, setup


def _second(model_dir, out: Path, kit: "Kit", public: np.ndarray, dirs: list) -> dict:
    """Build the second model version, add it to `kit` and `dirs`; what it is, for the setup."""
    from ..device.pipeline import Pipeline
    from .versions import SCALE, second_version

    dirs.append(second_version(model_dir, out, seed=0))
    runtime = Pipeline.from_model_dir(out, guard=None)
    kit.add_version(runtime, public)
    a, b = (t.reshape(len(t), -1).to(torch.float64) for t in kit.truths)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return {"perturbation": SCALE, "features_sha256": runtime.features_sha256,
            "median_cos_features": float(cos.median()), "min_cos_features": float(cos.min())}


def _guard_threshold() -> float:
    from ..device.guard import DEFAULT_THRESHOLD
    return DEFAULT_THRESHOLD


class Kit:
    """What scoring needs: the runtime (to decode), the victims' images and true features, the attacker's
    public features (membership test; their mean fixes a recovered vector's sign) and its inverter (trained
    on the audited model's features). Per model version (``add_version``): its runtime, the victims' true
    features and the public features under it."""

    def __init__(self, local, victims, truth, public_feats, inverter):
        self.local, self.victims, self.truth, self.public, self.inverter = local, victims, truth, public_feats, inverter
        self.mean = public_feats.reshape(len(public_feats), -1).mean(0).to(torch.float64)
        self.runtimes, self.truths, self.publics = [local], [truth], [public_feats]

    def add_version(self, runtime, public_images: np.ndarray) -> None:
        self.runtimes.append(runtime)
        self.truths.append(torch.from_numpy(runtime.features(self.victims)))
        self.publics.append(torch.from_numpy(runtime.features(public_images)))


def _versions(seen: queries.Seen) -> np.ndarray:
    return np.asarray(seen.version, np.int64) if len(seen.version) == len(seen.x) else np.zeros(len(seen.x), np.int64)


def _recover(x: torch.Tensor, kit: Kit, versions) -> span.Recovery:
    """The cloud's attack on everything it holds: the span intersection over all pairs (across model
    versions too), and every public feature it can compute, under each version, against every span."""
    return span.merge(span.intersect(x), *(span.members(x, kit.publics[v]) for v in versions))


def _best(rec: span.Recovery, kit: Kit, ids: list, versions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the best |cos| of a recovered vector with its true feature under any of `versions`."""
    best, idx = span.best_match(rec, kit.truths[versions[0]][ids])
    for v in versions[1:]:
        b, i = span.best_match(rec, kit.truths[v][ids])
        idx, best = torch.where(b > best, i, idx), torch.maximum(best, b)
    return best, idx


def score(seen: queries.Seen, ids: list, kit: Kit) -> dict:
    """Everything the cloud received, attacked together. Under several model versions an image counts as
    exposed when a recovered vector lies within span.EXACT of its true feature under any version (the
    cloud holds both versions' graphs); ``by_version`` gives the same within each version's transmissions
    alone. ``repeats``: transmissions whose span holds (to span.EXACT) the feature, under their own version,
    of an image an earlier transmission carried, whatever the attack finds."""
    out = {"transmissions": len(seen.x), "held_back": seen.held_back, "refused": seen.refused, "images": len(ids),
           "exposed": 0, "share": 0.0, "median_cos": None, "median_cos_all": None, "recon_mae": None,
           "recon_mae_true_key": None, "repeats": 0,
           "answer_recovered": None, "tell": None}
    if seen.messages:
        out["refusal"] = seen.messages[0]
    if not seen.x:
        return out
    x = torch.from_numpy(np.stack(seen.x))
    ver = _versions(seen)
    present = sorted(set(ver.tolist()))
    rec = _recover(x, kit, present)
    best, idx = _best(rec, kit, ids, present)
    exposed = best >= span.EXACT
    out.update(exposed=int(exposed.sum()), share=float(exposed.float().mean()), median_cos_all=float(best.median()),
               median_cos=float(best[exposed].median()) if exposed.any() else None, tell=tell(rec, seen, kit),
               repeats=repeats(x, seen, kit))
    if exposed.any():
        out.update(readback(rec, [i for i, e in zip(ids, exposed) if e], idx[exposed], seen, x, kit))
    out.update(principal_attack(seen, x, kit))
    if len(present) > 1:
        out["by_version"] = [_within(x, seen, kit, v) for v in present]
    return out


def _within(x: torch.Tensor, seen: queries.Seen, kit: Kit, v: int) -> dict:
    """Exact exposure among the transmissions of model version `v` alone, against its own true features."""
    mine = torch.from_numpy(_versions(seen) == v)
    ids = sorted({i for i, m in zip(seen.ids, mine.tolist()) if m})
    best, _ = _best(_recover(x[mine], kit, [v]), kit, ids, [v])
    exposed = int((best >= span.EXACT).sum())
    return {"version": v, "transmissions": int(mine.sum()), "images": len(ids), "exposed": exposed}


def repeats(x: torch.Tensor, seen: queries.Seen, kit: Kit) -> int:
    """How many transmissions' spans hold, to |cos| >= span.EXACT, the feature (computed under the
    transmission's model version) of an image that an earlier transmission carried: the device sent that
    image again, whether as an image or as a fool, under whatever pool or version."""
    if len(seen.pixels) != len(seen.x) or len(seen.x) < 2:
        return 0
    q = span.bases(x)                                                      # [T, D, P]
    ver, pixels = _versions(seen), np.stack(seen.pixels)
    hit = np.zeros(len(q), dtype=bool)
    for v in sorted(set(ver.tolist())):
        a = torch.from_numpy(kit.runtimes[v].features(pixels)).reshape(len(q), -1).to(torch.float64)
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
        mine = np.flatnonzero(ver == v)
        cos = torch.einsum("tdp,sd->tsp", q[mine], a).norm(dim=2)          # [T_v, T]
        earlier = torch.arange(len(q))[None, :] < torch.from_numpy(mine)[:, None]
        hit[mine] = ((cos >= span.EXACT) & earlier).any(1).numpy()
    return int(hit.sum())


def principal_attack(seen: queries.Seen, x: torch.Tensor, kit: Kit) -> dict:
    """The cross-transmission attack on related transmissions (P = 2): each transmission's best partner, its
    first principal vector u; which-is-real (u nearer the image than the fool, chance 0.5), the inverter on
    u at true scale, the public decoder's top-1 at u's angle against the device's answer, and the adaptive
    reading (principal.adaptive: when to believe u, learned from what the cloud computes). Under several
    model versions the pairs run across versions (the cloud holds every x); the truth, the decoder and the
    angle's sign are each transmission's own version's; the inverter is the one trained on the audited model."""
    from .principal import adaptive, angle_from, observables, principal, which_is_real

    if len(seen.x) < 2 or x.shape[1] != 2 or len(seen.pixels) != len(seen.x):
        return {"principal_real": None, "principal_recon_mae": None, "principal_answer": None,
                "principal_adaptive": None}
    xs, ver = x.numpy(), _versions(seen)
    _, _, u = principal(xs)
    pixels = np.stack(seen.pixels)
    a = np.zeros((len(xs), int(np.prod(xs.shape[2:]))))
    theta, guess = np.zeros(len(xs), np.float32), np.zeros(len(xs), np.int64)
    re, im = (xs[:, k].reshape(len(xs), -1).astype(np.float64) for k in (0, 1))
    for v in sorted(set(ver.tolist())):
        m = ver == v
        rt = kit.runtimes[v]
        a[m] = rt.features(pixels[m]).reshape(int(m.sum()), -1)
        mean = kit.publics[v].reshape(len(kit.publics[v]), -1).mean(0).to(torch.float64).numpy()
        theta[m] = angle_from(u[m], xs[m], mean)
        guess[m] = rt.decode(rt.process(xs[m]), rotation_key_np(theta[m])).argmax(1)
    cs = np.stack([np.linalg.lstsq(np.stack([r, i], 1), v, rcond=None)[0] for r, i, v in zip(re, im, a)])
    cs /= np.linalg.norm(cs, axis=1, keepdims=True)
    b = -cs[:, 1:] * re + cs[:, :1] * im  # the fool's direction: x = e^{i t}(a + i s b)
    real = which_is_real(u, a, b[:, None])
    shared = np.cos(theta)[:, None] * re + np.sin(theta)[:, None] * im  # u read as the image, at true scale
    rec = kit.inverter.reconstruct(torch.from_numpy(shared.astype(np.float32)).reshape(len(xs), *kit.truth.shape[1:]))
    mae = float((rec.clamp(0, 1) - torch.from_numpy(pixels)).abs().mean())
    answer = float((guess == np.stack(seen.answers).argmax(1)).mean())
    learned = adaptive(observables(xs), real, 2)["adaptive_real"]  # a cloud that learns when to believe u
    return {"principal_real": float(real.mean()), "principal_recon_mae": mae, "principal_answer": answer,
            "principal_adaptive": learned}


def tell(rec: span.Recovery, seen: queries.Seen, kit: Kit) -> float | None:
    """How often the rule "the vector that recurs (in another transmission, or in public data) is the fool,
    the other is the image" names the real image, over transmissions with a recovered pair: 1 = a sure
    tell, 0.5 = a coin (both or neither recur), 0 = the rule is backwards (the image is what recurs). The
    image's truth is its feature under the transmission's model version."""
    if not len(rec):
        return None
    recurs = span.recurring(rec, span.DETECT)  # the tolerance the pairs were found with
    v = rec.vectors / rec.vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    ver = _versions(seen)
    scores = []
    for t in torch.unique(rec.owner).tolist():
        mine = torch.nonzero(rec.owner == t).squeeze(1)
        top = mine[rec.cosine[mine].argmax()]                      # the best reading of this transmission
        pair = mine[rec.read[mine] == rec.read[top]]
        shared, other = (pair[rec.role[pair] == r][0] for r in (0, 1))
        a = kit.truths[ver[t]][seen.ids[t]].reshape(-1).to(torch.float64)
        a = a / a.norm()
        if bool(recurs[shared]) == bool(recurs[other]):
            scores.append(0.5)
            continue
        guess = other if recurs[shared] else shared
        scores.append(float(abs(float(v[guess] @ a)) >= span.EXACT))
    return float(np.mean(scores))


def readback(rec: span.Recovery, ids: list, idx: torch.Tensor, seen: queries.Seen, x: torch.Tensor, kit: Kit) -> dict:
    """For the exposed images: their recovered features, sign fixed by the public features' mean (no
    truth needed), through the inverter (mean abs pixel error, beside the true key's: the audited model's
    true feature), and the device's answer read with the public decoder (of the carrying transmission's
    model version) at the angle the feature gives in a transmission that carries it."""
    vec = rec.vectors[idx]
    vec = vec * torch.where(vec @ kit.mean >= 0, 1.0, -1.0).to(vec.dtype)[:, None]
    shape = kit.truth.shape[1:]
    a_hat = vec.to(torch.float32).reshape(len(vec), *shape)
    images = torch.from_numpy(kit.victims[ids])
    mae = lambda f: float((kit.inverter.reconstruct(f).clamp(0, 1) - images).abs().mean())  # noqa: E731
    out = {"recon_mae": mae(a_hat), "recon_mae_true_key": mae(kit.truth[ids])}
    carrier = [seen.ids.index(i) if i in seen.ids else -1 for i in ids]
    keep = [j for j, t in enumerate(carrier) if t >= 0]
    if keep:
        t = torch.tensor([carrier[j] for j in keep])
        re, im = (x[t, k].reshape(len(t), -1).to(torch.float64) for k in (0, 1))
        coef = torch.linalg.lstsq(torch.stack((re, im), 2), vec[keep].unsqueeze(2)).solution.squeeze(2)
        theta = torch.atan2(coef[:, 1], coef[:, 0]).to(torch.float32).numpy()
        xs, ver = x[t].numpy(), _versions(seen)[t.numpy()]
        guess = np.zeros(len(t), np.int64)
        for v in sorted(set(ver.tolist())):
            rt, m = kit.runtimes[v], ver == v
            guess[m] = rt.decode(rt.process(xs[m]), rotation_key_np(theta[m])).argmax(1)
        truth = np.stack([seen.answers[int(i)] for i in t]).argmax(1)
        out["answer_recovered"] = float((guess == truth).mean())
    return out


def verdict(col: dict, mode_id: str) -> str:
    k, n = col["exposed"], col["images"]
    if k:
        why = " (by design: a fool from public data is found by membership; fools must be private)" \
            if mode_id == "public_fool" else ""
        return f"LEAKS: {k} of {n} images exposed exactly{why}"
    extra = []
    if col["held_back"]:
        extra.append(f"{col['held_back']} near-duplicate(s) answered on the device")
    if col["refused"]:
        extra.append(f"{col['refused']} request(s) refused")
    return "holds: no image exposed exactly" + (f" ({'; '.join(extra)})" if extra else "")
