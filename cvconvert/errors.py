"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class CvError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported layer...)."""


class ConversionError(CvError):
    """The converter cannot make a model rotation-equivariant as asked."""
