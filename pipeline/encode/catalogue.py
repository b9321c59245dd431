"""The encode stage's input: a catalogue file with columns item_id, text, image_path and an
optional title (what fills {title} in the prompt template; without it {title} takes the text).

Formats by suffix: .csv, .tsv, .parquet/.pq, .jsonl/.ndjson (one JSON object per line). A
directory stands for the ``catalogue.*`` file inside it (the synthetic generator's layout).
image_path is relative to the catalogue file's folder unless absolute; '' means no image;
an empty or missing text is ''. item_id is int64 when every id is an integer that fits, else
str (as the generic loader reads ids). Rows come back sorted by item_id ascending (the feature
store's row order). Bad input (unreadable file, repeated or missing columns, empty, repeated
or non-integral numeric ids, cells that are lists or objects, NUL characters in ids or paths)
raises DataError naming the file and, where known, the row and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.schema import Catalogue, DataError

COLUMNS = ("item_id", "text", "image_path")
TITLE = "title"  # optional
_READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits, as the loaders read ids
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ItemTable:
    """Validated catalogue rows in item_id ascending order.

    item_id: [M] int64 (all ids integral) or str; text: [M] str ('' = none);
    image: [M] str absolute paths ('' = none); source: the file read, or a label;
    title: [M] str ('' = none), or None when the catalogue has no title column.
    """

    item_id: np.ndarray
    text: np.ndarray
    image: np.ndarray
    source: str
    title: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.item_id)


def read_catalogue(path) -> ItemTable:
    """Read and validate a catalogue file (see the module docstring); DataError on bad input."""
    path = _locate(Path(path))
    frame = _read_frame(path)
    text_file = _READERS[path.suffix.lower()] in ("csv", "tsv")
    repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if repeated:
        raise DataError(path, f"duplicate column name(s) {', '.join(repeated)}; expected one column each of "
                              f"{', '.join(COLUMNS)}", row=1 if text_file else None)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}",
                        column=missing[0])
    unread = [str(c) for c in frame.columns if c not in (*COLUMNS, TITLE)]
    if unread:  # named, so a misspelt column never passes silently
        print(f"warning: {path}: column(s) {', '.join(map(repr, unread))} not read (a catalogue has "
              f"{', '.join(COLUMNS)} and optionally {TITLE})", file=sys.stderr, flush=True)
    title = frame["title"].to_numpy(object) if TITLE in frame.columns else None
    return _validated(frame["item_id"].to_numpy(object), frame["text"].to_numpy(object),
                      frame["image_path"].to_numpy(object), str(path), rows=list(frame.index + 1),
                      folder=path.parent.resolve(), title=title)


def from_catalogue(catalogue: Catalogue, source: str = "<catalogue>") -> ItemTable:
    """A loader's Catalogue as the stage's input (relative image paths resolve against the cwd)."""
    title = None if catalogue.title is None else np.asarray(catalogue.title, dtype=object)
    return _validated(np.asarray(catalogue.item_id, dtype=object), np.asarray(catalogue.text, dtype=object),
                      np.asarray(catalogue.image, dtype=object), source, rows=range(1, len(catalogue) + 1),
                      folder=Path.cwd(), title=title)


def write_catalogue(catalogue: Catalogue, path) -> Path:
    """Write a loader's Catalogue as a catalogue file the stage reads (format by suffix).

    Image paths are written absolute, so the file can live anywhere.
    """
    path = Path(path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown catalogue format; use one of {', '.join(sorted(_READERS))}")
    table = from_catalogue(catalogue, str(path))
    # object columns: a numpy str array would drop trailing NUL characters
    frame = pd.DataFrame({"item_id": table.item_id, "text": table.text.astype(object),
                          "image_path": table.image.astype(object),
                          **({TITLE: table.title.astype(object)} if table.title is not None else {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if kind in ("csv", "tsv"):
            # quote every text: pandas leaves a lone carriage return unquoted, which splits the row
            frame.to_csv(tmp, index=False, sep="," if kind == "csv" else "\t", quoting=csv.QUOTE_NONNUMERIC)
        elif kind == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left beside the output
        raise
    return path


def content_hash(table: ItemTable) -> str:
    """sha256 over every row's id, text and image bytes (not paths: moving the data keeps it).

    Unreadable and missing images hash as markers, so fixing one changes the hash. A non-empty
    title counts too (it can fill the prompt); a catalogue without titles hashes as it always did.
    """
    digest = hashlib.sha256()
    titles = table.title if table.title is not None else [""] * len(table)
    for item, text, image, title in zip(table.item_id, table.text, table.image, titles):
        digest.update(f"{type(item).__name__}:{item}\x1f{text}\x1f".encode("utf-8", "surrogatepass"))
        if title:
            digest.update(f"title:{title}\x1f".encode("utf-8", "surrogatepass"))
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
    """The file's rows; index: 0-based line (text files; approximate for csv/tsv) or record (parquet)."""
    kind = _READERS[path.suffix.lower()]
    try:
        if kind in ("csv", "tsv"):  # header read as a row: pandas would rename repeated names
            frame = pd.read_csv(path, sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False,
                                header=None)
            return frame.iloc[1:].set_axis([str(c) for c in frame.iloc[0]], axis=1)
        if kind == "parquet":
            return pd.read_parquet(path).reset_index(drop=True)  # rows by position, not a stored index
        return _read_jsonl(path)
    except pd.errors.EmptyDataError:
        raise DataError(path, "cannot read catalogue: the file is empty") from None
    except DataError:
        raise
    except UnicodeDecodeError as error:
        raise DataError(path, f"cannot read catalogue: not valid utf-8 text (byte {error.start})") from None
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataError(path, f"cannot read catalogue: {type(error).__name__}: {error}") from None
    except Exception as error:  # pyarrow raises its own types for corrupt parquet
        if type(error).__module__.startswith("pyarrow"):
            raise DataError(path, f"cannot read catalogue: {type(error).__name__}: {error}") from None
        raise


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); Python's json keeps integers of any size exact."""
    records, lines = [], []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # bad JSON, a number too long, deep nesting
                raise DataError(path, f"not valid JSON: {str(error).split(': line')[0]}; expected one JSON "
                                      "object per line", row=line_no) from None
            if not isinstance(record, dict):
                raise DataError(path, f"found a JSON {type(record).__name__}; expected one JSON object per line",
                                row=line_no)
            records.append(record)
            lines.append(line_no - 1)
    if not records:
        raise pd.errors.EmptyDataError
    return pd.DataFrame.from_records(records, index=lines)


