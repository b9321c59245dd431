"""pipeline.report.groups: ARI of a run's last grouping against the synthetic generator's planted groups."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml

from pipeline.report import groups


def fake_run(run_dir, known, round_=7):
    folder = run_dir / "checkpoints" / f"round-{round_:06d}"
    folder.mkdir(parents=True)
    torch.save({"groups": {"known": known}}, folder / "global.pt")
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
    fake_run(tmp_path / "runs" / "tiny-gfmfr" / "seed-0", relabelled)
    fake_run(tmp_path / "runs" / "tiny-gfmfr" / "seed-1", np.random.default_rng(0).integers(0, 3, 60))
    out = tmp_path / "groups.md"
    assert groups.main(["--configs", str(path), "--seeds", "0", "1", "2", "--runs-dir", str(tmp_path / "runs"),
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert "| tiny-gfmfr | 0 | 7 | 56 | 1.000 |" in text
    seed1 = next(line for line in text.splitlines() if line.startswith("| tiny-gfmfr | 1 |"))
    assert abs(float(seed1.split("|")[5])) < 0.2  # chance
    assert "| tiny-gfmfr | 2 | (no checkpoint)" in text
    assert text.startswith("<!-- made by: python -m pipeline.report.groups --configs")
