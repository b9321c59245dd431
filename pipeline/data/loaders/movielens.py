"""MovieLens-100K + TMDB text + posters (``movielens-mm``).

Directory layout: ``u.data`` (TSV user, item, rating, unix ts; no header), ``u.item``
(``|``-separated latin-1; id|title|...), optional ``items_tmdb.csv`` (movie_id, ...,
overview, ...) and optional ``posters/<movie_id>.jpg``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.loaders import _read
from pipeline.data.schema import Catalogue, DataError, Interactions, RawDataset

RATINGS, ITEMS, TMDB, POSTERS = "u.data", "u.item", "items_tmdb.csv", "posters"
KEYS = ("user", "item", "timestamp")


def load(path, *, rating_threshold: float | None = None, allow_duplicates: bool = False,
         skip_missing: bool = False) -> RawDataset:
    """Read and validate MovieLens-100K-MM.

    rating_threshold: keep ratings >= threshold (None keeps all).
    Returns interactions [N] (int64 ids and timestamps, float32 ratings, file order) and a
    catalogue [M] with one row per u.item movie: text "{title}. {overview}" (or "{title}."),
    image = absolute poster path or "".
    """
    threshold = _check_threshold(rating_threshold)
    root = _read.require_dir(path)
    catalogue = _read_items(root / ITEMS)
    ratings = _read.read_text_table(root / RATINGS, sep="\t", header=False, quoting=csv.QUOTE_NONE)
    ratings = _read.name_columns(ratings, ("user", "item", "rating", "timestamp"), exact=True)
    n_read = len(ratings.frame)
    ratings, dropped = _read.drop_missing(ratings, KEYS, skip=skip_missing)
    inter = _parse_ratings(ratings, catalogue.item_id, allow_duplicates)
    overviews, tmdb_info = _read_overviews(root / TMDB)
    catalogue = _with_content(catalogue, overviews, root / POSTERS)
    inter, below = _apply_threshold(inter, threshold, ratings.path)
    files = {"interactions": str(ratings.path), "items": str(root / ITEMS)}
    if tmdb_info:
        files["tmdb"] = str(root / TMDB)
    source = {
        "format": "movielens-mm",
        "path": str(root),
        "files": files,
        "rows_read": n_read,
        "dropped_missing": dropped,
        "rating_threshold": threshold,
        "dropped_below_threshold": below,
        **tmdb_info,
    }
    return RawDataset(root.name, inter, catalogue, None, source)


def _check_threshold(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"rating_threshold must be a finite number or None, got {t!r}")
    return float(t)


def _apply_threshold(inter: Interactions, threshold: float | None, path: Path) -> tuple[Interactions, int]:
    """Keep rows with rating >= threshold; returns them and the number removed."""
    if threshold is None:
        return inter, 0
    keep = inter.rating >= threshold
    if not keep.any():
        raise DataError(path, f"no ratings >= {threshold} (rating_threshold)")
    kept = Interactions(inter.user[keep], inter.item[keep], inter.timestamp[keep], inter.rating[keep])
    return kept, int((~keep).sum())


def _read_items(path: Path) -> Catalogue:
    """u.item -> catalogue [M] with item_id int64 and text = title (content added later)."""
    table = _read.read_text_table(path, sep="|", header=False, encoding="latin-1", quoting=csv.QUOTE_NONE)
    table = _read.name_columns(table, ("movie_id", "title"), exact=False)
    where = table.where()
    ids_col = table.frame["movie_id"]
    where.fail(_read.is_missing(ids_col), "movie_id", lambda v: "empty movie id", ids_col)
    ids = _read.parse_ids(ids_col, where, "movie_id")
    _read.check_unique_ids(ids, where, "movie_id")
    titles = table.frame["title"].to_numpy(dtype=object)
    empty = np.full(len(ids), "", dtype=object)
    return Catalogue(ids, titles, empty)


def _parse_ratings(table: _read.Table, known_items: np.ndarray, allow_duplicates: bool) -> Interactions:
    frame, where = table.frame, table.where()
    user = _read.parse_ids(frame["user"], where, "user")
    item = _read.parse_ids(frame["item"], where, "item")
    rating = _read.parse_ratings(frame["rating"], where, "rating")
    ts = _read.parse_numbers(frame["timestamp"], where, "timestamp", what="timestamp")
    where.fail(~np.isin(item, known_items), "item", lambda v: f"item {v} is not in {ITEMS}", item)
    if not allow_duplicates:
        _read.check_duplicates({"user": user, "item": item, "timestamp": ts}, where)
    return Interactions(user, item, ts, rating)


def _read_overviews(path: Path) -> tuple[pd.Series, dict]:
    """items_tmdb.csv -> overview per movie_id (Series indexed by int64 id), plus stats.

    Repeated movie_ids are expected (55 in the release) and must carry the same
    overview; the first row of each id is kept.
    """
    if not path.exists():
        return pd.Series([], dtype=object, index=pd.Index([], dtype=np.int64)), {}
    table = _read.read_text_table(path)
    _read.require_columns(table, ("movie_id", "overview"))
    where = table.where()
    ids_col = table.frame["movie_id"]
    where.fail(_read.is_missing(ids_col), "movie_id", lambda v: "empty movie_id", ids_col)
    ids = _read.parse_ids(ids_col, where, "movie_id")
    overview = table.frame["overview"].to_numpy(dtype=object)
    first = ~pd.Series(ids).duplicated(keep="first").to_numpy()
    kept = pd.Series(overview[first], index=ids[first])
    conflict = overview != kept.reindex(ids).to_numpy()
    where.fail(conflict, "overview", lambda v: "repeated movie_id with a different overview than its first row", ids)
    return kept, {"tmdb_rows": len(ids), "tmdb_duplicate_rows": int((~first).sum())}


def _with_content(cat: Catalogue, overviews: pd.Series, posters: Path) -> Catalogue:
    """Catalogue with text "{title}. {overview}" / "{title}." and absolute poster paths."""
    titles = pd.Series(cat.text, dtype=str)
    ov = pd.Series(overviews.reindex(cat.item_id).to_numpy(), dtype=object).fillna("").astype(str)
    text = (titles + ". " + ov).where(ov != "", titles + ".")
    text = text.where(titles != "", ov)  # no title: just the overview ('' if neither)
    return Catalogue(cat.item_id, text.to_numpy(dtype=object), _read.existing_images(posters, cat.item_id))
