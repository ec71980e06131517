"""`cvconvert export`: validated ONNX graphs of a model dir (and optionally a Triton model repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import command, emit_json, info


@command("export")
def export(
    model_dir: Path = typer.Argument(..., help="Model directory (from `cvconvert convert` / `cvconvert train`)."),
    opset: int = typer.Option(18, help="ONNX opset (>= 17)."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance of ONNX Runtime vs PyTorch."),
    rtol: float = typer.Option(1e-3, help="Relative tolerance of ONNX Runtime vs PyTorch."),
    triton_repo: Optional[Path] = typer.Option(None, help="Also write a Triton model repository for processing.onnx."),
    name: Optional[str] = typer.Option(None, help="Model name in the Triton repository (default ARCH_processing)."),
    max_batch_size: int = typer.Option(64, help="Triton max_batch_size (dynamic batching)."),
    as_json: bool = typer.Option(False, "--json", help="Print the validation report as JSON on stdout."),
):
    """Export DIR's encoder / processing / decoder (+ features) to DIR/onnx/*.onnx; validate; fail on any mismatch."""
    from cvconvert.export import export_model_dir, summary_lines

    from rich.console import Console
    console = Console(stderr=True)
    with console.status("exporting") as status:
        report = export_model_dir(model_dir, opset=opset, atol=atol, rtol=rtol, triton_repo=triton_repo,
                                  triton_name=name, max_batch_size=max_batch_size,
                                  progress=lambda msg: status.update(msg))
    if as_json:
        emit_json(report)
    else:
        for line in summary_lines(report):
            info(line)
        info(f"wrote {Path(model_dir) / 'onnx'} (validated; {report['seconds']} s)")
        if "triton" in report:
            info(f"wrote Triton model {report['triton']['name']} in {report['triton']['repo']}")
