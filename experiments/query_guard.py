"""The multi-query modes of issue 19, old device vs new, through `Pipeline.predict` with a recording cloud.

    .venv/bin/python experiments/query_guard.py /tmp/q/lenet --second /tmp/q/lenet2 --n 30 --out r.json

Modes: distinct images (the cost), one-pixel shift, 1-px crop, 3-degree rotation, JPEG 70, look-alikes (the
nearest other test image), a skewed stream (footwear only, pool of all classes), a second pool from the same
photos, a re-export (a second model version, --second). Old device: pool fools used once, the exact-repeat
guard, a memory per pool (floor 1: no geometric screen). New: the shipped guard in one state folder.
Per mode and device: share of requests sent, which-is-real of the principal vector of each transmission's
best pair (chance 1/P), |cos(u, a)|, images exposed exactly, the public decoder's top-1 at u's angle vs the
device's answer, answers from another image, refusals, pool fools per image. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvconvert.attacks.principal import adaptive, angle_from, observables, principal, which_is_real  # noqa: E402
from cvconvert.attacks.queries import NEAR, lookalikes  # noqa: E402
from cvconvert.device.fools import FoolPool  # noqa: E402
from cvconvert.device.keylaws import rotation_key_np  # noqa: E402
from cvconvert.device.guard import SentGuard  # noqa: E402
from cvconvert.device.pipeline import Pipeline  # noqa: E402
from cvconvert.errors import CvError  # noqa: E402
from guard_threshold import FMNIST, test_images  # noqa: E402


def labels() -> np.ndarray:
    import gzip
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


class Cloud:
    """Records every x, and (for scoring only) the a and b the device combined, and the answers."""

    def __init__(self):
        self.x, self.a, self.b, self.ans = [], [], [], []

    def attach(self, pipe):
        real_combine, real_decode = pipe.combine, pipe.decode

        def combine(a, b, theta):
            x = real_combine(a, b, theta)
            self.x.append(x), self.a.append(a), self.b.append(b if b.ndim == a.ndim + 1 else b[:, None])
            return x

        def decode(h, theta=None):
            out = real_decode(h, theta)
            if theta is not None and len(self.ans) < len(self.x):
                self.ans.append(out)
            return out
        pipe.combine, pipe.decode = combine, decode
        return pipe


GUARD = {}


def device(model, pool_dir, state, new: bool, cloud):
    # the old device: a memory per pool (a state folder of its own next to each pool), no geometric screen
    old_state = Path(str(pool_dir) + "-state")
    guard = SentGuard(Path(state) / "guard.npz", **GUARD) if new else SentGuard(old_state / "guard.npz", floor=1.0)
    pipe = Pipeline.from_model_dir(model, pool=FoolPool.open(pool_dir), guard=guard)
    pipe.on_warning = lambda m: None
    return cloud.attach(pipe)


def make_pool(model, path, pics):
    probe = Pipeline.from_model_dir(model, guard=None)
    f = probe.features(pics)
    FoolPool.create(path, pics, f, features_sha256=probe.features_sha256, input_shape=probe.input_shape,
                    feature_shape=f.shape[1:])
    return path


def run(stages, new: bool, tmp: Path, photos, cloud, answers: list | None = None) -> dict:
    """stages: [(model dir, pool name, [request images])]; a pool name seen before is reused. answers: if
    given, gets (top-1 class or -1, how: sent / similar / cached / refused) per request."""
    cost = {"requests": 0, "sent": 0, "similar": 0, "cached": 0, "refused": 0, "pool_fools": 0, "mirrored": 0}
    answers = [] if answers is None else answers
    pools = {}
    for model, name, reqs in stages:
        key = (str(model), name)
        if key not in pools:
            pools[key] = make_pool(model, tmp / f"pool-{len(pools)}", photos)
            pipe = device(model, pools[key], tmp / "state", new, cloud)
        for img in reqs:
            cost["requests"] += 1
            try:
                logits = pipe.predict(img[None])
            except CvError:
                cost["refused"] += 1
                answers.append((-1, "refused"))
                continue
            how = "sent" if pipe.last["sent"] else "similar" if pipe.last.get("similar") else "cached"
            answers.append((int(logits[0].argmax()), how))
            cost["sent"] += pipe.last["sent"]
            cost["similar"] += len(pipe.last.get("similar", []))
            cost["cached"] += pipe.last["cached"] - len(pipe.last.get("similar", []))
            cost["pool_fools"] += pipe.last.get("pool_fools", 0)
            cost["mirrored"] += pipe.last.get("mirrored", 0)
            cost.setdefault("how", []).extend(pipe.last.get("how", []))
            for w in pipe.last.get("why_similar", []):
                key = "similar_" + w.replace(" ", "_")
                cost[key] = cost.get(key, 0) + 1
    return cost


def readings(cloud, guard_file: Path, how: list) -> dict:
    """Where the cloud's exact reading and the device's own part: per transmission, the coin the guard
    recorded, the vector its best pair names in the guard's sketches now, and in the exact features now;
    which-is-real by how the fools were found and by the final best pair's level."""
    from cvconvert.device.screen import DEFAULT_FLOOR, History

    state = SentGuard(guard_file)._load()
    if len(np.unique(state["group"])) != len(cloud.x) or len(how) != len(cloud.x):
        return {}
    a, b = np.concatenate(cloud.a), np.concatenate(cloud.b)
    t = len(a)
    exact = np.concatenate([a.reshape(t, 1, -1), b.reshape(t, b.shape[1], -1)], 1)
    groups = np.repeat(np.arange(t), exact.shape[1])
    ex = History(exact.reshape(len(groups), -1), groups)
    order = np.argsort(state["group"], kind="stable")
    sk = History(state["sketch"][order].astype(np.float32), state["group"][order])
    first = np.arange(0, len(groups), exact.shape[1])
    named_ex, named_sk, coin = ex.top[first], sk.top[first], state["top"][order][first]
    level = ex.best_of_group()
    how = np.asarray(how)

    def partners(h):
        out = []
        for j in range(len(h.ids)):
            s0 = h._pairs(h.q[j])[0]
            s0[j] = -1
            out.append(int(np.argmax(s0)))
        return np.array(out)
    same = partners(ex) == partners(sk)
    agree = (ex.top == sk.top).reshape(t, -1).all(1)
    out = {"coin_image": float(coin.mean()), "sketch_image": float(named_sk.mean()), "exact_image": float(named_ex.mean()),
           "exact_vs_sketch": float((ex.top == sk.top).reshape(t, -1).all(1).mean()),
           "exact_vs_coin": float((ex.top == state["top"][order]).reshape(t, -1).all(1).mean()),
           "same_partner": float(same.mean()), "agree_same_partner": float(agree[same].mean()) if same.any() else None,
           "agree_other_partner": float(agree[~same].mean()) if (~same).any() else None}
    for h in ("coin", "mirror", "typical"):
        m = how == h
        out[f"n_{h}"] = int(m.sum())
        if m.any():
            out[f"exact_image_{h}"] = float(named_ex[m].mean())
            out[f"coin_image_{h}"] = float(coin[m].mean())
    out["per"] = {"how": how.tolist(), "coin": coin.astype(int).tolist(), "named": named_ex.astype(int).tolist(),
                  "level": level.round(4).tolist()}  # per transmission, for the tables' pooling
    for name, m in (("below_floor", level < DEFAULT_FLOOR), ("above_floor", level >= DEFAULT_FLOOR)):
        out[f"n_{name}"] = int(m.sum())
        if m.any():
            out[f"exact_image_{name}"] = float(named_ex[m].mean())
    return out


