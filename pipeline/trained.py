"""A trained run, opened for use: its model at the best validation round (or the last
checkpoint), every user's personal state, recommendations, and an export to safetensors.

    run = TrainedRun.open("runs/ku/fcf")                 # checkpoints/best, else the newest
    run.recommend("196", k=10)                          # the user's top-K, training items excluded
    run.export("exports/fcf")                           # model.safetensors + model_card.json
    TrainedRun.open_export("exports/fcf").scores(...)   # the same scores, bit for bit

Scores come from the engine's own scorer (Shard.scores, what the evaluator ranks), so a
recommendation is exactly the evaluator's ranking of that user minus the training items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import ExperimentConfig
from pipeline.outputs import OutputKind, check_output

EXPORT_TENSORS = "model.safetensors"
MODEL_CARD = "model_card.json"
EXPORT_FORMAT = "fedmm-pipeline export 1"


def _is_export(folder: Path) -> bool:
    try:
        card = json.loads((Path(folder) / MODEL_CARD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and str(card.get("format", "")).startswith("fedmm-pipeline export")


EXPORT_OUTPUT = OutputKind("export", "an export", MODEL_CARD, frozenset({EXPORT_TENSORS, MODEL_CARD}), _is_export)


class RunError(ValueError):
    """A run directory, checkpoint, export or user that cannot be used, and why."""


@dataclass
class Recommendation:
    rank: int
    item_id: str
    score: float
    title: str
    image: str


class TrainedRun:
    """config, data (the prepared split), globals, and one Shard per pool holding its users' state."""

    def __init__(self, config: ExperimentConfig, data, negatives, globals_: dict, pool_states: list[dict],
                 round_: int, source: Path, summary: dict | None = None):
        from pipeline.federated.strategy.aggregate import feature_dims, initial_state
        from pipeline.federated.engine.shard import Shard

        self.config, self.data, self.negatives, self.round, self.source = config, data, negatives, round_, source
        self.summary = summary or {}
        self.globals = globals_
        init = initial_state(config, data.n_users, data.n_items, feature_dims(data))
        self.shards = []
        for state in pool_states:
            shard = Shard(config, data, negatives, np.asarray(state["users"]), init)
            shard.store.load_state_dict(state)
            self.shards.append(shard)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, run_dir, checkpoint: str = "best", data_cache: Path | None = None) -> "TrainedRun":
        """The run in `run_dir` at checkpoint 'best' (the best validation round; the newest
        checkpoint when the run kept none) or 'last' (the newest intact checkpoint)."""
        from pipeline.federated.runtime.checkpoints import damage, newest_intact

        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise RunError(f"{run_dir}: not a run directory (no config.yaml); pass the folder a train job wrote")
        folder = run_dir / "checkpoints" / "best"
        if checkpoint == "last" or not (folder / "manifest.json").is_file():
            folder, skipped = newest_intact(run_dir / "checkpoints")
            if folder is None:
                why = f" ({'; '.join(f'{p.name}: {r}' for p, r in skipped)})" if skipped else ""
                raise RunError(f"{run_dir}: no intact checkpoint to load{why}")
        elif (reason := damage(folder)) is not None:
            raise RunError(f"{folder}: {reason}")
        config = ExperimentConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        config = _anchored(config, run_dir)
        data, negatives = _prepared(config, data_cache)
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        if summary and (why := data.mismatch(summary["dataset"])):
            raise RunError(f"{run_dir} was trained on {why}")
        manifest = json.loads((folder / "manifest.json").read_text())
        state = torch.load(folder / "global.pt", weights_only=False)
        pools = [torch.load(folder / f"pool-{i}.pt", weights_only=False) for i in range(manifest["pools"])]
        return cls(config, data, negatives, state["globals"], pools, manifest["round"], folder, summary)

    @classmethod
    def open_export(cls, export_dir, data_cache: Path | None = None) -> "TrainedRun":
        """A model written by export(): the same scores as the run it came from."""
        from safetensors.torch import load_file

        export_dir = Path(export_dir)
        if not (export_dir / MODEL_CARD).is_file() or not (export_dir / EXPORT_TENSORS).is_file():
            raise RunError(f"{export_dir}: not an export (expected {EXPORT_TENSORS} and {MODEL_CARD})")
        card = json.loads((export_dir / MODEL_CARD).read_text())
        config = ExperimentConfig.model_validate(card["config"])
        data, negatives = _prepared(config, data_cache)
        if why := data.mismatch(card["dataset"]):
            raise RunError(f"{export_dir} was trained on {why}")
        # each tensor in an allocation of its own: the file's packed tensors start at any byte, and
        # the CPU's matrix kernels may round differently on unaligned data (seen with one user's
        # scores, 1e-8 apart), where the run's own tensors are aligned
        tensors = {name: t.clone() for name, t in load_file(export_dir / EXPORT_TENSORS).items()}
        globals_ = {name[len("globals/"):]: t for name, t in tensors.items() if name.startswith("globals/")}
        pools = [_unflatten({k: v for k, v in tensors.items() if k.startswith(f"pool{i}/")}, f"pool{i}/",
                            card["pool_meta"][i]) for i in range(len(card["pool_meta"]))]
        return cls(config, data, negatives, globals_, pools, card["round"], export_dir, card)

    # -- use ---------------------------------------------------------------------------------------

    def user_index(self, user) -> int:
        """The dataset's user id (as in its files) -> the model's user index."""
        ids = np.asarray(self.data.user_ids)
        wanted = str(user)
        found = np.flatnonzero(ids.astype(str) == wanted)
        if len(found) == 0:
            raise RunError(f"user {user!r} is not in {self.data.name!r} (its {len(ids)} users have ids like "
                           f"{', '.join(map(str, ids[:3]))}, ...)")
        return int(found[0])

    def scores(self, users: np.ndarray) -> torch.Tensor:
        """[B, I] the model's logits of users (indices) over all items, each with its own state."""
        users = np.asarray(users, dtype=np.int64)
        out = torch.empty(len(users), self.data.n_items)
        for shard in self.shards:
            mine = np.isin(users, shard.users)
            if mine.any():
                out[torch.as_tensor(np.flatnonzero(mine))] = shard.scores(self.globals, torch.as_tensor(users[mine])).float()
        return out

    def recommend(self, user, k: int = 10) -> list[Recommendation]:
        """The user's top-k items by score, its training items excluded (k >= 1; a bool is refused)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"recommend k={k!r}: the number of items to recommend must be a whole number >= 1")
        index = self.user_index(user)
        scores = self.scores(np.array([index]))[0].double()
        trained = self.data.train_items[self.data.train_indptr[index]:self.data.train_indptr[index + 1]]
        scores[torch.as_tensor(trained, dtype=torch.int64)] = -torch.inf
        top = torch.topk(scores, min(k, self.data.n_items - len(trained))).indices.tolist()
        catalogue = self.data.catalogue
        return [Recommendation(rank=r + 1, item_id=str(self.data.item_ids[i]), score=float(scores[i]),
                               title=_display_title(catalogue, i),
                               image=str(catalogue.image[i]) if catalogue is not None and catalogue.image is not None
                               else "")
                for r, i in enumerate(top)]

    def model_card(self) -> dict:
        from pipeline.report.tables import config_label

        selection = self.summary.get("selection", {})
        return {"method": config_label(self.config), "backbone": self.config.model.backbone,
                "dataset": self.data.identity(),
                "encoder": _encoder(self.config), "round": self.round,
                "metrics_at_best_round": {"round": selection.get("best_round"), "valid": selection.get("valid"),
                                          "test": selection.get("test")},
                "privacy": self.summary.get("privacy"), "config": json.loads(self.config.model_dump_json())}

    def export(self, out_dir, *, overwrite: bool = True, inputs=()) -> Path:
        """model.safetensors (globals and every pool's personal state) + model_card.json, written
        atomically. `out_dir` must not hold anything but an earlier export (replaced only with
        `overwrite`) nor overlap the checkpoint read or `inputs` (pipeline.outputs.check_output)."""
        from safetensors.torch import save_file

        from pipeline.data.store import write_atomically

        check_output(out_dir, EXPORT_OUTPUT, inputs=[self.source, *inputs], overwrite=overwrite)
        tensors = {f"globals/{name}": t.contiguous() for name, t in self.globals.items()}
        pool_meta = []
        for i, shard in enumerate(self.shards):
            flat, meta = _flatten(shard.store.state_dict(), f"pool{i}/")
            tensors.update(flat)
            pool_meta.append(meta)
        card = {**self.model_card(), "pool_meta": pool_meta, "format": EXPORT_FORMAT}

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / EXPORT_TENSORS), metadata={"format": card["format"]})
            (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")

        return write_atomically(Path(out_dir), fill)


# -- helpers ---------------------------------------------------------------------------------------


def _anchored(config: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """The run's config with relative data paths (data.path, data.features) made absolute against
    the folder the run was trained from, so a run opens the same from any working directory.

    That folder is known when runtime.out was relative: the run directory's absolute path ends with
    it (runs/mydata/fcf trained in /home/me/work is /home/me/work/runs/mydata/fcf). Otherwise the
    paths stay as written (relative to the working directory)."""
    out = Path(config.runtime.out)
    if out.is_absolute() or ".." in out.parts or not out.parts:
        return config
    here = Path(run_dir).resolve()
    parts = Path(*[p for p in out.parts if p != "."]).parts
    if here.parts[-len(parts):] != parts:
        return config
    origin = here.parents[len(parts) - 1]
    updates = {key: origin / value for key in ("path", "features")
               if (value := getattr(config.data, key)) is not None and not Path(value).is_absolute()}
    return config.model_copy(update={"data": config.data.model_copy(update=updates)}) if updates else config


def _prepared(config: ExperimentConfig, data_cache: Path | None):
    from pipeline.data.datasets import open_dataset
    from pipeline.data.cache import data_cache_root

    return open_dataset(config.data, cache=data_cache_root(data_cache))


def _display_title(catalogue, item: int) -> str:
    """What a recommendation shows for item index `item`: the catalogue's title when it has one,
    else the first line of its text (shortened to 80 characters); '' without a catalogue."""
    if catalogue is None:
        return ""
    title = str(catalogue.title[item]).strip() if catalogue.title is not None else ""
    return title or _title(catalogue.text[item])


def _title(text) -> str:
    text = str(text).strip()
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= 80 else first[:77] + "..."


def _encoder(config: ExperimentConfig) -> dict | None:
    features = config.data.features
    if features is None:
        return None
    manifest = Path(features) / "manifest.json"
    return json.loads(manifest.read_text()).get("modalities") if manifest.is_file() else {"store": str(features)}


def _flatten(tree: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (and numpy arrays) of a nested dict under '/'-joined names; everything else in
    the returned meta, with the key types needed to rebuild it (int keys are rounds)."""
    tensors, meta = {}, {}
    for key, value in tree.items():
        name = f"{prefix}{'i:' if isinstance(key, int) else ''}{key}"
        if isinstance(value, dict):
            sub, sub_meta = _flatten(value, name + "/")
            tensors.update(sub)
            meta[name] = {"dict": sub_meta}
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            tensors[name] = torch.as_tensor(value).contiguous().clone()
            meta[name] = {"numpy": isinstance(value, np.ndarray)}
        else:
            meta[name] = {"value": value}
    return tensors, meta


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> dict:
    out = {}
    for name, kind in meta.items():
        raw = name[len(prefix):]
        key = int(raw[2:]) if raw.startswith("i:") else raw
        if "dict" in kind:
            out[key] = _unflatten(tensors, name + "/", kind["dict"])
        elif "value" in kind:
            out[key] = kind["value"]
        else:
            out[key] = tensors[name].numpy() if kind["numpy"] else tensors[name]
    return out
