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


__all__ = ["FORMATS", "load", "DataError"]
