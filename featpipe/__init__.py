"""featpipe: product photos -> frozen-backbone feature cache -> heads, auto-tagging and similarity search.

The library is one module per stage (`featpipe.extract.extract`, `featpipe.harness.fit_head`, ...);
importing the package itself loads nothing, so a process that needs one light module (a Ray actor
running OpenVINO) does not load torch with the rest."""
__version__ = "0.1.0"
