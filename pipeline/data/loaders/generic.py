"""Generic format for users' own data (also what the synthetic generator writes).

``interactions.csv`` or ``interactions.parquet``: columns user_id, item_id, timestamp
(required) and rating (optional).
``catalogue.csv`` or ``catalogue.parquet`` (optional): item_id (required), title, text and
image_path (optional; image_path relative to the catalogue file's folder unless absolute; title is
what `recommend` shows and what fills {title} in the encode prompt).
Any other column is not read, and a warning on stderr names it (a misspelt `titel` never passes
silently).
Ids are int64 when every id of the column is an integer, else str (names); negative integers
and decimal numbers (1.5, 2e3) fail. A row with an empty user_id, item_id or timestamp, or a line
cut short, fails unless skip_missing (CLI: --skip-missing) asks to drop such rows; they are counted
in `data stats` and in the run summary.
Item ids of interactions and catalogue share one type.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from pipeline.data.loaders import _read
from pipeline.data.schema import Catalogue, DataError, Interactions, RawDataset

INTERACTIONS = ("interactions.csv", "interactions.parquet")
CATALOGUE = ("catalogue.csv", "catalogue.parquet")
KEYS = ("user_id", "item_id", "timestamp")
INTERACTION_COLUMNS = (*KEYS, "rating")
CATALOGUE_COLUMNS = ("item_id", "title", "text", "image_path")


def load(path=None, *, interactions=None, catalogue=None, allow_duplicates: bool = False,
         skip_missing: bool = False) -> RawDataset:
    """Read and validate a generic dataset.

    Either `path`, a directory with one interactions file and at most one catalogue file,
    or explicit `interactions` (and optional `catalogue`) files (.csv, .tsv, .parquet).
    Returns interactions [N] in file order (ids int64 or str objects; timestamp int64 or
    float64; rating float32 or None) and a catalogue [M] or None. A row with an empty
    user_id/item_id/timestamp (a field left empty, or a line cut short) is refused, or with
    skip_missing dropped and counted in ``source['dropped_missing']``.
    """
    inter_path, cat_path, name = _resolve(path, interactions, catalogue)
    table = _read.read_table(inter_path, columns=INTERACTION_COLUMNS)
    _warn_unread(inter_path, table, INTERACTION_COLUMNS)
    _read.require_columns(table, KEYS)
    n_read = len(table.frame)
    table, dropped = _read.drop_missing(table, KEYS, skip=skip_missing)
    cat_table = _read_catalogue_table(cat_path) if cat_path else None
    items_are_int = _read.all_int(table.frame["item_id"]) and (
        cat_table is None or _read.all_int(cat_table.frame["item_id"])
    )
    inter = _parse_interactions(table, not items_are_int, allow_duplicates)
    cat = _parse_catalogue(cat_table, not items_are_int) if cat_table else None
    files = {"interactions": str(table.path)}
    if cat_table:
        files["catalogue"] = str(cat_table.path)
    source = {"format": "generic", "files": files, "rows_read": n_read, "dropped_missing": dropped}
    return RawDataset(name, inter, cat, None, source)


def _resolve(path, interactions, catalogue) -> tuple[Path, Path | None, str]:
    """(interactions file, catalogue file or None, dataset name) from the call's arguments."""
    if path is not None and (interactions is not None or catalogue is not None):
        raise TypeError("generic.load: pass either a directory or interactions=/catalogue=, not both")
    if path is None:
        if interactions is None:
            raise TypeError("generic.load: pass a directory or interactions=")
        p = _read.require_file(interactions)
        c = _read.require_file(catalogue) if catalogue is not None else None
        return p, c, p.stem
    root = _read.require_dir(path)
    return _read.find_one(root, INTERACTIONS, required=True), _read.find_one(root, CATALOGUE, required=False), root.name


def _parse_interactions(table: _read.Table, item_strings: bool, allow_duplicates: bool) -> Interactions:
    frame, where = table.frame, table.where()
    _read.refuse_decimal_ids(frame["user_id"], where, "user_id")
    _read.refuse_decimal_ids(frame["item_id"], where, "item_id")
    user_strings = not _read.all_int(frame["user_id"])
    user = _read.parse_ids(frame["user_id"], where, "user_id", strings=user_strings)
    item = _read.parse_ids(frame["item_id"], where, "item_id", strings=item_strings)
    ts = _read.parse_numbers(frame["timestamp"], where, "timestamp", what="timestamp")
    rating = _read.parse_ratings(frame["rating"], where, "rating") if "rating" in frame else None
    if not allow_duplicates:
        _read.check_duplicates({"user_id": user, "item_id": item, "timestamp": ts}, where)
    return Interactions(user, item, ts, rating)


def _warn_unread(path: Path, table: _read.Table, known: tuple[str, ...]) -> None:
    """A warning on stderr naming the columns of `path` the generic format does not read."""
    present = _read.parquet_columns(path) if table.kind == "parquet" else table.columns()
    unread = [name for name in present if name not in known]
    if unread:
        print(f"warning: {path}: column(s) {', '.join(map(repr, unread))} not read (the generic format reads "
              f"{', '.join(known)})", file=sys.stderr, flush=True)


def _read_catalogue_table(path: Path) -> _read.Table:
    table = _read.read_table(path, columns=CATALOGUE_COLUMNS)
    _warn_unread(path, table, CATALOGUE_COLUMNS)
    _read.require_columns(table, ("item_id",))
    col = table.frame["item_id"]
    table.where().fail(_read.is_missing(col), "item_id", lambda v: "empty item_id", col)
    _read.refuse_decimal_ids(col, table.where(), "item_id")
    return table


def _parse_catalogue(table: _read.Table, item_strings: bool) -> Catalogue:
    """Catalogue [M]: unique item ids, text ('' if none), absolute image paths ('' if none),
    titles ('' if none; None when the file has no title column)."""
    frame, where = table.frame, table.where()
    ids = _read.parse_ids(frame["item_id"], where, "item_id", strings=item_strings)
    _read.check_unique_ids(ids, where, "item_id")
    text = _text_column(table, "text")
    image = _absolute_paths(_text_column(table, "image_path"), table.path.parent)
    title = _text_column(table, "title").str.strip().to_numpy(dtype=object) if "title" in frame else None
    return Catalogue(ids, text.to_numpy(dtype=object), image.to_numpy(dtype=object), title)


def _text_column(table: _read.Table, name: str) -> pd.Series:
    """Column `name` as str with '' for missing; all '' when the column is absent."""
    n = len(table.frame)
    if name not in table.frame:
        return pd.Series([""] * n, dtype=str)
    col = table.frame[name].reset_index(drop=True)
    if not _read.is_text(col):
        raise DataError(table.path, f"column holds {col.dtype} values; expected text", column=name)
    return col.fillna("").astype(str)


def _absolute_paths(paths: pd.Series, base: Path) -> pd.Series:
    """Relative paths resolved against `base`; absolute kept; '' kept."""
    relative = (paths != "") & ~paths.str.startswith(os.sep)
    return paths.where(~relative, str(base) + os.sep + paths)
