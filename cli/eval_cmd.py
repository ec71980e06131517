"""`cvconvert eval`: test classification error of a model directory (complex: decoded with the right key)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import command, emit_json, info


@command("eval")
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="Model directory."),
    data: Optional[str] = typer.Option(None, help="Data set (default: the one the model was converted for)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding the data set's files."),
    task: Optional[str] = typer.Option(None, help="fine | coarse (Fashion-MNIST's 4 superclasses)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N test images."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Print the test error and write it to DIR/eval.json."""
    from cvconvert.errors import CvError
    from cvconvert.evaluate import eval_dir

    if batch_size < 1 or (limit is not None and limit < 1):
        raise CvError("--batch-size and --limit must be positive")
    res = eval_dir(model_dir, data, str(data_dir) if data_dir else None, task, batch_size, device, workers, limit)
    if as_json:
        emit_json(res)
    else:
        print(f"{res['data']} test error {100 * res['error']:.2f}% on {res['n']} images "
              f"({res['variant']} {res['arch']})")
        info(f"wrote {model_dir}/eval.json")
