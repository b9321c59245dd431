"""Dataset configs and the one entry point that turns a config into a prepared dataset.

Named datasets resolve under the data root: `$PIPELINE_DATA_ROOT`, else `../shared/data`
beside the repository. `synthetic` needs no files: it is generated from its seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data import loaders
from pipeline.data.negatives import EvalNegatives, sample_eval_negatives
from pipeline.data.prepare import PrepareConfig, PreparedDataset, prepare, preparation_line
from pipeline.data.schema import DataError, RawDataset
from pipeline.data.store import load_prepared, save_prepared
from pipeline.strict import ConfigModel, one_line

REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (format, folder under the data root, loader options, protocol overrides)
NAMED = {
    # the KU release holds 5 exact duplicate rows (users 134-138, item 285); loaders refuse
    # duplicates by default, and protocol step 2 drops them when they are let through
    "ku": ("fedmr", "ku", {"allow_duplicates": True}, {}),
    # every user has >= 20 ratings; no k-core keeps all 1,682 movies (PFedRec/FedRAP setting)
    "movielens": ("movielens-mm", "movielens-100k-mm", {}, {"min_user": 0, "min_item": 0}),
}

Format = Literal["fedmr", "movielens-mm", "microlens", "generic", "synthetic"]


def default_name(path) -> str:
    """The label of a dataset at `path` when the config names none: the folder's name (a file: its
    name without suffix, as the generic loader labels explicit files)."""
    path = Path(path)
    return path.stem if path.is_file() else (path.name or path.resolve().name)


def data_root() -> Path:
    return Path(os.environ.get("PIPELINE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


class DatasetConfig(ConfigModel):
    """Which data, how to read it, and the preparation protocol."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("synthetic", description="ku, movielens, synthetic, or a label for `path` (default with a "
                                                "`path`: the folder's name, or the file's name without suffix)")
    format: Format | None = Field(None, description="loader; implied by a named dataset")
    path: Path | None = Field(None, description="dataset folder or file; implied by a named dataset")
    loader_options: dict = Field(default_factory=dict, description="extra loader keyword arguments: "
                                 "allow_duplicates, skip_missing (drop and count rows with an empty user, item or "
                                 "timestamp instead of refusing the file), ...")
    protocol: PrepareConfig = Field(default_factory=PrepareConfig)
    eval_seed: int = Field(0, ge=0, description="seed of the persisted P1 negatives")
    features: Path | None = Field(None, description="feature store folder (python -m pipeline encode); "
                                                    "replaces any features the dataset ships")
    synthetic: dict = Field(default_factory=dict, description="SyntheticConfig fields")

    @model_validator(mode="before")
    @classmethod
    def _name_from_path(cls, data):
        """Your own data is labelled by its folder (`runs/mydata` -> "mydata") when `name` is left
        out; a named dataset or the generator keeps its own name."""
        if isinstance(data, dict) and data.get("name") is None and data.get("path") is not None:
            return {**data, "name": default_name(data["path"])}
        return data

    @field_validator("synthetic")
    @classmethod
    def _synthetic_fields(cls, value: dict) -> dict:
        """The generator's settings, checked with the rest of the config (before anything starts)."""
        from pipeline.data.synthetic import SyntheticConfig

        try:
            SyntheticConfig(**value)
        except ValidationError as error:
            raise ValueError(one_line(error)) from None
        return value

    def effective_protocol(self) -> PrepareConfig:
        """The protocol with a named dataset's defaults under the keys set explicitly."""
        if self.name not in NAMED or self.path is not None:
            return self.protocol
        return PrepareConfig(**{**NAMED[self.name][3], **self.protocol.model_dump(exclude_unset=True)})

    @property
    def generated(self) -> bool:
        """The synthetic generator's data (no files behind it)."""
        return self.name == "synthetic" and self.path is None

    def resolved(self) -> tuple[str, Path | None]:
        """(format, path) with named datasets filled in."""
        if self.name in NAMED and self.path is None:
            fmt, folder, _, _ = NAMED[self.name]
            return self.format or fmt, data_root() / folder
        if self.generated:
            return "synthetic", None
        if self.format is None or self.path is None:
            raise DataError("config", f"dataset {self.name!r} is not a named dataset "
                                      f"({', '.join([*NAMED, 'synthetic'])}): give format and path",
                            column="dataset")
        return self.format, self.path


