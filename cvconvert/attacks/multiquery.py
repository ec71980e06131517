"""The multi-query audit: the cloud keeps every x it receives and compares them.

For each usage mode (``queries.modes``) the victims' transmissions are built twice through the device
runtime, by the old device ("before") and by the shipped one ("after"), and attacked with the span
intersection over all pairs plus the public-set membership test (``span``). Per mode and device the
report gets: the share of images whose feature the attacker holds exactly (|cos| >= 0.999 with the true
feature), what that feature gives it (the image through the audit's inverter, and the device's answer
through the public decoder at the recovered angle), whether it can tell which vector of a pair is the
image, and a verdict.
"""

from __future__ import annotations

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


def split_images(sizes: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Victim images first, the rest as the device's private fools (no one else holds them)."""
    want = max(sizes["requests"], sizes["batch"], sizes["repeat_images"], sizes["near_images"])
    n_v = min(want, len(images) // 3)
    return images[:n_v], images[n_v:]


def measure(model_dir, run, sizes: dict) -> tuple[list, dict]:
    """One row per mode: {"id", "mode", "before": {...}, "after": {...}} (see ``score``), and the setup.
    ``run``: the audit so far (its victims, its public images and features, its trained inverter)."""
    from ..device.pipeline import Pipeline

    pub = run.public
    local = Pipeline.from_model_dir(model_dir, guard=None)
    victims, private = split_images(sizes, run.ev["images"].numpy())
    public = run.tr["images"].numpy()
    fools = {"private": private, "small": private[:sizes["small_pool"]], "large": private[:sizes["large_pool"]],
             "public": public[:sizes["large_pool"]]}
    kit = Kit(local, victims, torch.from_numpy(local.features(victims)), pub.tr["a"], run.inverter)
    rows = []
    for mode in queries.modes(sizes, victims, pub.seed):
        ids = sorted({i for r in mode.requests for i in r[0]})
        before = score(queries.run_before(local, mode, fools, local.fool_rule), ids, kit)
        after = score(queries.run_after(model_dir, local, mode, fools), ids, kit)
        for col in (before, after):
            col["verdict"] = verdict(col, mode.id)
        rows.append({"id": mode.id, "mode": mode.label, "before": before, "after": after})
    setup = {"victims": len(victims), "private_fools": len(private), "public_images": len(public),
             "sizes": sizes, "detect_cosine": span.DETECT, "exact_cosine": span.EXACT,
             "guard_threshold": _guard_threshold(), "fool_rule": local.fool_rule,
             "defense": local.law.name}  # the key law: rotation (the paper's angle) or exchange
    return rows, setup


def _guard_threshold() -> float:
    from ..device.guard import DEFAULT_THRESHOLD
    return DEFAULT_THRESHOLD


class Kit:
    """What scoring needs: the runtime (to decode), the victims' images and true features, the attacker's
    public features (membership test; their mean fixes a recovered vector's sign) and its inverter."""

    def __init__(self, local, victims, truth, public_feats, inverter):
        self.local, self.victims, self.truth, self.public, self.inverter = local, victims, truth, public_feats, inverter
        self.mean = public_feats.reshape(len(public_feats), -1).mean(0).to(torch.float64)


def score(seen: queries.Seen, ids: list, kit: Kit) -> dict:
    out = {"transmissions": len(seen.x), "held_back": seen.held_back, "refused": seen.refused, "images": len(ids),
           "exposed": 0, "share": 0.0, "median_cos": None, "median_cos_all": None, "recon_mae": None,
           "recon_mae_true_key": None,
           "answer_recovered": None, "tell": None}
    if seen.messages:
        out["refusal"] = seen.messages[0]
    if not seen.x:
        return out
    x = torch.from_numpy(np.stack(seen.x))
    rec = span.merge(span.intersect(x), span.members(x, kit.public))
    best, idx = span.best_match(rec, kit.truth[ids])
    exposed = best >= span.EXACT
    out.update(exposed=int(exposed.sum()), share=float(exposed.float().mean()), median_cos_all=float(best.median()),
               median_cos=float(best[exposed].median()) if exposed.any() else None, tell=tell(rec, seen, kit.truth))
    if exposed.any():
        out.update(readback(rec, [i for i, e in zip(ids, exposed) if e], idx[exposed], seen, x, kit))
    out.update(principal_attack(seen, x, kit))
    return out


def principal_attack(seen: queries.Seen, x: torch.Tensor, kit: Kit) -> dict:
    """The cross-transmission attack on related transmissions (P = 2): each transmission's best partner, its
    first principal vector u; which-is-real (u nearer the image than the fool, chance 0.5), the inverter on
    u at true scale, and the public decoder's top-1 at u's angle against the device's answer."""
    from .principal import angle_from, principal, which_is_real

    if len(seen.x) < 2 or x.shape[1] != 2 or len(seen.pixels) != len(seen.x):
        return {"principal_real": None, "principal_recon_mae": None, "principal_answer": None}
    xs = x.numpy()
    _, _, u = principal(xs)
    pixels = np.stack(seen.pixels)
    a = kit.local.features(pixels).reshape(len(xs), -1).astype(np.float64)
    re, im = (xs[:, k].reshape(len(xs), -1).astype(np.float64) for k in (0, 1))
    cs = np.stack([np.linalg.lstsq(np.stack([r, i], 1), v, rcond=None)[0] for r, i, v in zip(re, im, a)])
    cs /= np.linalg.norm(cs, axis=1, keepdims=True)
    b = -cs[:, 1:] * re + cs[:, :1] * im  # the fool's direction: x = e^{i t}(a + i s b)
    real = which_is_real(u, a, b[:, None])
    mean = kit.mean.numpy()
    theta = angle_from(u, xs, mean)
    shared = np.cos(theta)[:, None] * re + np.sin(theta)[:, None] * im  # u read as the image, at true scale
    rec = kit.inverter.reconstruct(torch.from_numpy(shared.astype(np.float32)).reshape(len(xs), *kit.truth.shape[1:]))
    mae = float((rec.clamp(0, 1) - torch.from_numpy(pixels)).abs().mean())
    guess = kit.local.decode(kit.local.process(xs), rotation_key_np(theta)).argmax(1)
    answer = float((guess == np.stack(seen.answers).argmax(1)).mean())
    return {"principal_real": float(real.mean()), "principal_recon_mae": mae, "principal_answer": answer}


def tell(rec: span.Recovery, seen: queries.Seen, truth: torch.Tensor) -> float | None:
    """How often the rule "the vector that recurs (in another transmission, or in public data) is the fool,
    the other is the image" names the real image, over transmissions with a recovered pair: 1 = a sure
    tell, 0.5 = a coin (both or neither recur), 0 = the rule is backwards (the image is what recurs)."""
    if not len(rec):
        return None
    recurs = span.recurring(rec, span.DETECT)  # the tolerance the pairs were found with
    v = rec.vectors / rec.vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    scores = []
    for t in torch.unique(rec.owner).tolist():
        mine = torch.nonzero(rec.owner == t).squeeze(1)
        top = mine[rec.cosine[mine].argmax()]                      # the best reading of this transmission
        pair = mine[rec.read[mine] == rec.read[top]]
        shared, other = (pair[rec.role[pair] == r][0] for r in (0, 1))
        a = truth[seen.ids[t]].reshape(-1).to(torch.float64)
        a = a / a.norm()
        if bool(recurs[shared]) == bool(recurs[other]):
            scores.append(0.5)
            continue
        guess = other if recurs[shared] else shared
        scores.append(float(abs(float(v[guess] @ a)) >= span.EXACT))
    return float(np.mean(scores))


def readback(rec: span.Recovery, ids: list, idx: torch.Tensor, seen: queries.Seen, x: torch.Tensor, kit: Kit) -> dict:
    """For the exposed images: their recovered features, sign fixed by the public features' mean (no
    truth needed), through the inverter (mean abs pixel error, beside the true key's), and the device's
    answer read with the public decoder at the angle the feature gives in a transmission that carries it."""
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
        xs = x[t].numpy()
        guess = kit.local.decode(kit.local.process(xs), rotation_key_np(theta)).argmax(1)
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
