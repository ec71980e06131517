"""The one rule every registry follows (architectures, data sets, converter mappings, attacks): a name
registered twice replaces the first entry and warns, as timm's model registry does, so that a plugin
that shadows a built-in by accident says so."""

from __future__ import annotations

import warnings


def put(table: dict, name, value, what: str):
    """table[name] = value; warn when NAME already holds a different entry."""
    old = table.get(name)
    if old is not None and old is not value:
        label = getattr(name, "__name__", name)
        warnings.warn(f"{what} {label!r} registered twice: the new entry replaces the old one", stacklevel=3)
    table[name] = value
    return value
