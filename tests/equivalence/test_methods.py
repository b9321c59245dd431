"""Every method declares itself in one place (pipeline.models.base.Method): its parameter
partition, uploads, learning-rate groups, loss hooks and GFMFR parts, with no capability found by
looking for attributes; what each method uploads follows from that declaration alone and equals
what real uploads show (the pinned tests/equivalence/upload_schema.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import feature_dims, initial_state
from pipeline.federated.messages import declared_upload
from pipeline.models import BACKBONES, backbone, model_for
from pipeline.models.base import BACKBONE_FIELDS, METHOD_FIELDS
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features
from test_upload_schema import METHODS, PINNED

REPO = Path(__file__).resolve().parents[2]
FUSIONS = {"": (), "+fedmr": ("model.fusion={d_f: 8, d_r: 6}",),
           "+fedmr(grad_adam)": ("model.fusion={d_f: 8, d_r: 6, fusion_agg: grad_adam}",),
           "+fedmr(local router)": ("model.fusion={d_f: 8, d_r: 6, router_scope: local}",)}


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic())


def config(name, *extra):
    return load_config(None, [f"model.backbone={name}", "model.dim=8", "train.local_epochs=2", "train.batch_rows=24",
                              "train.neg_ratio=2", *extra])


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_module_declares_every_field(name):
    module = backbone(name)
    missing = [field for field in BACKBONE_FIELDS if not hasattr(module, field)]
    assert not missing, f"{name} does not declare {missing}"
    assert module.FUSION is None and module.FUSION_PLUG in ("input", "additive")
    assert bool(module.ITEM_INPUT) == (module.FUSION_PLUG == "input")


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_the_declared_partition_is_the_initial_state(data, name, fusion):
    """Global and personal parameters are disjoint and are exactly the initial state's; every
    parameter has a learning-rate group and a multiplier; kept copies are global tables; gradients
    are uploaded only for global dense weights; the two-step groups cover every trained
    parameter once; GFMFR's group table is global and its grouping vector is trained."""
    cfg = config(name, *FUSIONS[fusion])
    model = model_for(cfg.model)
    missing = [field for field in METHOD_FIELDS if not hasattr(model, field)]
    assert not missing, f"{name}{fusion} does not declare {missing}"
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    globals_ = [*model.GLOBAL_TABLES, *model.GLOBAL_DENSE]
    personal = [*model.PERSONAL_DENSE, *model.PERSONAL_TABLES]
    assert len(set(globals_)) == len(globals_) and len(set(personal)) == len(personal)
    assert not set(globals_) & set(personal)
    assert set(globals_) == set(init.global_params)
    assert set(personal) == {*init.personal_shared, *init.personal_per_user, *init.personal_table_base}
    assert set(model.PERSONAL_TABLES) == set(init.personal_table_base)
    every = {*globals_, *personal}
    assert set(model.LR_GROUPS) == every and set(model.lr_scale(data.n_items, cfg.model)) == every
    assert set(model.KEEP_TRAINED_COPY) <= set(model.GLOBAL_TABLES)
    assert set(model.UPLOAD_GRADS) <= set(model.GLOBAL_DENSE)
    if model.TWO_STEP_GROUPS:
        stepped = [n for group in model.TWO_STEP_GROUPS for n in group]
        assert len(stepped) == len(set(stepped)) and set(stepped) == every - set(model.PERSONAL_TABLES)
    assert model.GROUP_TABLE in model.GLOBAL_TABLES and set(model.GROUP_VECTOR) <= every
    assert model.AGGREGATION in ("uniform", "weighted")
    assert (model.FUSION is None) == (fusion == "") and bool(model.MODALITIES) == (fusion != "")
    assert (model.fuse_teacher is not None) == (fusion != "")


def test_declared_uploads_equal_the_pinned_uploads(data):
    """The upload of every method as its declaration says (messages.declared_upload) equals the
    schema tests/equivalence/test_upload_schema.py pins from real uploads, for all 35 methods and settings."""
    pinned = json.loads(PINNED.read_text())
    assert set(pinned) == set(METHODS)
    for method, (name, *extra) in METHODS.items():
        cfg = config(name, *extra)
        init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
        assert declared_upload(model_for(cfg.model), init, cfg) == pinned[method], method


def test_no_capability_is_found_by_looking_for_attributes():
    """The engine reads what a method declares; it never asks whether a method has an attribute."""
    pattern = re.compile(r"(hasattr|getattr)\((self\.)?(model|backbone|self\.model|self\.backbone)\b")
    engine = [REPO / "pipeline" / part for part in ("models", "federated", "centralized", "eval")]
    found = [f"{path.relative_to(REPO)}:{number}" for folder in engine for path in folder.rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_the_fusion_module_names_no_backbone():
    text = (REPO / "pipeline" / "models" / "fusion.py").read_text()
    assert not [name for name in BACKBONES if f'"{name}"' in text]
