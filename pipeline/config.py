"""Typed experiment configuration: YAML files in configs/, overridable from the command line.

Unknown keys and out-of-range values are refused with a message naming the key; every option
either takes effect or is refused (reference defect D14). Presets (spec/protocols.md §9) only
set defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.data.datasets import DatasetConfig

Backbone = Literal["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"]

# spec/backbones.md defaults per backbone
BACKBONE_LR = {"fedavg": 0.01, "fcf": 0.1, "fedncf": 0.1, "pfedrec": 0.1, "fedrap": 0.1}
BACKBONE_LR_DECAY = {"fedrap": 0.9}


class ModelConfig(BaseModel):
    """The backbone and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Backbone = "fedavg"
    dim: int = Field(64, ge=4, description="ID embedding size d (FedNCF needs a multiple of 4)")
    pfedrec_update: Literal["two_step", "joint"] = "two_step"
    pfedrec_eta: float = Field(1.0, gt=0, description="PFedRec item lr = lr * n * eta")
    pfedrec_eval_table: Literal["personal", "global"] = "personal"
    fedrap_lambda: float = Field(0.1, ge=0, description="base weight of -MSE(P, C)")
    fedrap_mu: float = Field(0.1, ge=0, description="base weight of the regulariser R(C)")
    fedrap_reg: Literal["l1", "l2"] = "l1"

    @model_validator(mode="after")
    def _ncf_dim(self):
        if self.backbone == "fedncf" and self.dim % 4:
            raise ValueError(f"dim={self.dim}: FedNCF's tower halves twice, dim must be a multiple of 4")
        return self


class TrainConfig(BaseModel):
    """Local training, sampling, schedule and selection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(100, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    local_epochs: int = Field(5, ge=1)
    tol: float = Field(1e-4, ge=0, description="per-client early stop on relative epoch-loss change")
    batch_size: int = Field(2048, ge=1, description="positives per mini-batch")
    batch_rows: int | None = Field(None, ge=1, description="rows per mini-batch; overrides batch_size")
    neg_ratio: int = Field(1, ge=1)
    neg_pool: Literal["all", "train_items"] = "all"
    neg_exclude_heldout: bool = False
    lr: float | None = Field(None, gt=0, description="client lr; None = the backbone's default")
    lr_decay: float | None = Field(None, gt=0, le=1, description="per-round lr factor; None = backbone default")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0, description="run seed: sampling, negatives, shuffling")
    model_seed: int = Field(0, ge=0, description="initialisation seed")
    protocol: Literal["p1", "p3"] = "p3"
    selection_metric: str | None = Field(None, description="validation metric; default hr@10 (P1), hr@50 (P3)")
    patience: int = Field(20, ge=0)
    eval_every: int = Field(1, ge=1)
    eval_ks: tuple[int, ...] = (10, 20, 50)

    @model_validator(mode="after")
    def _checks(self):
        if self.weight_decay > 0:
            raise ValueError("weight_decay > 0 is not supported yet by the sparse item-table engine "
                             "(decay touches every row); use 0")
        metric = self.selection_metric
        if metric is not None:
            name, _, k = metric.partition("@")
            if name not in ("hr", "ndcg") or not k.isdigit() or int(k) not in self.eval_ks:
                raise ValueError(f"selection_metric={metric!r}: expected hr@K or ndcg@K with K in {self.eval_ks}")
        return self

    def rows_per_batch(self) -> int:
        return self.batch_rows or self.batch_size * (1 + self.neg_ratio)

    def selection(self) -> str:
        return self.selection_metric or ("hr@10" if self.protocol == "p1" else "hr@50")


class RuntimeConfig(BaseModel):
    """Where and how the run executes; none of it changes the numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pools: int | None = Field(None, ge=1, description="ClientPool actors; None = one per available CPU")
    cpus_per_pool: float = Field(1.0, gt=0)
    gpus_per_pool: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints (0 = never)")
    out: Path = Field(Path("runs/train"), description="run directory")
    progress: bool = True
    tensorboard: bool = True


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "experiment"
    data: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else BACKBONE_LR[self.model.backbone]

    def lr_decay(self) -> float:
        if self.train.lr_decay is not None:
            return self.train.lr_decay
        return BACKBONE_LR_DECAY.get(self.model.backbone, 1.0)


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for dotted='a.b' (creating levels)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def load_config(path: Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """YAML file (optional) plus `key.sub=value` overrides (values parsed as YAML scalars)."""
    tree: dict = {}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a config file must hold a mapping at top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.rounds=5")
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return ExperimentConfig.model_validate(tree)
