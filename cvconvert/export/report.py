"""The export report's pieces shared by `cvconvert export` and `cvconvert validate`: the stage clock,
the header naming the weights the graphs come from, and the summary lines the CLI prints."""

from __future__ import annotations

import time
from pathlib import Path


class Clock:
    """Seconds per stage for the report, and each new stage's progress message."""

    def __init__(self, progress=None):
        self.progress, self.timings, self.stage = progress, {}, "loading"
        self.start = self.last = time.perf_counter()

    def step(self, msg: str) -> None:
        now = time.perf_counter()
        self.timings[self.stage] = round(now - self.last, 2)
        self.stage, self.last = msg, now
        if self.progress:
            self.progress(msg)

    def finish(self, report: dict) -> dict:
        self.step("done")
        report["seconds"] = round(time.perf_counter() - self.start, 2)
        report["timings"] = self.timings
        return report


def header(model_dir: Path, manifest: dict, weights_sha: str | None) -> dict:
    return {"model_dir": str(model_dir), "arch": manifest["arch"], "variant": manifest["variant"],
            "key_law": manifest.get("key_law"), "format_version": manifest.get("format_version"),
            "weights_sha256": weights_sha}  # which model.pt the graphs come from (artifacts.export_provenance)


def summary_lines(report: dict) -> list[str]:
    lines = []
    for part, g in report["graphs"].items():
        diffs = ", ".join(f"b{k}: {v:.2e}" for k, v in g["max_abs_diff"].items() if v is not None)
        sig = "; ".join(f"{e['name']} {e['shape']}" for e in g["inputs"]) + " -> " + \
            "; ".join(f"{e['name']} {e['shape']}" for e in g["outputs"])
        lines.append(f"{g['file']}: {g['nodes']} nodes, {g['bytes'] / 1e6:.2f} MB, {sig}; max abs diff {diffs or 'n/a'}")
    c = report["chain"]
    lines.append(f"chain vs PyTorch (batch {c['batch']}): max abs diff {c['max_abs_diff']:.2e}, "
                 f"argmax agree {c['argmax_agree']:.0%}")
    if "rotation" in report:
        r = report["rotation"]
        what = f"equivariance under {r['parts']}x{r['parts']} orthogonal keys ({r['reflections']} reflections)"
        left = r.get("tie_samples_left_out", 0)
        lines.append(f"{what} of processing.onnx: max abs diff {r['max_abs_diff']:.2e}"
                     + (f" ({left} sample(s) at a max-modulus tie left out)" if left else ""))
    for why in report.get("tie_redraws", []):
        lines.append(f"drawn again: {why}")
    if "combine" in report:
        c = report["combine"]
        lines.append(f"features.onnx + combine_np vs encoder.onnx: max abs diff {c['max_abs_diff']:.2e}")
    if "folded_batchnorms" in report:
        lines.append(f"folded batch-norms: {report['folded_batchnorms']}")
    for name in report.get("skipped", []):
        lines.append(f"{name}: not in this export (made before it existed); re-export to add it")
    return lines
