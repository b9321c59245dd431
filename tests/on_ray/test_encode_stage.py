"""The Ray Data encode stage end to end with the tiny CLIP, on a small catalogue written here:
PNG files and texts, one corrupt image, one missing image, one empty text."""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from pipeline.data.schema import DataError
from pipeline.encode.config import EncodeConfig
from pipeline.encode.encoders import EncoderSpec, build_encoder
from pipeline.encode.images import decode_images
from pipeline.encode.job import encode_items
from pipeline.encode.store import load_features

pytestmark = pytest.mark.slow

TINY = EncodeConfig(text_model="tiny-clip", image_model="tiny-clip", batch_size=4, actors=1)  # one actor: fast start
IDS = [3, 7, 11, 12, 20, 21, 25, 40]
CORRUPT_ID, MISSING_ID, EMPTY_TEXT_ID = 11, 20, 25


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _picture(seed: int, path):
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (int(rng.integers(40, 90)), int(rng.integers(40, 90))), tuple(rng.integers(0, 256, 3).tolist()))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, 30, 2).tolist()
        draw.rectangle([x, y, x + 15, y + 15], fill=tuple(rng.integers(0, 256, 3).tolist()))
    image.save(path)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """catalogue.csv in shuffled row order; images/ beside it, paths relative."""
    root = tmp_path_factory.mktemp("catalogue")
    (root / "images").mkdir()
    rows = []
    for item in IDS:
        name = f"images/{item}.png"
        if item == CORRUPT_ID:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        elif item != MISSING_ID:
            _picture(item, root / name)
        rows.append({"item_id": item, "text": "" if item == EMPTY_TEXT_ID else f"Item {item}: a thing to buy",
                     "image_path": name})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=3)
    frame.to_csv(root / "catalogue.csv", index=False)
    return root / "catalogue.csv"


