"""Shared validated readers for the dataset loaders.

Every reader turns a bad input into :class:`~pipeline.data.schema.DataError` naming the
file, the 1-based line (header counted; for parquet the 1-based record) and the column.
Text tables are read with every field as a string and parsed column by column with
vectorised checks; only the first offending row is located, to build the message.

Conventions: a *table* holds a frame whose index is the 0-based record position in the
file (header excluded), so rows dropped on the way keep their original position.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from pipeline.data.schema import DataError

_PROBE_BYTES = 1 << 16
# ASCII digits only: \d would also accept other scripts' digits, which casts reject
_INT_RE = r"[+-]?[0-9]+"
_FLOAT_RE = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
_INT64_MAX = "9223372036854775807"


# ----------------------------------------------------------------------------- files


def require_dir(path) -> Path:
    """Absolute path of an existing directory, else DataError."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise DataError(p, "directory not found")
    if not p.is_dir():
        raise DataError(p, "expected a directory, found a file")
    return p


def require_file(path) -> Path:
    """Absolute path of an existing regular file, else DataError."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise DataError(p, "file not found")
    if p.is_dir():
        raise DataError(p, "expected a file, found a directory")
    if not p.is_file():
        raise DataError(p, "not a regular file")
    return p


def find_one(root: Path, names: Sequence[str], *, required: bool) -> Path | None:
    """The one file in `root` matching any of the glob patterns `names`.

    None when nothing matches and not `required`; DataError when nothing matches and
    `required`, or when more than one file matches (ambiguous input).
    """
    found = sorted({p for name in names for p in root.glob(name)})
    if len(found) > 1:
        listed = ", ".join(p.name for p in found)
        raise DataError(root, f"ambiguous input: found {listed}; keep only one")
    if not found:
        if required:
            raise DataError(root / names[0], f"file not found (looked for {' or '.join(names)})")
        return None
    return require_file(found[0])


def _probe_text(path: Path) -> None:
    """Reject zero-byte, unreadable and binary files before pandas sees them."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
    except OSError as e:
        raise DataError(path, f"cannot read file: {e.strerror or e}") from None
    if not head:
        raise DataError(path, "file is empty (0 bytes)")
    if b"\x00" in head:
        raise DataError(path, "binary content (NUL byte); expected a text file")


