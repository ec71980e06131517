"""`cvconvert bench`: latency/throughput of the complex split network vs the original, as ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cvconvert.errors import CvError

from ._app import command, emit_json, info


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CvError(f"bad --batch-sizes {text!r}: expected comma-separated integers such as 1,32,128") from None
    if not sizes or min(sizes) < 1:
        raise CvError(f"bad --batch-sizes {text!r}: every batch size must be a positive integer")
    return sizes


@command("bench")
def bench(
    model_dir: Path = typer.Argument(..., help="A complex model directory (DIR/onnx/ from `cvconvert export` if present)."),
    batch_sizes: str = typer.Option("1,32,128", "--batch-sizes", "-b", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(20, help="Timed calls per configuration (the median is reported)."),
    warmup: int = typer.Option(3, help="Untimed calls first (allocations, cuDNN algorithm search)."),
    provider: str = typer.Option("auto", help="auto | cpu | cuda (ONNX Runtime execution provider; eager device)."),
    baseline: Optional[Path] = typer.Option(None, help="An `original` variant model dir; default: the same "
                                                       "architecture and split rebuilt as original (random weights)."),
    engines: str = typer.Option("ort,eager", help="ort, eager or both (comma-separated)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for ONNX Runtime and PyTorch (default: the CPUs "
                                                     "this process may use)."),
    plot: Optional[Path] = typer.Option(None, help="Also draw the latencies and ratios as a PNG here."),
    as_json: bool = typer.Option(False, "--json", help="Print every measurement as JSON on stdout."),
):
    """Time each part, end to end and the online device path, complex vs original, ONNX Runtime vs PyTorch eager."""
    from cvconvert.bench import BenchConfig, bench_dir

    sizes = _batch_sizes(batch_sizes)
    eng = tuple(e.strip() for e in engines.split(",") if e.strip())
    if not eng or any(e not in ("ort", "eager") for e in eng):
        raise CvError(f"bad --engines {engines!r}: choose ort, eager or ort,eager")
    if repeats < 1:
        raise CvError("--repeats must be at least 1")
    if warmup < 0:
        raise CvError("--warmup must not be negative")
    if threads is not None and threads < 1:
        raise CvError("--threads must be at least 1")
    if not model_dir.exists():
        raise CvError(f"model directory {model_dir} does not exist")
    if plot is not None and not plot.resolve().parent.is_dir():
        raise CvError(f"--plot {plot}: folder {plot.parent} does not exist")
    cfg = BenchConfig(batch_sizes=sizes, repeats=repeats, warmup=warmup, provider=provider, threads=threads,
                      engines=eng, progress=not as_json)
    report = bench_dir(model_dir, baseline, cfg, log=info)
    if plot is not None:
        from cvconvert.bench import plot_report
        plot_report(report, plot)
        info(f"wrote {plot}")
    if as_json:
        emit_json(report)
    else:
        print_report(report)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from cvconvert.bench import baseline_stage, where_run

    console = Console()
    if not console.is_terminal and console.width < 132:
        console = Console(width=132)  # piped / captured: do not squeeze the table into 80 columns
    console.print(f"[bold]{report['arch']}[/] on {report['device']} ({where_run(report)}), "
                  f"median of {report['repeats']} runs after {report['warmup']} warm-up; baseline: {report['baseline']}")
    t = Table(title="latency (ms) and throughput (samples/s)")
    t.caption = ("cplx = complex split network, orig = original model; /s = samples per second at p50; "
                 "features and online (features + precomputed fool feature + numpy combine + processing + "
                 "decoder) are set against the original's encoder and end to end")
    for col in ("batch", "engine", "stage", "cplx p50", "cplx p90", "orig p50", "orig p90",
                "cplx/s", "orig/s", "cplx/orig"):
        t.add_column(col, justify="right")
    rows = {(r["batch"], r["engine"], r["stage"], r["model"]): r for r in report["results"]}
    for (n, eng, stage, model), r in rows.items():
        if model != "complex":
            continue
        o = rows.get((n, eng, baseline_stage(stage), "original"))
        t.add_row(str(n), eng, stage, f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                  f"{o['p50_ms']:.2f}" if o else "-", f"{o['p90_ms']:.2f}" if o else "-",
                  f"{r['throughput_per_s']:.0f}", f"{o['throughput_per_s']:.0f}" if o else "-",
                  f"{r['p50_ms'] / o['p50_ms']:.2f}x" if o else "-")
    console.print(t)
    oe = [r for r in report["ratios"] if r["kind"] == "ort/eager"]
    if oe:
        t2 = Table(title="ONNX Runtime / PyTorch eager (p50; < 1 means ORT is faster)")
        for col in ("batch", "stage", "complex", "original"):
            t2.add_column(col, justify="right")
        by = {(r["batch"], r["stage"], r["model"]): r["ratio"] for r in oe}
        for (n, stage, model), v in by.items():
            if model == "complex":
                o = by.get((n, stage, "original"))
                t2.add_row(str(n), stage, f"{v:.2f}", f"{o:.2f}" if o is not None else "-")
        console.print(t2)
    console.print(f"peak memory (RSS): {report['peak_rss_mb']:.0f} MB")
