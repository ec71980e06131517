"""`cvconvert validate`: re-check an existing DIR/onnx/ against DIR/model.pt without re-exporting."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import command, emit_json, info


@command("validate")
def validate(
    model_dir: Path = typer.Argument(..., help="Model directory with onnx/ (from `cvconvert export`) and model.pt."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance of ONNX Runtime vs PyTorch."),
    rtol: float = typer.Option(1e-3, help="Relative tolerance of ONNX Runtime vs PyTorch."),
    as_json: bool = typer.Option(False, "--json", help="Print the validation report as JSON on stdout."),
):
    """Run export's checks again on DIR/onnx/ (contract, ORT vs PyTorch, chain, rotation, features +
    combine, sha256 against export.json); fail on any mismatch. Writes nothing."""
    from rich.console import Console

    from cvconvert.export import summary_lines, validate_dir

    with Console(stderr=True).status("validating") as status:
        report = validate_dir(model_dir, atol=atol, rtol=rtol, progress=lambda msg: status.update(msg))
    if as_json:
        emit_json(report)
        return
    for line in summary_lines(report):
        info(line)
    info(f"{Path(model_dir) / 'onnx'}: {len(report['graphs'])} graphs valid ({report['seconds']} s)")
