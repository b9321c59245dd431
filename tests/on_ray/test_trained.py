"""Using a trained run (pipeline/trained.py): the best-round checkpoint reproduces the reported
metrics, recommendations are the evaluator's ranking minus the training items, an export
loads back to bit-identical scores, and bad runs or users are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.runtime.run import train
from pipeline.trained import RunError, TrainedRun

pytestmark = pytest.mark.slow
TINY = ["data.synthetic={n_users: 60, n_items: 200, images: false, seed: 3}", "train.local_epochs=2",
        "train.neg_ratio=2", "train.participation=0.7", "train.rounds=5", "runtime.pools=2",
        "runtime.progress=false", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def runs(local_ray, tmp_path_factory):
    """A trained run per backbone whose personal state has another shape: dense heads (FCF),
    sparse personal tables (FedRAP), fine-tuned copies per round (PFedRec)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for backbone in ("fcf", "fedrap", "pfedrec"):
        config = load_config(None, [*TINY, f"model.backbone={backbone}", f"runtime.out={root / backbone}"])
        train(config, data_cache=root / "prepared", quiet=True)
        out[backbone] = (root / backbone, root / "prepared")
    return out


def evaluate(run: TrainedRun, split: str) -> dict:
    train_cfg = run.config.train
    from pipeline.federated.strategy import Strategy

    results = [s.evaluate(run.globals, train_cfg.protocol, split, train_cfg.eval_ks, with_items=True)
               for s in run.shards]
    return Strategy.reduce(results)  # as the run reduced them: means, and coverage of the union


@pytest.mark.parametrize("backbone", ["fcf", "fedrap", "pfedrec"])
def test_the_best_checkpoint_reproduces_the_reported_metrics(runs, backbone):
    run_dir, cache = runs[backbone]
    run = TrainedRun.open(run_dir, data_cache=cache)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.round == summary["selection"]["best_round"]
    for split in ("valid", "test"):
        assert evaluate(run, split) == pytest.approx(summary["selection"][split], abs=1e-12)
    last = TrainedRun.open(run_dir, checkpoint="last", data_cache=cache)
    assert last.round == summary["rounds_run"] - 1


def test_recommendations_are_the_evaluators_ranking_without_training_items(runs):
    run_dir, cache = runs["fedrap"]
    run = TrainedRun.open(run_dir, data_cache=cache)
    for user_index in (0, 17, run.data.n_users - 1):
        user = run.data.user_ids[user_index]
        recs = run.recommend(user, k=10)
        trained = set(run.data.train_items[run.data.train_indptr[user_index]:run.data.train_indptr[user_index + 1]])
        items = [int(np.flatnonzero(run.data.item_ids.astype(str) == r.item_id)[0]) for r in recs]
        assert len(items) == 10 and not trained & set(items)
        shard = next(s for s in run.shards if user_index in s.users)
        scores = shard.scorer(run.globals, "p3", "test")(np.array([user_index]))[0].double()  # what the evaluator ranks
        scores[list(trained)] = -torch.inf
        assert items == torch.topk(scores, 10).indices.tolist()
        assert [r.score for r in recs] == pytest.approx(scores[items].tolist(), abs=0)
        assert all(r.title for r in recs)


@pytest.mark.parametrize("backbone", ["fcf", "fedrap", "pfedrec"])
def test_export_loads_back_to_identical_scores(runs, backbone, tmp_path):
    run_dir, cache = runs[backbone]
    run = TrainedRun.open(run_dir, data_cache=cache)
    out = run.export(tmp_path / "export")
    card = json.loads((out / "model_card.json").read_text())
    assert card["backbone"] == backbone and card["round"] == run.round
    assert card["metrics_at_best_round"]["round"] == run.round and card["dataset"]["fingerprint"]
    loaded = TrainedRun.open_export(out, data_cache=cache)
    users = np.arange(run.data.n_users)
    assert torch.equal(run.scores(users), loaded.scores(users))
    assert [vars(r) for r in run.recommend(run.data.user_ids[5])] == [vars(r) for r in loaded.recommend(run.data.user_ids[5])]


def test_bad_runs_and_users_are_clear_errors(runs, tmp_path):
    run_dir, cache = runs["fcf"]
    with pytest.raises(RunError, match="not a run directory"):
        TrainedRun.open(tmp_path, data_cache=cache)
    with pytest.raises(RunError, match="is not in"):
        TrainedRun.open(run_dir, data_cache=cache).recommend("no-such-user")
    with pytest.raises(RunError, match="not an export"):
        TrainedRun.open_export(tmp_path, data_cache=cache)


def test_report_renders_a_table_and_plots_that_open(runs, tmp_path):
    from PIL import Image

    from pipeline.cli import main
    from pipeline.report.runs import NotARun, report_runs

    dirs = [runs[b][0] for b in ("fcf", "fedrap", "pfedrec")]
    report = report_runs(dirs, tmp_path / "one", title="one run")  # one run
    assert "| FCF |" in (tmp_path / "one" / "report.md").read_text() and len(report["figures"]) == 2
    assert main(["report", *map(str, dirs), "--out", str(tmp_path / "all")]) == 0  # a comparison, by the CLI
    text = (tmp_path / "all" / "report.md").read_text()
    for label in ("| FCF |", "| FedRAP |", "| PFedRec |", "| popularity |"):
        assert label in text, label
    assert "![validation HR@50 over rounds](validation.png)" in text and "(costs.png)" in text
    for name in ("validation.png", "costs.png"):
        with Image.open(tmp_path / "all" / name) as image:
            image.verify()
        with Image.open(tmp_path / "all" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300
    with pytest.raises(NotARun, match="not a run directory"):
        report_runs([tmp_path], tmp_path / "none")


def test_recommend_and_export_commands(runs, tmp_path, capsys):
    from pipeline.cli import main

    run_dir, cache = runs["fcf"]
    user = str(TrainedRun.open(run_dir, data_cache=cache).data.user_ids[2])
    assert main(["export", "--run", str(run_dir), "--data-cache", str(cache), "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    for source in (run_dir, tmp_path / "x"):  # a run directory or an export folder
        assert main(["recommend", "--run", str(source), "--data-cache", str(cache), "--user", user, "--k", "7",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["user"] == user and [r["rank"] for r in out["items"]] == list(range(1, 8))
    assert main(["recommend", "--run", str(tmp_path), "--user", user]) == 2
    assert "not a run directory" in capsys.readouterr().err