@pytest.fixture(scope="module")
def encoded(ray_local, catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "tiny"
    manifest = encode_items(catalogue, out, TINY, progress=False)
    return out, manifest


def test_shapes_normalisation_and_item_order(encoded):
    out, manifest = encoded
    ids, matrices, loaded = load_features(out)
    assert ids.tolist() == sorted(IDS) and ids.dtype == np.int64
    assert set(matrices) == {"text", "image"}
    for matrix in matrices.values():
        assert matrix.shape == (len(IDS), 16) and matrix.dtype == np.float32
        assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert loaded["item_order"].startswith("item_id ascending")
    assert not manifest["reused"]


def test_rows_belong_to_their_items(encoded, catalogue):
    """Row r equals the encoder run directly on item_ids[r]'s own content."""
    out, _ = encoded
    ids, matrices, _ = load_features(out)
    good = [i for i in IDS if i not in (CORRUPT_ID, MISSING_ID)]
    pixels, _ = decode_images([str(catalogue.parent / "images" / f"{i}.png") for i in good], 32)
    direct = build_encoder(EncoderSpec.parse("tiny-clip", "image")).encode(pixels)
    rows = np.searchsorted(ids, good)
    assert np.allclose(matrices["image"][rows], direct, atol=1e-5)
    texts = TINY.prompted_texts(["" if i == EMPTY_TEXT_ID else f"Item {i}: a thing to buy" for i in ids])
    assert np.allclose(matrices["text"], build_encoder(EncoderSpec.parse("tiny-clip", "text")).encode(texts), atol=1e-5)


def test_manifest_contents(encoded, catalogue):
    out, manifest = encoded
    assert manifest["item_count"] == len(IDS) and manifest["catalogue"] == str(catalogue)
    assert len(manifest["input_hash"]) == 64 and manifest["normalisation"].startswith("L2")
    image, text = manifest["modalities"]["image"], manifest["modalities"]["text"]
    assert image["model_id"] == text["model_id"] == "tiny-clip (random init, seed 0)"
    assert (image["dim"], text["dim"], image["input_size"]) == (16, 16, 32)
    assert image["missing"] == {"count": 1, "ids": [MISSING_ID]}
    assert image["corrupt"] == {"count": 1, "ids": [CORRUPT_ID]}
    assert image["encoded"] == len(IDS) - 2 and image["fallback"] == "mean"
    assert text["empty"] == {"count": 1, "ids": [EMPTY_TEXT_ID]}
    assert text["prompt"] == "The title of this item is: {title}." and text["empty_text"] == "missing"
    assert set(manifest["run"]["stages"]) == {"text", "image"}
    assert manifest["run"]["stages"]["image"]["plan"]["device"] == "cpu"
    assert json.loads((out / "manifest.json").read_text())["key"] == manifest["key"]


def test_missing_and_corrupt_images_get_the_mean_image_feature(encoded):
    out, _ = encoded
    ids, matrices, _ = load_features(out)
    image = matrices["image"]
    bad = np.isin(ids, [CORRUPT_ID, MISSING_ID])
    mean = image[~bad].mean(axis=0)
    expected = mean / np.linalg.norm(mean)
    assert np.allclose(image[bad], expected, atol=1e-5)


def test_rerun_on_unchanged_inputs_reuses_the_store(encoded, catalogue):
    out, manifest = encoded
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = encode_items(catalogue, out, TINY, progress=False)
    assert again["reused"] and again["key"] == manifest["key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # the batch size does not change a feature, so it does not invalidate the store either
    assert encode_items(catalogue, out, TINY.model_copy(update={"batch_size": 3}), progress=False)["reused"]


def test_changed_inputs_or_settings_are_not_reused(encoded, catalogue, monkeypatch):
    """A changed text, image byte or feature-changing setting sends the run back to the stage."""
    import pipeline.encode.stage as stage

    class Recomputed(Exception):
        pass

    def refuse(address=None):
        raise Recomputed

    monkeypatch.setattr(stage, "ensure_ray", refuse)
    out, _ = encoded
    assert encode_items(catalogue, out, TINY, progress=False)["reused"]
    frame = pd.read_csv(catalogue, keep_default_na=False)
    frame.loc[frame.item_id == 3, "text"] = "Item 3: something else entirely"
    frame.to_csv(catalogue.parent / "changed.csv", index=False)
    with pytest.raises(Recomputed):
        encode_items(catalogue.parent / "changed.csv", out, TINY, progress=False)
    with pytest.raises(Recomputed):
        encode_items(catalogue, out, TINY.model_copy(update={"prompt": "none"}), progress=False)
    image = catalogue.parent / "images" / "3.png"
    original = image.read_bytes()
    try:
        _picture(99, image)
        with pytest.raises(Recomputed):
            encode_items(catalogue, out, TINY, progress=False)
    finally:
        image.write_bytes(original)


def test_all_images_corrupt_fails_clearly_and_writes_nothing(ray_local, tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.png").write_bytes(b"nope either")
    pd.DataFrame({"item_id": [1, 2], "text": ["x", "y"], "image_path": ["a.png", "b.png"]}).to_csv(
        tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match="none of the 2 images could be read") as error:
        encode_items(tmp_path / "c.csv", tmp_path / "out", TINY.model_copy(update={"text_model": "none"}),
                     progress=False)
    assert error.value.column == "image_path"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_register_json_and_reuse(encoded, catalogue, capsys):
    from pipeline.encode.cli import register

    out, manifest = encoded
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["encode", str(catalogue), "--out", str(out), "--text-model", "tiny-clip",
                              "--image-model", "tiny-clip", "--batch-size", "4", "--json", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reused"] and printed["key"] == manifest["key"] and printed["item_count"] == len(IDS)


def test_pipeline_cli_has_encode_and_reports_bad_input(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "c.csv").write_text("item_id,text\n1,a\n")
    assert main(["encode", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing column(s) image_path" in capsys.readouterr().err


def test_one_pass_store_equals_the_two_modality_passes(encoded, catalogue):
    """The store of the one streaming pass holds what the two-pass way (images alone on the
    cluster, then text alone) gives, assembled the same way: same ids, same rows, same facts."""
    from pipeline.encode import stage
    from pipeline.encode.catalogue import read_catalogue
    from pipeline.encode.encoders import describe
    from pipeline.encode.images import is_file
    from pipeline.encode.job import _image_part, _text_part

    out, manifest = encoded
    ids, matrices, _ = load_features(out)
    table = read_catalogue(catalogue)
    rows = np.flatnonzero([is_file(path) for path in table.image])
    images = stage.encode_images(table.item_id[rows], list(table.image[rows]), TINY.image_spec, size=32,
                                 batch_size=TINY.batch_size, actors=1, progress=False)
    texts = stage.encode_texts(table.item_id, TINY.prompted_texts(table.text), TINY.text_spec,
                               batch_size=TINY.batch_size, actors=1, progress=False)
    image, image_info = _image_part(table, images, describe(TINY.image_spec))
    text, text_info = _text_part(table, texts, describe(TINY.text_spec), TINY, table.text == "")
    assert ids.tolist() == table.item_id.tolist()
    assert np.allclose(matrices["image"], image, atol=1e-6) and np.allclose(matrices["text"], text, atol=1e-6)
    assert manifest["modalities"] == {"text": text_info, "image": image_info}
    # one pass: the two pools were planned to hold the cluster's 2 CPUs together
    stages = manifest["run"]["stages"]
    held = sum(s["plan"]["actors"] * s["plan"]["actor_cpus"] + s["plan"]["decode_tasks"] * s["plan"]["decode_cpus"]
               for s in stages.values())
    assert set(stages) == {"image", "text"} and held <= 2.0 + 1e-9
    assert manifest["run"]["pass"].startswith("one streaming pass")


def test_a_normal_encode_prints_our_progress_and_summary_not_rays_internals(catalogue, tmp_path):
    """`python -m pipeline encode` as a user runs it (its own local Ray): the progress bars and
    the summary, without Ray's internal notices (an error-level core_worker line about actor
    constructor arguments, 'Progress bars disabled', the token-authentication banner, Ray Data's
    execution plan lines)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "encode", str(catalogue), "--out", str(tmp_path / "s"),
                           "--text-model", "tiny-clip", "--image-model", "tiny-clip", "--batch-size", "4",
                           "--actors", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"feature store {tmp_path / 's'}: {len(IDS)} items")
    assert "encode images (tiny-clip)" in done.stderr and "encode text (tiny-clip)" in done.stderr
    for noise in ("core_worker", "constructor arguments", "Progress bars disabled", "Token authentication",
                  "Execution plan of Dataset", "Starting execution of Dataset", "Deprecat"):
        assert noise not in done.stderr, f"{noise!r} in:\n{done.stderr}"