# ----------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A tabular file read into memory.

    frame: [R, C], index = 0-based record position in the file (header excluded).
    Text files hold stripped str columns; parquet files hold their own column types.
    blank_skipped: record positions do not count empty lines (fast reader) rather than
    counting them as records (exact reader).
    """

    path: Path
    frame: pd.DataFrame
    kind: str  # "text" or "parquet"
    header: bool = True
    sep: str = ","
    encoding: str = "utf-8"
    quoting: int = csv.QUOTE_MINIMAL
    blank_skipped: bool = False
    short: dict = field(default_factory=dict)  # record position -> its field count, for lines cut short

    def line(self, pos: int) -> int:
        """1-based line (as an editor shows it) where record `pos` starts; parquet: pos + 1."""
        if self.kind == "parquet":
            return int(pos) + 1
        # Quoted fields may span lines, so count with the csv module (error path only).
        target = int(pos) + (1 if self.header else 0)
        with open(self.path, newline="", encoding=self.encoding) as f:
            reader = csv.reader(f, delimiter=self.sep, quoting=self.quoting)
            end, k = 0, 0
            for record in reader:
                if record or not self.blank_skipped:
                    if k == target:
                        return end + 1
                    k += 1
                end = reader.line_num
        return target + 1  # the readers disagreed on the layout; best effort

    def where(self, rows: Sequence[int] | None = None) -> "Where":
        """Locator for a column of this table: positional index -> file line.

        rows: record position of each element (default: the frame's index).
        """
        index = np.asarray(self.frame.index if rows is None else rows)
        return Where(self.path, lambda i: self.line(index[i]))

    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    def with_frame(self, frame: pd.DataFrame) -> "Table":
        return replace(self, frame=frame)


@dataclass(frozen=True)
class Where:
    """Where the values of one parsed series live: the file and positional index -> line."""

    path: Path
    line: Callable[[int], int]

    def fail(self, mask, column: str, reason: Callable[[object], str], values) -> None:
        """Raise DataError for the first True of `mask` [n] (no-op if none).

        values: [n] Series or array, read only to word the message.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        i = int(np.argmax(mask))
        value = values.iloc[i] if isinstance(values, pd.Series) else values[i]
        raise DataError(self.path, reason(value), row=self.line(i), column=column)


def read_text_table(
    path,
    *,
    sep: str = ",",
    header: bool = True,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_MINIMAL,
) -> Table:
    """Read a delimited text file with every field as a stripped string.

    Blank lines are skipped (they keep their place in line numbering). Header-less files
    get integer column labels 0..C-1. Raises DataError for missing, empty, binary,
    undecodable or malformed files and for files with no data rows.
    """
    path = require_file(path)
    _probe_text(path)
    table = Table(path, pd.DataFrame(), "text", header, sep, encoding, quoting)
    try:
        table = replace(table, frame=_read_fast(table), blank_skipped=True)
    except (pa.ArrowException, csv.Error, UnicodeDecodeError, StopIteration):
        # anything unusual (ragged rows, bad bytes): the exact reader words the error
        table = table.with_frame(_read_exact(table))
        table = replace(table, short=_short_records(table, table.frame.shape[1]))
    frame = table.frame
    frame = frame.set_axis([str(c).strip().lstrip("\ufeff") for c in frame.columns], axis=1) if header else frame
    frame = frame.apply(lambda col: col.str.strip())
    frame = frame[~(frame == "").all(axis=1)]
    if frame.empty:
        raise DataError(path, "no data rows" + (" (header only)" if header else ""))
    return table.with_frame(frame)


def _read_fast(t: Table) -> pd.DataFrame:
    """pyarrow CSV reader, every column as string; raises on any irregularity."""
    with open(t.path, newline="", encoding=t.encoding) as f:
        first = next(r for r in csv.reader(f, delimiter=t.sep, quoting=t.quoting) if r or t.header)
    if t.header and not first:
        raise DataError(t.path, "line 1 is blank; expected the header (column names) there", row=1)
    if t.header and len(set(first)) != len(first):
        repeated = sorted({c for c in first if first.count(c) > 1})
        raise DataError(t.path, f"duplicate column name(s) {', '.join(repeated)}", row=1)
    names = [f"c{i}" for i in range(len(first))]
    arrow = pcsv.read_csv(
        t.path,
        read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if t.header else 0, encoding=t.encoding),
        parse_options=pcsv.ParseOptions(
            delimiter=t.sep,
            quote_char='"' if t.quoting != csv.QUOTE_NONE else False,
            newlines_in_values=t.quoting != csv.QUOTE_NONE,
        ),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}),
    )
    labels = first if t.header else list(range(len(names)))
    return arrow.to_pandas().set_axis(labels, axis=1)


def _read_exact(t: Table) -> pd.DataFrame:
    """pandas C reader keeping blank lines as rows, so positions count every record."""
    try:
        frame = pd.read_csv(
            t.path,
            sep=t.sep,
            header=0 if t.header else None,
            dtype=str,
            na_filter=False,
            skip_blank_lines=False,
            encoding=t.encoding,
            quoting=t.quoting,
            engine="c",
        )
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        raise DataError(t.path, f"malformed table: {_short(e)}", row=int(m.group(1)) if m else None) from None
    except pd.errors.EmptyDataError:
        raise DataError(t.path, "file is empty (no header or data)") from None
    except UnicodeDecodeError:
        raise DataError(t.path, f"not valid {t.encoding} text") from None
    except (OSError, ValueError) as e:
        raise DataError(t.path, f"cannot read as a table: {_short(e)}") from None
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas silently turns a surplus leading column into the index
        raise DataError(t.path, "data rows have more fields than the header", row=2)
    return frame


