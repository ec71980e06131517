"""report.json, report.md (tables laid out like the paper's, each attack beside its chance level and the
baselines, one verdict per attack) and PNG figures, every file written atomically."""

from __future__ import annotations

import math
from pathlib import Path

from ..figures import pyplot, save_png
from ..modeldir import atomic_json, atomic_write

# The paper's published numbers, to print beside ours where the setting is comparable.
PAPER_ANGLE = {("lenet", "paper"): ("LeNet CIFAR-10", 0.7884), ("resnet20", "alpha"): ("ResNet-20-a CIFAR-10", 0.7890),
               ("resnet20", "beta"): ("ResNet-20-b CIFAR-10", 0.7859), ("resnet56", "alpha"): ("ResNet-56-a CIFAR-10", 0.8088)}
PAPER_RECON = {"lenet": ("LeNet CIFAR-10", 0.0769, 0.2405), "resnet56": ("ResNet-56-a CIFAR-10", 0.0989, 0.2804)}
PAPER_KNN = ("CIFAR-100 ResNet-56 (Table 5)", {"additional": (0.7338, 0.6837, 0.7116), "complex": (0.9444, 0.9363, 0.925)})

FIGURES = {"reconstructions": "reconstructions.png", "rotation_sweep": "rotation_sweep.png",
           "angle_errors": "angle_errors.png", "attack_error_per_epoch": "attack_error_per_epoch.png"}


# --- verdicts ---------------------------------------------------------------------------------------------

def angle_verdict(err: float) -> str:
    if err < 0.1:
        return "LEAKS: key recovered (within 0.1 rad)"
    if err < 0.75:
        return "LEAKS: key mostly recovered (below the paper's 0.75 rad)"
    if err < 0.9 * math.pi / 2:
        return "partial: better than chance, above 0.75 rad"
    return "holds: near chance"


def recon_verdict(mae: float, chance: float, original: float | None) -> str:
    if mae >= 0.9 * chance:
        return "holds: no better than the average image"
    if original is not None:
        ratio = mae / max(original, 1e-9)
        if ratio >= 3:
            return f"partial: {ratio:.1f}x the original's error (paper's bar met), but beats the average image"
        return f"LEAKS: {ratio:.1f}x the original's error (paper's bar is 3x)"
    return f"LEAKS: {mae / chance:.2f} of the average image's error"


def property_verdict(err: float, chance: float, best: float | None) -> str:
    if err >= chance - 0.02:
        return "holds: near chance"
    if best is not None and chance - best > 1e-6:
        gain = (chance - err) / (chance - best)
        return f"{'LEAKS' if gain >= 0.5 else 'partial'}: {gain:.0%} of the raw-image classifier's gain over chance"
    return "LEAKS: better than chance"


def add_verdicts(R: dict) -> None:
    """One verdict per row; rows are found by their ``id`` (the labels are free text)."""
    t = R["tables"]
    for row in t["angle"]:
        row["verdict"] = angle_verdict(row["mean_abs_error_rad"])
    recon_and_property_verdicts(t)


def recon_and_property_verdicts(t: dict) -> None:
    """Verdicts of the reconstruction rows (against chance and the original's inversion) and of the
    property rows (against chance and the raw-image classifier)."""
    rec = t["reconstruction"]
    chance = next(r["mae"] for r in rec if r["id"] == "chance")
    orig = next((r["mae"] for r in rec if r["model"] == "original"), None)
    for row in rec:
        if row["id"] != "chance":
            row["verdict"] = ("reference" if row["id"] == "reference"
                              else recon_verdict(row["mae"], chance, None if row["model"] == "original" else orig))
    best = next((r["error"] for r in t["property"] if r["id"] == "reference"), None)
    for row in t["property"]:
        row["verdict"] = ("reference" if row["id"] == "reference"
                          else property_verdict(row["error"], row["chance"], best))


# --- writing ------------------------------------------------------------------------------------------------

def write_report(R: dict, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if R["meta"].get("audit") == "rows":
        from .report_parts import write_parts_report
        return write_parts_report(R, out)
    pics = R.pop("_pictures")
    add_verdicts(R)
    R["figures"] = {k: v for k, v in FIGURES.items()}
    _figures(R, pics, out)
    atomic_json(R, out / "report.json")
    md = markdown(R)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))
    return R