def accuracy(answers, truth) -> dict:
    """Top-1 against the labels: of the images sent, of those answered from a similar earlier image, of those
    answered as exact repeats, and of all requests (a refusal counts as wrong there; also without them)."""
    pred = np.array([p for p, _ in answers])
    how = np.array([h for _, h in answers])
    right = pred == np.asarray(truth)[:len(pred)]
    out = {}
    for k in ("sent", "similar", "cached"):
        m = how == k
        out[f"acc_{k}"] = float(right[m].mean()) if m.any() else None
        out[f"n_{k}"] = int(m.sum())
    out["acc_all"] = float(right.mean())
    out["acc_answered"] = float(right[how != "refused"].mean()) if (how != "refused").any() else None
    return out


def score(cloud, pipe, mean) -> dict:
    if len(cloud.x) < 2:
        return {"which_is_real": None, "u_cos": None, "exposed": 0, "answer_recovered": None}
    x, a, b = (np.concatenate(v) for v in (cloud.x, cloud.a, cloud.b))
    flat = lambda v: v.reshape(len(v), *([v.shape[1]] if v.ndim == a.ndim + 1 else []), -1)  # noqa: E731
    _, s0, u = principal(x)
    real = which_is_real(u, flat(a), flat(b))
    ua = np.abs((u * (flat(a) / np.linalg.norm(flat(a), axis=1, keepdims=True))).sum(1))
    fb = flat(b)
    fb = fb.reshape(len(fb), -1, fb.shape[-1])  # [n, P-1, K]
    ub = np.abs(np.einsum("nk,npk->np", u, fb / np.linalg.norm(fb, axis=2, keepdims=True))).max(1)
    parts = x.shape[1]
    # the cloud may read the named vector as a fool when that is right more often: then it guesses among
    # the other P - 1
    best = max(float(real.mean()), (1 - float(real.mean())) / (parts - 1))
    out = {"which_is_real": float(real.mean()), "best_reading": best, "u_cos": float(np.median(ua)),
           "s0": float(np.median(s0)),
           "exposed": int((ua >= 0.999).sum()), "fool_as_close": int((ub >= 0.999).sum())}
    obs = observables(x)  # the adaptive cloud: learns from these when u is the image (pooled in the tables)
    out.update(adaptive(obs, real, parts))
    out["obs"], out["real"] = obs.round(4).tolist(), real.astype(int).tolist()
    if x.shape[1] == 2:
        theta = angle_from(u, x, mean)
        guess = pipe.decode(pipe.process(x), rotation_key_np(theta)).argmax(1)
        out["answer_recovered"] = float((guess == np.concatenate(cloud.ans).argmax(1)).mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--second", type=Path, help="a second version of the model (re-export mode)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--pool", type=int, default=400)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--floor", type=float)
    ap.add_argument("--margin", type=float)
    ap.add_argument("--quantile", type=float)
    ap.add_argument("--modes", help="comma-separated subset")
    args = ap.parse_args()
    GUARD.update({k: v for k, v in (("floor", args.floor), ("margin", args.margin), ("quantile", args.quantile)) if v is not None})
    imgs, labs = test_images(), labels()
    n, m = args.n, args.model_dir
    victims = imgs[:n]
    photos = imgs[5000:5000 + args.pool]
    look = imgs[lookalikes(victims, imgs[:5000])]
    foot = imgs[1000:5000][np.isin(labs[1000:5000], [5, 7, 9])][:2 * n]
    modes = {"distinct": [(m, "A", list(imgs[1000:1000 + 3 * n]))]}
    truth = {"distinct": labs[1000:1000 + 3 * n]}  # accuracy is reported for the modes with labels here
    for key, (label, f) in NEAR.items():
        modes[key] = [(m, "A", [r for v in victims for r in (v, f(v))])]
    modes["lookalike"] = [(m, "A", [r for v, w in zip(victims, look) for r in (v, w)])]
    modes["skewed"] = [(m, "A", list(foot))]
    modes["second_pool"] = [(m, "A", list(victims)), (m, "B", list(victims))]
    if args.second:
        modes["reexport"] = [(m, "A", list(victims)), (args.second, "A", list(victims))]
    if args.modes:
        modes = {k: v for k, v in modes.items() if k in args.modes.split(",")}
    probe = Pipeline.from_model_dir(m, guard=None)
    mean = probe.features(imgs[9000:9500]).reshape(500, -1).mean(0).astype(np.float64)
    results = {}
    for name, stages in modes.items():
        results[name], got = {}, {}
        for new in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["CVCONVERT_STATE_DIR"] = str(Path(tmp) / "state")
                cloud, answers = Cloud(), []
                cost = run(stages, new, Path(tmp), photos, cloud, answers)
                how = cost.pop("how", [])
                res = {**cost, **score(cloud, probe, mean)}
                if new and name != "reexport":
                    res["readings"] = readings(cloud, Path(tmp) / "state" / "guard.npz", how)
                if name in truth:
                    res.update(accuracy(answers, truth[name]))
                    got[new] = answers
            if new and name in truth:  # the same images as the old device (all sent) answered them
                (po, ho), (pn, hn) = (np.array([list(t) for t in got[k]], object).T for k in (False, True))
                y, sim = np.asarray(truth[name])[:len(pn)], hn == "similar"
                res["old_acc_on_similar"] = float((po[sim] == y[sim]).mean()) if sim.any() else None
                res["similar_agrees_old"] = float((pn[sim] == po[sim]).mean()) if sim.any() else None
            results[name]["new" if new else "old"] = res
            print(name, "new" if new else "old", json.dumps({k: v for k, v in res.items() if k not in ("obs", "real")}),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({"n": n, "pool": args.pool, "guard": GUARD, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
