"""Tests of the synthetic multimodal dataset generator (pipeline.data.synthetic).

Statistical tests measure the signal the generator is meant to carry (content lift, group
differences) on fixed seeds; the thresholds sit far from the measured values (printed with -s).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.data import synthetic
from pipeline.data.schema import RawDataset
from pipeline.data.synthetic import PALETTE, SyntheticConfig, generate, load_truth, write

TINY = dict(n_users=50, n_items=60, mean_interactions=10, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return generate(SyntheticConfig(**TINY), progress=False)


@pytest.fixture(scope="module")
def default():
    return generate(SyntheticConfig(), progress=False)


@pytest.fixture(scope="module")
def tiny_written(tiny, tmp_path_factory):
    return write(tiny, tmp_path_factory.mktemp("tiny") / "synthetic", progress=False)


def _arrays(data: synthetic.SyntheticData) -> dict[str, np.ndarray]:
    """Every generated array, by name."""
    it, cat, truth = data.dataset.interactions, data.dataset.catalogue, data.truth
    out = {"user": it.user, "item": it.item, "timestamp": it.timestamp, "text": cat.text.astype(str),
           "user_group": truth.user_group, "item_id_factor": truth.item_id_factor,
           "item_popularity": truth.item_popularity}
    out.update({f"attr_{k}": v for k, v in truth.item_attributes.items()})
    out.update({f"profile_{k}": v for k, v in truth.group_profile.items()})
    return out


# -------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_arrays(tiny):
    again = generate(SyntheticConfig(**TINY), progress=False)
    first, second = _arrays(tiny), _arrays(again)
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert first[name].tobytes() == second[name].tobytes(), name


def test_different_seed_differs(tiny):
    other = generate(SyntheticConfig(**{**TINY, "seed": 4}), progress=False)
    assert not np.array_equal(tiny.dataset.interactions.item[:200], other.dataset.interactions.item[:200])
    assert not np.array_equal(tiny.truth.item_attributes["colour"], other.truth.item_attributes["colour"])
    assert list(tiny.dataset.catalogue.text) != list(other.dataset.catalogue.text)


def test_written_files_are_byte_identical(tiny, tiny_written, tmp_path):
    again = write(generate(SyntheticConfig(**TINY), progress=False), tmp_path / "again", progress=False)
    names = sorted(p.relative_to(tiny_written).as_posix() for p in tiny_written.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert sum(name.endswith(".png") for name in names) == TINY["n_items"]
    for name in names:
        assert (tiny_written / name).read_bytes() == (again / name).read_bytes(), name


def test_thread_count_does_not_change_the_result(monkeypatch):
    # 3 chunks of users at 400 items
    config = SyntheticConfig(n_users=3 * synthetic._chunk_size(400) - 7, n_items=400, images=False)
    monkeypatch.setattr(synthetic, "MAX_WORKERS", 1)
    one = generate(config, progress=False).dataset.interactions
    monkeypatch.setattr(synthetic, "MAX_WORKERS", 3)
    three = generate(config, progress=False).dataset.interactions
    for name in ("user", "item", "timestamp"):
        assert np.array_equal(getattr(one, name), getattr(three, name)), name


# -------------------------------------------------------------------------------- format


def test_dataset_container(tiny):
    dataset = tiny.dataset
    assert isinstance(dataset, RawDataset) and dataset.name == "synthetic"
    it = dataset.interactions
    assert it.rating is None and it.split is None
    for name in ("user", "item", "timestamp"):
        assert getattr(it, name).dtype == np.int64, name
    assert it.user.min() == 0 and it.user.max() == TINY["n_users"] - 1
    assert it.item.min() >= 0 and it.item.max() < TINY["n_items"]
    assert np.array_equal(dataset.catalogue.item_id, np.arange(TINY["n_items"]))
    assert all(path == "" for path in dataset.catalogue.image)


def test_written_generic_format(tiny, tiny_written):
    table = pq.read_table(tiny_written / "interactions.parquet")
    assert table.column_names == ["user_id", "item_id", "timestamp"]
    assert all(str(t) == "int64" for t in table.schema.types)
    assert np.array_equal(table.column("item_id").to_numpy(), tiny.dataset.interactions.item)
    catalogue = pd.read_csv(tiny_written / "catalogue.csv", keep_default_na=False)
    assert list(catalogue.columns) == ["item_id", "text", "image_path"]
    assert list(catalogue.text) == list(tiny.dataset.catalogue.text)
    assert list(catalogue.image_path) == [f"images/{i}.png" for i in range(TINY["n_items"])]
    assert SyntheticConfig.model_validate_json((tiny_written / "synthetic.json").read_text()) == tiny.config
    truth = load_truth(tiny_written)
    assert np.array_equal(truth.user_group, tiny.truth.user_group)
    for name, values in tiny.truth.item_attributes.items():
        assert np.array_equal(truth.item_attributes[name], values)
        assert np.array_equal(truth.group_profile[name], tiny.truth.group_profile[name])
    assert truth.vocabularies == tiny.truth.vocabularies
    assert truth.attribute_modality == tiny.truth.attribute_modality
    assert np.array_equal(truth.item_id_factor, tiny.truth.item_id_factor)


def test_write_without_images(tmp_path):
    data = generate(SyntheticConfig(**{**TINY, "images": False}), progress=False)
    folder = write(data, tmp_path / "noimg", progress=False)
    assert not (folder / "images").exists()
    catalogue = pd.read_csv(folder / "catalogue.csv", keep_default_na=False)
    assert set(catalogue.image_path) == {""}


def test_write_replaces_atomically_and_cleans_up_after_a_crash(tiny, tmp_path, monkeypatch):
    target = tmp_path / "data"
    write(tiny, target, progress=False)
    other = generate(SyntheticConfig(**{**TINY, "seed": 9, "images": False}), progress=False)
    write(other, target, progress=False)  # replaces the old directory as a whole
    assert not (target / "images").exists()
    assert load_truth(target).user_group.tobytes() == other.truth.user_group.tobytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_save_truth", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write(tiny, target, progress=False)
    assert load_truth(target).user_group.tobytes() == other.truth.user_group.tobytes()  # untouched
    with pytest.raises(RuntimeError):
        write(tiny, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no staging or old directories left behind


# -------------------------------------------------------------------------------- content


def _dominant_colour(pixels: np.ndarray) -> int:
    """Index of the PALETTE colour nearest (in chromaticity) to the mean of the saturated pixels."""
    rgb = pixels.reshape(-1, 3).astype(float)
    saturated = rgb[rgb.max(axis=1) - rgb.min(axis=1) > 60]
    mean = saturated.mean(axis=0)
    palette = np.array(PALETTE, float)
    chroma = lambda c: c / c.sum(axis=-1, keepdims=True)  # noqa: E731
    return int(np.argmin(((chroma(palette) - chroma(mean)) ** 2).sum(axis=1)))


def test_images_open_with_configured_size(tiny, tiny_written):
    for item in range(TINY["n_items"]):
        with Image.open(tiny_written / f"images/{item}.png") as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (64, 64)
    small = SyntheticConfig(**{**TINY, "image_size": 32})
    assert synthetic.render_image(tiny.truth, small, 0).size == (32, 32)


@pytest.mark.parametrize("noise, floor", [(0.3, 0.97), (1.0, 0.8)])
def test_colour_attribute_is_recoverable_from_the_image(noise, floor):
    config = SyntheticConfig(**{**TINY, "noise": noise, "n_items": 120})
    data = generate(config, progress=False)
    truth = data.truth.item_attributes["colour"]
    recovered = np.array([_dominant_colour(np.asarray(synthetic.render_image(data.truth, config, i)))
                          for i in range(config.n_items)])
    accuracy = float(np.mean(recovered == truth))
    print(f"colour recovered from image (noise={noise}): {accuracy:.3f}")
    assert accuracy >= floor
    # images of items with different colours differ in mean colour in the expected direction:
    # red items are redder than blue items, blue items bluer than red ones
    means = np.array([np.asarray(synthetic.render_image(data.truth, config, i)).reshape(-1, 3).mean(axis=0)
                      for i in range(config.n_items)])
    red, blue = means[truth == 0], means[truth == 2]
    assert (red[:, 0] - red[:, 2]).mean() > (blue[:, 0] - blue[:, 2]).mean() + 20


def test_shapes_and_textures_change_the_image(tiny):
    config = tiny.config
    pixels = [np.asarray(synthetic.render_image(tiny.truth, config, i)).astype(float) for i in range(config.n_items)]
    # textured items have dark pattern pixels inside the shape: higher brightness spread
    texture = tiny.truth.item_attributes["texture"]
    spread = np.array([p.mean(axis=2)[p.max(axis=2) - p.min(axis=2) > 60].std() for p in pixels])
    assert spread[texture != 0].min() > spread[texture == 0].max()


def test_text_contains_the_attribute_words(tiny):
    words = {a.name: a.words for a in synthetic.ATTRIBUTES if a.modality == "text"}
    for item, text in enumerate(tiny.dataset.catalogue.text):
        tokens = set(text.replace(",", " ").split())
        for name, synonyms in words.items():
            category = tiny.truth.item_attributes[name][item]
            assert tokens & set(synonyms[category]), (text, name)
            others = {w for c, group in enumerate(synonyms) if c != category for w in group}
            assert not tokens & others, (text, name)
    exact = generate(SyntheticConfig(**{**TINY, "noise": 0.0}), progress=False)
    for item, text in enumerate(exact.dataset.catalogue.text):
        for name in words:
            category = exact.truth.item_attributes[name][item]
            assert exact.truth.vocabularies[name][category] in text.replace(",", " ").split()


# -------------------------------------------------------------------------------- interactions


def _check_interactions(data: synthetic.SyntheticData) -> None:
    it, config = data.dataset.interactions, data.config
    assert np.all(np.diff(it.user) >= 0)  # grouped by user
    counts = np.bincount(it.user, minlength=config.n_users)
    assert counts.min() >= config.min_interactions
    assert counts.max() <= min(config.max_interactions, config.n_items)
    keys = it.user * config.n_items + it.item
    assert len(np.unique(keys)) == len(keys)  # no duplicate (user, item)
    same_user = it.user[1:] == it.user[:-1]
    assert np.all(np.diff(it.timestamp)[same_user] > 0)  # strictly chronological per user
    assert it.timestamp.min() >= config.start_time
    assert it.timestamp.max() <= config.start_time + config.time_span_days * 86400 + config.max_interactions


def test_interactions_are_well_formed(tiny, default):
    _check_interactions(tiny)
    _check_interactions(default)
    mean = len(default.dataset.interactions) / default.config.n_users
    assert abs(mean - default.config.mean_interactions) < 0.1 * default.config.mean_interactions


def test_popularity_is_skewed(default):
    counts = np.sort(np.bincount(default.dataset.interactions.item, minlength=default.config.n_items))[::-1]
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    print(f"top 10% of items get {top_share:.3f} of interactions")
    assert top_share > 0.25
    flat = generate(SyntheticConfig(popularity_alpha=0.0), progress=False)
    flat_counts = np.sort(np.bincount(flat.dataset.interactions.item, minlength=400))[::-1]
    assert flat_counts[:40].sum() / flat_counts.sum() < top_share


def _lifts(data: synthetic.SyntheticData, users: np.ndarray | None = None) -> dict[tuple[int, str], float]:
    """(group, attribute) -> P(interacted item has the group's preferred category) / share of
    catalogue items with that category, for the attributes of the group's own modality."""
    it, truth = data.dataset.interactions, data.truth
    mask = np.ones(len(it), bool) if users is None else users
    group = truth.user_group[it.user]
    out = {}
    for g, modality in enumerate(truth.group_modality):
        for name, values in truth.item_attributes.items():
            if truth.attribute_modality[name] != modality:
                continue
            preferred = truth.preferred(name)[g]
            observed = np.mean(values[it.item[mask & (group == g)]] == preferred)
            out[(g, name)] = observed / np.mean(values == preferred)
    return out


def test_content_signal_is_real(default):
    lifts = _lifts(default)
    print("lift of the preferred category over chance, per (group, attribute):",
          {f"{g}:{n}": round(v, 2) for (g, n), v in lifts.items()})
    print(f"mean lift {np.mean(list(lifts.values())):.2f}, min {min(lifts.values()):.2f}")
    assert min(lifts.values()) > 1.2
    assert np.mean(list(lifts.values())) > 1.8
    # the knob: without content signal the attributes carry (almost) nothing
    no_content = _lifts(generate(SyntheticConfig(content_signal=0.0), progress=False))
    print(f"mean lift with content_signal=0: {np.mean(list(no_content.values())):.2f}")
    assert np.mean(list(no_content.values())) < 1.25


def _preferred_share(data: synthetic.SyntheticData) -> np.ndarray:
    """[R] per interaction, the share of the group's own-modality attributes on which the item
    has the group's preferred category."""
    it, truth = data.dataset.interactions, data.truth
    group = truth.user_group[it.user]
    hits, n_attributes = np.zeros(len(it)), np.zeros(len(it))
    for name, values in truth.item_attributes.items():
        own = truth.group_modality[group] == truth.attribute_modality[name]
        hits += own & (values[it.item] == truth.preferred(name)[group])
        n_attributes += own
    return hits / n_attributes


def test_last_item_is_a_typical_item():
    """Timestamps ignore the selection order: a user's chronologically last item carries the
    group's preferred attributes as often as the user's items on average."""
    data = generate(SyntheticConfig(n_users=3000, images=False), progress=False)
    it = data.dataset.interactions
    share = _preferred_share(data)
    per_user = np.bincount(it.user, weights=share) / np.bincount(it.user)
    last = share[np.r_[it.user[1:] != it.user[:-1], True]]
    chance = np.mean(_preferred_share(generate(SyntheticConfig(n_users=3000, images=False, content_signal=0.0),
                                               progress=False)))
    print(f"preferred-attribute share: user average {per_user.mean():.3f}, last item {last.mean():.3f}, "
          f"without content signal {chance:.3f}")
    assert abs(last.mean() - per_user.mean()) < 0.2 * (per_user.mean() - chance)


def _group_profiles(data: synthetic.SyntheticData, users: np.ndarray) -> np.ndarray:
    """[G, C] per group, the category distribution of every attribute over the interacted items
    of `users` (bool mask over users), attributes concatenated."""
    it, truth = data.dataset.interactions, data.truth
    keep = users[it.user]
    group = truth.user_group[it.user[keep]]
    rows = []
    for g in range(data.config.n_groups):
        parts = []
        for name, values in truth.item_attributes.items():
            hist = np.bincount(values[it.item[keep][group == g]], minlength=len(truth.vocabularies[name]))
            parts.append(hist / hist.sum())
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def _between_and_within(data: synthetic.SyntheticData) -> tuple[float, float]:
    """(smallest total-variation distance between two groups' attribute profiles,
    largest distance between the two halves of one group: the sampling noise floor)."""
    n_attributes = len(data.truth.item_attributes)
    tv = lambda a, b: 0.5 * np.abs(a - b).sum() / n_attributes  # noqa: E731
    every = _group_profiles(data, np.ones(data.config.n_users, bool))
    half = np.arange(data.config.n_users) % 2 == 0
    first, second = _group_profiles(data, half), _group_profiles(data, ~half)
    G = data.config.n_groups
    between = min(tv(every[a], every[b]) for a in range(G) for b in range(a + 1, G))
    within = max(tv(first[g], second[g]) for g in range(G))
    return between, within


def test_groups_differ(default):
    between, within = _between_and_within(default)
    print(f"group profiles (mean TV over attributes): closest pair of groups {between:.3f}, "
          f"split-half noise within a group {within:.3f}")
    assert between > 2 * within
    # image-taste groups differ on image attributes, text-taste groups on text attributes
    lifts = _lifts(default)
    assert all(v > 1.2 for v in lifts.values())
    # the knob: without group strength the groups look alike
    alike_between, alike_within = _between_and_within(generate(SyntheticConfig(group_strength=0.0), progress=False))
    print(f"group_strength=0: closest pair {alike_between:.3f}, noise {alike_within:.3f}")
    assert alike_between < between / 2


def test_medium_run_is_vectorised():
    """100k users, images off: runs through the chunked path (no timing assertion)."""
    config = SyntheticConfig(n_users=100_000, n_items=1_000, images=False, seed=1)
    data = generate(config, progress=False)
    it = data.dataset.interactions
    counts = np.bincount(it.user, minlength=config.n_users)
    assert counts.min() >= config.min_interactions and len(counts) == config.n_users
    keys = it.user * config.n_items + it.item
    assert len(np.unique(keys)) == len(keys)
    assert np.bincount(data.truth.user_group).min() > 0


def test_gumbel_top_k_samples_the_softmax():
    """Top-1 of logits + the 16-bit Gumbel noise picks item i with probability softmax(logits)_i."""
    logits = np.log(np.array([1.0, 2.0, 3.0, 4.0, 10.0], np.float32))
    rows = 40_000
    workspace = synthetic._Workspace.allocate(rows, len(logits))
    keys = workspace.keys
    keys[:] = logits
    _, items = synthetic._gumbel_top_k(keys, np.ones(rows, np.int64), np.random.default_rng(0), workspace)
    observed = np.bincount(items, minlength=len(logits)) / rows
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(observed - expected).max() < 0.01


def test_gumbel_top_k_settles_tied_keys(monkeypatch):
    workspace = synthetic._Workspace.allocate(3, 50)
    keys = workspace.keys
    keys[:] = 0.0
    monkeypatch.setattr(synthetic, "_gumbel_noise", lambda out, rng: out.fill(0.0))
    counts = np.array([5, 10, 50])
    rows, items = synthetic._gumbel_top_k(keys, counts, np.random.default_rng(0), workspace)
    assert np.array_equal(np.bincount(rows), counts)
    for row, count in enumerate(counts):
        assert len(np.unique(items[rows == row])) == count


# -------------------------------------------------------------------------------- config


def test_config_refuses_unknown_keys_and_out_of_range_values():
    with pytest.raises(ValidationError, match="colour_depth"):
        SyntheticConfig(colour_depth=8)
    with pytest.raises(ValidationError, match="n_users"):
        SyntheticConfig(n_users=-1)
    with pytest.raises(ValidationError, match="content_signal"):
        SyntheticConfig(content_signal=1.5)
    with pytest.raises(ValidationError, match="min_interactions"):
        SyntheticConfig(min_interactions=30, mean_interactions=20)
    with pytest.raises(ValidationError, match="n_items"):
        SyntheticConfig(n_items=20, mean_interactions=25, max_interactions=30)
    with pytest.raises(ValidationError, match="seed"):
        SyntheticConfig(seed=-1)


def test_defaults_are_the_embedded_default():
    config = SyntheticConfig()
    assert (config.n_users, config.n_items, config.n_groups) == (600, 400, 4)
    assert config.images and config.image_size == 64
