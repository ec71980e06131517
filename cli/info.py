"""`cvconvert info`: what a model directory holds."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import command, emit_json


@command("info")
def info_cmd(model_dir: Path = typer.Argument(..., help="A model directory."),
             as_json: bool = typer.Option(False, "--json")):
    """Show a model directory's manifest (refuses unknown format versions)."""
    from cvconvert.modeldir import read_manifest

    m = read_manifest(model_dir)
    onnx_dir = model_dir / "onnx"
    m = {**m, "onnx": sorted(p.name for p in onnx_dir.glob("*.onnx")) if onnx_dir.is_dir() else []}
    if as_json:
        emit_json(m)
        return
    split = f"{m['encoder_end']}:{m['decoder_start'] or ''}"
    for key, val in [("arch", m["arch"]), ("variant", m["variant"]), ("split", f"{m['split']} ({split})"),
                     ("input", m["input_shape"]), ("feature", m["feature_shape"]), ("classes", m["num_classes"]),
                     ("activation", m["activation"]), ("data", m.get("data")), ("onnx", m["onnx"] or "-"),
                     ("history", m.get("history") or "-")]:
        print(f"{key:11s} {val}")
