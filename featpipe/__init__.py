"""featpipe: product photos -> frozen-backbone feature cache -> heads, auto-tagging and similarity search."""
__version__ = "0.1.0"

from .extract import extract  # noqa: E402

__all__ = ["extract", "__version__"]
