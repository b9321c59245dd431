"""Persist a prepared dataset and its P1 negatives; write atomically, read back exactly.

Layout of a prepared-dataset directory:
  split.npz        CSR training interactions, held-out items and their timestamps
  user_map.csv     new_id,original_id        item_map.csv   new_id,original_id
  features_<m>.npy aligned, L2-normalised features per modality (if any)
  catalogue.parquet item content aligned to new ids (if any)
  p1_negatives.npz [U, 99] int32 validation and test negatives, counts, seed, fingerprint
  meta.json        name, sizes, fingerprint, protocol config and step counts
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PreparedDataset
from pipeline.data.schema import Catalogue, DataError

_SPLIT_ARRAYS = ("train_indptr", "train_items", "train_time", "valid_item", "test_item",
                 "valid_time", "test_time")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomically(path: Path, text: str) -> Path:
    """Write a text file through a temporary sibling and a rename: readers see the old file or
    the new one, never half of one, and a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomically(directory: Path, fill) -> Path:
    """Call fill(tmp_dir) then move tmp_dir into place: readers see all files or none.

    A failure at any step (fill, moving the old version aside, moving the new one in) leaves
    `directory` as it was and no temporary folder behind.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is as any folder mkdir makes
    aside = None  # holds the previous version while the new one moves in
    try:
        fill(tmp)
        if directory.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, aside / directory.name)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            if not directory.exists() and (aside / directory.name).exists():
                os.replace(aside / directory.name, directory)  # put the previous version back
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return directory


def save_prepared(data: PreparedDataset, negatives: EvalNegatives, directory: Path, extra_meta: dict | None = None) -> Path:
    """Write the prepared dataset and its negatives to `directory` (replaced atomically)."""
    if negatives.fingerprint != data.fingerprint():
        raise ValueError("negatives were drawn for another split")

    def fill(tmp: Path):
        np.savez(tmp / "split.npz", **{name: getattr(data, name) for name in _SPLIT_ARRAYS})
        _write_map(tmp / "user_map.csv", data.user_ids)
        _write_map(tmp / "item_map.csv", data.item_ids)
        for name, matrix in data.features.items():
            np.save(tmp / f"features_{name}.npy", matrix)
        if data.catalogue is not None:
            columns = {"item_id": np.arange(data.n_items), "text": data.catalogue.text.astype(str),
                       "image": data.catalogue.image.astype(str)}
            if data.catalogue.title is not None:
                columns["title"] = data.catalogue.title.astype(str)
            pd.DataFrame(columns).to_parquet(tmp / "catalogue.parquet")
        np.savez(tmp / "p1_negatives.npz", valid=negatives.valid, test=negatives.test,
                 n_valid=negatives.n_valid, n_test=negatives.n_test,
                 seed=np.int64(negatives.seed), fingerprint=np.str_(negatives.fingerprint))
        meta = {"name": data.name, "n_users": data.n_users, "n_items": data.n_items,
                "fingerprint": data.fingerprint(), "features": sorted(data.features),
                "stats": data.stats, **(extra_meta or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))

    return write_atomically(directory, fill)


def _write_map(path: Path, original: np.ndarray) -> None:
    pd.DataFrame({"new_id": np.arange(len(original)), "original_id": original}).to_csv(path, index=False)


def _read_map(path: Path) -> np.ndarray:
    column = pd.read_csv(path, dtype={"original_id": str})["original_id"].to_numpy()
    try:
        return column.astype(np.int64)
    except ValueError:
        return column.astype(object)


def load_prepared(directory: Path) -> tuple[PreparedDataset, EvalNegatives]:
    """Read back what save_prepared wrote; the split's fingerprint is checked."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(meta_path, "not a prepared dataset (meta.json missing)")
    meta = json.loads(meta_path.read_text())
    with np.load(directory / "split.npz") as split:
        arrays = {name: split[name] for name in _SPLIT_ARRAYS}
    features = {name: np.load(directory / f"features_{name}.npy") for name in meta["features"]}
    catalogue = None
    if (directory / "catalogue.parquet").is_file():
        frame = pd.read_parquet(directory / "catalogue.parquet")
        catalogue = Catalogue(item_id=np.arange(len(frame)), text=frame["text"].to_numpy(object),
                              image=frame["image"].to_numpy(object),
                              title=frame["title"].to_numpy(object) if "title" in frame else None)
    data = PreparedDataset(name=meta["name"], n_users=meta["n_users"], n_items=meta["n_items"],
                           user_ids=_read_map(directory / "user_map.csv"),
                           item_ids=_read_map(directory / "item_map.csv"),
                           features=features, catalogue=catalogue, stats=meta["stats"], **arrays)
    if data.fingerprint() != meta["fingerprint"]:
        raise DataError(directory / "split.npz", "content does not match the fingerprint in meta.json")
    if catalogue is not None:  # catalogue ids are the new ids; keep original ids for display
        data.catalogue = Catalogue(item_id=data.item_ids, text=catalogue.text, image=catalogue.image,
                                   title=catalogue.title)
    with np.load(directory / "p1_negatives.npz") as neg:
        negatives = EvalNegatives(valid=neg["valid"], test=neg["test"], n_valid=neg["n_valid"],
                                  n_test=neg["n_test"], seed=int(neg["seed"]),
                                  fingerprint=str(neg["fingerprint"]))
    if negatives.fingerprint != data.fingerprint():
        raise DataError(directory / "p1_negatives.npz", "negatives belong to another split")
    return data, negatives