def _missing(value) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _text(value, column: str, source: str, row: int) -> str:
    """A text or path cell as str: '' when missing; numbers in decimal; anything else refused."""
    if _missing(value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    raise DataError(source, f"{column} holds a {type(value).__name__} value ({str(value)[:40]}); expected text",
                    row=row, column=column)


def _id(value, source: str, row: int) -> str:
    """An item_id cell as stripped text: a string, or an integer (also an integral float) in decimal."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and value == int(value):
        value = int(value)
    text = _text(value, "item_id", source, row).strip()
    if not text:
        raise DataError(source, "empty item_id", row=row, column="item_id")
    if isinstance(value, (float, np.floating)):
        raise DataError(source, f"item_id {text} is not an integer; expected an integer or a string id",
                        row=row, column="item_id")
    if "\x00" in text:
        raise DataError(source, f"item_id {text!r} contains a NUL character", row=row, column="item_id")
    return text


def _image_path(value, folder: Path, source: str, row: int) -> str:
    """Absolute normalised path ('' for none); relative paths resolve against `folder`."""
    path = _text(value, "image_path", source, row).strip()
    if "\x00" in path:
        raise DataError(source, f"image path {path!r} contains a NUL character", row=row, column="image_path")
    return os.path.normpath(path if os.path.isabs(path) else folder / path) if path else ""


def _validated(ids: np.ndarray, text: np.ndarray, image: np.ndarray, source: str, rows, folder: Path,
               title: np.ndarray | None = None) -> ItemTable:
    """Check ids (non-empty, unique) and cells, type the ids, resolve image paths, sort rows by id.

    rows: [M] the row number (1-based, as reported) of each element; title: [M] or None.
    """
    if len(ids) == 0:
        raise DataError(source, "the catalogue has no rows")
    raw = [_id(v, source, row) for v, row in zip(ids, rows)]
    numbers = [int(v) if _INT.fullmatch(v) else None for v in raw]
    if all(k is not None and -(2**63) <= k < 2**63 for k in numbers):
        typed = np.array(numbers, dtype=np.int64)
    else:  # ids beyond int64 stay str, as the generic loader reads them
        typed = np.array(raw, dtype=str)
    order = np.argsort(typed, kind="stable")
    sorted_ids = typed[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if repeated.size:
        first, second = sorted(order[repeated[0]: repeated[0] + 2])
        raise DataError(source, f"duplicate item_id {raw[second]!r} (first at row {rows[first]})",
                        row=rows[second], column="item_id")
    texts = np.array([_text(v, "text", source, row).strip() for v, row in zip(text, rows)], dtype=object)
    images = np.array([_image_path(v, folder, source, row) for v, row in zip(image, rows)], dtype=object)
    titles = None if title is None else np.array(
        [_text(v, TITLE, source, row).strip() for v, row in zip(title, rows)], dtype=object)[order]
    return ItemTable(item_id=sorted_ids, text=texts[order], image=images[order], source=source, title=titles)
