"""`cvconvert convert`: a real model -> complex split network (or a baseline), as a model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cvconvert.datasets import dataset_names

from ._app import command, emit_json, info, parse_shape


@command("convert")
def convert(
    arch: str = typer.Argument(..., help="Zoo name (see `cvconvert list`) or any torchvision classification model."),
    output: Path = typer.Option(..., "-o", "--output", help="Model directory to write."),
    split: Optional[str] = typer.Option(None, "--split", "-s",
                                        help="Preset (alpha, beta, paper) or ENCODER_END:DECODER_START dotted node names."),
    variant: str = typer.Option("complex", help="complex | original | noisy | additional"),
    data: str = typer.Option("fashion-mnist", help=f"Data set the model is for (input shape, classes, "
                                                   f"normalisation): {' | '.join(dataset_names())}."),
    task: str = typer.Option("fine", help="fine | coarse (Fashion-MNIST's 4 superclasses)."),
    input_shape: Optional[str] = typer.Option(None, help="C,H,W; overrides the data set's."),
    num_classes: Optional[int] = typer.Option(None, help="Overrides the data set's class count."),
    weights: Optional[Path] = typer.Option(None, help="state_dict of the real model, or a trained model dir / model.pt."),
    gamma: float = typer.Option(0.5, help="Noise level of the noisy variant (a + gamma * eps)."),
    k: int = typer.Option(8, help="k-anonymity: 1 real + k-1 rotated negatives per sample in GAN training."),
    activation: Optional[str] = typer.Option(None, help="fixed | channel (delta's constant c; default per model)."),
    c: Optional[float] = typer.Option(None, help="The constant c for --activation fixed."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random initialisation (same seed: the variants "
                                                  "start from the same real weights)."),
    parts: int = typer.Option(2, "--parts", "-P", help="P in 2..4: hide each image's feature among P-1 fools with "
                                                     "a secret orthogonal key (2: the complex network)."),
    key_law: Optional[str] = typer.Option(None, "--key-law", help="How the device draws the secret key "
                                          "(docs/keys.md): rotation (P = 2, the paper's angle; default), exchange "
                                          "(P = 2, signed), haar (any P; the default for P > 2)."),
    force: bool = typer.Option(False, help="Replace a non-empty output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
):
    """Rewrite ARCH into encoder / processing / decoder and write a model directory."""
    from cvconvert.build import convert_to_dir

    manifest = convert_to_dir(arch, output, split=split, variant=variant, data=data, task=task,
                              input_shape=parse_shape(input_shape), num_classes=num_classes, weights=weights,
                              gamma=gamma, k=k, activation=activation, c=c, force=force, seed=seed, parts=parts,
                              key_law=key_law)
    if as_json:
        emit_json(manifest)
    else:
        data = (manifest.get("data") or {}).get("name") or "no data set"
        info(f"wrote {output} ({manifest['variant']} {arch} for {data}, input {manifest['input_shape']}, "
             f"{manifest['num_classes']} classes; split {manifest['split']}: "
             f"encoder -> {manifest['encoder_end']}, decoder from {manifest['decoder_start'] or '(unrotate only)'}, "
             f"feature {manifest['feature_shape']}"
             + (f", {manifest['parts']} parts, key law {manifest['key_law']}" if "key_law" in manifest else "") + ")")
