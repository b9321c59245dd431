"""MicroLens format: a pairs TSV and a titles CSV.

Pairs (no header): ``user \\t item1 item2 ...`` with each user's items in chronological
order and no timestamps, so timestamp = position 0, 1, 2, ... within the user's line.
Titles: header ``item,title``. Optional covers ``images/<item>.jpg`` beside the titles.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from pipeline.data.loaders import _read
from pipeline.data.schema import Catalogue, Interactions, RawDataset

PAIRS_GLOB, TITLES_GLOB, IMAGES = "*_pairs.tsv", "*_titles.csv", "images"


def load(path=None, *, pairs=None, titles=None, allow_duplicates: bool = False,
         skip_missing: bool = False) -> RawDataset:
    """Read and validate MicroLens data.

    Either `path`, a directory holding one ``*_pairs.tsv`` and at most one
    ``*_titles.csv``, or explicit `pairs` (and optional `titles`) files.
    Returns interactions [N] (int64 user, item, position timestamps; file order) and a
    catalogue [M] (text = title, image = cover path or "") when titles exist.
    A line with an empty user or item list is refused, or with skip_missing dropped and counted
    (``source['dropped_missing']``).
    allow_duplicates is accepted for a uniform API: with one line per user and positional
    timestamps an exact (user, item, timestamp) duplicate cannot occur.
    """
    pairs_path, titles_path, name = _resolve(path, pairs, titles)
    table = _read.name_columns(
        _read.read_text_table(pairs_path, sep="\t", header=False, quoting=csv.QUOTE_NONE),
        ("user", "items"),
        exact=True,
    )
    n_read = len(table.frame)
    table, dropped = _read.drop_missing(table, ("user", "items"), skip=skip_missing)
    inter = _explode(table)
    catalogue = _read_titles(titles_path) if titles_path else None
    files = {"interactions": str(table.path)}
    if titles_path:
        files["titles"] = str(titles_path)
    source = {"format": "microlens", "files": files, "rows_read": n_read, "dropped_missing": dropped}
    return RawDataset(name, inter, catalogue, None, source)


def _resolve(path, pairs, titles) -> tuple[Path, Path | None, str]:
    """(pairs file, titles file or None, dataset name) from the call's arguments."""
    if path is not None and (pairs is not None or titles is not None):
        raise TypeError("microlens.load: pass either a directory or pairs=/titles=, not both")
    if path is None:
        if pairs is None:
            raise TypeError("microlens.load: pass a directory or pairs=")
        p = _read.require_file(pairs)
        return p, _read.require_file(titles) if titles is not None else None, p.stem.removesuffix("_pairs")
    root = _read.require_dir(path)
    p = _read.find_one(root, [PAIRS_GLOB], required=True)
    t = _read.find_one(root, [TITLES_GLOB], required=False)
    return p, t, p.stem.removesuffix("_pairs")


def _explode(table: _read.Table) -> Interactions:
    """One interaction per (line, item token); timestamp = token position in its line."""
    frame, where = table.frame, table.where()
    users = _read.parse_ids(frame["user"], where, "user")
    _read.check_unique_ids(users, where, "user")
    lists = pc.utf8_split_whitespace(_read.as_arrow(frame["items"]))
    tokens = pc.list_flatten(lists).to_pandas()
    parent = pc.list_parent_indices(lists).to_numpy()
    lengths = pc.list_value_length(lists).to_numpy()
    position = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = (tokens != "").to_numpy()  # split leaves no empties after strip; be safe anyway
    tokens, parent, position = tokens[keep].reset_index(drop=True), parent[keep], position[keep]
    item = _read.parse_ids(tokens, table.where(frame.index[parent]), "item")
    return Interactions(users[parent], item, position.astype(np.int64))


def _read_titles(path: Path) -> Catalogue:
    """Titles CSV -> catalogue [M]: int64 item ids (unique), text = title, image path or ""."""
    table = _read.read_text_table(path)
    _read.require_columns(table, ("item", "title"))
    where = table.where()
    ids_col = table.frame["item"]
    where.fail(_read.is_missing(ids_col), "item", lambda v: "empty item id", ids_col)
    ids = _read.parse_ids(ids_col, where, "item")
    _read.check_unique_ids(ids, where, "item")
    image = _read.existing_images(path.parent / IMAGES, ids)
    return Catalogue(ids, table.frame["title"].to_numpy(dtype=object), image)
