"""`cvconvert attack`: the privacy audit (paper Sec. 4.3 / 5.1 attacks plus adaptive ones)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._app import command, emit_json, info


@command("attack")
def attack(
    model_dir: Path = typer.Argument(..., help="The complex model dir to audit (as the attacker sees it)."),
    data: str = typer.Option(..., "--data", help="Data set (fashion-mnist, cifar10, cifar100, celeba, cub200, folder:PATH)."),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory (report.json, report.md, PNGs, checkpoints/)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    task: Optional[str] = typer.Option(None, help="fine | coarse (default: the model's training task)."),
    baseline: List[Path] = typer.Option([], "--baseline", help="original / noisy / additional model dir (repeatable)."),
    budget: str = typer.Option("quick", help="quick (LeNet in < 10 min on 2 CPU cores) | full."),
    train_size: Optional[int] = typer.Option(None, help="Override: attacker training images."),
    eval_size: Optional[int] = typer.Option(None, help="Override: victim (test) images."),
    epochs: Optional[int] = typer.Option(None, help="Override: epochs of every attacker network."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    seed: int = typer.Option(0, help="Seeds the data subsets and the attackers (the victim's keys use the CSPRNG)."),
    resume: bool = typer.Option(False, help="Resume from the attacker checkpoints in the report directory."),
    multi_query: bool = typer.Option(True, help="Also run the multi-query audit (span intersection over all the "
                                                "transmissions of each usage mode; needs `cvconvert export` first)."),
    rows: bool = typer.Option(False, "--rows", help="Run the row audit (best rotation search, which row is the "
                                                   "image, Gram and Procrustes white-box attacks) on a two-part "
                                                   "model; always used for --parts above 2."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
):
    """Audit MODEL_DIR's privacy: angle estimation, inversion and property inference, against the baselines."""
    from cvconvert.attacks.report import write_report
    from cvconvert.attacks.budget import make_budget
    from cvconvert.attacks.runner import run_audit

    b = make_budget(budget, train_size, eval_size, epochs)
    try:
        R = run_audit(model_dir, data, output, data_dir=data_dir, task=task, baselines=list(baseline), budget=b,
                      device=device, seed=seed, resume=resume, log=info, multi_query=multi_query,
                      rows=rows)
    except KeyboardInterrupt:
        info(f"interrupted: the attackers' finished epochs are in {output}/checkpoints; rerun with --resume")
        raise
    R = write_report(R, output)
    if as_json:
        emit_json(R)
    else:
        info(f"wrote {output}/report.md, report.json and {len(R['figures'])} figures")
        for row in R["tables"].get("angle", []):
            info(f"  angle  {row['attack']:<45} {row['mean_abs_error_rad']:.3f} rad  {row['verdict']}")
        for row in R["tables"].get("which_row", []):
            info(f"  row    {row['attack'][:45]:<45} {row['accuracy']:.3f}      {row['verdict']}")
        for row in R["tables"]["reconstruction"]:
            if row["model"] == "complex" and row.get("verdict") != "reference":
                info(f"  recon  {row['attack'][:45]:<45} {row['mae']:.4f}      {row['verdict']}")
        for row in R["tables"].get("multi_query") or []:
            b, a = row["before"], row["after"]
            info(f"  query  {row['id']:<12} exposed before {b['exposed']}/{b['images']}, after {a['exposed']}/{a['images']}: "
                 f"{a['verdict']}")
        if (R.get("multi_query") or {}).get("skipped"):
            info(f"  query  multi-query audit skipped: {R['multi_query']['skipped']}")
