"""Tables of experiments/results/farfool.md from the sweep's JSON files (no measuring here).

    .venv/bin/python experiments/farfool_table.py experiments/results/farfool/defense_sweep.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

ORDER = ["original", "exchange", "exchange-far", "exchange-far4", "exchange-match"]
ANGLES = [("test err (1k, model's own batch-roll fool)", "test_error", "{:.3f}"),
          ("test err (1k, the rule's fools)", "test_error_deployed_fools", "{:.3f}"),
          ("mean d(I, I')", "fool_dist_mean", "{:.3f}"),
          ("angle: regressor", "angle_regressor", "{:.3f}"),
          ("angle: phase support", "angle_phase_support", "{:.3f}"),
          ("angle: D' grid", "angle_dprime", "{:.3f}"),
          ("angle: white-box (32 img)", "angle_whitebox", "{:.3f}"),
          ("probe abs(x)", "probe_modulus_acc", "{:.3f}"),
          ("probe a", "probe_a_acc", "{:.3f}"),
          ("which-is-real classifier on (a, b)", "pair_order_acc", "{:.3f}"),
          ("white-box 1st image real", "whitebox_first_is_real_frac", "{:.2f}"),
          ("s/epoch", "epoch_time_s", "{:.1f}")]
RECON = [("dec(a*), regressor angle", "recon_regressor_angle"),
         ("+-a inverter, regressor angle", "recon_regressor_angle_pm"),
         ("dec(a*), D' angle", "recon_dprime_angle"),
         ("+-a inverter, D' angle", "recon_dprime_angle_pm"),
         ("snap (D' picks of 8)", "recon_snap_dprime"),
         ("oracle best of 8 (pair bound)", "recon_oracle_best_of_8"),
         ("true key", "recon_ref_true_key"),
         ("predicted (e0 + d)/2", "recon_pair_guess_pred")]
REALISTIC = ["recon_regressor_angle", "recon_regressor_angle_pm", "recon_dprime_angle", "recon_dprime_angle_pm",
             "recon_snap_dprime"]


def fmt(v, f):
    return f.format(v) if isinstance(v, (int, float)) else "-"


def tables(res: dict, label: str) -> str:
    orig = res.get("original", {}).get("recon_mae_a")
    out = [f"**{label}**: utility, angles (rad; floor of exchange pi/4 = 0.785, chance 1.571), probes", "",
           "| variant | " + " | ".join(c[0] for c in ANGLES) + " |", "|---" * (len(ANGLES) + 1) + "|"]
    for name in ORDER:
        r = res.get(name)
        if r:
            out.append(f"| {name} | " + " | ".join(fmt(r.get(k), f) for _, k, f in ANGLES) + " |")
    out += ["", f"**{label}**: reconstruction MAE (ratio to the original's dec(a) = "
            f"{fmt(orig, '{:.3f}')} in brackets)", "",
            "| variant | " + " | ".join(c[0] for c in RECON) + " | best attack needing no truth |",
            "|---" * (len(RECON) + 2) + "|"]
    for name in ORDER:
        r = res.get(name)
        if not r:
            continue
        if name == "original":
            out.append(f"| original | dec(a): {r['recon_mae_a']:.3f} (1.00) |" + " - |" * len(RECON))
            continue
        cell = lambda v: f"{v:.3f} ({v / orig:.2f}x)" if isinstance(v, (int, float)) and orig else fmt(v, "{:.3f}")  # noqa: E731
        best = min(r[k] for k in REALISTIC if k in r)
        out.append(f"| {name} | " + " | ".join(cell(r.get(k)) for _, k in RECON) + f" | {cell(best)} |")
    return "\n".join(out)


def main():
    for path in sys.argv[1:]:
        res = json.loads(open(path).read())
        s = res.get("_setup", {})
        print(tables(res, f"{path} (seed {s.get('seed')})"))
        print()


if __name__ == "__main__":
    main()
