"""pipeline.report.groups: ARI of a run's last grouping against the synthetic generator's planted groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.report import groups


def fake_run(run_dir, known, round_=7, scores=None, student=None, metric="hr@50"):
    folder = run_dir / "checkpoints" / f"round-{round_:06d}"
    folder.mkdir(parents=True)
    history = [{"round": round_, f"valid/{metric}": student}] if student is not None else []
    torch.save({"groups": {"known": known, **({"scores": scores} if scores is not None else {})},
                "history": history}, folder / "global.pt")
    (folder / "manifest.json").write_text(json.dumps({"round": round_}))


def test_ari_of_the_last_grouping(tmp_path, capsys):
    config = {"name": "tiny-gfmfr", "data": {"name": "synthetic", "synthetic": {
        "n_users": 60, "n_items": 40, "n_groups": 3, "group_strength": 1.0, "images": False}},
        "model": {"backbone": "fcf", "gfmfr": {"group_num": 3}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    from pipeline.config import load_config

    truth = groups.planted_groups(load_config(path))
    assert len(truth) == 60 and set(truth.tolist()) == {0, 1, 2}
    relabelled = (truth + 1) % 3  # the same partition under other ids
    relabelled[:4] = -1  # never grouped: left out
    from pipeline.data.datasets import open_dataset

    data, _ = open_dataset(load_config(path).data)
    # a teacher that puts its members' validation items first (at most 20 per group, under K = 50,
    # and never a member's training item): every grouped user's validation item is in its top 50
    perfect = torch.zeros(3, data.n_items, dtype=torch.float64)
    for user in np.flatnonzero(relabelled >= 0):
        perfect[relabelled[user], int(data.valid_item[user])] = 1.0
    fake_run(tmp_path / "runs" / "tiny-gfmfr" / "seed-0", relabelled, scores=perfect, student=0.25)
    fake_run(tmp_path / "runs" / "tiny-gfmfr" / "seed-1", np.random.default_rng(0).integers(0, 3, 60))
    out = tmp_path / "groups.md"
    assert groups.main(["--configs", str(path), "--seeds", "0", "1", "2", "--runs-dir", str(tmp_path / "runs"),
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert "| tiny-gfmfr | 0 | 7 | 56 | 1.000 |" in text
    seed0 = next(line for line in text.splitlines() if line.startswith("| tiny-gfmfr | 0 |"))
    assert seed0.endswith("| 100.00 (HR@50) | 25.00 |"), seed0
    assert "| tiny-gfmfr | 1.000 |" not in text and "| 100.00 | 25.00 | 2 |" in text  # means over the two runs
    seed1 = next(line for line in text.splitlines() if line.startswith("| tiny-gfmfr | 1 |"))
    assert abs(float(seed1.split("|")[5])) < 0.2  # chance
    assert "| tiny-gfmfr | 2 | (no checkpoint)" in text
    assert text.startswith("<!-- made by: python -m pipeline.report.groups --configs")


def test_teacher_without_planted_groups(tmp_path):
    """Real data (a generic-format file, no generator behind it): no ARI, the teacher alone."""
    import pandas as pd

    rng = np.random.default_rng(3)
    rows = [(u, i, t) for u in range(30) for t, i in enumerate(rng.choice(25, size=8, replace=False))]
    (tmp_path / "log").mkdir()
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "log" / "interactions.csv",
                                                                            index=False)
    config = {"name": "tiny-real", "data": {"name": "tiny", "format": "generic", "path": str(tmp_path / "log"),
                                            "protocol": {"min_user": 0, "min_item": 0}},
              "model": {"backbone": "fcf", "gfmfr": {"group_num": 2}}, "train": {"protocol": "p3", "eval_ks": [10], "selection_metric": "hr@10"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    known = np.arange(30) % 2
    fake_run(tmp_path / "runs" / "tiny-real" / "seed-0", known, scores=torch.zeros(2, 25, dtype=torch.float64),
             student=0.5, metric="hr@10")
    assert groups.main(["--configs", str(path), "--seeds", "0", "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = groups.grouping_rows(groups_specs(path, tmp_path / "runs"))
    assert rows[0]["ari"] is None and rows[0]["student"] == 0.5
    assert rows[0]["teacher"] == 0.0  # all scores tied: ranked pessimistically


def groups_specs(path, runs_dir):
    from pipeline.report.experiments import expand_configs, plan_runs

    return plan_runs(expand_configs([str(path)]), [0], [], runs_dir)


def test_teacher_fit_traces_student_teacher_and_targets(tmp_path):
    from pipeline.config import load_config
    from pipeline.data.synthetic import SyntheticConfig, generate
    from pipeline.encode.store import write_store
    from pipeline.report import teacher_fit

    fields = {"n_users": 40, "n_items": 30, "images": False, "seed": 4}
    items = np.unique(np.asarray(generate(SyntheticConfig(**fields), progress=False).dataset.interactions.item))
    text = np.random.default_rng(0).normal(size=(len(items), 6)).astype(np.float32)
    write_store(tmp_path / "s", items.astype(np.int64), {"text": text}, {"modalities": {"text": {"dim": 6}}})
    config = {"name": "tiny-fit", "data": {"name": "synthetic", "synthetic": fields, "features": str(tmp_path / "s"),
                                           "protocol": {"min_user": 0, "min_item": 0}},
              "model": {"backbone": "fcf", "dim": 8, "gfmfr": {"group_num": 2, "server_epochs": 2,
                                                               "group_emb_dim": 8}},
              "train": {"protocol": "p3", "eval_ks": [10], "selection_metric": "hr@10", "local_epochs": 1}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="not a GFMFR config"):
        teacher_fit.trace(load_config(path, ["model.gfmfr=null"]))
    out = tmp_path / "fit.md"
    assert teacher_fit.main(["--configs", str(path), "--seeds", "0", "1", "--rounds", "2", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| FCF + GFMFR |")]
    assert [int(r[2]) for r in rows] == [0, 1] and all(int(r[1]) == 2 for r in rows)
    for row in rows:
        student, teacher, target, error = (float(v) for v in row[3:])
        assert 0 <= student <= 100 and 0 <= teacher <= 100 and 0 <= target <= 100 and error > 0
    assert any(float(r[4]) != float(r[5]) for r in rows)  # f_phi does not reproduce its targets
