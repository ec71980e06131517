"""Pool runs of experiments/query_guard.py into the tables of docs/results.md (numpy only).

    .venv/bin/python experiments/query_guard_table.py P R1.json [R2.json ...] [--null K]

Per mode, new device: requests sent per run, answered from a similar image, exact repeats answered, the
plain reading ("u is the image", pooled over the runs, with its standard error) and its better side
max(s, (1 - s)/(P - 1)), and the adaptive reading (cvconvert.attacks.principal.adaptive: a cross-validated
logistic fit on the cloud's own principal cosines, pooled over the runs) beside the old device's. Then the
same pooled over every mode, the transfer reading (fit on one run, as a cloud fits on its own simulation
of the device, read on the other), and the plain reading by band of the best pair's first principal
cosine and by the path the fools were found on. ``--null K``: per mode, the adaptive reading of K label
permutations (a cloud that can learn nothing): its 95th percentile and the share of them at or above the
real reading (a permutation p-value), so that a mode's reading over the target can be told from noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvconvert.attacks.principal import adaptive, fit_predict, reading  # noqa: E402

BANDS = [0, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01]


def stack(cols, key):
    return np.concatenate([np.asarray(c[key]) for c in cols])


def mode_row(m, rows, parts):
    new, old = [r["new"] for r in rows], [r["old"] for r in rows]
    sent = [n["sent"] for n in new]
    p = sum(n["sent"] * n["which_is_real"] for n in new) / sum(sent)
    se = (p * (1 - p) / sum(sent)) ** 0.5
    ad, oad = adaptive(stack(new, "obs"), stack(new, "real").astype(bool), parts), \
        adaptive(stack(old, "obs"), stack(old, "real").astype(bool), parts)
    op = stack(old, "real").mean()
    auc = "-" if ad["adaptive_auc"] is None else f"{ad['adaptive_auc']:.2f}"
    join = lambda k: "+".join(str(n[k]) for n in new)  # noqa: E731
    return (f"| {m} | {join('sent')} of {join('requests')} | {join('similar')} | {join('cached')} | {p:.2f} ({se:.2f}) | "
            f"{max(p, (1 - p) / (parts - 1)):.2f} | {ad['adaptive_real']:.2f} ({auc}) | "
            f"{max(op, (1 - op) / (parts - 1)):.2f} / {oad['adaptive_real']:.2f} |")


def transfer(runs, modes, parts):
    per = [(np.concatenate([np.asarray(r["results"][m]["new"]["obs"]) for m in modes if m in r["results"]]),
            np.concatenate([np.asarray(r["results"][m]["new"]["real"]) for m in modes if m in r["results"]]).astype(bool))
           for r in runs]
    out = []
    for i, (otr, ytr) in enumerate(per):
        for j, (ote, yte) in enumerate(per):
            if i != j:
                got = reading(fit_predict(otr, ytr, ote), yte, parts)
                out.append(f"fit on run {i}, read run {j}: {got:.3f} over {len(yte)}")
    return out


def by_band_and_path(runs):
    """{path: [(n, share naming the image)] per band} over every mode and run (runs with per-transmission
    readings only)."""
    agg = {}
    for r in runs:
        for res in r["results"].values():
            per = (res["new"].get("readings") or {}).get("per")
            if not per:
                continue
            band = np.digitize(np.asarray(res["new"]["obs"])[:, 0], BANDS)
            real, how = np.asarray(res["new"]["real"]), np.asarray(per["how"])
            for h in ("coin", "mirror", "typical", "all"):
                for k in range(1, len(BANDS)):
                    m = (band == k) & ((how == h) if h != "all" else True)
                    a = agg.setdefault(h, np.zeros((len(BANDS) - 1, 2)))
                    a[k - 1] += (m.sum(), real[m].sum())
    return agg


def null(runs, modes, parts, k: int):
    """Prints per mode the adaptive reading, its 95th percentile over k label permutations and the
    permutation p (the reading is refitted here: mode_row formats it, and this stays a separate, opt-in pass)."""
    rng = np.random.default_rng(1)  # public: the permutations are the check's, not the device's
    print(f"\n| mode | adaptive | no-signal null p95 ({k} permutations) | p |\n|---|---|---|---|")
    for m in modes:
        new = [r["results"][m]["new"] for r in runs if m in r["results"]]
        o, y = stack(new, "obs"), stack(new, "real").astype(bool)
        got = adaptive(o, y, parts)["adaptive_real"]
        perm = np.array([adaptive(o, rng.permutation(y), parts, seed=int(rng.integers(1 << 30)))["adaptive_real"]
                         for _ in range(k)])
        print(f"| {m} | {got:.2f} | {np.quantile(perm, 0.95):.2f} | {(perm >= got).mean():.2f} |")


def main() -> int:
    args = sys.argv[1:]
    k = int(args[args.index("--null") + 1]) if "--null" in args else 0
    if k:
        del args[args.index("--null"):args.index("--null") + 2]
    parts, runs = int(args[0]), [json.loads(Path(f).read_text()) for f in args[1:]]
    modes = list(runs[0]["results"])
    print("| mode | sent (per run) | answered from a similar image | exact repeats answered | u is the image "
          "(s.e.) | better side | adaptive (AUC) | old device: better side / adaptive |")
    print("|---|---|---|---|---|---|---|---|")
    for m in modes:
        print(mode_row(m, [r["results"][m] for r in runs if m in r["results"]], parts))
    new = [r["results"][m]["new"] for r in runs for m in modes if m in r["results"]]
    o, y = stack(new, "obs"), stack(new, "real").astype(bool)
    ad = adaptive(o, y, parts)
    print(f"\nevery mode pooled: {len(y)} transmissions, u is the image {y.mean():.3f}, adaptive "
          f"{ad['adaptive_real']:.3f} (AUC {ad['adaptive_auc']:.2f})")
    for line in transfer(runs, modes, parts) if len(runs) > 1 else []:
        print("transfer:", line)
    agg = by_band_and_path(runs)
    if agg:
        print("\n| path | " + " | ".join(f"s0 {BANDS[k]}-{min(BANDS[k + 1], 1.0)}" for k in range(len(BANDS) - 1)) + " |")
        print("|---|" + "---|" * (len(BANDS) - 1))
        for h, a in agg.items():
            print(f"| {h} | " + " | ".join(f"{s / n:.2f} ({int(n)})" if n else "-" for n, s in a) + " |")
    if k:
        null(runs, modes, parts, k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
