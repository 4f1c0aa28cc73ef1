"""A model as a self-contained folder that runs where the dataset, the cache and the weights are not.

    bundle/
      manifest.json      what is inside, with each file's sha256
      model.pt           the model file (head, classes, threshold, provenance)
      networks/KEY/      each backbone converted to OpenVINO IR (model.xml + .bin), named as the network store
                         names it (`features.networks.network_key`)
      weights/           each backbone's weights file, for a torch-runtime model (OpenVINO reads the IR)
      catalogue.npz      the catalogue in the head's embedding space, for similar products

`write_bundle` builds it from a model file on the machine that has what the model was made with;
`Predictor.load(folder)` (`read_bundle`) loads it anywhere: its networks are looked up first, and the
weights folder is on the weights search path.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..features.networks import NetworkStore, network_key
from ..features.pipeline import part_network, pipeline_runtime
from ..features.weights import locate_weights
from ..files import sha256_file
from ..models import Model, load_model
from .catalogue import Catalogue

FORMAT = "featpipe-bundle"
FORMAT_VERSION = 1


class BundleError(UserError):
    """A bundle folder that is incomplete, damaged or not a bundle."""


@dataclass
class Bundle:
    root: Path
    model: Model
    manifest: dict

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    def networks(self, store: NetworkStore | None = None) -> NetworkStore:
        """`store` (default: featpipe's own) with this bundle's networks searched first."""
        store = store or NetworkStore()
        return NetworkStore(store.root, [self.root / "networks", *store.extra])

    def catalogue(self) -> Catalogue | None:
        name = self.manifest.get("catalogue")
        return Catalogue.load(self.root / name) if name else None


def _parts(model: Model) -> list[dict]:
    return model.provenance.get("parts") or [model.provenance]


def write_bundle(model_path: str | os.PathLike, out: str | os.PathLike, *, networks: NetworkStore | None = None,
                 search_path=(), catalogue: bool = True) -> Path:
    """Write the bundle of the model file `model_path` to the folder `out` (which must not exist yet), whole or
    not at all. Needs what the model needs here: its backbones' weights (or their networks in `networks`) and,
    with `catalogue`, the cache it was trained on."""
    model_path, out = Path(model_path), Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists; give a new folder for the bundle (or remove that one)")
    model = load_model(model_path)
    store = networks or NetworkStore()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(model_path, tmp / "model.pt")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "featpipe": __version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": {}, "catalogue": None}
        split = "finetune" in model.provenance
        for part in _parts(model):
            runtime = pipeline_runtime(part)
            if runtime == "torch":
                weights = locate_weights(part, search_path)
                if weights not in ("imagenet", "none"):
                    (tmp / "weights").mkdir(exist_ok=True)
                    shutil.copyfile(weights, tmp / "weights" / Path(weights).name)
                continue
            import openvino

            key = network_key(part | {"runtime": runtime}, split)
            network = part_network(part, runtime, split, store, search_path)
            openvino.save_model(network, tmp / "networks" / key / "model.xml", compress_to_fp16=False)
        if catalogue and not split:
            Catalogue.for_model(model).save(tmp / "catalogue.npz")
            manifest["catalogue"] = "catalogue.npz"
        manifest["files"] = {str(p.relative_to(tmp)): f"sha256:{sha256_file(p)}"
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """The bundle in `root`; every file is checked against the manifest's sha256 when `verify`."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}: not a featpipe bundle (no readable manifest.json: {type(exc).__name__}); "
                          "make one with `featpipe bundle`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{root}: not a featpipe bundle of format {FORMAT_VERSION}; make it again with `featpipe bundle`")
    if verify:
        for name, digest in manifest["files"].items():
            if name == "model.pt":
                continue  # load_model checks the model file's own checksum
            path = root / name
            if not path.is_file():
                raise BundleError(f"{root}: {name} is missing; copy the whole bundle folder")
            if f"sha256:{sha256_file(path)}" != digest:
                raise BundleError(f"{root}: {name} is damaged (its sha256 is not the manifest's); copy it again")
    return Bundle(root, load_model(root / "model.pt"), manifest)
