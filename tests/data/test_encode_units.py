"""Encode stage pieces that need no Ray: catalogue reading and errors, config, resource plans,
join and fallback, the feature store's reader, the tiny CLIP and Hugging Face encoders by path."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.data.schema import Catalogue, DataError
from pipeline.encode.assemble import fill_with_mean, join_on_item_id
from pipeline.encode.catalogue import content_hash, from_catalogue, read_catalogue, write_catalogue
from pipeline.encode.config import EncodeConfig
from pipeline.encode.encoders import FEDMR_PROMPT, EncoderSpec, build_encoder, describe
from pipeline.encode.images import CORRUPT, MISSING, OK, decode_images
from pipeline.encode.resources import plan_pass, plan_stage
from pipeline.encode.stage import _actor_resources
from pipeline.encode.store import load_features, write_store


def _png(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", (255, 0, 0))
    _png(tmp_path / "img" / "b.png", (0, 255, 0))
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG but not really")
    return tmp_path


# ----------------------------------------------------------------------------- catalogue


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_catalogue_round_trip_sorted_and_resolved(folder, suffix):
    frame = pd.DataFrame({"item_id": [30, 10, 20], "text": ["c", "", "b"],
                          "image_path": ["img/a.png", "", str(folder / "img" / "b.png")]})
    path = folder / f"catalogue{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()
    table = read_catalogue(path)
    assert table.item_id.tolist() == [10, 20, 30] and table.item_id.dtype == np.int64
    assert table.text.tolist() == ["", "b", "c"]
    assert table.image.tolist() == ["", str(folder / "img" / "b.png"), str(folder / "img" / "a.png")]


def test_folder_means_its_catalogue_file_and_string_ids(folder):
    pd.DataFrame({"item_id": ["b2", "a1"], "text": ["x", "y"], "image_path": ["", ""]}).to_csv(
        folder / "catalogue.csv", index=False)
    table = read_catalogue(folder)
    assert table.item_id.tolist() == ["a1", "b2"]


def test_write_catalogue_from_a_loader_catalogue(folder, monkeypatch):
    monkeypatch.chdir(folder)
    catalogue = Catalogue(item_id=np.array([2, 1]), text=np.array(["two", "one"], dtype=object),
                          image=np.array(["img/a.png", ""], dtype=object))
    for name in ("out/cat.csv", "out/cat.parquet", "out/cat.jsonl"):
        table = read_catalogue(write_catalogue(catalogue, name))
        assert table.item_id.tolist() == [1, 2]
        assert table.text.tolist() == ["one", "two"]
        assert table.image.tolist() == ["", str(folder / "img" / "a.png")]
        assert content_hash(table) == content_hash(from_catalogue(catalogue))


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    ("", "empty"),
    ("item_id,text\n1,a\n", "missing column(s) image_path"),
    ("item_id,text,image_path\n1,a,\n2,b,\n1,c,\n", "duplicate item_id '1' (first at row 2)"),
    ("item_id,text,image_path\n1,a,\n,b,\n", "empty item_id"),
    ("item_id,text,image_path\n", "no rows"),
    ('item_id,text,image_path\n1,"unclosed,\n', "cannot read catalogue"),
])
def test_unreadable_catalogue_is_a_clear_data_error(tmp_path, content, reason):
    path = tmp_path / "catalogue.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as error:
        read_catalogue(path)
    assert str(path) in str(error.value) and reason in str(error.value)


def test_duplicate_error_names_row_and_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("item_id,text,image_path\n1,a,\n2,b,\n1,c,\n")
    with pytest.raises(DataError) as error:
        read_catalogue(path)
    assert error.value.row == 4 and error.value.column == "item_id"


def test_corrupt_parquet_and_unknown_suffix(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="cannot read catalogue"):
        read_catalogue(tmp_path / "c.parquet")
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        read_catalogue(tmp_path / "c.xlsx")


def test_content_hash_follows_image_bytes_not_paths(folder):
    def table(image):
        return from_catalogue(Catalogue(np.array([1]), np.array(["t"], dtype=object), np.array([image], dtype=object)))

    copy = shutil.copy(folder / "img" / "a.png", folder / "copy.png")
    assert content_hash(table(str(folder / "img" / "a.png"))) == content_hash(table(str(copy)))
    assert content_hash(table(str(folder / "img" / "a.png"))) != content_hash(table(str(folder / "img" / "b.png")))
    assert content_hash(table(str(folder / "nope.png"))) != content_hash(table(""))


# ----------------------------------------------------------------------------- images


def test_decode_statuses_and_shape(folder):
    paths = [str(folder / "img" / "a.png"), "", str(folder / "img" / "nope.png"), str(folder / "img" / "bad.png")]
    pixels, status = decode_images(paths, 24)
    assert pixels.shape == (4, 24, 24, 3) and pixels.dtype == np.uint8
    assert status.tolist() == [OK, MISSING, MISSING, CORRUPT]
    assert (pixels[0] == [255, 0, 0]).all() and not pixels[1:].any()


def test_truncated_jpeg_is_corrupt(tmp_path):
    path = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:200])
    assert decode_images([str(path)], 16)[1].tolist() == [CORRUPT]


# ----------------------------------------------------------------------------- config and specs


def test_specs_parse_and_refuse():
    assert EncoderSpec.parse("clip:openai/clip-vit-base-patch32", "image").source == "openai/clip-vit-base-patch32"
    assert not EncoderSpec.parse("none", "text").enabled
    for bad, modality in [("minilm", "image"), ("efficientnet-lite0", "text"), ("clip", "text"),
                          ("tiny-clip:x", "text"), ("bert", "text")]:
        with pytest.raises(ValueError):
            EncoderSpec.parse(bad, modality)


def test_config_validation_prompts_and_empty_text_policy():
    assert EncodeConfig().template() is None and EncodeConfig().empty_text_policy() == "mean"
    clip = EncodeConfig(text_model="tiny-clip")
    assert clip.template() == FEDMR_PROMPT and clip.empty_text_policy() == "missing"
    assert clip.prompted_texts(["Toy Story (1995)", ""]) == [
        "The title of this item is: Toy Story (1995).", "The title of this item is: missing."]
    assert EncodeConfig(text_model="tiny-clip", prompt="none").prompted("x") == "x"
    for bad in [{"batch_size": 0}, {"prompt": "no placeholder"}, {"prompt": "{other}"}, {"colour": 1},
                {"text_model": "none", "image_model": "none"}, {"image_model": "minilm"}]:
        with pytest.raises(ValidationError):
            EncodeConfig(**bad)


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("text_model: tiny-clip\nimage_model: tiny-clip\nbatch_size: 8\n")
    config = EncodeConfig.from_yaml(path, batch_size=4, actors=None)
    assert (config.text_model, config.batch_size, config.actors) == ("tiny-clip", 4, None)
    path.write_text("batch_sise: 8\n")
    with pytest.raises(ValidationError, match="batch_sise"):
        EncodeConfig.from_yaml(path)


def test_shipped_configs_are_valid():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "configs" / "encode"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        EncodeConfig.from_yaml(path)


# ----------------------------------------------------------------------------- resources


def test_gpu_plan_is_chosen_when_the_cluster_has_gpus():
    plan = plan_stage({"CPU": 16.0, "GPU": 2.0}, decode=True)
    assert (plan.actors, plan.actor_gpus, plan.device, plan.half, plan.torch_threads) == (2, 1.0, "cuda", True, 1)
    assert plan.decode_tasks == 14 and plan.decode_cpus == 1.0
    assert _actor_resources(plan) == {"num_cpus": 1.0, "num_gpus": 1.0, "max_restarts": 0}
    assert plan_stage({"CPU": 16.0, "GPU": 2.0}, actors=1).actors == 1
    assert plan_stage({"CPU": 16.0, "GPU": 2.0}, actors=5).actors == 2


def test_cpu_plan_never_oversubscribes():
    for cpus in (1, 2, 3, 8):
        for actors in (None, 1, 2, 4):
            for decode in (False, True):
                plan = plan_stage({"CPU": float(cpus)}, actors=actors, decode=decode)
                assert plan.device == "cpu" and not plan.half and plan.actor_gpus == 0
                assert plan.actors * plan.actor_cpus + plan.decode_tasks * plan.decode_cpus <= cpus + 1e-9
                assert plan.torch_threads == max(1, round(plan.actor_cpus))
                assert "num_gpus" not in _actor_resources(plan)
    two = plan_stage({"CPU": 2.0}, decode=True)
    assert (two.actors, two.actor_cpus, two.torch_threads, two.decode_cpus) == (2, 0.875, 1, 0.25)
    one = plan_stage({"CPU": 2.0}, actors=1)
    assert (one.actors, one.actor_cpus, one.torch_threads) == (1, 2.0, 2)
    big = plan_stage({"CPU": 32.0}, decode=True)
    assert (big.actors, big.torch_threads) == (4, 8)
    # a 2-node cluster of 16-CPU nodes: no actor larger than a node
    multi = plan_stage({"CPU": 32.0}, node_cpus=16.0, actors=1)
    assert multi.actors == 1 and multi.actor_cpus == 16.0


# ----------------------------------------------------------------------------- join, fallback, store


def test_join_on_item_id_and_mean_fallback():
    ids = np.array([3, 5, 9])
    matrix, present = join_on_item_id(ids, np.array([9, 3]), np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))
    assert present.tolist() == [True, False, True]
    assert matrix.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    filled = fill_with_mean(matrix, present)
    assert np.allclose(filled[1], [np.sqrt(0.5), np.sqrt(0.5)])
    with pytest.raises(ValueError, match="not in the catalogue"):
        join_on_item_id(ids, np.array([4]), np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="more than once"):
        join_on_item_id(ids, np.array([3, 3]), np.zeros((2, 2), dtype=np.float32))


def test_store_reader_refuses_incomplete_stores(tmp_path):
    with pytest.raises(DataError, match="not a feature store"):
        load_features(tmp_path / "nothing")
    ids = np.array([1, 2], dtype=np.int64)
    text = np.eye(2, 3, dtype=np.float32)
    write_store(tmp_path / "s", ids, {"text": text}, {"modalities": {"text": {"dim": 3}}})
    got_ids, matrices, manifest = load_features(tmp_path / "s")
    assert got_ids.tolist() == [1, 2] and matrices["text"].tolist() == text.tolist()
    assert manifest["item_count"] == 2 and set(matrices) == {"text"}
    np.save(tmp_path / "s" / "text.npy", text[:1])
    with pytest.raises(DataError, match="expected float32"):
        load_features(tmp_path / "s")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s" / "features.parquet")
    assert table.column("item_id").to_pylist() == [1, 2] and table.column("text").to_pylist()[0] == [1.0, 0, 0]


# ----------------------------------------------------------------------------- encoders (no Ray)


def test_tiny_clip_is_deterministic_normalised_and_batch_independent():
    text = build_encoder(EncoderSpec.parse("tiny-clip", "text"))
    again = build_encoder(EncoderSpec.parse("tiny-clip", "text"))
    texts = ["a red chair", "The title of this item is: missing.", "ü" * 100]
    features = text.encode(texts)
    assert features.shape == (3, 16) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert np.allclose(features, again.encode(texts), atol=1e-6)
    assert np.allclose(features[:1], text.encode(texts[:1]), atol=1e-5)  # padding does not leak
    image = build_encoder(EncoderSpec.parse("tiny-clip", "image"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = image.encode(pixels)
    assert out.shape == (2, 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert describe(EncoderSpec.parse("tiny-clip", "image"))["size"] == 32


@pytest.fixture(scope="module")
def local_hf_models(tmp_path_factory):
    """A tiny CLIP and a tiny ViT saved with save_pretrained, as a user's local paths would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    from pipeline.encode.minilm import model_dir

    root = tmp_path_factory.mktemp("hf")
    clip_dir, vit_dir = root / "clip", root / "vit"
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=40, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=48, patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(clip_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(model_dir(), name), clip_dir / name)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=40, patch_size=20)).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 40, "width": 40}).save_pretrained(vit_dir)
    return clip_dir, vit_dir


