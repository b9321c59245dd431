"""The feature store: what the encode stage writes and the only way training reads features.

Layout of a store directory (written atomically: readers see all files or none):

  item_ids.npy      [n] item ids (int64, or unicode when the catalogue's ids are not integers),
                    ascending: row r of every matrix belongs to item_ids[r]
  text.npy          float32 [n, d_t], unit L2 rows   (absent when the text model is 'none')
  image.npy         float32 [n, d_i], unit L2 rows   (absent when the image model is 'none')
  features.parquet  the same rows: item_id plus one fixed-size list<float32> column per modality
  manifest.json     models, dims, normalisation, item count and order, content hash of the
                    inputs, missing / corrupt images and empty texts (counts and ids), timings
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.data.loaders._read import check_finite
from pipeline.data.schema import DataError, Features, RawDataset
from pipeline.data.store import write_atomically
from pipeline.outputs import OutputKind

FORMAT = "pipeline.encode/feature-store@1"
MANIFEST, IDS, PARQUET = "manifest.json", "item_ids.npy", "features.parquet"
ITEM_ORDER = "item_id ascending (the catalogue's ids, sorted)"


def _is_store(folder: Path) -> bool:
    return read_manifest(folder) is not None


# what `encode` may replace: an earlier feature store, nothing else (pipeline.outputs.check_output)
STORE_OUTPUT = OutputKind("encode", "a feature store", MANIFEST,
                          frozenset({IDS, PARQUET, MANIFEST, "text.npy", "image.npy"}), _is_store)


def matrix_file(modality: str) -> str:
    return f"{modality}.npy"


def write_store(directory, item_ids: np.ndarray, matrices: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write ids [n], matrices {modality: float32 [n, d]} and the manifest, replacing `directory`."""
    n = len(item_ids)
    for name, matrix in matrices.items():
        if matrix.shape[0] != n or matrix.dtype != np.float32:
            raise ValueError(f"{name}: expected float32 [{n}, d], got {matrix.dtype} {list(matrix.shape)}")
    manifest = {**manifest, "format": FORMAT, "item_count": n, "item_order": ITEM_ORDER,
                "files": {"item_ids": IDS, "parquet": PARQUET, **{m: matrix_file(m) for m in matrices}}}

    def fill(tmp: Path) -> None:
        np.save(tmp / IDS, item_ids, allow_pickle=False)
        for name, matrix in matrices.items():
            np.save(tmp / matrix_file(name), matrix, allow_pickle=False)
        _write_parquet(tmp / PARQUET, item_ids, matrices)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    return write_atomically(Path(directory), fill)


def _write_parquet(path: Path, item_ids: np.ndarray, matrices: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"item_id": pa.array(item_ids)}
    for name, matrix in matrices.items():
        values = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=pa.float32())
        columns[name] = pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])
    pq.write_table(pa.table(columns), path)


def read_manifest(directory) -> dict | None:
    """The store's manifest, or None when there is no (readable) store at `directory`."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def load_features(directory) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(item_ids [n], {"text": float32 [n, d_t], "image": float32 [n, d_i]}, manifest).

    Only the modalities that were encoded are present. Rows follow item_ids (ascending).
    Raises DataError when the directory is not a complete, consistent store.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(directory / MANIFEST, "not a feature store (manifest.json missing, unreadable or "
                                              "of another format); run `python -m pipeline encode` first")
    try:
        n = int(manifest["item_count"])
        dims = {name: int(info["dim"]) for name, info in manifest["modalities"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(directory / MANIFEST, "damaged manifest: item_count or modalities.<name>.dim missing or "
                                              "not a number; re-encode the store") from None
    item_ids = _load_array(directory / IDS)
    if item_ids.shape != (n,):
        raise DataError(directory / IDS, f"expected {n} item ids (manifest item_count), found {item_ids.shape}")
    if len(np.unique(item_ids)) != n:
        raise DataError(directory / IDS, "an item id appears more than once; re-encode the store")
    matrices = {}
    for name, dim in dims.items():
        matrix = _load_array(directory / matrix_file(name))
        if matrix.dtype != np.float32 or matrix.shape != (n, dim):
            raise DataError(directory / matrix_file(name), f"expected float32 [{n}, {dim}] as the "
                                                          f"manifest says, found {matrix.dtype} {list(matrix.shape)}")
        check_finite(directory / matrix_file(name), matrix, item_ids)
        matrices[name] = matrix
    return item_ids, matrices, manifest


def attach_features(raw: RawDataset, directory) -> RawDataset:
    """`raw` with its features taken from the store (prepare() then aligns them to the remapped
    item ids). Every item of the interactions must have a row: a store made from another
    catalogue is refused rather than silently filled with mean rows."""
    item_ids, matrices, manifest = load_features(directory)
    features = Features(item_id=item_ids, matrices=matrices)
    items = np.unique(np.asarray(raw.interactions.item))
    try:
        known = np.isin(items, features.item_id.astype(items.dtype))
    except (TypeError, ValueError):
        known = np.zeros(len(items), dtype=bool)
    if not known.all():
        raise DataError(Path(directory) / IDS, f"{int((~known).sum())} interacted items have no feature row "
                                               f"(e.g. {items[~known][:3].tolist()}); encode this dataset's catalogue")
    # the store's key (encoders, their settings, the inputs' content) goes with the data into run summaries
    source = {**raw.source, "stats": {**raw.source.get("stats", {}), "features_recipe": manifest.get("key")}}
    return dataclasses.replace(raw, features=features, source=source)


def reusable(directory, key: str) -> dict | None:
    """The manifest when `directory` holds a complete store made with `key`, else None."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("key") != key:
        return None
    try:
        load_features(directory)
    except (DataError, KeyError, TypeError):
        return None
    return manifest


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(path, f"cannot read feature store file: {error}") from None
