"""Checkpoint integrity: every file of a round's checkpoint folder is listed in its manifest
with its sha256, and a folder whose files do not match is never loaded (a resume falls back to
the newest intact one).

Layout: <run>/checkpoints/round-000007/{global.pt, pool-0.pt, ..., manifest.json}; Checkpoints
writes and restores them for rounds.run_rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.outputs import sha256_of


def damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be trusted (None: intact). Manifests written before
    digests were recorded are checked for their files' presence only."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        return f"manifest.json unreadable ({error})"
    names = ["global.pt", *(f"pool-{i}.pt" for i in range(int(manifest.get("pools", 0))))]
    digests = manifest.get("sha256", {})
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if name in digests and sha256_of(path) != digests[name]:
            return f"{name} does not match its sha256 in manifest.json (corrupt or modified)"
    return None


def newest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete, intact checkpoint under `root` and the newer ones skipped, with why."""
    skipped = []
    for folder in sorted((p for p in root.glob("round-*") if (p / "manifest.json").is_file()), reverse=True):
        reason = damage(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


KEEP = 2  # round checkpoints kept (the newest); checkpoints/best is kept apart
BEST = "best"  # checkpoints/best: the state at the best validation round (runtime.keep_best)


class Checkpoints:
    """A run's checkpoints: one folder per round, renamed into place when complete
    (<run>/checkpoints/round-000007/{global.pt, pool-0.pt, ..., manifest.json}), the newest KEEP
    kept, and checkpoints/best. Newer damaged folders are skipped when loading and listed in
    `damaged` (a damaged file is never loaded)."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "checkpoints"
        self.damaged: list[str] = []

    def save(self, round_: int, strategy, pools, name: str | None = None, progress=None) -> None:
        """Write round `round_`'s checkpoint folder (round-NNNNNN, or `name`) atomically; the pools
        that have saved count in `progress` (backend.Progress)."""
        import shutil

        import torch

        from pipeline.data.store import write_atomically

        def fill(tmp: Path) -> None:
            phase = progress.begin(round_, "checkpoint" if name is None else f"checkpoint {name}",
                                   len(pools.shards)) if progress is not None else 0
            saved = pools.save(tmp, round_, progress, phase)
            torch.save(strategy.state_dict(), tmp / "global.pt")
            digests = {f"pool-{i}.pt": digest for i, (_, digest) in enumerate(saved)}
            digests["global.pt"] = sha256_of(tmp / "global.pt")
            manifest = {"round": round_, "pools": len(pools.shards), "pool_bytes": [size for size, _ in saved],
                        "users_per_pool": [len(s) for s in pools.shards], "sha256": digests}
            (tmp / "manifest.json").write_text(json.dumps(manifest))

        write_atomically(self.folder / (name or f"round-{round_:06d}"), fill)
        for old in sorted(self.folder.glob("round-*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest intact round checkpoint (None: none)."""
        import sys

        folder, skipped = newest_intact(self.folder)
        for path, reason in skipped:
            note = f"{path.name}: {reason}"
            if note not in self.damaged:
                self.damaged.append(note)
                print(f"checkpoint {path} skipped: {reason}", file=sys.stderr, flush=True)
        return folder

    @staticmethod
    def load(checkpoint: Path | None, strategy, pools) -> int:
        """Restore the strategy and every pool from `checkpoint` (None: the initial state);
        returns the next round."""
        import torch

        if checkpoint is None:
            strategy.reset()
            pools.load(None, -1)
            return 0
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        if manifest["pools"] != len(pools.shards):
            raise ValueError(f"{checkpoint} was written by {manifest['pools']} pools, this run has "
                             f"{len(pools.shards)}: set runtime.pools={manifest['pools']} to resume it")
        strategy.load_state_dict(torch.load(checkpoint / "global.pt", weights_only=False))
        pools.load(checkpoint, manifest["round"])
        return manifest["round"] + 1
