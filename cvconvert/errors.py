"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class CvError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported layer...)."""


class ConversionError(CvError):
    """The converter cannot make a model rotation-equivariant as asked."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to `limit`."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