def load_raw(config: DatasetConfig, workdir: Path | None = None) -> RawDataset:
    """Read the dataset's files (or generate the synthetic one) without preparing it."""
    fmt, path = config.resolved()
    if fmt == "synthetic" and workdir is None:  # in memory: no files to read
        from pipeline.data import synthetic

        raw = synthetic.generate(synthetic.SyntheticConfig(**config.synthetic)).dataset
    else:
        if fmt == "synthetic":
            path, fmt = materialize_synthetic(config, workdir), "generic"
        if not Path(path).exists():
            raise DataError(path, f"dataset {config.name!r} not found (data root: {data_root()})")
        options = {**(NAMED[config.name][2] if config.name in NAMED and config.path is None else {}),
                   **config.loader_options}
        raw = loaders.load(fmt, path, **options)
    if config.features is not None:
        from pipeline.encode.store import attach_features

        raw = attach_features(raw, config.features)
    return RawDataset(name=config.name, interactions=raw.interactions, catalogue=raw.catalogue,
                      features=raw.features, source=raw.source)


def materialize_synthetic(config: DatasetConfig, workdir: Path) -> Path:
    """Write the synthetic dataset of `config` (PNG images included) under `workdir` once;
    returns its folder (generic format: interactions, catalogue.csv, images/)."""
    from pipeline.data import synthetic

    synth_config = synthetic.SyntheticConfig(**config.synthetic)
    key = hashlib.sha256(synth_config.model_dump_json().encode()).hexdigest()[:12]
    folder = Path(workdir) / f"synthetic-{key}"
    if not folder.is_dir():
        synthetic.write(synthetic.generate(synth_config), folder)
    return folder


def planted_groups(config: DatasetConfig) -> np.ndarray:
    """[U] the synthetic generator's taste group of every prepared user (prepared id order),
    regenerated from the config (the data are a pure function of it)."""
    from pipeline.data import synthetic

    if not config.generated:
        raise ValueError(f"dataset {config.name!r}: planted groups exist for the synthetic generator only")
    generated = synthetic.generate(synthetic.SyntheticConfig(**config.synthetic), progress=False)
    users = prepare(generated.dataset, config.effective_protocol()).user_ids
    return generated.truth.user_group[np.asarray(users, dtype=np.int64)]


def open_dataset(config: DatasetConfig, cache: Path | None = None) -> tuple[PreparedDataset, EvalNegatives]:
    """Prepared split + persisted P1 negatives; reused from `cache` when already prepared
    from the same config and the same input files."""
    if cache is None:
        data = prepare(load_raw(config), config.effective_protocol())
        _announce(data, config)
        return data, sample_eval_negatives(data, config.eval_seed)
    target = Path(cache) / f"{config.name}-{_input_key(config)}"
    if (target / "meta.json").is_file():
        return load_prepared(target)
    data = prepare(load_raw(config, workdir=cache), config.effective_protocol())
    _announce(data, config)
    negatives = sample_eval_negatives(data, config.eval_seed)
    save_prepared(data, negatives, target, extra_meta={"config": json.loads(config.model_dump_json())})
    return data, negatives


def _announce(data: PreparedDataset, config: DatasetConfig) -> None:
    """One line on stderr when a dataset is prepared (not when a cached copy is read): the filters
    applied and what each removed, so two preparations of the same data never differ silently."""
    print(preparation_line(data.name, data.stats, config.effective_protocol()), file=sys.stderr, flush=True)


def _input_key(config: DatasetConfig) -> str:
    """Hash of the config and of the bytes of every input file (not images: the catalogue
    lists their paths, and the encode stage fingerprints their content in its manifest)."""
    digest = hashlib.sha256(config.model_dump_json().encode() + config.effective_protocol().model_dump_json().encode())
    if config.features is not None:
        manifest = Path(config.features) / "manifest.json"
        if not manifest.is_file():
            raise DataError(manifest, "not a feature store; run `python -m pipeline encode` first")
        digest.update(manifest.read_bytes())
        digest.update(b"stats.features_recipe")  # caches from before the stats named the store's key: prepared again
        for file in sorted(Path(config.features).glob("*.npy")):  # the matrices themselves: an edited
            digest.update(file.name.encode())                        # store is read (and checked) again
            digest.update(file.read_bytes())
    fmt, path = config.resolved()
    if path is not None:
        files = [path] if Path(path).is_file() else sorted(
            p for p in Path(path).iterdir() if p.is_file() and p.suffix in {".csv", ".tsv", ".npy", ".parquet", ".data", ".item"})
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]