def _f(v, nd=4):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _table(head: list, rows: list) -> list:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda c: (c if isinstance(c, str) else _f(c)).replace("|", "\\|")  # noqa: E731 (|x| in names)
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def markdown(R: dict) -> str:
    m, t = R["meta"], R["tables"]
    L = [f"# Privacy audit: {m['arch']} ({m['variant']}, split {m['split']}) on {m['data']} (task {m['task']})", "",
         f"Model dir `{m['model_dir']}`; feature a: {m['feature_shape']}. Attacker: the public weights, "
         f"{m['n_attacker_train']} public training images, and the victim's transmitted x for {m['n_eval']} test "
         f"images (the secret theta and fooling images are never shown to it). Budget `{m['budget']['name']}`, "
         f"device {m['device']}, seed {m['seed']}, {m['elapsed_s']} s. Fool rule `{m.get('fool_rule', 'random')}`: "
         "the victim's fools and the attacker's simulated ones are picked the same way.", ""]
    L += _provenance(m)
    if m["baselines"]:
        L += ["Baselines: " + ", ".join(f"{k} (`{v}`)" for k, v in m["baselines"].items()), ""]
    L += ["## Verdicts", ""]
    for row in t["angle"]:
        L.append(f"- angle, {row['attack']}: {row['mean_abs_error_rad']:.3f} rad -> {row['verdict']}")
    for row in t["reconstruction"][1:]:
        if row["model"] == "complex" and row["verdict"] != "reference":
            L.append(f"- reconstruction, {row['attack']}: {row['mae']:.4f} -> {row['verdict']}")
    for row in t["property"]:
        if row["model"] == "complex":
            L.append(f"- property, {row['attack']}: {row['error']:.3f} -> {row['verdict']}")
    if R.get("property_skipped"):
        L.append(f"- property inference: skipped ({R['property_skipped']})")
    for row in t.get("multi_query") or []:
        L.append(f"- across queries, {row['mode']}: before {row['before']['verdict']}; after {row['after']['verdict']}")
    L += ["", "## Utility (classification error with the right key)", ""]
    L += _table(["model", "error", "chance (majority class)"], [[r["model"], r["error"], r["chance"]] for r in t["utility"]])
    paper = PAPER_ANGLE.get((m["arch"], m["split"]))
    L += ["## Angle estimation (paper Table 4: mean |theta_hat - theta|, radians)", "",
          f"Random guessing scores pi/2 = {math.pi / 2:.4f}."
          + (f" Paper, {paper[0]}: {paper[1]:.4f} (its D' attack only)." if paper else ""), ""]
    L += _table(["attack", "mean abs error", "median", "share < 0.1 rad", "chance", "verdict"],
                [[r["attack"] + (f" (n={r['n']})" if "n" in r else ""), r["mean_abs_error_rad"], r["median_rad"],
                  r["frac_below_0.1rad"], r["chance_rad"], r["verdict"]] for r in t["angle"]])
    pr = PAPER_RECON.get(m["arch"])
    L += ["## Reconstruction (paper Tables 1-2: mean abs pixel error in [0, 1]; higher = more private)", ""]
    if pr:
        L += [f"Paper, {pr[0]}: original {pr[1]} -> complex dec(a*) {pr[2]}.", ""]
    L += _table(["model", "attack", "mean abs error", "PSNR dB", "SSIM", "verdict"],
                [[r["model"], r["attack"] + (f" (n={r['n']})" if "n" in r else ""), r["mae"], r.get("psnr"),
                  r.get("ssim"), r.get("verdict", "chance level")] for r in t["reconstruction"]])
    L += ["## Property inference (paper Sec. 4.3 attacks 1-4, Table 5; error rate, higher = more private)", ""]
    if R.get("property_skipped"):
        L += [f"Skipped: {R['property_skipped']}.", ""]
    else:
        L += [f"Paper, {PAPER_KNN[0]}: k-NN error 1/3/5-NN additional "
              f"{'/'.join(map(str, PAPER_KNN[1]['additional']))}, complex {'/'.join(map(str, PAPER_KNN[1]['complex']))}.", ""]
        L += _table(["model", "attack", "error", "chance", "verdict"],
                    [[r["model"], r["attack"], r["error"], r["chance"], r["verdict"]] for r in t["property"]])
    L += multi_query_md(R)
    if t.get("targets"):
        L += ["## The issue's targets", ""]
        L += _table(["target", "measured", "threshold", "met"],
                    [[r["target"], r["value"], r["threshold"], "yes" if r["met"] else "NO"] for r in t["targets"]])
    L += ["## Figures", "", "- `reconstructions.png`: input and each attack's reconstruction (cf. paper Fig. 2)",
          "- `rotation_sweep.png`: inversion-1 decoder applied to Re[x e^{-it}] for t through (0, 2 pi) (cf. Fig. 7)",
          "- `angle_errors.png`: histogram of each angle attack's error",
          "- `attack_error_per_epoch.png`: attacker error per epoch (cf. Fig. 3)", "",
          "## Notes", "",
          "- The U-Net follows paper Sec. 5.1 (feature up-sampled to the input size, four down and four up "
          f"blocks) with {m['budget']['unet_convs']} conv(s) per block instead of six, width {m['budget']['unet_width']}.",
          "- White-box: x is explained equally well by the pair swapped, so its score is also given for the better "
          f"of the two recovered images; mean relative residual {R.get('whitebox_residual', float('nan')):.4f}.",
          "- Phase support: the estimator shown in the inversion row was chosen on the attacker's own simulated x "
          f"(its errors there: {', '.join(f'{k} {v:.3f}' for k, v in R.get('phase_support_calibration', {}).items())} rad).",
          ""]
    return "\n".join(L)