def test_clip_by_local_path_both_towers(local_hf_models):
    clip_dir, _ = local_hf_models
    text_spec = EncoderSpec.parse(f"clip:{clip_dir}", "text")
    image_spec = EncoderSpec.parse(f"clip:{clip_dir}", "image")
    assert describe(image_spec) == {"model": f"clip:{clip_dir}", "model_id": str(clip_dir), "size": 48}
    assert EncodeConfig(text_model=f"clip:{clip_dir}").template() == FEDMR_PROMPT
    features = build_encoder(text_spec).encode(["The title of this item is: Heat (1995).", "x"])
    assert features.shape == (2, 8) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    image = build_encoder(image_spec)
    assert image.size == 48 and image.encode(np.zeros((3, 48, 48, 3), dtype=np.uint8)).shape == (3, 8)


def test_any_hf_text_and_vision_model_by_path(local_hf_models):
    from pipeline.encode.minilm import model_dir

    _, vit_dir = local_hf_models
    text = build_encoder(EncoderSpec.parse(f"hf:{model_dir()}", "text"))
    minilm = build_encoder(EncoderSpec.parse("minilm", "text"))
    texts = ["space opera", "a quiet drama"]
    assert np.allclose(text.encode(texts), minilm.encode(texts), atol=1e-5)  # same recipe, same model
    vision = build_encoder(EncoderSpec.parse(f"hf:{vit_dir}", "image"))
    assert vision.size == 40 and vision.dim == 32
    out = vision.encode(np.full((2, 40, 40, 3), 128, dtype=np.uint8))
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_unknown_hub_name_fails_early_offline():
    with pytest.raises(ValueError, match="local directory"):
        describe(EncoderSpec.parse("clip:no-such-org/no-such-clip", "image"))


