"""featpipe: product photos -> frozen-backbone feature cache -> heads, auto-tagging and similarity search.

    from featpipe import Predictor
    predictor = Predictor.load("runs/model.pt")      # a model file or a bundle folder
    predictor.predict(["photo.jpg"])

The library is one module per stage (`featpipe.extract.extract`, `featpipe.harness.fit_head`, ...) and
layers as sub-packages (`features`, `workflows`, `service`). Importing the package itself loads nothing:
`Predictor` is imported when first used, so a process that needs one light module (a Ray actor running
OpenVINO) does not load torch with the rest."""
__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from .workflows.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'featpipe' has no attribute {name!r}")
