"""The catalogue as a model sees it: every product's embedding in the head's own space (its hidden layer),
with ids, labels and metadata, embedded once and kept, so a similar-products query costs one search.

Built from the cache a model was trained on (`Catalogue.of_cache`) and stored under featpipe's cache folder,
named by the head's digest and the images' digest, or carried in a bundle (`workflows.bundle`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..features.networks import cache_home
from ..files import atomic_path
from ..models import Model
from ..search import SimilarityIndex, embed_space
from ..store import FeatureCache, open_caches


@dataclass
class Catalogue:
    ids: np.ndarray  # (N,) int64 image ids
    labels: np.ndarray  # (N,) the target's label of each
    meta: dict[str, np.ndarray]  # metadata columns (gender, baseColour, ...), one value per item
    vectors: np.ndarray  # (N, D) embeddings in `space`
    space: str  # e.g. "batchnorm-<head digest>": which head's embedding
    image_root: str | None = None  # where the catalogue's images/{id}.jpg were, for paths in answers
    _index: SimilarityIndex | None = field(default=None, repr=False)

    @classmethod
    def of_cache(cls, cache: FeatureCache, model: Model) -> "Catalogue":
        target = cache.attrs["target"]
        return cls(cache.ids.astype(np.int64), np.asarray(cache.meta[target]),
                   {c: np.asarray(v) for c, v in cache.meta.items() if c != target},
                   embed_space(cache, cache.features, model).astype(np.float16), space_of(model),
                   cache.attrs.get("dataset_root"))

    @classmethod
    def for_model(cls, model: Model, folder: Path | None = None) -> "Catalogue":
        """The catalogue of the cache(s) `model` was trained on, stored in `folder` (default: featpipe's cache
        folder) the first time and read from there after."""
        recorded = model.provenance.get("cache")
        paths = recorded if isinstance(recorded, list) else [recorded] if recorded else []
        digest = model.provenance.get("images_digest") or model.provenance.get("dataset_fingerprint", "")
        stored = (folder or cache_home() / "catalogues") / f"{space_of(model)}-{str(digest)[:12]}.npz"
        if stored.is_file():
            return cls.load(stored)
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise UserError(f"similar products need the catalogue this model was trained on, and its cache "
                            f"{missing[0] if missing else '(none recorded)'} is not here; use a bundle "
                            "(`featpipe bundle`, which carries the catalogue) or the machine that has the cache")
        catalogue = cls.of_cache(open_caches(paths), model)
        try:
            catalogue.save(stored)
        except OSError:
            pass  # a read-only cache folder costs the next process the embedding again, nothing else
        return catalogue

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"space": self.space, "image_root": self.image_root, "columns": list(self.meta)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ids=self.ids, labels=self.labels.astype(str), vectors=self.vectors,
                     header=np.array(json.dumps(header)), **{f"meta_{i}": self.meta[c].astype(str)
                                                            for i, c in enumerate(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Catalogue":
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                return cls(z["ids"], z["labels"], {c: z[f"meta_{i}"] for i, c in enumerate(header["columns"])},
                           z["vectors"], header["space"], header["image_root"])
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path}: not a readable catalogue file ({type(exc).__name__}); delete it and it is "
                            "rebuilt from the cache") from None

    @property
    def index(self) -> SimilarityIndex:
        if self._index is None:
            self._index = SimilarityIndex(self.vectors.astype(np.float32), self.ids)
        return self._index

    def column(self, name: str) -> np.ndarray:
        """A metadata column by name, any case; an unknown name is an error listing the columns."""
        columns = {c.lower(): c for c in ["label", *self.meta]}
        if name.lower() not in columns:
            raise UserError(f"unknown metadata column {name!r}; the catalogue has {', '.join(columns.values())}")
        real = columns[name.lower()]
        return self.labels if real == "label" else self.meta[real]

    def allowed(self, where: dict[str, str], same: tuple[str, ...] = (), row: int | None = None) -> np.ndarray:
        """Items whose column equals each `where` value (case-insensitively) and, for `same`, the value of item
        `row`. A value no item has is an error listing the column's values."""
        mask = np.ones(len(self.ids), dtype=bool)
        for name, value in where.items():
            col = self.column(name)
            match = np.char.lower(col.astype(str)) == value.strip().lower()
            if not match.any():
                values = sorted(set(col.tolist()))
                raise UserError(f"{name}={value}: no catalogue item has that value; {name} is one of "
                                f"{', '.join(values[:30])}{' ...' if len(values) > 30 else ''}")
            mask &= match
        for name in same:
            if row is None:
                raise UserError(f"same={name}: needs a catalogue item as the query (a new photo has no metadata); "
                                f"filter with where={name}=VALUE instead")
            col = self.column(name)
            mask &= col == col[row]
        return mask

    def row_of(self, image_id: int) -> int:
        rows = np.flatnonzero(self.ids == int(image_id))
        if not len(rows):
            raise UserError(f"id {image_id} is not in the catalogue ({len(self.ids)} items)")
        return int(rows[0])

    def search(self, query: np.ndarray, k: int, mask: np.ndarray, extra: tuple[str, ...] = ()) -> list[dict]:
        """The k items nearest `query` (one vector in this space) among `mask`, best first."""
        k = min(k, int(mask.sum()))
        if k < 1:
            raise UserError("no catalogue item passes the filters")
        found = self.index.exact(query[None, :], k, None if mask.all() else mask)
        return [{"rank": r + 1, "id": int(self.ids[i]), "label": str(self.labels[i]), "score": float(s)}
                | ({"path": str(Path(self.image_root) / "images" / f"{int(self.ids[i])}.jpg")} if self.image_root else {})
                | {c: str(self.column(c)[i]) for c in extra}
                for r, (i, s) in enumerate(zip(found.rows[0], found.scores[0]))]


def space_of(model: Model) -> str:
    """The name of a head's embedding space: its kind and the digest of its weights."""
    return f"{model.head.head}-{model.digest()}"
