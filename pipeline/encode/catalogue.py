"""The encode stage's input: a catalogue file with columns item_id, text, image_path.

Formats by suffix: .csv, .tsv, .parquet/.pq, .jsonl/.ndjson (one JSON object per line). A
directory stands for the ``catalogue.*`` file inside it (the synthetic generator's layout).
image_path is relative to the catalogue file's folder unless absolute; '' means no image;
an empty or missing text is ''. Rows come back sorted by item_id ascending (the feature
store's row order).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.schema import Catalogue, DataError

COLUMNS = ("item_id", "text", "image_path")
_READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"^[+-]?\d+$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ItemTable:
    """Validated catalogue rows in item_id ascending order.

    item_id: [M] int64 (all ids integral) or str; text: [M] str ('' = none);
    image: [M] str absolute paths ('' = none); source: the file read, or a label.
    """

    item_id: np.ndarray
    text: np.ndarray
    image: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.item_id)


def read_catalogue(path) -> ItemTable:
    """Read and validate a catalogue file (see the module docstring); DataError on bad input."""
    path = _locate(Path(path))
    frame = _read_frame(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}",
                        column=missing[0])
    header = 1 if _READERS[path.suffix.lower()] in ("csv", "tsv") else 0
    images = frame["image_path"].map(_as_text).str.strip()
    folder = path.parent.resolve()
    images = images.map(lambda p: "" if not p else os.path.normpath(p if os.path.isabs(p) else folder / p))
    return _validated(frame["item_id"].to_numpy(object), frame["text"].map(_as_text).to_numpy(object),
                      images.to_numpy(object), str(path), first_row=1 + header)


def from_catalogue(catalogue: Catalogue, source: str = "<catalogue>") -> ItemTable:
    """A loader's Catalogue as the stage's input (relative image paths resolve against the cwd)."""
    images = [_as_text(p).strip() for p in catalogue.image]
    images = ["" if not p else os.path.abspath(p) for p in images]
    return _validated(np.asarray(catalogue.item_id, dtype=object),
                      np.asarray([_as_text(t) for t in catalogue.text], dtype=object),
                      np.asarray(images, dtype=object), source, first_row=1)


def write_catalogue(catalogue: Catalogue, path) -> Path:
    """Write a loader's Catalogue as a catalogue file the stage reads (format by suffix).

    Image paths are written absolute, so the file can live anywhere.
    """
    path = Path(path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown catalogue format; use one of {', '.join(sorted(_READERS))}")
    table = from_catalogue(catalogue, str(path))
    frame = pd.DataFrame({"item_id": table.item_id, "text": table.text.astype(str),
                          "image_path": table.image.astype(str)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if kind in ("csv", "tsv"):
        frame.to_csv(tmp, index=False, sep="," if kind == "csv" else "\t")
    elif kind == "parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    os.replace(tmp, path)
    return path


def content_hash(table: ItemTable) -> str:
    """sha256 over every row's id, text and image bytes (not paths: moving the data keeps it).

    Unreadable and missing images hash as markers, so fixing one changes the hash.
    """
    digest = hashlib.sha256()
    for item, text, image in zip(table.item_id, table.text, table.image):
        digest.update(f"{type(item).__name__}:{item}\x1f{text}\x1f".encode("utf-8", "surrogatepass"))
        digest.update(_file_digest(image))
        digest.update(b"\x1e")
    return digest.hexdigest()


def _file_digest(path: str) -> bytes:
    if not path:
        return b"<no image>"
    try:
        with open(path, "rb") as handle:
            file_hash = hashlib.sha256()
            while chunk := handle.read(_CHUNK):
                file_hash.update(chunk)
            return file_hash.digest()
    except FileNotFoundError:
        return b"<missing>"
    except OSError:
        return b"<unreadable>"


def _locate(path: Path) -> Path:
    if path.is_dir():
        found = sorted(p for p in path.glob("catalogue.*") if p.suffix.lower() in _READERS)
        if not found:
            raise DataError(path, f"no catalogue file (catalogue{{{','.join(sorted(_READERS))}}}) in this folder")
        return found[0]
    if not path.exists():
        raise DataError(path, "cannot read catalogue: no such file")
    if path.suffix.lower() not in _READERS:
        raise DataError(path, f"cannot read catalogue: unknown format {path.suffix!r}; "
                              f"use one of {', '.join(sorted(_READERS))}")
    return path


def _read_frame(path: Path) -> pd.DataFrame:
    kind = _READERS[path.suffix.lower()]
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False)
    except pd.errors.EmptyDataError:
        raise DataError(path, "cannot read catalogue: the file is empty") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise DataError(path, f"cannot read catalogue: {type(error).__name__}: {error}") from None
    except Exception as error:  # pyarrow raises its own types for corrupt parquet
        if type(error).__module__.startswith("pyarrow"):
            raise DataError(path, f"cannot read catalogue: {type(error).__name__}: {error}") from None
        raise


def _as_text(value) -> str:
    """Cell -> str; None/NaN -> ''."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _validated(ids: np.ndarray, text: np.ndarray, image: np.ndarray, source: str, first_row: int) -> ItemTable:
    """Check ids (non-empty, unique), type them, sort rows by id."""
    if len(ids) == 0:
        raise DataError(source, "the catalogue has no rows")
    raw = [_as_text(v).strip() for v in ids]
    for row, value in enumerate(raw):
        if not value:
            raise DataError(source, "empty item_id", row=row + first_row, column="item_id")
    if all(_INT.match(v) for v in raw):
        typed = np.array([int(v) for v in raw], dtype=np.int64)
    else:
        typed = np.array(raw, dtype=str)
    order = np.argsort(typed, kind="stable")
    sorted_ids = typed[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if repeated.size:
        first, second = sorted(order[repeated[0]: repeated[0] + 2])
        raise DataError(source, f"duplicate item_id {raw[second]!r} (first at row {first + first_row})",
                        row=second + first_row, column="item_id")
    text = np.array([t.strip() for t in text[order]], dtype=object)
    return ItemTable(item_id=sorted_ids, text=text, image=np.asarray(image[order], dtype=object), source=source)
