"""Dataset loaders: read and validate raw files into :class:`~pipeline.data.schema.RawDataset`.

Loaders only read and validate (a row with an empty user, item or timestamp is refused, or
dropped and counted with the loaders' skip_missing option);
filtering, k-core, remapping and splitting happen in :mod:`pipeline.data.prepare`.
Every bad input raises :class:`~pipeline.data.schema.DataError`.
"""

from __future__ import annotations

from pipeline.data.loaders import fedmr, generic, microlens, movielens
from pipeline.data.schema import DataError, RawDataset

FORMATS = ("fedmr", "movielens-mm", "microlens", "generic")
_MODULES = {"fedmr": fedmr, "movielens-mm": movielens, "microlens": microlens, "generic": generic}


def load(fmt: str, path=None, **options) -> RawDataset:
    """Load dataset `path` in format `fmt` (one of FORMATS); options go to that loader.

    microlens and generic also accept explicit files instead of a directory
    (``load("generic", interactions=..., catalogue=...)``).
    """
    if fmt not in _MODULES:
        where = path if path is not None else "<dataset>"
        raise DataError(where, f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return _MODULES[fmt].load(path, **options)


def detect_format(path) -> str:
    """The format of dataset folder `path`, from the files each loader reads: generic
    (interactions.csv/.parquet), fedmr (inter.csv), movielens-mm (u.data and u.item), microlens
    (one *_pairs.tsv). A folder that matches none, or more than one, is a DataError that names
    what each format expects."""
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        raise DataError(root, "no such dataset folder (a file needs --format to say how to read it)")
    found = {
        "generic": any((root / name).is_file() for name in generic.INTERACTIONS),
        "fedmr": (root / fedmr.INTERACTIONS).is_file(),
        "movielens-mm": (root / movielens.RATINGS).is_file() and (root / movielens.ITEMS).is_file(),
        "microlens": len(list(root.glob(microlens.PAIRS_GLOB))) == 1,
    }
    matches = [fmt for fmt, hit in found.items() if hit]
    if len(matches) == 1:
        return matches[0]
    expects = (f"generic: {' or '.join(generic.INTERACTIONS)}; fedmr: {fedmr.INTERACTIONS}; movielens-mm: "
               f"{movielens.RATINGS} and {movielens.ITEMS}; microlens: one {microlens.PAIRS_GLOB}")
    if not matches:
        raise DataError(root, f"cannot tell the dataset format: the folder holds none of the files a format "
                              f"reads ({expects}); name one with --format")
    raise DataError(root, f"cannot tell the dataset format: the folder matches {', '.join(matches)}; "
                          f"name one with --format")


__all__ = ["FORMATS", "detect_format", "load", "DataError"]
