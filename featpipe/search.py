"""Similar products from cached embeddings: exact cosine search, and an HNSW index for large catalogues.

Search runs in the backbone's raw feature space or in a trained head's own embedding (its hidden
layer), which groups products by type rather than by look alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_path, open_regular
from .models import Model
from .store import FeatureCache

log = logging.getLogger(__name__)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_space(cache: FeatureCache, features: np.ndarray, model: Model | None = None) -> np.ndarray:
    """Features -> the search space: raw backbone features, or the model head's embedding.

    Not normalised here: SimilarityIndex normalises its catalogue and every query itself."""
    if model is None:
        return features
    model.check_features(cache.attrs)
    model.check_labels(cache.provenance(), cache.classes)  # a head trained on other classes or data is another space
    return model.head.embed(features)


@dataclass
class Neighbours:
    rows: np.ndarray  # (n_queries, k) row indices into the catalogue
    scores: np.ndarray  # (n_queries, k) cosine similarities, best first


@dataclass
class IndexUpdate:
    """What build_approximate did to the stored index: built it, or added, re-embedded and deleted items."""

    built: bool
    added: int = 0
    changed: int = 0
    removed: int = 0
    deleted_share: float = 0.0  # of the index's slots, deleted items included
    rebuild_due: bool = False

    def __str__(self) -> str:
        if self.built:
            return "HNSW index built"
        text = (f"HNSW index updated: {self.added} added, {self.changed} changed, {self.removed} deleted "
                f"({self.deleted_share:.0%} of its slots are deleted items)")
        return text + ("; a rebuild is due (deleted items slow search and cost recall): rerun with "
                       "--rebuild-index" if self.rebuild_due else "")


def vector_digests(vectors: np.ndarray) -> np.ndarray:
    """A short hash of each row's bytes: says which indexed vectors changed."""
    rows = np.ascontiguousarray(vectors)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in rows],
                    dtype=np.uint64)


