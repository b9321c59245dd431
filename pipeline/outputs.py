"""What a command may write to its --out: nothing it did not make.

A command that writes a folder (export, encode, data synth) replaces its --out as a whole. Before
it does, check_output refuses
  - an --out that is, contains or lies inside one of the command's inputs (even with --overwrite),
  - a training run directory (even with --overwrite),
  - anything else that exists and is not an earlier output of the same command (recognised by the
    file that command always writes: its manifest, model card or config), or that holds files the
    command does not write,
  - an earlier output of the same command unless the user asked to replace it (--overwrite).
An empty folder is no loss and is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


class OutputError(ValueError):
    """An --out that the command refuses to write; the message says why in one line."""


@dataclass(frozen=True)
class OutputKind:
    """command: as typed after `python -m pipeline`; what: what it writes ("an export");
    marker: the file by which an earlier output is recognised; names: every entry it writes;
    recognise(folder) -> True when the folder's marker is the command's own."""

    command: str
    what: str
    marker: str
    names: frozenset[str]
    recognise: Callable[[Path], bool]


def is_run_directory(path: Path) -> bool:
    """A folder a train or centralized job wrote (config.yaml beside its metrics or checkpoints)."""
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("metrics.jsonl", "checkpoints", "summary.json", "ray_train", ".lock"))


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if source.is_relative_to(out):
        return "contains"
    if out.is_relative_to(source):
        return "is inside"
    return None


def check_output(out, kind: OutputKind, *, inputs: Iterable = (), overwrite: bool = False) -> None:
    """Raise OutputError unless `kind.command` may write `out` (see the module's docstring)."""
    shown = Path(out)
    out = shown.expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).expanduser().resolve()
        if (relation := _relation(out, resolved)) is not None:
            raise OutputError(f"refusing to write {kind.what} to {shown}: it {relation} the command's input "
                              f"{source}; choose an --out outside its inputs")
    if not out.exists() and not out.is_symlink():
        return
    if is_run_directory(out):
        raise OutputError(f"refusing to write {kind.what} to {shown}: it is a training run directory; "
                          f"choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"refusing to replace {shown}: it exists and is not a folder `pipeline {kind.command}` "
                          f"wrote; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not kind.recognise(out):
        raise OutputError(f"refusing to replace {shown}: it exists and is not {kind.what} written by "
                          f"`pipeline {kind.command}` (no {kind.marker} of its own); choose another --out")
    extra = [name for name in entries if name not in kind.names]
    if extra:
        listed = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise OutputError(f"refusing to replace {shown}: besides {kind.what} it holds {listed}, which "
                          f"`pipeline {kind.command}` did not write; move them away or choose another --out")
    if not overwrite:
        raise OutputError(f"{shown} already holds {kind.what} from an earlier `pipeline {kind.command}`; "
                          f"pass --overwrite to replace it")
