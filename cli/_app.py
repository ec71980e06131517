"""The typer app and what every command shares: one-line errors, stdout for data, stderr for messages."""

from __future__ import annotations

import functools
import json
import os
import sys

import typer

from cvconvert.errors import CvError, one_line

app = typer.Typer(name="cvconvert", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Private split inference: convert a CNN into a complex-valued split network, train, "
                       "export to ONNX, serve, attack and benchmark it.")


def info(msg: str) -> None:
    """A message for people: stderr, so stdout stays machine-readable."""
    print(msg, file=sys.stderr, flush=True)


def emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def fail(msg: str, code: int = 2):
    info(f"error: {msg}")
    raise typer.Exit(code)


def command(name: str | None = None, *, on: typer.Typer | None = None, **kwargs):
    """app.command() (or `on`'s, for a sub-command group) that turns CvError (and any unexpected
    exception) into a one-line error."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            try:
                return fn(*a, **kw)
            except CvError as exc:
                fail(str(exc))
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as exc:  # never a traceback for users; CVCONVERT_DEBUG=1 shows it
                if os.environ.get("CVCONVERT_DEBUG"):
                    raise
                first = one_line(exc, 500)
                fail(f"{type(exc).__name__}: {first} (set CVCONVERT_DEBUG=1 for the traceback)", 1)

        return (on or app).command(name, **kwargs)(wrapped)

    return deco


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CvError(f"bad shape {text!r}: expected C,H,W such as 3,32,32") from None
    if len(shape) != 3 or min(shape) < 1:
        raise CvError(f"bad shape {text!r}: expected three positive integers C,H,W")
    return shape
