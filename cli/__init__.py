"""The cvconvert command line (typer)."""
