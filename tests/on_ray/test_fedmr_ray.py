"""FedMR through the real Server and ClientPool actors on KU (real CLIP features): the same
metrics as the in-process engine, the server's grad_adam state checkpointed and restored on
resume, selection on validation (never on test)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.datasets import data_root, open_dataset
from pipeline.federated.rounds import in_process, run_rounds
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
    """The same run in this process: the same round loop (rounds.run_rounds) on in-process pools."""
    data, negatives = open_dataset(cfg.data)
    strategy, pools = in_process(cfg, data, negatives, n_pools=2)
    history = run_rounds(strategy, pools, rounds=rounds)
    return [{k[6:]: v for k, v in m.items() if k.startswith("valid/")} for m in history], strategy.fusion_adam


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