def _short_records(t: Table, width: int) -> dict[int, int]:
    """{record position: field count} of the non-blank records with fewer than `width` fields (a
    line cut short: the exact reader fills the fields it lacks with '', as if they were empty)."""
    short = {}
    with open(t.path, newline="", encoding=t.encoding) as f:
        reader = csv.reader(f, delimiter=t.sep, quoting=t.quoting)
        if t.header:
            next(reader, None)
        for position, record in enumerate(reader):
            if record and len(record) < width:
                short[position] = len(record)
    return short


def read_parquet_table(path, columns: Sequence[str] | None = None) -> Table:
    """Read a parquet file; str columns are stripped with nulls as ''.

    Integer columns with nulls arrive as nullable arrow-backed ints; timestamp/date
    columns as int64 in their own unit. Raises DataError for unreadable files and files with no rows.
    """
    path = require_file(path)
    try:
        names = pq.read_schema(path).names
        repeated = sorted({n for n in names if names.count(n) > 1})
        wanted = None if columns is None else [c for c in columns if c in names]
        arrow = None if repeated else pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(path, f"not a readable parquet file: {_short(e)}") from None
    if repeated:
        raise DataError(path, f"duplicate column name(s) {', '.join(repeated)}")
    frame = pd.DataFrame({name: _arrow_to_series(path, name, arrow[name]) for name in arrow.column_names})
    if frame.empty:
        raise DataError(path, "no data rows")
    return Table(path, frame, "parquet")


def parquet_columns(path) -> list[str]:
    """The column names of a parquet file (its schema only; no rows are read)."""
    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(path, f"not a readable parquet file: {_short(e)}") from None


def _arrow_to_series(path: Path, name: str, col: pa.ChunkedArray) -> pd.Series:
    t = col.type
    if pa.types.is_null(t):  # an all-null column
        return pd.Series([""] * len(col), dtype=str)
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return col.to_pandas().fillna("").astype(str).str.strip()
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        col = pc.cast(col, pa.int64()) if pa.types.is_timestamp(t) else pc.cast(pc.cast(col, pa.int32()), pa.int64())
        t = pa.int64()
    if pa.types.is_integer(t):
        # with nulls, plain to_pandas would go through float64 and round ids above 2**53
        return col.to_pandas() if col.null_count == 0 else col.to_pandas(types_mapper=pd.ArrowDtype)
    if pa.types.is_floating(t):
        return col.to_pandas()
    raise DataError(path, f"unsupported parquet column type {t}", column=name)


