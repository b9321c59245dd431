"""Your own item embeddings as a feature store: `python -m pipeline features import`.

    python -m pipeline features import --ids ids.txt --text text.npy [--image image.npy] \\
        --out runs/features/mydata [--data path/to/mydata]

ids: one item id per line (.txt), a CSV whose item_id column (or only column) holds them, or a
.npy vector. Row r of every matrix (.npy, [n, d], any real dtype) belongs to the r-th id. The
store is the one `encode` writes (pipeline.encode.store): ids ascending, float32 rows scaled to
unit L2 norm, a manifest naming the files imported, so `train` reads it through `data.features`
like an encoded one. Everything is checked before anything is written, and the store is written
atomically: an empty or repeated id, a matrix with another row count, a NaN/inf or all-zero row
is a DataError naming the file, the row and why; with --data, ids the dataset does not know and
interacted items without a row are refused too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.loaders._read import check_finite
from pipeline.data.schema import DataError
from pipeline.encode import store
from pipeline.outputs import check_output, sha256_of

MODALITIES = ("text", "image")
_INT = re.compile(r"[+-]?[0-9]+")


def import_embeddings(ids_file, matrices: dict[str, Path], out, *, data=None, overwrite: bool = False) -> dict:
    """Write a feature store at `out` from an id list and one matrix per modality.

    matrices: modality ("text" or "image") -> .npy file [n, d]. data: a DatasetConfig whose items
    the ids must cover (every interacted item has a row, and no id is unknown to it), or None.
    Returns the store's manifest with "path" added. `out` must be new or an earlier store
    (replaced only with `overwrite`), never one of the inputs.
    """
    if not matrices:
        raise ValueError("features import: give at least one matrix (--text and/or --image)")
    unknown = sorted(set(matrices) - set(MODALITIES))
    if unknown:
        raise ValueError(f"features import: unknown modality {unknown[0]!r}; one of {', '.join(MODALITIES)}")
    inputs = [Path(ids_file), *map(Path, matrices.values())]
    check_output(out, store.STORE_OUTPUT, inputs=inputs, overwrite=overwrite)  # before anything is read
    ids, rows = read_ids(ids_file)
    order = np.argsort(ids, kind="stable")
    loaded = {name: _read_matrix(Path(path), ids, rows) for name, path in matrices.items()}
    if data is not None:
        _check_against(data, ids, ids_file)
    normalised = {name: _unit_rows(matrix)[order] for name, matrix in loaded.items()}
    manifest = {
        "source": "imported",
        "imported": {"ids": str(Path(ids_file).resolve()),
                     **{name: str(Path(path).resolve()) for name, path in matrices.items()},
                     "sha256": {str(p.name): sha256_of(p) for p in inputs}},
        "item_id_dtype": str(ids.dtype),
        "normalisation": "l2 (rows scaled to unit norm on import)",
        "modalities": {name: {"dim": int(matrix.shape[1]), "model_id": f"imported:{Path(matrices[name]).name}",
                              "fallback": "none (every item has its own row)"}
                       for name, matrix in normalised.items()},
    }
    store.write_store(out, ids[order], normalised, manifest)
    return {**store.read_manifest(out), "path": str(out)}


def read_ids(path) -> tuple[np.ndarray, list[int]]:
    """([n] ids, int64 when every id is an integer, else str; [n] the row each came from, 1-based
    as an editor numbers lines). Empty and repeated ids are a DataError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such id file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            values = np.load(path, allow_pickle=False)
            if values.ndim != 1:
                raise DataError(path, f"expected a vector of ids, found shape {list(values.shape)}")
            raw, rows = [str(v) for v in values.tolist()], list(range(1, len(values) + 1))
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False)
            if "item_id" not in frame.columns and len(frame.columns) != 1:
                raise DataError(path, f"expected an item_id column (or a single column); found "
                                      f"{', '.join(frame.columns)}", row=1)
            column = frame["item_id"] if "item_id" in frame.columns else frame.iloc[:, 0]
            raw, rows = [v.strip() for v in column.tolist()], list(range(2, len(frame) + 2))
        else:  # one id per line
            lines = path.read_text(encoding="utf-8").splitlines()
            while lines and not lines[-1].strip():  # a trailing blank line is not an id
                lines.pop()
            raw, rows = [line.strip() for line in lines], list(range(1, len(lines) + 1))
    except (UnicodeDecodeError, ValueError, OSError, pd.errors.ParserError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(path, f"cannot read ids: {type(error).__name__}: {error}") from None
    if not raw:
        raise DataError(path, "no ids in the file")
    for value, row in zip(raw, rows):
        if not value:
            raise DataError(path, "empty item id", row=row)
    if all(_INT.fullmatch(v) for v in raw):
        ids = np.array([int(v) for v in raw], dtype=np.int64)
    else:
        ids = np.array(raw, dtype=str)
    first: dict = {}
    for value, row in zip(ids.tolist(), rows):
        if value in first:
            raise DataError(path, f"item id {value!r} repeated (first at row {first[value]})", row=row)
        first[value] = row
    return ids, rows


def _read_matrix(path: Path, ids: np.ndarray, rows: list[int]) -> np.ndarray:
    """[n, d] float32 from a .npy file whose row r belongs to ids[r]; DataError when it does not fit."""
    if not path.is_file():
        raise DataError(path, "no such embedding file")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(path, f"cannot read embeddings (a .npy file saved by numpy.save): {error}") from None
    if matrix.ndim != 2 or not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise DataError(path, f"expected a real-valued matrix [items, width], found {matrix.dtype} "
                              f"{list(matrix.shape)}")
    if matrix.shape[0] != len(ids) or matrix.shape[1] < 1:
        raise DataError(path, f"{matrix.shape[0]} rows of width {matrix.shape[1]} for {len(ids)} ids: row r "
                              f"must be the embedding of the r-th id")
    matrix = matrix.astype(np.float32)
    check_finite(path, matrix, ids)
    zero = np.flatnonzero(~matrix.any(axis=1))
    if zero.size:
        raise DataError(path, f"row {zero[0]} (0-based; item id {ids[zero[0]]}, id file row {rows[zero[0]]}) is all "
                              f"zeros: an embedding needs a direction" + (f"; {zero.size} rows in all" if zero.size > 1
                                                                          else ""))
    return matrix


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def _check_against(data, ids: np.ndarray, ids_file) -> None:
    """Every interacted item of the dataset has an id, and every id is an item the dataset knows
    (its interactions or its catalogue)."""
    from pipeline.data.datasets import load_raw

    raw = load_raw(data.model_copy(update={"features": None}))
    known = np.unique(np.asarray(raw.interactions.item))
    if raw.catalogue is not None:
        known = np.union1d(known.astype(str), np.asarray(raw.catalogue.item_id).astype(str))
    interacted = np.unique(np.asarray(raw.interactions.item)).astype(str)
    as_text = ids.astype(str)
    missing = interacted[~np.isin(interacted, as_text)]
    if missing.size:
        raise DataError(ids_file, f"{missing.size} interacted items of {data.name!r} have no id here (e.g. "
                                  f"{', '.join(missing[:3])}); every item needs its embedding")
    unknown = np.flatnonzero(~np.isin(as_text, np.asarray(known).astype(str)))
    if unknown.size:
        raise DataError(ids_file, f"item id {ids[unknown[0]]} is not an item of {data.name!r}" +
                        (f" ({unknown.size} such ids)" if unknown.size > 1 else "") +
                        "; the ids must be the dataset's own")


