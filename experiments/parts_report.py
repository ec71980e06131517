"""Table and plot of the parts sweep (experiments/parts_sweep.py --stage report) from its JSON files.

Per architecture and P: test error (cvconvert eval) beside the original's; the best which-row accuracy
(the row audit's best attack); the best reconstruction error without the key (the lowest over the
attacks that need no truth) and its ratio to the original's inversion error; the oracle bound (the best
of the P candidates, which needs the truth); the processing part's ONNX Runtime time at batch 128
against the original's. Each value beside the issue's target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORACLE = ("best_of_rows", "whitebox_parts")


def _load(results: Path, arch: str, name: str, stage: str):
    f = results / f"{arch}-{name}-{stage}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def row(results: Path, arch: str, parts: int) -> dict | None:
    orig, tr = _load(results, arch, "original", "train"), _load(results, arch, f"p{parts}", "train")
    if orig is None or tr is None:
        return None
    out = {"arch": arch, "P": parts, "error": tr["eval"]["error"], "original_error": orig["eval"]["error"],
           "n_test": tr["eval"]["n"], "train_s": tr["train_s"]}
    out["error_gap_points"] = 100 * (out["error"] - out["original_error"])
    bench = _load(results, arch, f"p{parts}", "bench")
    if bench:
        out["processing_ratio"] = next(r["ratio"] for r in bench["ratios"] if r["kind"] == "complex/original"
                                       and r["batch"] == 128 and r["engine"] == "ort" and r["stage"] == "processing")
    rep = _load(results, arch, f"p{parts}", "attack")
    if rep:
        t = rep["tables"]
        out["which_row"] = max(r["accuracy"] for r in t["which_row"])
        rec = t["reconstruction"]
        out["original_recon"] = next(r["mae"] for r in rec if r["model"] == "original")
        out["reference_recon"] = next(r["mae"] for r in rec if r["id"] == "reference")
        out["chance_recon"] = next(r["mae"] for r in rec if r["id"] == "chance")
        attacks = [r for r in rec if r["model"] == "complex" and r["id"] not in ("reference",) + ORACLE]
        best = min(attacks, key=lambda r: r["mae"])
        out["best_recon"], out["best_recon_attack"] = best["mae"], best["id"]
        out["oracle_recon"] = min(r["mae"] for r in rec if r["id"] in ORACLE)
        out["recon_ratio"] = out["best_recon"] / out["original_recon"]
        out["image_found"] = t["rotation"][0]["image_found"]
        out["n_eval"] = rep["meta"]["n_eval"]
    return out


def _mark(ok) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def table(rows: list) -> str:
    head = ["arch", "P", "test error (original)", "target +1.5 pts", "which-is-real", "target 1/P+0.05",
            "best recon (attack)", "x original's", "target >=3x at P=4", "oracle bound", "processing x orig",
            "target <= 1.1P", "processing x P=2's (ideal P/2)"]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        wr, rr, pr = r.get("which_row"), r.get("recon_ratio"), r.get("processing_ratio")
        L.append("| " + " | ".join([
            r["arch"], str(r["P"]), f"{100 * r['error']:.2f}% ({100 * r['original_error']:.2f}%)",
            _mark(r["error_gap_points"] <= 1.5),
            "-" if wr is None else f"{wr:.3f}", _mark(None if wr is None else wr <= 1 / r["P"] + 0.05),
            "-" if rr is None else f"{r['best_recon']:.4f} ({r['best_recon_attack']})",
            "-" if rr is None else f"{rr:.2f}x", _mark(None if rr is None or r["P"] != 4 else rr >= 3),
            "-" if rr is None else f"{r['oracle_recon']:.4f}",
            "-" if pr is None else f"{pr:.2f}x", _mark(None if pr is None else pr <= 1.1 * r["P"]),
            f"{r['processing_vs_p2']:.2f}x" if "processing_vs_p2" in r else "-"]) + " |")
    return "\n".join(L) + "\n"


def plot(rows: list, path: Path) -> None:
    from cvconvert.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for n, arch in enumerate(sorted({r["arch"] for r in rows})):
        rs, color = [r for r in rows if r["arch"] == arch], f"C{n}"  # its reference lines in its colour
        ps = [r["P"] for r in rs]
        ax[0].plot(ps, [100 * r["error"] for r in rs], "o-", color=color, label=f"{arch}")
        ax[0].plot(ps, [100 * r["original_error"] for r in rs], ":", color=color, label=f"{arch} original")
        for i, (key, scale) in enumerate((("which_row", 1), ("best_recon", 1), ("processing_ratio", 1)), 1):
            got = [(r["P"], r[key] * scale) for r in rs if key in r]
            if got:
                ax[i].plot(*zip(*got), "o-", color=color, label=arch)
        got = [(r["P"], 3 * r["original_recon"]) for r in rs if "original_recon" in r]
        if got:
            ax[2].plot(*zip(*got), ":", color=color, label=f"{arch}: 3x original's")
    ps = sorted({r["P"] for r in rows})
    ax[1].plot(ps, [1 / p for p in ps], "k--", label="chance 1/P")
    ax[1].plot(ps, [1 / p + 0.05 for p in ps], "r:", label="target 1/P + 0.05")
    ax[3].plot(ps, [1.1 * p for p in ps], "r:", label="target 1.1 P")
    titles = ("test error (%)", "which-is-real accuracy (best attack)", "best reconstruction error, no key",
              "processing time / original's (ORT, batch 128)")
    for a, t in zip(ax, titles):
        a.set_title(t, fontsize=9)
        a.set_xlabel("P (parts)")
        a.set_xticks(ps)
        a.legend(fontsize=6)
    save_png(fig, path)


def write(results: Path) -> None:
    rows = [r for arch in ("lenet", "resnet20") for p in (2, 3, 4) if (r := row(results, arch, p))]
    for r in rows:  # the marginal cost of more parts: against the two-part model (ideal: P / 2)
        two = next((q for q in rows if q["arch"] == r["arch"] and q["P"] == 2 and "processing_ratio" in q), None)
        if two and "processing_ratio" in r:
            r["processing_vs_p2"] = r["processing_ratio"] / two["processing_ratio"]
    (results / "parts_sweep.json").write_text(json.dumps(rows, indent=1))
    (results / "parts_sweep.md").write_text(table(rows))
    plot(rows, ROOT / "docs" / "parts_sweep.png")
    print(table(rows))