def read_table(path, columns: Sequence[str] | None = None, **text_options) -> Table:
    """Read a .parquet/.pq file (only `columns`, when given) or a delimited text file
    (.tsv is tab-separated; text files keep every column)."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return read_parquet_table(p, columns)
    if p.suffix.lower() == ".tsv":
        text_options.setdefault("sep", "\t")
    return read_text_table(p, **text_options)


def require_columns(table: Table, required: Sequence[str]) -> None:
    """DataError naming every column of `required` the table lacks."""
    present = table.columns()
    missing = [c for c in required if c not in present]
    if missing:
        raise DataError(
            table.path,
            f"missing required column(s) {', '.join(missing)} (found: {', '.join(present) or 'none'})",
            row=1 if table.kind == "text" else None,
            column=missing[0] if len(missing) == 1 else None,
        )


def name_columns(table: Table, names: Sequence[str], *, exact: bool) -> Table:
    """Label the first len(names) columns of a header-less table.

    exact: the file must have exactly that many fields per line (else at least).
    """
    n = table.frame.shape[1]
    if n < len(names) or (exact and n != len(names)):
        want = f"{len(names)}" if exact else f"at least {len(names)}"
        sep = "tab" if table.sep == "\t" else repr(table.sep)
        raise DataError(table.path, f"expected {want} {sep}-separated fields ({', '.join(names)}), found {n}", row=1)
    frame = table.frame.iloc[:, : len(names)].set_axis(list(names), axis=1)
    return table.with_frame(frame)


def is_missing(s: pd.Series) -> np.ndarray:
    """[n] bool: null, or an empty string."""
    m = s.isna().to_numpy().copy()
    if is_text(s):
        m |= (s == "").to_numpy()
    return m


SKIP_MISSING = "skip_missing=True (CLI: --skip-missing)"


def drop_missing(table: Table, columns: Sequence[str], *, skip: bool = False) -> tuple[Table, int]:
    """Rows with an empty value in any of `columns` (a field left empty, or a line cut short):
    refused with a DataError naming the first one, unless `skip` (the loaders' skip_missing
    option), which drops them (the protocol's cleaning step) and counts them.

    Returns the table of kept rows (original positions kept in the index) and the
    number dropped. DataError if no row survives.
    """
    drop = np.zeros(len(table.frame), dtype=bool)
    for c in columns:
        drop |= is_missing(table.frame[c])
    n = int(drop.sum())
    if n and not skip:
        i = int(np.argmax(drop))
        column = next(c for c in columns if is_missing(table.frame[c].iloc[i:i + 1])[0])
        position = int(table.frame.index[i])
        if position in table.short:
            reason = (f"the line has {table.short[position]} of {table.frame.shape[1]} fields (cut short?), "
                      f"so its {column} is missing")
        else:
            reason = f"empty {column}"
        more = f" ({n} such rows in all)" if n > 1 else ""
        raise DataError(table.path, f"{reason}{more}; fix the file, or pass {SKIP_MISSING} to drop rows with an "
                                    f"empty {' / '.join(map(str, columns))} (they are counted in `data stats` and "
                                    f"the run summary)", row=table.line(position), column=str(column))
    if n == len(drop):
        raise DataError(table.path, f"no usable rows: all {n} rows have an empty {' / '.join(map(str, columns))}")
    kept = table.frame[~drop] if n else table.frame
    return table.with_frame(kept), n


# ----------------------------------------------------------------------------- parsing


def is_text(s: pd.Series) -> bool:
    """Whether a column holds strings (text files always; parquet string columns)."""
    return pd.api.types.is_string_dtype(s.dtype) or s.dtype == object


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def show(v) -> str:
    """A value for a message: strings quoted, numbers plain."""
    return repr(v) if isinstance(v, str) else str(v)


def int_like(s: pd.Series) -> np.ndarray:
    """[n] bool: value is an integer that fits int64 (sign allowed); no errors raised."""
    if not is_text(s):
        if s.dtype.kind == "i":
            return np.ones(len(s), dtype=bool)
        if s.dtype.kind == "u":
            return s.to_numpy(dtype=np.uint64) < np.uint64(2**63)
        v = s.to_numpy(dtype=np.float64)
        return np.isfinite(v) & (np.floor(v) == v) & (np.abs(v) < 2.0**63)
    ok = s.str.fullmatch(_INT_RE).to_numpy(dtype=bool)
    digits = s.str.lstrip("+-").str.lstrip("0")
    n = digits.str.len()
    fits = (n < 19) | ((n == 19) & (digits <= _INT64_MAX))
    return ok & fits.to_numpy(dtype=bool)


def parse_ids(s: pd.Series, where: Where, column: str, *, strings: bool = False) -> np.ndarray:
    """Parse a column of non-missing ids.

    strings=False: [n] int64, every value must be a non-negative integer.
    strings=True: [n] object array of str; values that are negative integers still fail.
    """
    fast = _digits_only(s) if is_text(s) else None
    if fast is not None:
        return s.to_numpy(dtype=object) if strings else fast
    ints = int_like(s)
    if is_text(s):
        negative = ints & s.str.startswith("-").to_numpy(dtype=bool)
    else:
        negative = ints & (s.to_numpy(dtype=np.float64) < 0)
    where.fail(negative, column, lambda v: f"negative id {v}", s)
    if strings:
        if not is_text(s):
            where.fail(~ints, column, _bad_int_reason, s)
            return s.astype(np.int64).astype(str).to_numpy(dtype=object)
        return s.to_numpy(dtype=object)
    where.fail(~ints, column, _bad_int_reason, s)
    return _text_to_int64(s) if is_text(s) else s.to_numpy(dtype=np.int64)


def _bad_int_reason(v) -> str:
    if isinstance(v, str):
        integral = re.fullmatch(_INT_RE, v) is not None
    else:  # parquet: uint64 above int64, or an integral float as large
        integral = isinstance(v, (int, np.integer)) or float(v).is_integer()
    return f"id {show(v)} does not fit in int64" if integral else f"id {show(v)} is not an integer"


def parse_numbers(s: pd.Series, where: Where, column: str, *, what: str) -> np.ndarray:
    """Parse finite numbers: [n] int64 if every value is an integer, else float64.

    Empty values fail here (callers drop rows that may be empty beforehand).
    """
    where.fail(is_missing(s), column, lambda v: f"empty {what}", s)
    if not is_text(s):
        if s.dtype.kind in "iu":
            return s.to_numpy(dtype=np.int64)
        num = s.to_numpy(dtype=np.float64)
    elif (fast := _digits_only(s)) is not None:
        return fast
    elif int_like(s).all():
        return _text_to_int64(s)
    else:
        num = _text_to_float64(s)
    num = num.astype(np.float64)
    where.fail(~np.isfinite(num), column, lambda v: f"{what} {show(v)} is not a finite number", s)
    return num


def parse_ratings(s: pd.Series, where: Where, column: str) -> np.ndarray:
    """[n] float32 finite ratings."""
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, reported below
        rating = parse_numbers(s, where, column, what="rating").astype(np.float32)
    where.fail(~np.isfinite(rating), column,
               lambda v: f"rating {show(v)} is out of range; expected a number within +-3.4e38 (float32)", s)
    return rating


def parse_split(s: pd.Series, where: Where, column: str) -> np.ndarray:
    """[n] int8 split labels, each one of 0/1/2 (TRAIN/VALID/TEST)."""
    ok = s.isin(["0", "1", "2"]).to_numpy() if is_text(s) else s.isin([0, 1, 2]).to_numpy()
    where.fail(~ok, column, lambda v: f"split label {show(v)} is not one of 0, 1, 2 (train, valid, test)", s)
    return (_text_to_int64(s) if is_text(s) else s.to_numpy()).astype(np.int8)


def as_arrow(s: pd.Series) -> pa.Array:
    """The values of a column as one pyarrow array (no copy for arrow-backed strings)."""
    arr = pa.array(s)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _digits_only(s: pd.Series) -> np.ndarray | None:
    """[n] int64 if every value of a text column is plain ASCII digits fitting int64, else None.

    The common case, checked without a per-value regex (arrow's own cast alone would
    also accept forms such as hex '0x1').
    """
    arr = as_arrow(s)
    if not pc.all(pc.ascii_is_decimal(arr)).as_py():
        return None
    try:
        return pc.cast(arr, pa.int64()).to_numpy()
    except pa.ArrowInvalid:  # too large for int64
        return None


def refuse_decimal_ids(s: pd.Series, where: Where, column: str) -> None:
    """A text id column may hold integers or names, not decimal numbers: one '1.5' among integer
    ids would turn the whole column into text. DataError naming the first such id."""
    if not is_text(s) or _digits_only(s) is not None:
        return
    decimal = s.str.fullmatch(_FLOAT_RE).to_numpy(dtype=bool) & ~s.str.fullmatch(_INT_RE).to_numpy(dtype=bool)
    where.fail(decimal, column, lambda v: f"id {show(v)} is not an integer: ids are whole numbers or names, "
                                          f"not decimal numbers", s)


def all_int(s: pd.Series) -> bool:
    """Whether every value of the column is an integer that fits int64."""
    return (is_text(s) and _digits_only(s) is not None) or bool(int_like(s).all())


def _text_to_int64(s: pd.Series) -> np.ndarray:
    """[n] int64 from strings already checked by int_like."""
    return pc.cast(pc.replace_substring_regex(as_arrow(s), r"^\+", ""), pa.int64()).to_numpy()


def _text_to_float64(s: pd.Series) -> np.ndarray:
    """[n] float64 from decimal strings; NaN where a value is not a plain decimal number."""
    arr = as_arrow(s)
    ok = pc.match_substring_regex(arr, f"^{_FLOAT_RE}$")
    try:
        num = pc.cast(pc.if_else(ok, arr, pa.scalar(None, arr.type)), pa.float64())
    except pa.ArrowInvalid:  # e.g. out-of-range exponents
        return pd.to_numeric(s.where(ok.to_numpy(zero_copy_only=False), ""), errors="coerce").to_numpy(np.float64)
    return num.to_numpy(zero_copy_only=False).astype(np.float64)


def check_duplicates(keys: dict[str, np.ndarray], where: Where, *, what: str = "interaction") -> None:
    """DataError naming both lines of the first exact duplicate of the `keys` columns [n]."""
    frame = pd.DataFrame(keys)
    dup = frame.duplicated(keep="first").to_numpy()
    if not dup.any():
        return
    later = int(np.argmax(dup))
    same = (frame == frame.iloc[later]).all(axis=1).to_numpy()
    earlier = int(np.argmax(same))
    shown = ", ".join(f"{k}={frame.iat[later, j]}" for j, k in enumerate(frame.columns))
    reason = f"duplicate {what} ({shown}) of row {where.line(earlier)}"
    if what == "interaction":
        reason += ("; pass allow_duplicates=True (CLI: --allow-duplicates) to let them through, "
                   "and the preparation protocol drops exact duplicates")
    raise DataError(where.path, reason, row=where.line(later), column=None)


def check_unique_ids(ids: np.ndarray, where: Where, column: str) -> None:
    """DataError naming both lines of the first repeated id in [n] `ids`."""
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    if not dup.any():
        return
    later = int(np.argmax(dup))
    earlier = int(np.argmax(ids == ids[later]))
    raise DataError(
        where.path,
        f"duplicate {column} {ids[later]} (also on row {where.line(earlier)})",
        row=where.line(later),
        column=column,
    )


def existing_images(folder: Path, ids: np.ndarray, suffix: str = ".jpg") -> np.ndarray:
    """[M] object array: absolute path of folder/<id><suffix> where that file exists, else ''."""
    names = pd.Series(ids).astype(str) + suffix
    available = {e.name for e in os.scandir(folder) if e.is_file()} if folder.is_dir() else set()
    return (str(folder) + os.sep + names).where(names.isin(available), "").to_numpy(dtype=object)


# ----------------------------------------------------------------------------- matrices


def read_matrix(path) -> np.ndarray:
    """Load a 2-D floating .npy feature matrix as float32 [n, d], all values finite."""
    path = require_file(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(path, f"cannot read file: {e.strerror or e}") from None
    if magic.startswith(b"PK"):
        raise DataError(path, "is an .npz archive; expected a single .npy array")
    if magic != b"\x93NUMPY":
        raise DataError(path, "not a .npy file (no NUMPY header)")
    try:
        m = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, ...
        raise DataError(path, f"cannot load .npy file: {_short(e)}") from None
    if m.dtype.kind != "f":
        raise DataError(path, f"feature matrix has dtype {m.dtype}; expected float16, float32 or float64")
    if m.ndim != 2:
        raise DataError(path, f"feature matrix has shape {list(m.shape)}; expected 2-D [n_items, d]")
    if 0 in m.shape:
        raise DataError(path, f"feature matrix is empty (shape {list(m.shape)})")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported below
        m = m.astype(np.float32, copy=False)
    check_finite(path, m)
    return m


def check_finite(path, matrix: np.ndarray, item_ids: np.ndarray | None = None) -> None:
    """DataError naming the first row of a feature matrix [n, d] that holds NaN or inf, its item
    (item_ids[r], or r itself when rows are item ids) and how many rows do."""
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        item = f"item id {item_ids[r]}" if item_ids is not None else f"= item id {r}"
        more = f"; {int(bad.sum())} rows in all" if bad.sum() > 1 else ""
        raise DataError(path, f"NaN or inf in feature row {r} (0-based, {item}){more}: features must be finite; "
                              f"re-encode them")