def _provenance(m: dict) -> list:
    """Which encoder made the victims' x, and whether the weights the attacker's white-box search runs on
    match the deployed graphs."""
    graphs = {"current": "exported from exactly these weights (model.pt sha256 matches export.json)",
              "stale": "STALE: exported from an earlier model.pt, so what is deployed is not what was audited; "
                       "re-export and re-audit",
              "unknown": "exported, but the export does not record its model.pt (older export): re-export to check",
              "not exported": "not exported yet"}.get(m.get("exported_graphs"))
    out = []
    if graphs:
        out += [f"Audited weights: `{m['model_dir']}/model.pt`; its ONNX graphs (`onnx/`): {graphs}.", ""]
    v = m.get("victim_encoder") or {}
    if v.get("graph_sha256"):
        out += [f"Victims' x: built with the deployed `{v['source']}` (sha256 `{v['graph_sha256']}`) through the "
                "device runtime. Only the white-box attack (it needs gradients) runs on `model.pt`.", ""]
    elif v:
        out += ["Victims' x: built with `model.pt` (no exported graphs; `cvconvert export` them to audit what is "
                "deployed).", ""]
    return out


def multi_query_md(R: dict) -> list:
    """The multi-query section: per usage mode, the old device beside the shipped one."""
    mq, rows = R.get("multi_query") or {}, R["tables"].get("multi_query") or []
    L = ["## Privacy across queries (multi-query audit)", "",
         "Threat model: the cloud is honest but curious; it holds the public model dir and public data of the "
         "same domain, and keeps and compares every x it ever receives (it never sees theta, the image or the "
         "fool). Re(x) and Im(x) span {a, b}: any feature vector in two transmissions is found by intersecting "
         "their spans (SVD of the two bases, over all pairs), and a fool from public data by testing which public "
         "feature lies in span(x). \"exposed\" = the attacker holds the image's feature to |cos| >= 0.999.", ""]
    if mq.get("skipped"):
        return L + [f"Skipped: {mq['skipped']}.", ""]
    L += [f"Devices built with the runtime on the exported graphs (key law {mq['defense']}, fool rule "
          f"`{mq['fool_rule']}`): before = the old device (fools from the request or a folder drawn with "
          "replacement, or taken in order without reuse; its memory per pool, so a second pool of the same photos "
          "hands out the same fools again; repeats re-sent with a fresh key and fool, no guard); after = the "
          "shipped one (a device-private fool pool, each fool used once; the near-duplicate guard at cosine "
          f"{mq['guard_threshold']}; one memory per mode, shared by its pools and model versions). {mq['victims']} "
          f"victim images, {mq['private_fools']} private fool images, {mq['public_images']} public images for the "
          "membership test." + _second_version(mq), ""]
    pct = lambda c: f"{c['exposed']}/{c['images']} ({c['share']:.0%})"  # noqa: E731
    tel = lambda c: "-" if c["tell"] is None else f"{c['tell']:.2f}"  # noqa: E731
    L += _table(["mode", "before: exposed", "before: which is real", "after: exposed", "after: sent / on device / "
                 "refused", "after: verdict"],
                [[r["mode"], pct(r["before"]), tel(r["before"]), pct(r["after"]),
                  f"{r['after']['transmissions']} / {r['after']['held_back']} / {r['after']['refused']}",
                  r["after"]["verdict"]] for r in rows])
    L += ["What an exposed feature gives the attacker (exposed images only): the image through the audit's "
          "inverter (mean abs pixel error; beside it the same inverter on the true feature) and the device's "
          "own answer read with the public decoder at the recovered angle.", ""]
    L += _table(["mode", "device", "median abs cos", "inverter error", "with the true feature", "answer read"],
                [[r["mode"], side, r[side]["median_cos"], r[side]["recon_mae"], r[side]["recon_mae_true_key"],
                  r[side]["answer_recovered"]] for r in rows for side in ("before", "after")
                 if r[side]["exposed"]])
    f2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    fr = lambda v: "-" if v is None else f"{v:.2f} ({max(v, 1 - v):.2f})"  # noqa: E731  (P = 2)
    L += ["The cross-transmission attack on related transmissions (each transmission's best partner, its first "
          "principal vector u): which-is-real = u nearer the image than the fool (chance 0.5), the inverter on u "
          "(mean abs pixel error), the public decoder at u's angle vs the device's answer. Below chance tells as "
          "much as above it (the cloud reads the other vector): the best of the two readings is in brackets. "
          "Adaptive: a cloud that learns, from what it computes per transmission (principal cosines of its two best "
          "pairs, how they agree, how many transmissions it relates to), when to believe u (cross-validated; "
          "chance 0.5).", ""]
    L += _table(["mode", "sent before / after", "u is the image: before", "after", "adaptive: before", "after",
                 "inverter on u: before", "after", "answer read: before", "after"],
                [[r["mode"], f"{r['before']['transmissions']} / {r['after']['transmissions']}",
                  fr(r["before"].get("principal_real")), fr(r["after"].get("principal_real")),
                  f2(r["before"].get("principal_adaptive")), f2(r["after"].get("principal_adaptive")),
                  f2(r["before"].get("principal_recon_mae")), f2(r["after"].get("principal_recon_mae")),
                  f2(r["before"].get("principal_answer")), f2(r["after"].get("principal_answer"))] for r in rows])
    L += ["Repeats: transmissions whose span holds (|cos| >= 0.999) the feature of an image that an earlier "
          "transmission carried, under any pool or model version; under two model versions, exposed is counted "
          "over everything the cloud holds (a recovered vector within 0.999 of the image's feature under either "
          "version), and beside it within each version's transmissions alone.", ""]
    L += _table(["mode", "repeats: before", "after"] + ["exposed within each model version: before", "after"],
                [[r["mode"], r["before"].get("repeats"), r["after"].get("repeats"), _by_version(r["before"]),
                  _by_version(r["after"])] for r in rows])
    L += ["\"which is real\": how often the rule \"the vector that recurs elsewhere is the fool\" names the image "
          "(1 = a sure tell, 0.5 = a coin, 0 = backwards: the image is what recurs). Refusals and near-duplicates "
          "answered on the device are the shipped rules at work, not failures of the audit.", ""]
    return L


