"""report.json, report.md and reconstructions.png for the audit of a P-part model (P > 2)."""

from __future__ import annotations

from pathlib import Path

from ..modeldir import atomic_json, atomic_write
from .report import _provenance, _table, grid_figure, recon_and_property_verdicts


def which_verdict(acc: float, parts: int) -> str:
    if acc <= 1 / parts + 0.05:
        return f"holds: within 0.05 of chance (1/{parts})"
    return f"LEAKS: names the image {acc:.0%} of the time (chance {1 / parts:.0%})"


def add_verdicts(R: dict) -> None:
    t, parts = R["tables"], R["meta"]["parts"]
    for row in t["which_row"]:
        row["verdict"] = which_verdict(row["accuracy"], parts)
    recon_and_property_verdicts(t)


def write_parts_report(R: dict, out: Path) -> dict:
    pics = R.pop("_pictures")
    add_verdicts(R)
    R["figures"] = {"reconstructions": "reconstructions.png"}
    grid_figure(pics["grid"], out / "reconstructions.png")
    atomic_json(R, out / "report.json")
    md = markdown(R)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))
    return R


def markdown(R: dict) -> str:
    m, t = R["meta"], R["tables"]
    p = m["parts"]
    L = [f"# Privacy audit: {m['arch']} ({p} parts, split {m['split']}) on {m['data']} (task {m['task']})", "",
         f"Model dir `{m['model_dir']}`; feature a: {m['feature_shape']}. The device sends x = Q "
         f"[{'; '.join(['a'] + [f'b_{i}' for i in range(1, p)])}] with a secret orthogonal {p}x{p} key Q "
         f"(key law {m.get('key_law', 'haar')}). Attacker: the public weights, "
         f"{m['n_attacker_train']} public training images (its own simulated transmissions with its own keys and "
         f"fools), and the victims' x for {m['n_eval']} test images. Budget `{m['budget']['name']}`, device "
         f"{m['device']}, seed {m['seed']}, {m['elapsed_s']} s. Fool rule `{m.get('fool_rule', 'random')}`.", ""]
    L += _provenance(m)
    L += ["## Utility (classification error with the right key)", ""]
    L += _table(["model", "error", "chance (majority class)"], [[r["model"], r["error"], r["chance"]] for r in t["utility"]])
    L += ["## Best rotation search", "",
          "|cos| between a candidate row R x and the image's true feature a. \"image found\": share of victims "
          "with a candidate at |cos| >= 0.95; \"rows matched\": mean over the candidates of the best |cos| with "
          "any true row (1 = the search de-rotates x fully, up to the rows' order and signs).", ""]
    L += _table(["attack", "best |cos| with a", "image found", "rows matched"],
                [[r["attack"], r["image_cos"], r["image_found"], r["rows_cos"]] for r in t["rotation"]])
    L += ["## Which row is the image", "",
          f"Right = the picked candidate is the one closest to a. Chance 1/{p} = {1 / p:.3f}.", ""]
    L += _table(["attack", "accuracy", "|cos| of the pick with a", "chance", "verdict"],
                [[r["attack"], r["accuracy"], r["picked_cos"], r["chance"], r["verdict"]] for r in t["which_row"]])
    L += ["## Reconstruction (mean abs pixel error in [0, 1]; higher = more private)", "",
          "Rows marked \"oracle bound\" pick the best of the P per image with the truth: no attacker can do that.", ""]
    L += _table(["model", "attack", "mean abs error", "PSNR dB", "SSIM", "verdict"],
                [[r["model"], r["attack"] + (f" (n={r['n']})" if "n" in r else ""), r["mae"], r.get("psnr"),
                  r.get("ssim"), r.get("verdict", "chance level")] for r in t["reconstruction"]])
    L += [f"## {R.get('property_target', 'property').capitalize()} inference (error rate; higher = more private)", ""]
    L += _table(["model", "attack", "error", "chance", "verdict"],
                [[r["model"], r["attack"], r["error"], r["chance"], r["verdict"]] for r in t["property"]])
    L += ["## Targets", ""]
    L += _table(["target", "measured", "threshold", "met"],
                [[r["target"], r["value"], r["threshold"], "yes" if r["met"] else "NO"] for r in t["targets"]])
    L += ["## Notes", "",
          "- The which-row classifier is trained on the attacker's own transmissions de-rotated perfectly (it "
          "knows its own keys), then applied to the search's candidates and to the victims' true rows.",
          f"- White-box: mean relative residual {R.get('whitebox_residual', float('nan')):.4f}.",
          "- The multi-query (span intersection) audit is not part of the row audit: the default audit of a "
          "two-part model runs it.", ""]
    return "\n".join(L)
