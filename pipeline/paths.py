"""Where commands write when you name no folder: one documented root, never the working directory.

The runs root is, in order:
1. the environment variable PIPELINE_RUNS;
2. $XDG_DATA_HOME/fedmm-pipeline/runs, by default ~/.local/share/fedmm-pipeline/runs.

Under it: `train/` (a config without runtime.out), `experiments/` (`pipeline experiments`
without --runs-dir), `sweeps/` (`pipeline sweep` without --storage), `main/` (`pipeline run`
without --workdir) and `reproduction/`. A folder you name (an --out, a config's runtime.out) is
used as given, relative to the working directory like any command-line path. Prepared datasets
have their own cache (pipeline/data/cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PIPELINE_RUNS"


def runs_root() -> Path:
    """The folder default outputs go under (absolute: the working directory never decides it)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share").expanduser()
    return (base / "fedmm-pipeline" / "runs").resolve()


def default_run_dir(kind: str) -> Path:
    """runs_root()/kind: where a command's outputs go when no folder is named."""
    return runs_root() / kind
