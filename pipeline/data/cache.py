"""Where prepared datasets are kept: one data root for every command, never the working directory.

A prepared dataset (split, id maps, P1 negatives) is keyed by its config and the bytes of its
input files (pipeline.data.datasets.open_dataset), so runs, `recommend`, `export`, `baselines`,
`report` and `experiments` share one copy whatever folder they write to. The root is, in order:

1. an explicit `--data-cache` of the command (or the `data_cache` argument of the Python API);
2. the environment variable PIPELINE_DATA_CACHE;
3. $XDG_CACHE_HOME/fedmm-pipeline/prepared, by default ~/.cache/fedmm-pipeline/prepared.

Deleting the root loses nothing but time: datasets are prepared again on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PIPELINE_DATA_CACHE"


def data_cache_root(explicit: Path | str | None = None) -> Path:
    """The prepared-data cache: `explicit`, else $PIPELINE_DATA_CACHE, else the user cache folder
    (an absolute path: the working directory never decides it)."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return (base / "fedmm-pipeline" / "prepared").resolve()