def test_manifest_is_json_serialisable_with_string_ids(tmp_path):
    ids = np.array(["a", "b"])
    write_store(tmp_path / "s", ids, {"image": np.eye(2, dtype=np.float32)}, {"modalities": {"image": {"dim": 2}}})
    got, _, manifest = load_features(tmp_path / "s")
    assert got.tolist() == ["a", "b"]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["item_count"] == 2


# ----------------------------------------------------------------------------- refusals before Ray starts


def test_all_inputs_bad_fails_before_any_work(tmp_path):
    from pipeline.encode.job import encode_items

    pd.DataFrame({"item_id": [1, 2], "text": ["", "  "], "image_path": ["", "gone.png"]}).to_csv(
        tmp_path / "c.csv", index=False)
    config = EncodeConfig(text_model="tiny-clip", image_model="tiny-clip")
    with pytest.raises(DataError, match="every input is bad: all 2 texts are empty and none of the 2 images exists"):
        encode_items(tmp_path / "c.csv", tmp_path / "out", config, progress=False)
    with pytest.raises(DataError, match="all 2 texts are empty"):
        encode_items(tmp_path / "c.csv", tmp_path / "out", EncodeConfig(text_model="tiny-clip", image_model="none",
                                                                        empty_text="mean"), progress=False)
    pd.DataFrame({"item_id": [1], "text": ["fine"], "image_path": ["gone.png"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="none of the 1 images exists") as error:
        encode_items(tmp_path / "d.csv", tmp_path / "out", config, progress=False)
    assert error.value.column == "image_path"
    assert not (tmp_path / "out").exists()


def test_join_with_string_ids_from_an_object_column():
    ids = np.array(["a1", "b2", "c3"])
    matrix, present = join_on_item_id(ids, np.array(["c3", "a1"], dtype=object), np.eye(2, dtype=np.float32))
    assert present.tolist() == [True, False, True] and matrix[2].tolist() == [1.0, 0.0]


def test_length_order_and_batches():
    from pipeline.encode.batching import batches, length_order

    assert length_order(["ccc", "a", "bb", "a"]).tolist() == [1, 3, 2, 0]
    assert [(s.start, s.stop) for s in batches(5, 2)] == [(0, 2), (2, 4), (4, 5)]


def test_attach_features_feeds_prepare_and_refuses_foreign_stores(tmp_path):
    from pipeline.data.prepare import PrepareConfig, prepare
    from pipeline.data.schema import Interactions, RawDataset
    from pipeline.encode.store import attach_features

    ids = np.array([10, 20, 30], dtype=np.int64)
    text = np.eye(3, 4, dtype=np.float32)
    write_store(tmp_path / "s", ids, {"text": text}, {"modalities": {"text": {"dim": 4}}})
    user = np.repeat(np.arange(4), 3)
    item = np.tile(ids, 4)
    raw = RawDataset("t", Interactions(user, item, np.arange(12)))
    data = prepare(attach_features(raw, tmp_path / "s"), PrepareConfig(min_user=0, min_item=0))
    assert data.features["text"].tolist() == text.tolist()  # new item r = ascending id r = store row r
    foreign = RawDataset("t", Interactions(user, np.tile([10, 20, 99], 4), np.arange(12)))
    with pytest.raises(DataError, match="1 interacted items have no feature row"):
        attach_features(foreign, tmp_path / "s")


def test_a_synthetic_config_reads_its_feature_store_in_memory_and_cached(tmp_path):
    """data.features replaces the generated dataset's features whether it is generated in memory
    (no cache: it once came back without them) or written to the cache first."""
    from pipeline.data.datasets import DatasetConfig, open_dataset
    from pipeline.data.synthetic import SyntheticConfig, generate

    fields = {"n_users": 40, "n_items": 30, "images": False, "seed": 4}
    items = np.unique(np.asarray(generate(SyntheticConfig(**fields), progress=False).dataset.interactions.item))
    text = np.random.default_rng(0).normal(size=(len(items), 6)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)  # (features are read back as unit rows)
    write_store(tmp_path / "s", items.astype(np.int64), {"text": text}, {"modalities": {"text": {"dim": 6}}})
    config = DatasetConfig(name="synthetic", synthetic=fields, features=tmp_path / "s",
                           protocol={"min_user": 0, "min_item": 0})
    in_memory, _ = open_dataset(config)
    cached, _ = open_dataset(config, cache=tmp_path / "cache")
    expected = text[np.searchsorted(items, in_memory.item_ids)]
    assert set(in_memory.features) == {"text"} and np.allclose(in_memory.features["text"], expected, atol=1e-6)
    assert np.allclose(np.asarray(cached.features["text"]), text[np.searchsorted(items, cached.item_ids)], atol=1e-6)


def _used(plans) -> tuple[float, float]:
    """(CPUs, GPUs) that every pool of a pass holds at once: actors and decode tasks together."""
    cpus = sum(p.actors * p.actor_cpus + p.decode_tasks * p.decode_cpus for p in plans.values())
    return cpus, sum(p.actors * p.actor_gpus for p in plans.values())


def test_one_pass_plan_fits_every_pool_in_the_cluster_at_once():
    """Both modalities' actors start together: their resources together never exceed the cluster
    (else a pool would wait for the other to finish, which is the two-pass way again)."""
    both = {"image": True, "text": False}
    for cpus in (1, 2, 3, 8, 32):
        for actors in (None, 1, 2, 4):
            plans = plan_pass({"CPU": float(cpus)}, both, actors=actors)
            assert list(plans) == ["image", "text"]
            assert _used(plans)[0] <= cpus + 1e-9
            assert plans["text"].decode_tasks == 0 and plans["image"].decode_tasks >= 1
            for plan in plans.values():  # each keeps the pool it would have alone, so the last one fills the node
                assert plan.actors == plan_stage({"CPU": float(cpus)}, actors=actors).actors
                assert plan.torch_threads == max(1, round(plan.actor_cpus))
    two = plan_pass({"CPU": 2.0}, both)
    assert (two["image"].actors, two["image"].actor_cpus, two["text"].actors, two["text"].actor_cpus) == (2, 0.437, 2, 0.437)
    for gpus in (1, 2, 3, 8):
        for cpus in (1, 2, 16):
            plans = plan_pass({"CPU": float(cpus), "GPU": float(gpus)}, both)
            used_cpus, used_gpus = _used(plans)
            assert used_cpus <= cpus + 1e-9 and used_gpus <= gpus + 1e-9
            assert all(p.device == "cuda" and p.half for p in plans.values())
    one_gpu = plan_pass({"CPU": 8.0, "GPU": 1.0}, both)
    assert [(p.actors, p.actor_gpus) for p in one_gpu.values()] == [(1, 0.5), (1, 0.5)]
    three = plan_pass({"CPU": 16.0, "GPU": 3.0}, both)
    assert [(p.actors, p.actor_gpus) for p in three.values()] == [(2, 1.0), (1, 1.0)]
    # one modality alone: exactly the single-stage plan
    assert plan_pass({"CPU": 8.0}, {"text": False}) == {"text": plan_stage({"CPU": 8.0})}


def test_stage_plans_from_the_connected_cluster_pick_gpus(monkeypatch):
    import ray

    from pipeline.encode.stage import cluster_plan

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}])
    plan = cluster_plan(None, decode=True)
    assert (plan.device, plan.half, plan.actor_gpus, plan.actors) == ("cuda", True, 1.0, 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert cluster_plan(None, decode=True).device == "cpu"
