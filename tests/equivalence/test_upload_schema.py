"""What the server sees: the exact upload of every method, pinned.

For each backbone alone, with FedMR (weight averaging and grad_adam), with GFMFR and with
both, one client trains one round and its Upload is reduced to a schema (field -> parameter
name -> shape, with K = items the client touched, d = dim; one client) that must equal the
pinned one in tests/equivalence/upload_schema.json. Beside it: no personal parameter is ever uploaded
(GFMFR's grouping vectors excepted: GFMFR sends the personal head for grouping, and
the schema says so), no raw interactions (no field holds per-interaction rows), and the item ids
uploaded are exactly the rows the client touched (its positives and the negatives it sampled).

A deliberate change of what crosses the network updates the JSON file:
    PIN_UPLOADS=1 pytest tests/equivalence/test_upload_schema.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import feature_dims, initial_state, round_lrs
from pipeline.federated.engine.sampling import client_data, epoch_rows
from pipeline.federated.messages import Upload
from pipeline.federated.engine.shard import Shard
from pipeline.models import model_for
from test_equivalence import synthetic
from test_fedmr_equivalence import with_features

PINNED = Path(__file__).with_name("upload_schema.json")
BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")
FEDMR = "model.fusion={d_f: 8, d_r: 6}"
METHODS = {f"{b}{suffix}": (b, *extra) for b in BACKBONES for suffix, extra in (
    ("", ()), ("+fedmr", (FEDMR,)), ("+fedmr(grad_adam)", ("model.fusion={d_f: 8, d_r: 6, fusion_agg: grad_adam}",)),
    ("+gfmfr", ("model.gfmfr={group_num: 2}",)), ("+fedmr+gfmfr", (FEDMR, "model.gfmfr={group_num: 2}")))}
# weight decay adds one number per global table: how much the client's decay shrank the rows it never touched
METHODS.update({f"{b}+weight_decay": (b, "train.weight_decay=0.01") for b in BACKBONES})
USER = 4


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic())


def upload_of(data, backbone, *extra) -> tuple[Upload, object, object]:
    cfg = load_config(None, [f"model.backbone={backbone}", "model.dim=8", "train.local_epochs=2",
                             "train.batch_rows=24", "train.neg_ratio=2", *extra])
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
    g = {k: v.double() for k, v in init.global_params.items()}
    return shard.train(0, g, np.array([USER]), round_lrs(cfg, data.n_items, 0)), cfg, init


def touched_items(data, cfg) -> np.ndarray:
    """The items of the client's rows over the round's local epochs (positives and sampled negatives)."""
    clients = client_data(data, np.array([USER]))
    rows = [epoch_rows(clients, neg_ratio=cfg.train.neg_ratio, rows_per_batch=cfg.train.rows_per_batch(),
                       seed=cfg.train.seed, round_=0, epoch=e) for e in range(cfg.train.local_epochs)]
    return np.unique(np.concatenate([r.item for r in rows]))


def shape(tensor: torch.Tensor, sizes: dict[int, str]) -> str:
    return "[" + ", ".join(sizes.get(n, str(n)) for n in tensor.shape) + "]"


def schema(upload: Upload, sizes: dict[int, str]) -> dict:
    out = {}
    for field in dataclasses.fields(upload):
        value = getattr(upload, field.name)
        if isinstance(value, dict):
            out[field.name] = {name: shape(t, sizes) if isinstance(t, torch.Tensor) else type(t).__name__
                               for name, t in sorted(value.items())}
        elif isinstance(value, torch.Tensor):
            out[field.name] = shape(value, sizes)
        elif isinstance(value, np.ndarray):
            out[field.name] = f"ids {shape(torch.as_tensor(value), sizes)}"
        else:
            out[field.name] = type(value).__name__ if value is not None else None
    return out


def test_every_method_uploads_exactly_the_pinned_schema(data):
    found, problems = {}, []
    for method, (backbone, *extra) in METHODS.items():
        upload, cfg, init = upload_of(data, backbone, *extra)
        touched = touched_items(data, cfg)
        found[method] = schema(upload, {len(touched): "K", cfg.model.dim: "d"})
        model = model_for(cfg.model)
        personal = {*model.PERSONAL_DENSE, *model.PERSONAL_TABLES}
        for kind in ("table_items", "table_sums", "dense_sums", "grad_sums"):
            leaked = personal & set(getattr(upload, kind))
            if leaked:
                problems.append(f"{method}: personal parameters {sorted(leaked)} in {kind}")
        for name, items in upload.table_items.items():
            if not np.array_equal(np.sort(items.numpy()), touched):
                problems.append(f"{method}: {name} uploads items beyond the client's rows")
        uploaded = {*upload.dense_sums, *upload.grad_sums}
        if uploaded - set(init.global_params):
            problems.append(f"{method}: dense uploads that are not global parameters: {uploaded - set(init.global_params)}")
        if cfg.model.gfmfr is not None:  # GFMFR's grouping vector: the personal head (FedNCF: tower + head)
            assert upload.group_users.tolist() == [USER]
    if os.environ.get("PIN_UPLOADS"):
        PINNED.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    assert not problems, problems
    pinned = json.loads(PINNED.read_text())
    changed = {m: {"pinned": pinned.get(m), "now": found[m]} for m in found if pinned.get(m) != found[m]}
    assert not changed and set(pinned) == set(found), json.dumps(changed, indent=1)


def test_upload_fields_hold_no_interactions():
    """No field of an Upload can hold a client's interactions: only reduced sums, the touched
    item ids, counts, and GFMFR's per-client grouping inputs."""
    names = [f.name for f in dataclasses.fields(Upload)]
    assert names == ["table_items", "table_sums", "dense_sums", "grad_sums", "weight", "table_scale_sums", "clients",
                     "rows", "loss_sum",
                     "seconds", "group_users", "group_vectors", "group_alpha", "rho", "distilled", "clipped"]