class SimilarityIndex:
    """A catalogue of unit vectors; `exact` is a matrix product, `approximate` an hnswlib HNSW graph.

    ids: one stable id per row (image ids); the HNSW index is labelled by them, so a stored index can
    follow a catalogue that changes: new items are added, changed ones re-inserted, removed ones marked
    deleted."""

    # past these, an updated index is worth rebuilding
    REBUILD_DELETED_SHARE = 0.1
    REBUILD_CHANGED_SHARE = 0.5

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None):
        self.vectors = normalize(vectors)
        self.ids = np.arange(len(self.vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(self.ids) != len(self.vectors) or len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("SimilarityIndex needs one distinct id per vector")
        self._by_id = np.argsort(self.ids)  # HNSW answers with ids; this finds their rows
        self._hnsw = None

    def __len__(self) -> int:
        return len(self.vectors)

    def _check_k(self, k: int, allowed: np.ndarray | None) -> None:
        n = len(self) if allowed is None else int(allowed.sum())
        if k < 1 or k > n:
            raise UserError(f"-k {k}: the catalogue has {n} candidate item(s); ask for between 1 and {n}")

    def exact(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Neighbours:
        """Top-k by cosine; `allowed` is a boolean mask over the catalogue (metadata filters)."""
        self._check_k(k, allowed)
        sims = normalize(queries) @ self.vectors.T
        if allowed is not None:
            sims[:, ~allowed] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sims, top, 1)
        order = np.argsort(-s, axis=1, kind="stable")
        return Neighbours(np.take_along_axis(top, order, 1), np.take_along_axis(s, order, 1))

    def build_approximate(self, path: str | os.PathLike | None = None, key: str = "", m: int = 32,
                          ef_construction: int = 200, ef: int = 128, threads: int = -1,
                          rebuild: bool = False) -> IndexUpdate:
        """Load the HNSW index stored at `path` (built for `key` with these settings) and bring it up to
        date with this catalogue, or build (and store) it when there is none, or `rebuild` asks."""
        import hnswlib

        state_path = Path(str(path) + ".state.npz") if path else None
        settings = {"key": key, "m": m, "ef_construction": ef_construction, "dim": int(self.vectors.shape[1])}
        digests = vector_digests(self.vectors)
        index = hnswlib.Index(space="ip", dim=self.vectors.shape[1])
        state = _read_state(state_path) if path and Path(path).is_file() and not rebuild else None
        if state is not None and state["settings"] == settings:
            update = self._update(index, path, state, digests, threads)
        else:
            index.init_index(max_elements=max(len(self), 1), ef_construction=ef_construction, M=m, random_seed=0)
            index.add_items(self.vectors, self.ids, num_threads=threads)
            state = {"settings": settings, "built_with": len(self), "changed_since_build": 0}
            update = IndexUpdate(built=True)
        if path and (update.built or update.added or update.changed or update.removed):
            with atomic_path(Path(path)) as tmp:
                index.save_index(str(tmp))
            with atomic_path(state_path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, ids=self.ids, digests=digests, meta=np.array(json.dumps(
                    {k: state[k] for k in ("settings", "built_with", "changed_since_build")})))
        index.set_ef(max(ef, 1))
        self._hnsw = index
        return update

    def _update(self, index, path, state: dict, digests: np.ndarray, threads: int) -> IndexUpdate:
        """Mark removed ids deleted, then add new ids and re-insert changed ones (hnswlib replaces the
        vector of a label it holds, and revives a deleted label that comes back)."""
        old = dict(zip(state["ids"].tolist(), state["digests"].tolist()))
        now = set(self.ids.tolist())
        removed = [i for i in old if i not in now]
        fresh = np.array([i not in old for i in self.ids.tolist()])
        changed = np.array([i in old and old[i] != d for i, d in zip(self.ids.tolist(), digests.tolist())])
        index.load_index(str(path), max_elements=max(len(self), 1))
        index.resize_index(index.get_current_count() + int(fresh.sum()))
        for i in removed:
            index.mark_deleted(i)
        todo = fresh | changed
        if todo.any():
            index.add_items(self.vectors[todo], self.ids[todo], num_threads=threads)
        state["changed_since_build"] += int(todo.sum())
        slots = index.get_current_count()
        deleted = (slots - len(self)) / max(slots, 1)
        due = (deleted > self.REBUILD_DELETED_SHARE
               or state["changed_since_build"] > self.REBUILD_CHANGED_SHARE * max(state["built_with"], 1))
        return IndexUpdate(False, int(fresh.sum()), int(changed.sum()), len(removed), deleted, due)

    def approximate(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Neighbours:
        if self._hnsw is None:
            raise RuntimeError("call build_approximate() first")
        self._check_k(k, allowed)
        self._hnsw.set_ef(max(self._hnsw.ef, k))
        kwargs = {}
        if allowed is not None:
            allowed_ids = set(self.ids[allowed].tolist())
            kwargs = {"filter": lambda label: label in allowed_ids}
        labels, dist = self._hnsw.knn_query(normalize(queries), k=k, num_threads=1 if allowed is not None else -1, **kwargs)
        rows = self._by_id[np.searchsorted(self.ids, labels.astype(np.int64), sorter=self._by_id)]
        return Neighbours(rows, 1.0 - dist)


def _read_state(path: Path) -> dict | None:
    """The ids and vector digests a stored index holds, and how it was built; None when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"ids": z["ids"], "digests": z["digests"]} | json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError):
        return None


def index_path(cache: FeatureCache, space: str) -> Path:
    """Where the approximate index of a cache lives: beside it, named for the search space (and for every
    cache of a joined one, whose vectors are another index's)."""
    stems = [Path(p).stem for p in cache.attrs["cache"]] if "parts" in cache.attrs else [cache.path.stem]
    return cache.path.with_name(f"{'+'.join(stems)}.{space}.hnsw")


def precision_at_k(neigh_rows: np.ndarray, query_labels: np.ndarray, catalogue_labels: np.ndarray) -> float:
    return float((catalogue_labels[neigh_rows] == query_labels[:, None]).mean())


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the approximate search also returns."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def contact_sheet(tiles: list[tuple[str, str | os.PathLike | None]], out: str | os.PathLike,
                  thumb: tuple[int, int] = (120, 160), columns: int = 11) -> Path:
    """A PNG grid of (caption, image path) tiles, `columns` to a row; an unreadable image is a red box."""
    from PIL import Image, ImageDraw

    from .images import to_rgb

    w, h = thumb
    columns = max(1, min(columns, len(tiles)))
    n_rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (w * columns, (h + 30) * n_rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, path) in enumerate(tiles):
        x, y = (i % columns) * w, (i // columns) * (h + 30)
        try:
            with open_regular(path) as fh, Image.open(fh) as im:  # never a named pipe
                im = to_rgb(im)
                scale = min(w / im.width, h / im.height)  # catalogue photos are 60x80: enlarge them too
                im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.Resampling.BICUBIC)
                sheet.paste(im, (x + (w - im.width) // 2, y + (h - im.height) // 2))
        except (OSError, ValueError, TypeError, AttributeError):
            draw.rectangle([x + 4, y + 4, x + w - 4, y + h - 4], outline="red")
        draw.multiline_text((x + 4, y + h + 1), caption[:40], fill="black", spacing=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def neighbour_tiles(query_image: str | os.PathLike | None, hits: list[dict]) -> list[tuple[str, str | None]]:
    """The query, then each neighbour with its id, label and score: one row of a contact sheet."""
    return [("query", query_image)] + [(f"{h['id']} {h['label']}\n{h['score']:.3f}", h.get("path")) for h in hits]


def _matching(cache: FeatureCache, col: str, value: str) -> np.ndarray:
    """Rows whose `col` is `value`; a value no row has is an error listing the ones there are (else `-k` would
    be blamed for a catalogue left empty by the filter)."""
    hit = np.asarray(cache.meta[col]) == value
    if not hit.any():
        values = sorted(set(cache.meta[col]))
        shown = ", ".join(values[:20]) + (f" ... ({len(values)} in all)" if len(values) > 20 else "")
        raise UserError(f"--where {col}={value} matches no catalogue item; {col} has: {shown}")
    return hit


def find_similar(cache: FeatureCache, k: int = 10, query_id: int | None = None, image: str | os.PathLike | None = None,
                 same: tuple[str, ...] = (), where: dict[str, str] | None = None, model: Model | None = None,
                 approximate: bool = False, search_path: Sequence[str | os.PathLike] = (), device: str = "auto",
                 rebuild_index: bool = False) -> list[dict]:
    """The k catalogue items most similar to a cached id or a new photo, optionally filtered on metadata.

    `same`: columns whose value must equal the query's (cached ids only); `where`: column=value filters.
    """
    if (query_id is None) == (image is None):
        raise UserError("give exactly one query: --id ID (an image in the cache) or an IMAGE file")
    for col in [*same, *(where or {})]:
        if col not in cache.meta:
            raise UserError(f"unknown metadata column {col!r}; the cache has {', '.join(cache.meta)}")
    if query_id is not None:
        rows = np.flatnonzero(cache.ids == int(query_id))
        if not len(rows):
            raise UserError(f"--id {query_id} is not in {cache.path.name} ({len(cache.ids)} images)")
        query = cache.features[rows[:1]].astype(np.float32)
    else:
        if same:
            raise UserError("--same needs a cached --id query (a new photo has no metadata); use --where COL=VALUE")
        from .features.pipeline import FeaturePipeline

        feats, ok, errors = FeaturePipeline(cache.provenance(), device=device, search_path=search_path).embed([Path(image)])
        if not ok[0]:
            raise UserError(f"{image}: unreadable image ({errors[0]})")
        query = feats
    allowed = np.ones(len(cache.ids), dtype=bool)
    for col in same:
        allowed &= np.asarray(cache.meta[col]) == cache.meta[col][rows[0]]
    for col, value in (where or {}).items():
        allowed &= _matching(cache, col, value)
    if where and not allowed.any():
        raise UserError(f"--where {' '.join(f'{c}={v}' for c, v in where.items())}"
                        f"{' with --same ' + ' '.join(same) if same else ''}: each matches some items, but no "
                        "catalogue item matches them all; drop one")
    space = "raw" if model is None else f"{model.head.head}-{model.digest()}"
    index = SimilarityIndex(embed_space(cache, cache.features, model), cache.ids)
    q = embed_space(cache, query, model)
    mask = None if allowed.all() else allowed
    if approximate:
        # a stored index follows the cache's updates item by item; another space is another file
        update = index.build_approximate(index_path(cache, space), key=space, rebuild=rebuild_index)
        (log.warning if update.rebuild_due else log.info)("%s", update)
        found = index.approximate(q, k, mask)
    else:
        found = index.exact(q, k, mask)
    root = Path(cache.attrs["dataset_root"]) / "images"
    target = cache.attrs["target"]
    return [{"rank": r + 1, "id": int(cache.ids[i]), "label": cache.meta[target][i], "score": float(sc),
             "path": str(root / f"{int(cache.ids[i])}.jpg")} | {c: cache.meta[c][i] for c in [*same, *(where or {})]}
            for r, (i, sc) in enumerate(zip(found.rows[0], found.scores[0]))]
