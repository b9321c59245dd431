"""GFMFR through the real Server and ClientPool actors on KU (real CLIP features): the same
validation metrics and teacher as the in-process engine (group_server.GroupServer driven by
hand), the server's group state checkpointed and restored on resume, the group step's costs in
the round metrics, alone and with FedMR."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.data.datasets import data_root, open_dataset
from pipeline.federated.strategy.aggregate import participants
from pipeline.federated.rounds import in_process, run_rounds
from ray_runs import rounds_with_a_restart

pytestmark = [pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.skipif(not (data_root() / "ku").is_dir(), reason="KU data not available")]

GFMFR = "model.gfmfr={group_num: 3, server_epochs: 2, group_emb_dim: 32, server_batch: 512}"


def config(out, rounds, *extra):
    return load_config(None, ["data.name=ku", "model.dim=16", "train.local_epochs=2", "train.participation=0.5",
                              f"train.rounds={rounds}", "train.eval_ks=[10, 50]", "runtime.pools=2",
                              "runtime.progress=false", "runtime.tensorboard=false", f"runtime.out={out}", GFMFR,
                              *extra])


def reference(cfg, rounds):
    """The same run in this process: the same round loop (rounds.run_rounds) on in-process pools."""
    data, negatives = open_dataset(cfg.data)
    strategy, pools = in_process(cfg, data, negatives, n_pools=2)
    history = run_rounds(strategy, pools, rounds=rounds)
    return [{k[6:]: v for k, v in m.items() if k.startswith("valid/")} for m in history], strategy.groups


@pytest.mark.parametrize("backbone, extra", [
    ("fcf", ()),
    ("fedrap", ("model.fusion={d_f: 16, d_r: 8}", "train.lr=0.01")),  # GFMFR + FedMR
])
def test_gfmfr_server_matches_engine_and_resumes_group_state(local_ray, tmp_path, backbone, extra):
    rounds = 4
    cfg = config(tmp_path / "run", rounds, f"model.backbone={backbone}", *extra)
    data, negatives = open_dataset(cfg.data)
    # a new server resumes from the round-2 checkpoint (globals, group state, pools) and runs round 3
    history, checkpoint = rounds_with_a_restart(cfg, data, negatives, before=3)
    assert checkpoint["groups"]["scores"].shape == (3, data.n_items)

    expected, groups = reference(cfg, rounds)
    for got, want in zip(history, expected):
        assert {k: got[f"valid/{k}"] for k in want} == pytest.approx(want, abs=1e-6)
    # the group step ran every round, its costs are logged beside the clients' training time
    for metrics in history:
        for key in ("time/grouping_seconds", "time/group_fusion_seconds", "time/group_step_seconds",
                    "time/train_seconds", "group/fusion_loss"):
            assert metrics[key] >= 0, key
        assert 1 <= metrics["group/nonempty"] <= 3
        assert 0 < metrics["group/fusion_relative_error"] < 10
    assert history[0]["group/distilled_clients"] == 0  # round 0: no teacher yet
    # last_round membership: round t's distillers are the participants of both t-1 and t
    for r in (1, 2, 3):
        before = set(participants(data.n_users, 0.5, cfg.train.seed, r - 1).tolist())
        now = set(participants(data.n_users, 0.5, cfg.train.seed, r).tolist())
        assert history[r]["group/distilled_clients"] == len(before & now)
    assert history[3]["comm/teacher_bytes_down"] == history[3]["group/distilled_clients"] * data.n_items * 4