def _second_version(mq: dict) -> str:
    v = mq.get("second_version")
    if not v:
        return ""
    return (f" The second model version: the feature extractor's weights perturbed by {v['perturbation']:.0%} "
            f"(features graph sha256 `{v['features_sha256'][:16]}`), the victims' features under the two "
            f"versions at cosine {v['median_cos_features']:.5f} (median; min {v['min_cos_features']:.5f}).")


def _by_version(col: dict) -> str:
    """"v1 0/3, v2 0/6": exposed images / images sent, per model version (one version: "-")."""
    per = col.get("by_version")
    return "; ".join(f"v{v['version'] + 1} {v['exposed']}/{v['images']}" for v in per) if per else "-"


def _show(ax, img):
    img = img.detach().float().clamp(0, 1).cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def grid_figure(rows: list, path: Path) -> None:
    """Rows of (label, images): the input and each attack's reconstructions."""
    plt = pyplot()
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 2.6, 1.1 * len(rows)), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            if j < len(imgs):
                _show(ax, imgs[j])
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    save_png(fig, path)


def _figures(R: dict, pics: dict, out: Path) -> None:
    plt = pyplot()
    grid_figure(pics["grid"], out / FIGURES["reconstructions"])

    inputs, sweep, ts = pics["sweep"]
    fig, axes = plt.subplots(len(inputs), len(ts) + 1, figsize=(1.1 * (len(ts) + 1), 1.2 * len(inputs)), squeeze=False)
    for i in range(len(inputs)):
        _show(axes[i][0], inputs[i])
        for j, t in enumerate(ts):
            _show(axes[i][j + 1], sweep[j][i])
            if i == 0:
                axes[0][j + 1].set_title(f"t={t:.2f}", fontsize=7)
    axes[0][0].set_title("input", fontsize=7)
    save_png(fig, out / FIGURES["rotation_sweep"])

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, err in pics["angles"].items():
        ax.hist(err.numpy(), bins=36, range=(0, math.pi), histtype="step", density=True, label=name)
    ax.axhline(1 / math.pi, ls="--", c="gray", label="uniform guess")
    ax.set_xlabel("|theta_hat - theta| (rad)")
    ax.set_ylabel("density")
    ax.legend(fontsize=6)
    save_png(fig, out / FIGURES["angle_errors"])

    hist = {k: v for k, v in R["history"].items() if "(train)" not in k}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, h in hist.items():
        ax = axes[1] if "rad" in name else axes[0]
        ax.plot(range(1, len(h) + 1), h, marker="o", label=name)
    axes[0].set_title("property inference error per epoch")
    axes[1].set_title("angle regressor error per epoch (rad)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=6)
    save_png(fig, out / FIGURES["attack_error_per_epoch"])
