"""Entry point of the `cvconvert` console script (and `python -m cvconvert.cli`, e.g. under torchrun)."""

from __future__ import annotations

import importlib

from ._app import app

# One module per command (huggingface_hub's cli/ layout); each registers itself on import.
COMMANDS = ["convert", "list_cmd", "info", "serve", "export", "validate", "infer", "fools", "train", "eval_cmd",
            "attack", "bench"]
for _name in COMMANDS:
    importlib.import_module(f"cvconvert.cli.{_name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
