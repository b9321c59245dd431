"""Your own data, end to end, as a new user runs it: a small raw dataset of its own shape (ratings
in a TSV with dates, a JSON list of movies with names, plots and poster files) converted by hand
into the generic format, then only the commands README and docs/own_data.md show, each in its own
process with the real encoders and real Ray:

    data stats -> encode -> train (ID only, then + FedMR) -> recommend -> export -> report

Training runs from the folder that holds the data (relative paths, as the templates have them);
recommend and export run from another, empty folder, which must stay empty."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUICK = ["train.rounds=2", "train.local_epochs=1", "train.patience=0", "runtime.pools=1"]
GENRES = ["space", "western", "romance", "heist", "monster", "musical"]
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (120, 40, 160), (30, 160, 170)]


def _raw_dataset(folder: Path, users: int = 36, movies: int = 24) -> None:
    """A raw dataset in a shape of its own: ratings.tsv (who, what, stars, when as a date) and
    movies.json (id, name, plot, poster file); every user likes one genre and rates 8 movies."""
    (folder / "posters").mkdir(parents=True)
    rng = np.random.default_rng(7)
    catalogue = []
    for m in range(movies):
        genre = m % len(GENRES)
        image = Image.new("RGB", (48, 48), COLOURS[genre])
        ImageDraw.Draw(image).ellipse([8 + m % 5, 8, 36, 40 - m % 7], fill=(250, 250, 250))
        image.save(folder / "posters" / f"m{m:03d}.png")
        catalogue.append({"id": f"m{m:03d}", "name": f"The {GENRES[genre].title()} Film No. {m}",
                          "plot": f"A {GENRES[genre]} story: chapter {m} of a long saga about {GENRES[genre]}s.",
                          "poster": f"posters/m{m:03d}.png"})
    (folder / "movies.json").write_text(json.dumps(catalogue))
    rows = []
    for u in range(users):
        liked = [m for m in range(movies) if m % len(GENRES) == u % len(GENRES)]
        others = [m for m in range(movies) if m not in liked]
        picks = list(liked) + list(rng.choice(others, size=8 - len(liked), replace=False))
        for k, m in enumerate(rng.permutation(picks)):
            day = pd.Timestamp("2024-01-01") + pd.Timedelta(days=int(u + 3 * k))
            rows.append(f"u{u}\tm{m:03d}\t{1 + (m + u) % 5}\t{day.date()}")
    (folder / "ratings.tsv").write_text("who\twhat\tstars\twhen\n" + "\n".join(rows) + "\n")


def _to_generic(raw: Path, out: Path) -> None:
    """The user's own conversion: interactions.csv (user_id,item_id,timestamp,rating) and
    catalogue.csv (item_id,title,text,image_path) with image paths relative to the folder."""
    out.mkdir(parents=True)
    ratings = pd.read_csv(raw / "ratings.tsv", sep="\t")
    pd.DataFrame({"user_id": ratings["who"], "item_id": ratings["what"],
                  "timestamp": pd.to_datetime(ratings["when"]).astype("int64") // 10**9,
                  "rating": ratings["stars"]}).to_csv(out / "interactions.csv", index=False)
    movies = pd.DataFrame(json.loads((raw / "movies.json").read_text()))
    (out / "posters").mkdir()
    for poster in movies["poster"]:
        (out / poster).write_bytes((raw / poster).read_bytes())
    pd.DataFrame({"item_id": movies["id"], "title": movies["name"], "text": movies["plot"],
                  "image_path": movies["poster"]}).to_csv(out / "catalogue.csv", index=False)


def _pipeline(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=_ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"pipeline {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


_ENV: dict = {}


def test_own_data_from_raw_files_to_a_report(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _ENV.clear()
    _ENV.update({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIPELINE_DATA_CACHE")},
                HF_HUB_OFFLINE="1", PIPELINE_DATA_CACHE=str(tmp_path / "cache"),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    _raw_dataset(tmp_path / "raw")
    _to_generic(tmp_path / "raw", work / "mydata")
    plain = str(REPO / "configs" / "own_data" / "fcf.yaml")
    fedmr = str(REPO / "configs" / "own_data" / "fcf_fedmr.yaml")

    # 1. what training will see: the format told by the files, the folder's name as the label
    stats = json.loads(_pipeline(work, "data", "stats", "mydata", "--json").stdout)
    assert stats["dataset"] == "mydata" and stats["raw"] == {"users": 36, "items": 24, "interactions": 288}
    assert stats["catalogue"] == {"items": 24, "with_text": 24, "with_image": 24}
    assert stats["split"] == {"train": 36 * 6, "valid": 36, "test": 36}

    # 2. the catalogue's posters and plots through the real encoders into a feature store
    _pipeline(work, "encode", "mydata", "--format", "generic", "--out", "runs/features/mydata", "--no-progress")
    manifest = json.loads((work / "runs/features/mydata/manifest.json").read_text())
    assert manifest["item_count"] == 24
    assert {m: v["dim"] for m, v in manifest["modalities"].items()} == {"text": 384, "image": 1280}

    # ... and what the FedMR config's training will read of it
    view = json.loads(_pipeline(work, "data", "stats", "--config", fedmr, "--set", "data.path=mydata",
                                "--json").stdout)["training"]
    assert view["fusion_reads"]["text"] == [24, 384] and view["fusion_reads"]["image"] == [24, 1280]

    # 3. train the ID-only model and the FedMR one from the templates
    _pipeline(work, "train", "--config", plain, "--set", "data.path=mydata", *QUICK)
    trained = _pipeline(work, "train", "--config", fedmr, "--set", "data.path=mydata", *QUICK)
    assert "best round" in trained.stdout
    for run in ("fcf", "fcf_fedmr"):
        summary = json.loads((work / "runs/mydata" / run / "summary.json").read_text())
        assert summary["dataset"]["name"] == "mydata" and summary["rounds_run"] == 2
    run_dir = work / "runs/mydata/fcf_fedmr"

    # 4. recommend, from another folder: the catalogue's titles, training items excluded
    shown = _pipeline(elsewhere, "recommend", "--run", str(run_dir), "--user", "u3", "--k", "5").stdout
    lines = [line for line in shown.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    assert len(lines) == 5, shown
    assert all("The " in line and " Film No. " in line for line in lines), shown
    assert "story: chapter" not in shown  # the title, not the plot text
    items = [line.split()[1] for line in lines]
    train_items = set(pd.read_csv(work / "mydata/interactions.csv").query("user_id == 'u3'")
                      .sort_values("timestamp")["item_id"][:-2])  # all but validation and test
    assert len(set(items)) == 5 and not set(items) & train_items

    # 5. export, from another folder, to a folder named absolutely
    _pipeline(elsewhere, "export", "--run", str(run_dir), "--out", str(tmp_path / "export"))
    card = json.loads((tmp_path / "export/model_card.json").read_text())
    assert (tmp_path / "export/model.safetensors").is_file() and card["dataset"]["name"] == "mydata"
    assert card["encoder"]["text"]["dim"] == 384
    assert list(elsewhere.iterdir()) == []  # recommend and export wrote nothing where they ran

    # 6. the report of both runs
    _pipeline(work, "report", "runs/mydata/fcf", "runs/mydata/fcf_fedmr", "--out", "report")
    report = (work / "report/report.md").read_text()
    assert "FCF + FedMR" in report or "fcf + FedMR" in report
    assert any(p.suffix == ".png" for p in (work / "report").iterdir())
