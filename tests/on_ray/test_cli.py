"""The CLI as a user runs it: data stats, bad input, config refusals, the train job's files
(TensorBoard events read back with TensorBoard's own reader) and the main job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.datasets import data_root

REPO = Path(__file__).resolve().parents[2]
KU = data_root() / "ku"


def run_cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not KU.is_dir(), reason=f"real data folder {KU} absent")
def test_data_stats_json_on_ku(capsys):
    assert main(["data", "stats", "--format", "fedmr", str(KU), "--allow-duplicates", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 204 and stats["items"] == 560
    assert stats["split"] == {"train": 3076, "valid": 204, "test": 204}
    assert stats["raw"]["interactions"] == 3489
    assert stats["features"] == {"text": [560, 512], "image": [560, 512]}
    assert stats["cold_test_items"] == 88
    assert stats["protocol_steps"]["dropped_exact_duplicates"] == 5


@pytest.mark.skipif(not KU.is_dir(), reason=f"real data folder {KU} absent")
def test_duplicates_are_refused_by_default_with_file_and_row(capsys):
    assert main(["data", "stats", "--format", "fedmr", str(KU), "--json"]) == 2
    err = capsys.readouterr().err
    assert "inter.csv, row 1852" in err and "duplicate" in err and "--allow-duplicates" in err


def test_bad_generic_input_writes_nothing(tmp_path, capsys):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "interactions.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1,5,yesterday\n")
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--format", "generic", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "interactions.csv, row 3, column 'timestamp'" in err
    assert not out.exists() or not any(out.iterdir())


def test_data_stats_tells_the_format_from_the_folder(tmp_path, capsys):
    from pipeline.data.loaders import detect_format
    from pipeline.data.synthetic import SyntheticConfig, generate, write

    mine = tmp_path / "mine"
    write(generate(SyntheticConfig(n_users=40, n_items=30, images=False, seed=0), progress=False), mine,
          progress=False)
    assert main(["data", "stats", str(mine), "--json"]) == 0  # no --format
    stats = json.loads(capsys.readouterr().out)
    assert stats["dataset"] == "mine" and stats["raw"]["users"] == 40
    for files, fmt in ((["inter.csv"], "fedmr"), (["u.data", "u.item"], "movielens-mm"),
                       (["x_pairs.tsv"], "microlens"), (["interactions.parquet"], "generic")):
        folder = tmp_path / fmt
        folder.mkdir()
        for name in files:
            (folder / name).write_text("")
        assert detect_format(folder) == fmt
    (tmp_path / "fedmr" / "interactions.csv").write_text("")  # two formats' files: no guess
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, words in ((tmp_path / "fedmr", "matches generic, fedmr"), (empty, "holds none of the files")):
        assert main(["data", "stats", str(folder)]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and words in err and "--format" in err


def test_unknown_config_key_is_refused_by_name(capsys):
    assert main(["train", "--set", "train.roundz=3"]) == 2
    assert "roundz" in capsys.readouterr().err


def test_train_job_files_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    done = run_cli("train", "--out", str(out), "--json", "--set",
                   "data.synthetic={n_users: 50, n_items: 40, images: false}", "model.backbone=pfedrec",
                   "train.rounds=3", "train.local_epochs=2", "runtime.pools=2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["rounds_run"] == 3 and summary["pools"] == 2
    assert summary["selection"]["metric"] == "valid/hr@50"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "valid/hr@50", "test/ndcg@10", "time/round_seconds", "time/clients_per_second",
                "comm/bytes_down", "comm/bytes_up"):
        assert tag in tags, tag
    hr = [e.value for e in events.Scalars("valid/hr@50")]
    assert hr == pytest.approx([r["valid/hr@50"] for r in rows])
    again = run_cli("train", "--out", str(out), "--set", "data.synthetic={n_users: 50, n_items: 40, images: false}")
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is never overwritten


def test_main_job_prints_the_table(tmp_path):
    done = run_cli("run", "--workdir", str(tmp_path), "--users", "80", "--items", "60", "--rounds", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    methods = [row["method"] for row in result["rows"]]
    assert methods[0] == "popularity" and methods[1].startswith("fcf (federated")
    assert methods[2].startswith("fcf + FedMR (federated")  # the same backbone with the fusion module
    assert methods[3].startswith("fcf + FedMR + GFMFR (federated")  # ... and with group-wise fusion
    gfmfr = json.loads((tmp_path / "fcf_fedmr_gfmfr" / "summary.json").read_text())
    assert gfmfr["config"]["model"]["gfmfr"]["group_num"] == 5 and gfmfr["config"]["model"]["fusion"]["fusion"] == "moe"
    assert all(0 <= row["hr@50"] <= 1 for row in result["rows"])
    assert (tmp_path / "fcf" / "summary.json").is_file() and (tmp_path / "fcf_fedmr" / "summary.json").is_file()
    fedmr = json.loads((tmp_path / "fcf_fedmr" / "summary.json").read_text())
    assert fedmr["config"]["model"]["fusion"]["fusion"] == "moe"
    # the report, the TensorBoard logs and one user's top-10 (its training items excluded)
    assert Path(result["report"]).is_file() and (tmp_path / "report" / "costs.png").is_file()
    assert result["tensorboard"] == str(tmp_path.resolve()) and any((tmp_path / "fcf" / "tb").iterdir())
    recs = result["recommendations"]
    assert len(recs["items"]) == 10 and recs["run"] in [m.split(" (")[0] for m in methods[1:]]
    # the catalogue's real PNGs and texts went through the offline encoders into the store
    assert result["features"]["text"] == [result["summary"]["dataset"]["items"], 384]
    assert result["features"]["image"] == [result["summary"]["dataset"]["items"], 1280]
    assert (tmp_path / "features" / "manifest.json").is_file()
