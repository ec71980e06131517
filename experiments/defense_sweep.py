"""Sweep the phase-hiding defense's weight on LeNet / Fashion-MNIST and plot the privacy-utility curve.

    .venv/bin/python experiments/defense_sweep.py --out experiments/results            # everything
    .venv/bin/python experiments/defense_sweep.py --out experiments/results --only original,complex
    .venv/bin/python experiments/defense_sweep.py --out experiments/results --plot-only

Every variant is converted fresh (`cvconvert.build.convert_to_dir`, the same seed), trained by the same
loop (experiments/defense_lib.train_dir) on the same subset, then attacked by attackers trained after
the fact (experiments/defense_lib.evaluate). Results accumulate in OUT/defense_sweep.json (a variant
already there is skipped unless --redo), the plot goes to OUT/defense_sweep.png and a markdown table to
OUT/defense_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import defense_lib as L  # noqa: E402

# name -> (convert kwargs, train kwargs)
VARIANTS = {
    "original": ({"variant": "original"}, {}),
    "complex": ({}, {}),
    "paper-wgan": ({}, {"paper_gan": 0.1}),
    "exchange": ({}, {"defense": "exchange"}),
    # exchange with far fools: training fool = the batch image farthest from the image (L1 over pixels);
    # victim and attackers at evaluation: the farthest of a pool of 64 (experiments/results/farfool.md)
    "exchange-far": ({}, {"defense": "exchange", "fool_rule": "far"}),
    # a milder far rule: the farthest of 4 random candidates (training: 4 other batch images; evaluation: 4)
    "exchange-far4": ({}, {"defense": "exchange", "fool_rule": "far", "fool_pool": 4}),
    # exchangeable far pairs: fool drawn from a symmetric doubly-stochastic law favouring far pairs
    # (Sinkhorn on exp(16 D / mean D) over the image + 63 others; training: over the batch)
    "exchange-match": ({}, {"defense": "exchange", "fool_rule": "match", "match_lam": 16.0}),
    "symmetric-0.1": ({}, {"defense": "symmetric", "weight": 0.1}),
    "symmetric-1": ({}, {"defense": "symmetric", "weight": 1.0}),
    "symmetric-10": ({}, {"defense": "symmetric", "weight": 10.0}),
}
SWEEP = ["exchange", "symmetric-0.1", "symmetric-1", "symmetric-10"]  # the defense weight 0, 0.1, 1, 10


def run(args):
    from cvconvert.build import convert_to_dir
    from cvconvert.modeldir import atomic_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "defense_sweep.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    names = args.only.split(",") if args.only else list(VARIANTS)
    data = L.load_data(args.n_train, args.n_att, args.n_test, args.seed)
    L.log(f"data: {args.n_train} training, {args.n_att} attacker, {args.n_test} test images")
    steps = {"regressor": args.regressor_steps, "unet": args.unet_steps, "dprime_epochs": args.dprime_epochs,
             "probe": 400, "whitebox_n": args.whitebox_n, "whitebox_steps": args.whitebox_steps}
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if name in results and not args.redo:
            L.log(f"{name}: already measured, skipped")
            continue
        conv, tr = VARIANTS[name]
        d = Path(args.models) / name
        hist = _trained(d)
        if args.reuse and hist.get("epochs") == args.epochs and hist.get("n_train") == args.n_train:
            trained = {"records": hist["records"],
                       "epoch_time_s": sum(r["time_s"] for r in hist["records"]) / len(hist["records"])}
            L.log(f"{name}: reusing the model trained in {d}")
        else:
            convert_to_dir("lenet", d, force=True, data="fashion-mnist", **conv)
            trained = L.train_dir(d, data, args.epochs, seed=args.seed, **tr)
        L.log(f"{name}: trained, {trained['epoch_time_s']:.1f} s/epoch; attacking")
        ev = L.evaluate(d, data, steps, seed=args.seed, fool_rule=tr.get("fool_rule", "random"),
                        pool_size=tr.get("fool_pool") or args.pool_size,
                        match_lam=tr.get("match_lam", 16.0))
        ev["epoch_time_s"] = trained["epoch_time_s"]
        ev["train"] = trained["records"]
        L.log(f"{name}: {json.dumps({k: v for k, v in ev.items() if k != 'train'})}")
        results = json.loads(res_file.read_text()) if res_file.exists() else {}  # another process may have added
        results[name] = ev
        results["_setup"] = {**vars(args), "steps": steps}
        atomic_json(results, res_file)
    return results


def _trained(d: Path) -> dict:
    from cvconvert.modeldir import read_manifest
    try:
        return read_manifest(d).get("history") or {}
    except Exception:  # absent or foreign: train it
        return {}


REALISTIC = ("recon_regressor_angle", "recon_regressor_angle_pm", "recon_dprime_angle", "recon_dprime_angle_pm",
             "recon_snap_dprime")


def best_attack(r: dict) -> float | None:
    """The lowest reconstruction error of the attacks that need no truth (chosen after the fact: this
    favours the attacker)."""
    v = [r[k] for k in REALISTIC if isinstance(r.get(k), (int, float))]
    return min(v) if v else r.get("recon_mae_a")


def table(results: dict) -> str:
    orig = results.get("original", {})
    cols = [("test err (1k)", "test_error", "{:.3f}"), ("test err (10k)", "test_error_full", "{:.4f}"),
            ("s/epoch (loaded machine)", "epoch_time_s", "{:.0f}"),
            ("angle: regressor", "angle_regressor", "{:.3f}"), ("angle: phase support", "angle_phase_support",
                                                                "{:.3f}"),
            ("angle: D' grid", "angle_dprime", "{:.3f}"), ("angle: white-box", "angle_whitebox", "{:.3f}"),
            ("probe on abs(x)", "probe_modulus_acc", "{:.3f}"), ("probe on a", "probe_a_acc", "{:.3f}"),
            ("rec: best attack", "best_attack", "{:.3f}"), ("rec: oracle best of 8 readings", "recon_oracle_best_of_8",
                                                            "{:.3f}"),
            ("rec: true key", "recon_ref_true_key", "{:.3f}"),
            ("white-box: 1st image is the real one", "whitebox_first_is_real_frac", "{:.2f}")]
    lines = ["| variant | " + " | ".join(c[0] for c in cols) + " | rec ratio best attack / original |",
             "|---" * (len(cols) + 2) + "|"]
    for name in VARIANTS:
        r = results.get(name)
        if not r:
            continue
        r = {**r, "best_attack": best_attack(r)}
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-" for _, k, fmt in cols]
        if name == "original":
            cells[9] = f"{r['recon_mae_a']:.3f} (dec(a))"
            ratio = "1"
        else:
            ratio = f"{r['best_attack'] / orig['recon_mae_a']:.2f}" if "recon_mae_a" in orig else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _err(r: dict) -> float:
    return r.get("test_error_full", r["test_error"])  # the whole test set where measured


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    specs = [("angle_regressor", "learned regressor angle error (rad)"),
             ("angle_dprime", "paper D' angle error (rad)"),
             ("best_attack", "reconstruction MAE, best attack needing no truth")]
    for ax, (key, label) in zip(axes, specs):
        results = {n: ({**r, "best_attack": best_attack(r)} if not n.startswith("_") else r)
                   for n, r in results.items()}
        pts = [(n, r) for n, r in results.items() if not n.startswith("_") and key in r]
        for n, r in pts:
            ax.scatter(r[key], 100 * _err(r), s=40, color="C1" if n in SWEEP else "C0")
            ax.annotate(n, (r[key], 100 * _err(r)), fontsize=8, xytext=(4, 3), textcoords="offset points")
        sw = [results[n] for n in SWEEP if n in results and key in results[n]]
        if len(sw) > 1:
            ax.plot([r[key] for r in sw], [100 * _err(r) for r in sw], "-", color="C1", alpha=0.6,
                    label="symmetric weight: 0 (= exchange), " + ", ".join(n.split("-")[1] for n in SWEEP[1:] if n in results))
        if key.startswith("angle"):
            ax.axvline(0.75, ls="--", color="gray", lw=1, label="target 0.75 rad")
            ax.axvline(math.pi / 4, ls=":", color="green", lw=1, label="pi/4: exchange's floor")
            ax.axvline(math.pi / 2, ls=":", color="red", lw=1, label="pi/2: chance")
        elif "original" in results:
            o = results["original"]["recon_mae_a"]
            ax.axvline(3 * o, ls="--", color="gray", lw=1, label="target: 3x original's dec(a)")
            ax.axvline(o, ls=":", color="C0", lw=1, label="original's dec(a)")
        if "original" in results:
            ax.axhline(100 * _err(results["original"]) + 1.5, ls="--", color="purple", lw=1,
                       label="target: original + 1.5 points")
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%, 10k test images)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    s = results.get("_setup", {})
    fig.suptitle(f"LeNet / Fashion-MNIST, {s.get('epochs')} epochs on {s.get('n_train')} images; attackers trained "
                 f"after the fact on {s.get('n_att')} other images, scored on {s.get('n_test')} test images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--models", default="/tmp/cvconvert-defense-models", help="where the model dirs go")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--n-att", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--regressor-steps", type=int, default=500)
    p.add_argument("--unet-steps", type=int, default=250)
    p.add_argument("--dprime-epochs", type=int, default=1)
    p.add_argument("--whitebox-n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-size", type=int, default=64, help="fool pool per chunk of 64 for the far rule")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep an already trained model dir (same epochs/size)")
    p.add_argument("--whitebox-steps", type=int, default=80)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads((out / "defense_sweep.json").read_text()) if args.plot_only else run(args)
    plot(results, out / "defense_sweep.png")
    (out / "defense_sweep.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
