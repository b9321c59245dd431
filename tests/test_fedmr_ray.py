"""FedMR through the real Server and ClientPool actors on KU (real CLIP features): the same
metrics as the in-process engine, the server's grad_adam state checkpointed and restored on
resume, selection on validation (never on test)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.datasets import data_root, open_dataset
from pipeline.federated.aggregate import (apply_fusion_grads, apply_uploads, feature_dims, initial_state,
                                          participants, round_lrs, server_lr, shard_users)
from pipeline.federated.shard import Shard
from ray_runs import rounds_with_a_restart

pytestmark = [pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.skipif(not (data_root() / "ku").is_dir(), reason="KU data not available")]


def config(out, rounds):
    return load_config(None, ["data.name=ku", "model.backbone=fedrap", "model.dim=16",
                              "model.fusion={d_f: 16, d_r: 8, fusion_agg: grad_adam, server_clip: 1.0}",
                              "train.local_epochs=2", "train.participation=0.5", f"train.rounds={rounds}",
                              "train.eval_ks=[10, 50]", "runtime.pools=2", "runtime.progress=false",
                              "runtime.tensorboard=false", f"runtime.out={out}"])


def reference(cfg, rounds):
    """The same run in this process: one Shard per pool, the server's Adam step by hand."""
    data, negatives = open_dataset(cfg.data)
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    shards = [Shard(cfg, data, negatives, users, init) for users in shard_users(data.train_counts, 2)]
    g, adam, out = init.global_params, None, []
    for r in range(rounds):
        users = participants(data.n_users, cfg.train.participation, cfg.train.seed, r)
        uploads = [s.train(r, g, users[np.isin(users, s.users)], round_lrs(cfg, data.n_items, r)) for s in shards]
        g = apply_uploads(g, uploads)
        g, adam = apply_fusion_grads(g, uploads, adam, lr=server_lr(cfg), clip=cfg.model.fusion.server_clip)
        results = [s.evaluate(g, "p3", "valid", (10, 50)) for s in shards]
        out.append({k: sum(m[k] * n for m, n in results) / data.n_users for k in results[0][0]})
    return out, adam


def test_fedmr_server_matches_engine_and_resumes_adam_state(local_ray, tmp_path):
    rounds = 4
    cfg = config(tmp_path / "run", rounds)
    data, negatives = open_dataset(cfg.data)
    # a new server resumes from the round-2 checkpoint (globals, Adam state, pools) and runs round 3
    history, checkpoint = rounds_with_a_restart(cfg, data, negatives, before=3)
    assert checkpoint["fusion_adam"]["step"] == 3  # one server step per round
    best = int(np.argmax([m["valid/hr@50"] for m in history]))

    expected, adam = reference(cfg, rounds)
    for got, want in zip(history, expected):
        assert {k: got[f"valid/{k}"] for k in want} == pytest.approx(want, abs=1e-9)
    assert adam["step"] == rounds
    assert [m.get("improved") for m in history].count(True) >= 1
    assert max(r for r, m in enumerate(history) if m["improved"]) == best  # validation decides
