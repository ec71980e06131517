"""`cvconvert list`: the architecture registry (the zoo (and torchvision's models), with split presets and node names."""

from __future__ import annotations

from typing import Optional

import typer

from ._app import command, emit_json


@command("list")
def list_models(
    pattern: str = typer.Argument("*", help="Shell-style wildcard, e.g. 'resnet*'."),
    all_models: bool = typer.Option(False, "--all", help="Include every torchvision classification model."),
    nodes: Optional[str] = typer.Option(None, help="Print the dotted node names of ARCH usable in --split."),
    as_json: bool = typer.Option(False, "--json"),
):
    """List convertible architectures and their split presets."""
    from cvconvert import archs
    from cvconvert.convert import LEAF_MODULES
    from cvconvert.split import node_names

    if nodes:
        names = node_names(archs.create_model(nodes, 10, (3, 32, 32) if nodes in archs.list_models() else (3, 224, 224)),
                           LEAF_MODULES)
        if as_json:
            emit_json(names)
        else:
            print("\n".join(names))
        return
    rows = []
    for name in archs.list_models(pattern, include_torchvision=all_models):
        e = archs.get_entry(name)
        rows.append({"name": name, "source": e.source, "default_split": e.default_split,
                     "splits": {k: f"{v[0]}:{v[1] or ''}" for k, v in e.splits.items()},
                     "description": e.description})
    if as_json:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("model", "splits (ENCODER_END:DECODER_START)", "default", "description", box=None)
    for r in rows:
        table.add_row(r["name"], "  ".join(f"{k}={v}" for k, v in r["splits"].items()) or "explicit --split",
                      r["default_split"] or "-", r["description"])
    Console(width=160).print(table)
