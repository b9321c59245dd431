"""The centralized upper bound (pipeline/centralized): the federated model modules on pooled data.

In process: the pooled model scores exactly like the federated engine from the same initial
state (one copy of the math); N workers' loss slices give the 1-worker gradient (the scaling and
the row-keyed dropout that make data parallelism exact); the epoch sampler. Through Ray Train:
2 workers equal 1 worker epoch by epoch, resume continues the same trajectory, the CLI and the
experiments tables."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.centralized.model import PooledModel
from pipeline.centralized.trainer import CentralizedTrainer, epoch_batches, worker_slice
from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import feature_dims, initial_state
from pipeline.federated.engine.sampling import client_data
from pipeline.federated.engine.shard import Shard
from test_equivalence import synthetic
from test_fedmr_equivalence import MOE, with_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")
VARIANTS = [(b, None) for b in BACKBONES] + [(b, MOE) for b in BACKBONES] + [
    ("fcf", f"{MOE}, router_scope: global"), ("fedrap", f"{MOE}, mixing_source: batch"),
    ("fedncf", f"{MOE}, modalities: [id, image]")]


@pytest.fixture(scope="module")
def data():
    return with_features(synthetic())


def make_config(backbone, fusion, *extra):
    return load_config(None, [f"model.backbone={backbone}", "model.dim=8", "train.neg_ratio=2", "train.seed=3",
                              "train.model_seed=5", *([f"model.fusion={{{fusion}}}"] if fusion else []), *extra])


@pytest.mark.parametrize("backbone,fusion", VARIANTS)
def test_pooled_model_scores_like_the_federated_engine(data, backbone, fusion):
    """Same config, same initial state: the pooled model's [U, I] scores are the engine's."""
    cfg = make_config(backbone, fusion)
    init = initial_state(cfg, data.n_users, data.n_items, feature_dims(data))
    shard = Shard(cfg, data, None, np.arange(data.n_users), init, dtype=torch.float64)
    users = torch.arange(data.n_users)
    federated = shard.scores({k: v.double() for k, v in init.global_params.items()}, users)
    pooled = PooledModel(cfg, data, dtype=torch.float64).scores(users)
    assert pooled.shape == (data.n_users, data.n_items)
    torch.testing.assert_close(pooled, federated, rtol=0, atol=1e-12)


def _gradients(model, batches):
    model.zero_grad(set_to_none=True)
    for loss in batches:
        loss.backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()
            if p.grad is not None}


# mixing_source=batch mixes over the rows of the forward call, a worker's slice: not split-invariant
@pytest.mark.parametrize("backbone,fusion", [v for v in VARIANTS if "batch" not in (v[1] or "")]
                         + [("fedrap", "d_f: 8, dropout: 0.2, fusion: attention, attention_heads: 2")])
def test_worker_slices_add_up_to_the_global_batch_gradient(data, backbone, fusion):
    """What the trainer averages over 3 workers (each: its slice's loss x world / global rows) is the
    gradient of the mean loss over the global batch, dropout included (masks keyed by row)."""
    cfg = make_config(backbone, fusion, "model.fusion.dropout=0.3" if fusion else "train.seed=3")
    model = PooledModel(cfg, data, dtype=torch.float64)
    clients = client_data(data, np.arange(data.n_users))
    user, item, label, bounds = epoch_batches(clients, neg_ratio=2, batch_rows=300, seed=3, epoch=4, world=3)
    start, stop = bounds[1]
    tensors = lambda lo, hi: (torch.as_tensor(user[lo:hi]), torch.as_tensor(item[lo:hi]),  # noqa: E731
                              torch.as_tensor(label[lo:hi], dtype=torch.float64))
    whole = _gradients(model, [model(*tensors(start, stop), 4, 1, 3) / (stop - start)])
    world = 3
    sliced = _gradients(model, [model(*tensors(*worker_slice(start, stop, rank, world)), 4, 1, 3)
                                * (world / (stop - start)) / world for rank in range(world)])
    assert whole.keys() == sliced.keys() and len(whole) > 0
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in whole.values())


def test_epoch_batches_follow_the_negatives_rule(data):
    clients = client_data(data, np.arange(data.n_users))
    user, item, label, bounds = epoch_batches(clients, neg_ratio=3, batch_rows=100, seed=1, epoch=2, world=2)
    positives = {(u, i) for u in range(data.n_users)
                 for i in data.train_items[data.train_indptr[u]:data.train_indptr[u + 1]]}
    rows = list(zip(user.tolist(), item.tolist()))
    assert sorted(r for r, y in zip(rows, label) if y == 1) == sorted(positives)  # every positive once
    assert not any(r in positives for r, y in zip(rows, label) if y == 0)  # negatives avoid them
    assert (label == 0).sum() == 3 * len(positives)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(user)
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    again = epoch_batches(clients, neg_ratio=3, batch_rows=100, seed=1, epoch=2, world=2)
    assert all(np.array_equal(a, b) for a, b in zip((user, item, label), again[:3]))
    other = epoch_batches(clients, neg_ratio=3, batch_rows=100, seed=1, epoch=3, world=2)
    assert not np.array_equal(item, other[1])  # fresh negatives and order each epoch
    # a last batch under half a batch joins the one before it, whatever the worker count
    n = len(user)
    for world in (1, 2, 5):
        assert epoch_batches(clients, neg_ratio=3, batch_rows=n - 1, seed=1, epoch=2, world=world)[3] == [(0, n)]
    assert epoch_batches(clients, neg_ratio=3, batch_rows=n // 2 + 1, seed=1, epoch=2, world=3)[3] == [
        (0, n // 2 + 1), (n // 2 + 1, n)]
    with pytest.raises(ValueError, match="workers"):
        epoch_batches(clients, neg_ratio=3, batch_rows=4, seed=1, epoch=2, world=5)
    assert [worker_slice(0, 7, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]


def test_in_process_training_lowers_the_loss_and_selects_on_validation(data):
    cfg = make_config("fedrap", MOE, "centralized.epochs=6", "centralized.batch_size=64", "centralized.lr=0.01",
                      "train.protocol=p3", "train.eval_ks=[10]", "train.selection_metric=hr@10")
    trainer = CentralizedTrainer(cfg, data, None)
    before = {n: p.detach().clone() for n, p in trainer.pooled.named_parameters()}
    while not trainer.done():
        trainer.run_epoch()
    losses = [m["train/loss"] for m in trainer.history]
    assert losses[-1] < losses[0]
    assert all(0 <= m["valid/hr@10"] <= 1 and 0 <= m["test/ndcg@10"] <= 1 for m in trainer.history)
    best = int(np.argmax([m["valid/hr@10"] for m in trainer.history]))
    assert trainer.selection.best_round == best
    assert trainer.selection.best_test["hr@10"] == trainer.history[best]["test/hr@10"]
    moved = [n for n, p in trainer.pooled.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("personal.item_personal") for n in moved)  # FedRAP's per-(user, item) P
    assert any(n.startswith("dense.fedmr__") for n in moved)
    # a trainer restored from the state (as a checkpoint holds it: a copy) continues bit-identically
    state = copy.deepcopy(trainer.state_dict())
    twin = CentralizedTrainer(cfg.model_copy(update={"centralized": cfg.centralized.model_copy(
        update={"epochs": 8})}), data, None)
    twin.load_state_dict(state)
    trainer.config = twin.config
    assert trainer.run_epoch()["train/loss"] == twin.run_epoch()["train/loss"]


def test_gfmfr_and_privacy_are_refused(data, tmp_path):
    from pipeline.centralized.job import train_centralized

    with pytest.raises(ValueError, match="GFMFR"):
        PooledModel(make_config("fcf", MOE, "model.gfmfr={group_num: 2}"), data)
    with pytest.raises(ValueError, match="privacy"):
        train_centralized(make_config("fcf", None, "privacy={clip: 1.0, noise_multiplier: 1.0}",
                                      f"runtime.out={tmp_path}"))


# --- through Ray Train -------------------------------------------------------------------------------

RAY_TINY = ["data.synthetic={n_users: 80, n_items: 150, mean_interactions: 12, seed: 3, images: false}",
            "model.backbone=fedrap", "model.dim=8", "train.protocol=p3", "train.eval_ks=[10, 50]",
            "centralized.batch_size=64", "centralized.lr=0.01", "centralized.dtype=float64", "runtime.progress=false"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_trajectory(got, want):
    """Stated tolerance (float64): the epoch loss within 1e-12 relative and every metric within 1e-12
    (the same sums in another order; the same ranks)."""
    assert [m["epoch"] for m in got] == [m["epoch"] for m in want]
    for a, b in zip(got, want):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-12)
        for key in b:
            if key.startswith(("valid/", "test/")):
                assert a[key] == pytest.approx(b[key], abs=1e-12), (a["epoch"], key)


@pytest.mark.slow
def test_two_ray_train_workers_follow_one_and_resume_continues(local_ray, tmp_path):
    """2 workers (gradients all-reduced over gloo) equal 1 worker epoch by epoch for the same seed and global batch;
    a 2-worker run stopped after 2 epochs and resumed from its checkpoint continues the same
    trajectory. The loss falls, metrics and TensorBoard scalars are written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.centralized.job import latest_checkpoint, train_centralized

    one = train_centralized(load_config(None, [*RAY_TINY, "centralized.epochs=4", f"runtime.out={tmp_path / 'one'}"]))
    first = train_centralized(load_config(None, [*RAY_TINY, "centralized.epochs=2", "centralized.workers=2",
                                                 f"runtime.out={tmp_path / 'two'}"]))
    assert first["epochs_run"] == 2 and latest_checkpoint(tmp_path / "two").name == "epoch-0001"
    with pytest.raises(FileExistsError):  # a second start without --resume is refused
        train_centralized(load_config(None, [*RAY_TINY, "centralized.workers=2", f"runtime.out={tmp_path / 'two'}"]))
    two = train_centralized(load_config(None, [*RAY_TINY, "centralized.epochs=4", "centralized.workers=2",
                                               f"runtime.out={tmp_path / 'two'}"]), resume=True)
    assert one["mode"] == two["mode"] == "centralized" and (one["workers"], two["workers"]) == (1, 2)
    reference, resumed = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(reference) == 4
    _assert_same_trajectory(resumed, reference)
    assert reference[-1]["train/loss"] < reference[0]["train/loss"]
    assert two["selection"]["best_round"] == one["selection"]["best_round"]
    assert set(two["selection"]["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg", "mrr", "coverage") for k in (10, 50)}
    events = EventAccumulator(str(tmp_path / "two" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert "valid/hr@50" in events.Tags()["scalars"] and "time/epoch_seconds" in events.Tags()["scalars"]
    assert latest_checkpoint(tmp_path / "two").name == "epoch-0003"


KU = pytest.mark.skipif(not (__import__("pipeline.data.datasets", fromlist=["data_root"]).data_root() / "ku").is_dir(),
                        reason="KU data not available")


@pytest.mark.slow
@pytest.mark.realdata
@KU
def test_fedmr_on_ku_two_workers_follow_one(local_ray, tmp_path):
    """FedMR (local router: a per-user table with sparse gradients; experts once per item;
    history mixing) on KU's real CLIP features: 2 Ray Train workers equal 1."""
    from pipeline.centralized.job import train_centralized

    base = ["data.name=ku", "model.backbone=fcf", "model.dim=16", "model.fusion={d_f: 16, d_r: 8}",
            "train.protocol=p3", "train.eval_ks=[10, 50]", "centralized.epochs=2", "centralized.batch_size=256",
            "centralized.lr=0.01", "centralized.dtype=float64", "runtime.progress=false", "runtime.tensorboard=false"]
    one = train_centralized(load_config(None, [*base, f"runtime.out={tmp_path / 'one'}"]))
    two = train_centralized(load_config(None, [*base, "centralized.workers=2", f"runtime.out={tmp_path / 'two'}"]))
    _assert_same_trajectory(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"))
    assert one["dataset"]["users"] == 204 and two["workers"] == 2


@pytest.mark.slow
def test_experiments_table_has_centralized_rows_and_the_gap(local_ray, tmp_path, monkeypatch, capsys):
    """`pipeline experiments --mode both`: each config's federated runs and its centralized bound in
    one table, the centralized row labelled, the gap stated per backbone; GFMFR has no bound."""
    from pipeline.report.cli import main as experiments

    monkeypatch.chdir(tmp_path)  # the runs (--runs-dir runs/exp) are relative
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny-fcf\ndata:\n  name: synthetic\n  synthetic: {n_users: 60, n_items: 80, "
                      "mean_interactions: 12, seed: 3, images: false}\nmodel:\n  backbone: fcf\n  dim: 8\n"
                      "train:\n  protocol: p3\n  rounds: 2\n  local_epochs: 1\ncentralized:\n  epochs: 3\n"
                      "  batch_size: 64\n  lr: 0.01\nruntime:\n  pools: 1\n  progress: false\n  tensorboard: false\n")
    out = tmp_path / "table.md"
    assert experiments(["--configs", str(config), "--seeds", "0", "--mode", "both", "--runs-dir", "runs/exp",
                        "--out", str(out)]) == 0
    markdown = out.read_text()
    assert (tmp_path / "runs/exp/tiny-fcf-centralized/seed-0/summary.json").is_file()
    federated = next(line for line in markdown.splitlines() if line.startswith("| FCF |"))
    central = next(line for line in markdown.splitlines() if line.startswith("| FCF (centralized) |"))
    assert "centralized bound (this project, Ray Train)" in central and "re-run" in federated
    summary = json.loads((tmp_path / "runs/exp/tiny-fcf-centralized/seed-0/summary.json").read_text())
    assert summary["mode"] == "centralized" and summary["epochs_run"] == 3
    assert "**Centralized rows:**" in markdown and "lr 0.01, 64 positives per batch, epochs cap 3" in markdown
    gap = next(line for line in markdown.splitlines() if "Federated-to-centralized gap" in line)
    header = [cell.strip() for cell in next(line for line in markdown.splitlines()
                                            if line.startswith("| Method |")).split("|")]
    column = header.index("test HR@50")  # MRR and coverage columns stand beside HR and NDCG
    assert "test MRR@50" in header and "test Coverage@50" in header
    fed_value = float(federated.split("|")[column])
    central_value = float(central.split("|")[column])
    assert f"FCF: {fed_value:.2f} vs {central_value:.2f} ({fed_value - central_value:+.2f}" in gap
    # the runs are reused: a second call trains nothing
    assert experiments(["--configs", str(config), "--seeds", "0", "--mode", "both", "--runs-dir", "runs/exp",
                        "--report-only", "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text().splitlines()[1:] == markdown.splitlines()[1:]
    gfmfr = tmp_path / "gfmfr.yaml"
    gfmfr.write_text(config.read_text().replace("  dim: 8\n", "  dim: 8\n  gfmfr: {group_num: 2}\n"))
    assert experiments(["--configs", str(gfmfr), "--mode", "centralized"]) == 2
    assert "GFMFR has no centralized counterpart" in capsys.readouterr().err


@pytest.mark.slow
def test_job_wrapper_runs_the_cli(tmp_path):
    """jobs/train_centralized.py is `pipeline centralized` (a real local Ray, 2 workers, --json)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(repo / "jobs/train_centralized.py"), "--out", str(tmp_path / "run"),
                           "--workers", "2", "--json", "--set", "data.synthetic={n_users: 50, n_items: 60, images: false}",
                           "model.backbone=fedncf", "model.dim=8", "centralized.epochs=2", "centralized.batch_size=32",
                           "runtime.progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["mode"] == "centralized" and summary["workers"] == 2 and summary["epochs_run"] == 2
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_runs_inside_a_tune_trial(local_ray, tmp_path):
    """A Tune trial that runs the centralized job sees every epoch's metrics (TuneReportCallback)."""
    from ray import tune

    from pipeline.centralized.job import train_centralized

    def trial(point):
        train_centralized(load_config(None, [*RAY_TINY, "centralized.epochs=3", f"centralized.lr={point['lr']}",
                                             f"runtime.out={tmp_path / 'trial'}"]), quiet=True)

    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.1}), param_space={"lr": 0.01},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="central"))
    result = tuner.fit()[0]
    assert result.error is None
    frame = result.metrics_dataframe
    assert list(frame["epoch"]) == [0, 1, 2] and "valid/hr@50" in frame and "train/loss" in frame
    assert json.loads((tmp_path / "trial" / "summary.json").read_text())["epochs_run"] == 3


@pytest.mark.realdata
@KU
def test_two_threads_give_one_result_with_deterministic_kernels():
    """With 2 intra-op threads FedMR's scatters sum in a run-dependent order unless torch's
    deterministic algorithms are on, as the Ray Train worker loop sets them: then a seed gives one
    result (here: 2 epochs of FCF + FedMR on KU, twice, bit-identical losses)."""
    from pipeline.data.datasets import open_dataset

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/ku/fcf_fedmr.yaml", ["centralized.epochs=2"])
    data, negatives = open_dataset(cfg.data)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            trainer = CentralizedTrainer(cfg, data, negatives)
            runs.append([trainer.run_epoch()["train/loss"] for _ in range(2)])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert runs[0] == runs[1]


def test_the_centralized_bound_refuses_evaluation_schedules(tmp_path):
    from pipeline.centralized.job import train_centralized

    for key, shown in (("train.eval_every=2", None), ("train.eval_round0=false", "train.eval_round0=False"),
                       ("train.eval_users=10", None)):
        config = load_config(None, [key, f"runtime.out={tmp_path / 'run'}"])
        with pytest.raises(ValueError, match=f"{shown or key}: the centralized bound evaluates every user after every epoch"):
            train_centralized(config)
        assert not (tmp_path / "run").exists()  # refused before anything is written or Ray starts


def test_experiments_refuse_a_centralized_plan_with_a_schedule(tmp_path):
    from pipeline.report.experiments import plan_runs

    config = tmp_path / "sampled.yaml"
    config.write_text("name: sampled\ntrain:\n  eval_users: 10\n")
    with pytest.raises(ValueError, match="train.eval_users=10: the centralized bound"):
        plan_runs([config], seeds=[0], runs_dir=tmp_path / "runs", mode="both")
    assert len(plan_runs([config], seeds=[0], runs_dir=tmp_path / "runs", mode="federated")) == 1
