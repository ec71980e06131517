"""cvconvert: private split inference with complex-valued networks (ICLR 2020)."""

__version__ = "0.1.0"
FORMAT_VERSION = 2  # 2: one key law for every P (keyed graphs take `key`); docs/keys.md
