"""python -m pipeline.report.reproduction end to end on a tiny synthetic dataset: a preset trained
under both negative pools through the real train job (local Ray), the JSON rows the table
promises, the labels of the optimistic pool, and the table rebuilt from the records alone."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import ray

from pipeline.config import ORIGINAL_NEGATIVES, SYMMETRIC_NEGATIVES
from pipeline.report import reproduction

TINY = """\
name: tiny-pfedrec-paper
data:
  name: synthetic
  synthetic: {n_users: 60, n_items: 50, mean_interactions: 12, seed: 3}
model:
  backbone: pfedrec
  pfedrec_eta: 1.0
train:
  preset: pfedrec_paper
  protocol: p1
  rounds: 2
runtime:
  out: runs/ignored
  pools: 1
  progress: false
  tensorboard: false
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduction")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(TINY)
    cwd = os.getcwd()
    os.chdir(root)  # runs/, results/ and the data cache are relative, as from the repository root
    try:
        yield root
    finally:
        os.chdir(cwd)
        if ray.is_initialized():
            ray.shutdown()


def test_reproduction_table_from_runs_then_from_records(workspace):
    argv = ["--seeds", "0", "1", "--configs", "configs/tiny.yaml", "--out", "results/reproduction.md",
            "--runs-dir", "runs/reproduction"]
    assert reproduction.main(argv) == 0
    rows = json.loads((workspace / "results" / "reproduction.json").read_text())
    assert [(r["negatives"], r["recipe"]) for r in rows] == [("original", "pfedrec_paper"),
                                                             ("symmetric", "pfedrec_paper")]
    for row in rows:
        assert {"method", "recipe", "negatives", "dataset", "protocol", "metric", "mean", "std", "seeds",
                "published"} <= set(row)
        assert (row["method"], row["dataset"], row["protocol"], row["metric"]) == (
            "PFedRec", "synthetic", "p1", "test/hr@10")
        assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2 and row["missing"] == []
        assert 0 <= row["mean"] <= 100 and row["std"] is not None and row["published"] == 71.62
    assert rows[0]["negatives_label"] == ORIGINAL_NEGATIVES and rows[1]["negatives_label"] == SYMMETRIC_NEGATIVES
    summary = json.loads(next((workspace / "runs" / "reproduction" / "original").glob("*/seed-0/summary.json"))
                         .read_text())
    assert summary["negatives"] == ORIGINAL_NEGATIVES and summary["config"]["train"]["neg_exclude_heldout"]
    markdown = (workspace / "results" / "reproduction.md").read_text()
    assert markdown.startswith("<!-- made by: python -m pipeline.report.reproduction --seeds 0 1 --configs")
    assert ORIGINAL_NEGATIVES in markdown and "| PFedRec | `pfedrec_paper` | original |" in markdown

    # a fresh clone: no run directories, only the committed records
    shutil.rmtree(workspace / "runs" / "reproduction")
    assert reproduction.main([*argv, "--report-only"]) == 0
    assert json.loads((workspace / "results" / "reproduction.json").read_text()) == rows


def test_default_rows_carry_their_target(workspace):
    """A `train.preset: default` config gives a row with recipe "default" and its target, and the
    table says whether the mean reaches it."""
    (workspace / "configs" / "tiny_default.yaml").write_text(
        TINY.replace("tiny-pfedrec-paper", "tiny-pfedrec-default").replace("pfedrec_paper", "default"))
    argv = ["--seeds", "0", "--configs", "configs/tiny_default.yaml", "--negatives", "symmetric",
            "--out", "results/default.md"]
    assert reproduction.main(argv) == 0
    [row] = json.loads((workspace / "results" / "default.json").read_text())
    assert (row["recipe"], row["negatives"], row["target"], row["seeds"]) == ("default", "symmetric", 58.7, [0])
    verdict = "met" if row["mean"] >= 58.7 else "not met"
    assert f"| {row['mean']:.2f} | {row['per_seed'][0]:.2f} |" in (workspace / "results" / "default.md").read_text()
    assert f"| ≥ 58.7: {verdict} |" in (workspace / "results" / "default.md").read_text()
