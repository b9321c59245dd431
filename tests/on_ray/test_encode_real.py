"""The real embedded encoders (MiniLM, EfficientNet-Lite0) through the Ray Data stage on a handful
of items: their features carry meaning (near duplicates are closer than unrelated content)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from pipeline.encode import stage
from pipeline.encode.catalogue import read_catalogue
from pipeline.encode.config import EncodeConfig
from pipeline.encode.job import encode_items
from pipeline.encode.store import load_features

pytestmark = pytest.mark.slow

TEXTS = {
    1: "Toy Story (1995). A cowboy doll is threatened by a new spaceman toy.",
    2: "Toy Story (1995). A cowboy doll feels threatened when a new space ranger toy arrives.",
    3: "Quarterly tax filing deadlines for small businesses in Ohio.",
    4: "",
}


def _scene(width=320, height=240) -> Image.Image:
    """Sky, grass, sun and a house: something an ImageNet model has features for."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        draw.line([(0, y), (width, y)], fill=(80 + y // 3, 140 + y // 4, 230))
    draw.rectangle([0, int(height * 0.7), width, height], fill=(40, 150, 40))
    draw.ellipse([30, 20, 90, 80], fill=(255, 220, 0))
    draw.rectangle([150, 110, 260, 190], fill=(180, 40, 40))
    draw.polygon([(140, 110), (205, 60), (270, 110)], fill=(90, 50, 20))
    draw.rectangle([190, 150, 215, 190], fill=(60, 30, 10))
    return image


def _checkerboard(width=320, height=240) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 20):
        for y in range(0, height, 20):
            draw.rectangle([x, y, x + 20, y + 20], fill=(20, 20, 20) if (x // 20 + y // 20) % 2 else (240, 240, 240))
    return image


def test_real_encoders_put_similar_items_close(tmp_path):
    import ray

    scene = _scene()
    scene.crop((0, 0, 240, 240)).save(tmp_path / "1.png")      # two overlapping crops of one image
    scene.crop((80, 0, 320, 240)).save(tmp_path / "2.jpg", quality=90)
    _checkerboard().save(tmp_path / "3.png")                  # a different image
    pd.DataFrame({"item_id": list(TEXTS), "text": list(TEXTS.values()),
                  "image_path": ["1.png", "2.jpg", "3.png", ""]}).to_parquet(tmp_path / "items.parquet")

    config = EncodeConfig(actors=1)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        manifest = encode_items(tmp_path / "items.parquet", tmp_path / "store", config, progress=False)
        # the two-pass way, each modality alone on the cluster: the references for the one pass
        table = read_catalogue(tmp_path / "items.parquet")
        images = stage.encode_images(table.item_id[:3], list(table.image[:3]), config.image_spec, size=224,
                                     batch_size=config.batch_size, actors=1, progress=False)
        texts = stage.encode_texts(table.item_id[:3], config.prompted_texts(table.text[:3]), config.text_spec,
                                   batch_size=config.batch_size, actors=1, progress=False)
    finally:
        if started:
            ray.shutdown()

    ids, matrices, _ = load_features(tmp_path / "store")
    text, image = matrices["text"], matrices["image"]
    assert ids.tolist() == [1, 2, 3, 4]
    assert text.shape == (4, 384) and image.shape == (4, 1280)
    assert manifest["modalities"]["text"]["model_id"].startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert manifest["modalities"]["image"]["model_id"].startswith("efficientnet-lite0")
    assert manifest["modalities"]["text"]["empty"]["ids"] == [4]
    assert manifest["modalities"]["image"]["missing"]["ids"] == [4]
    assert text[0] @ text[1] > text[0] @ text[2] + 0.3        # near-duplicate texts vs unrelated
    assert image[0] @ image[1] > image[0] @ image[2] + 0.3    # two crops of one image vs another image
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=1e-5)
    # one streaming pass (384-d text and 1280-d image rows in one dataset) = the per-modality passes
    for reference in (images, texts):
        order = np.argsort(reference.item_id)
        assert reference.item_id[order].tolist() == [1, 2, 3]
    assert np.allclose(image[:3], images.features[np.argsort(images.item_id)], atol=1e-5)
    assert np.allclose(text[:3], texts.features[np.argsort(texts.item_id)], atol=1e-5)
