"""Synthetic multimodal recommendation data: the embedded default dataset.

A fresh clone without the real data runs on this generator. It is built so that every part of
the project has something real to learn:

* items have latent categorical attributes. The image-visible ones (colour, shape, texture) are
  drawn into a real PNG per item; the text-only ones (topic, mood) are written into a short
  description. Neither modality shows the other's attributes.
* every item also has a latent ID-only factor that no content shows, so pure ID models learn
  something too.
* users belong to latent taste groups. Even groups care about image-visible attributes, odd
  groups about text-only ones, so group-wise fusion has a reason to weigh modalities
  differently per group.
* a user's affinity to an item is
  ``sqrt(content_signal) * content + sqrt(1 - content_signal) * id_part`` (both parts have
  unit variance over items, so ``content_signal`` is the share of affinity variance that the
  attributes explain), and the user picks their items without replacement with probability
  proportional to ``popularity ** popularity_alpha * exp(affinity_beta * affinity)``
  (Gumbel-top-k over a [chunk_users, n_items] matrix).
* timestamps are drawn independently of the selection order, so the chronologically last
  item (the usual held-out item) is a typical item of the user, not the least preferred one.

Everything is a deterministic function of the config: every random stream is a numpy Generator
seeded by ``SeedSequence(config.seed, spawn_key=(stream, ...))``. Users are processed in chunks
whose size is a fixed function of ``n_items``; each chunk has its own stream, so the result
does not depend on how many threads run the chunks.

Shapes: U = n_users, I = n_items, G = n_groups, k = id_dim, C = total number of attribute
categories (sum over attributes), R = number of interactions.
"""

from __future__ import annotations

import json
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from pydantic import ConfigDict, Field, model_validator
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.data.schema import Catalogue, Interactions, RawDataset
from pipeline.data.store import write_atomically
from pipeline.outputs import OutputKind, check_output
from pipeline.strict import ConfigModel

# --------------------------------------------------------------------------------------------
# Vocabularies (immutable)


@dataclass(frozen=True)
class Attribute:
    """One latent item attribute: its name, the modality that shows it, its categories, and
    for text attributes the words (synonyms, canonical first) that express each category."""

    name: str
    modality: str  # "image" or "text"
    categories: tuple[str, ...]
    words: tuple[tuple[str, ...], ...] = ()


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("colour", "image", ("red", "green", "blue", "yellow", "purple", "orange")),
    Attribute("shape", "image", ("circle", "square", "triangle", "diamond", "cross")),
    Attribute("texture", "image", ("plain", "stripes", "dots", "checks")),
    Attribute("topic", "text", ("sports", "cooking", "travel", "music", "science", "history"),
              words=(("sports", "athletics", "football", "fitness"),
                     ("cooking", "recipes", "kitchen", "baking"),
                     ("travel", "journey", "voyage", "tourism"),
                     ("music", "songs", "melody", "concert"),
                     ("science", "physics", "research", "astronomy"),
                     ("history", "ancient", "medieval", "archives"))),
    Attribute("mood", "text", ("cheerful", "calm", "dark", "romantic"),
              words=(("cheerful", "joyful", "upbeat", "happy"),
                     ("calm", "peaceful", "serene", "quiet"),
                     ("dark", "grim", "gloomy", "sinister"),
                     ("romantic", "tender", "loving", "passionate"))),
)
MODALITIES = ("image", "text")

# RGB of each colour category, in the order of ATTRIBUTES[0].categories
PALETTE = ((215, 40, 40), (40, 165, 60), (45, 85, 215), (230, 200, 35), (135, 55, 185), (240, 135, 25))

# words that say nothing about any attribute
FILLER_WORDS = ("edition", "collection", "classic", "new", "series", "volume", "special",
                "original", "deluxe", "standard", "limited", "vintage", "modern", "compact",
                "bundle", "premium", "essential", "complete", "annual", "pocket", "select",
                "signature", "everyday", "studio")
TEMPLATES = ("a {mood} piece about {topic}", "{topic}, {mood} in tone", "a {mood} take on {topic}",
             "{mood} {topic}", "all about {topic}, {mood} throughout")

# Internal constants. Results depend on them, and on nothing but the config.
CHUNK_CELLS = 1 << 20  # users per chunk = CHUNK_CELLS // n_items: a 4 MiB float32 block
TASTE_SPREAD = 0.3  # per-user deviation from the group profile (profile entries are ~1)
COUNT_SIGMA = 1.0  # log-normal sigma of the interaction-count distribution
MAX_WORKERS = 4
# random streams: first element of every spawn_key
_ITEMS, _GROUPS, _USERS, _CHUNK, _TEXT, _IMAGE = range(6)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent numpy Generator for stream `key` of `seed`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# --------------------------------------------------------------------------------------------
# Config and containers


class SyntheticConfig(ConfigModel):
    """What to generate. Unknown keys and out-of-range values are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_users: int = Field(600, ge=1, le=50_000_000, description="number of users")
    n_items: int = Field(400, ge=10, le=1_000_000, description="number of items")
    n_groups: int = Field(4, ge=1, le=12, description="latent taste groups (even: image taste, odd: text taste)")
    mean_interactions: float = Field(20.0, ge=1, description="mean interactions per user")
    min_interactions: int = Field(5, ge=1, description="fewest interactions of any user")
    max_interactions: int = Field(300, ge=1, description="most interactions of any user (also capped at n_items)")
    popularity_alpha: float = Field(0.9, ge=0, le=3,
                                    description="exponent on Zipf popularity in the choice weight")
    affinity_beta: float = Field(2.0, ge=0, le=20,
                                 description="inverse temperature of the affinity in the choice weight")
    content_signal: float = Field(0.7, ge=0, le=1,
                                  description="share of affinity variance explained by item attributes "
                                              "(the rest: the ID-only factor)")
    group_strength: float = Field(0.9, ge=0, le=1,
                                  description="0: all groups share one taste profile; 1: fully group-specific")
    noise: float = Field(0.3, ge=0, le=1,
                         description="content noise: image jitter and pixel noise, text synonyms and filler words")
    id_dim: int = Field(8, ge=1, le=256, description="dimension of the latent ID-only factors")
    images: bool = Field(True, description="write one PNG per item")
    image_size: int = Field(64, ge=16, le=512, description="image width and height in pixels")
    start_time: int = Field(1_577_836_800, ge=0, description="earliest timestamp, unix seconds")
    time_span_days: float = Field(730.0, gt=0, le=36_500, description="length of the time window")
    seed: int = Field(0, ge=0, description="seed of every random stream")

    @model_validator(mode="after")
    def _counts_consistent(self) -> SyntheticConfig:
        if self.min_interactions > self.mean_interactions:
            raise ValueError(f"min_interactions ({self.min_interactions}) must not exceed "
                             f"mean_interactions ({self.mean_interactions})")
        if self.mean_interactions > self.max_interactions:
            raise ValueError(f"mean_interactions ({self.mean_interactions}) must not exceed "
                             f"max_interactions ({self.max_interactions})")
        if self.mean_interactions > self.n_items:
            raise ValueError(f"mean_interactions ({self.mean_interactions}) must not exceed "
                             f"n_items ({self.n_items})")
        return self


@dataclass(frozen=True)
class SyntheticTruth:
    """The latent structure behind the generated data (what a perfect model would recover).

    user_group:        [U] int64 taste group of each user.
    item_attributes:   attribute name -> [I] int64 category index into vocabularies[name].
    item_id_factor:    [I, k] float32 latent factor that no content shows.
    item_popularity:   [I] float64 Zipf base popularity (1 / popularity rank).
    group_modality:    [G] str, "image" or "text": which attributes the group's taste is about.
    group_profile:     attribute name -> [G, n_categories] float32 taste weights as used
                       (mixed by group_strength, scaled to unit content variance).
    vocabularies:      attribute name -> category names.
    attribute_modality: attribute name -> "image" or "text".
    """

    user_group: np.ndarray
    item_attributes: dict[str, np.ndarray]
    item_id_factor: np.ndarray
    item_popularity: np.ndarray
    group_modality: np.ndarray
    group_profile: dict[str, np.ndarray]
    vocabularies: dict[str, tuple[str, ...]]
    attribute_modality: dict[str, str]

    def preferred(self, attribute: str) -> np.ndarray:
        """[G] int64 the category of `attribute` each group likes most."""
        return self.group_profile[attribute].argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class SyntheticData:
    """A generated dataset, its config, and the truth behind it."""

    config: SyntheticConfig
    dataset: RawDataset
    truth: SyntheticTruth


# --------------------------------------------------------------------------------------------
# Items and groups


def _sample_items(config: SyntheticConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Item attributes {name: [I] int64}, ID factor [I, k] float32 with unit-variance dot
    products against N(0, 1) user factors, and Zipf popularity [I] float64."""
    rng = _rng(config.seed, _ITEMS)
    n = config.n_items
    attributes = {a.name: rng.integers(len(a.categories), size=n).astype(np.int64) for a in ATTRIBUTES}
    id_factor = (rng.standard_normal((n, config.id_dim)) / np.sqrt(config.id_dim)).astype(np.float32)
    popularity = 1.0 / (rng.permutation(n) + 1.0)
    return attributes, id_factor, popularity


def _one_hot(attributes: dict[str, np.ndarray]) -> np.ndarray:
    """[C, I] float32 one-hot of every attribute, attributes stacked in ATTRIBUTES order."""
    blocks = [np.eye(len(a.categories), dtype=np.float32)[:, attributes[a.name]] for a in ATTRIBUTES]
    return np.concatenate(blocks, axis=0)


def _random_profile(rng: np.random.Generator, liked: dict[str, tuple[int, float]]) -> np.ndarray:
    """[C] taste weights: small noise everywhere plus `weight` on each liked category
    (`liked`: attribute name -> (category, weight))."""
    parts = []
    for a in ATTRIBUTES:
        part = rng.normal(0.0, 0.15, len(a.categories))
        if a.name in liked:
            category, weight = liked[a.name]
            part[category] += weight
        parts.append(part)
    return np.concatenate(parts)


def _group_modality(n_groups: int) -> np.ndarray:
    """[G] str: even groups have image taste, odd groups text taste."""
    return np.array([MODALITIES[g % 2] for g in range(n_groups)])


def _sample_group_profiles(config: SyntheticConfig, one_hot: np.ndarray) -> np.ndarray:
    """[G, C] float32 taste profiles, mixed between a shared and a group-specific profile by
    group_strength and scaled so that each group's content score has unit variance over items.

    Groups with the same modality like different categories (a per-attribute permutation,
    taken in turn), so they are distinguishable whenever group_strength > 0.
    """
    rng = _rng(config.seed, _GROUPS)
    orders = {a.name: rng.permutation(len(a.categories)) for a in ATTRIBUTES}
    shared = _random_profile(rng, {a.name: (int(rng.integers(len(a.categories))), rng.uniform(0.3, 0.6))
                                   for a in ATTRIBUTES})
    modality = _group_modality(config.n_groups)
    profiles = []
    for g in range(config.n_groups):
        turn = g // len(MODALITIES)
        liked = {a.name: (int(orders[a.name][turn % len(a.categories)]), rng.uniform(0.6, 1.0))
                 for a in ATTRIBUTES if a.modality == modality[g]}
        own = _random_profile(rng, liked)
        profiles.append((1.0 - config.group_strength) * shared + config.group_strength * own)
    profiles = np.stack(profiles)
    scale = (profiles @ one_hot).std(axis=1, keepdims=True)
    return (profiles / np.maximum(scale, 1e-6)).astype(np.float32)


def _taste_spread_variance(one_hot: np.ndarray) -> float:
    """Variance over items that the per-user taste deviation adds to the content score:
    TASTE_SPREAD**2 * sum over attributes of (1 - sum of squared category shares)."""
    shares = one_hot.mean(axis=1)
    total, start = 0.0, 0
    for a in ATTRIBUTES:
        block = shares[start:start + len(a.categories)]
        total += 1.0 - float((block ** 2).sum())
        start += len(a.categories)
    return TASTE_SPREAD ** 2 * total


def _item_design(one_hot: np.ndarray, id_factor: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """[C + k + 1, I] float32 item side of the logit matmul: one-hot attributes, ID factor,
    log popularity."""
    return np.ascontiguousarray(np.concatenate(
        [one_hot, id_factor.T, np.log(popularity)[None, :].astype(np.float32)], axis=0), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Users and interactions


def _sample_user_groups_and_counts(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """[U] int64 group of each user, [U] int64 interaction count of each user.

    Counts are min_interactions plus a rounded log-normal (heavy tail) with the configured mean,
    capped at min(max_interactions, n_items).
    """
    rng = _rng(config.seed, _USERS)
    groups = rng.integers(config.n_groups, size=config.n_users).astype(np.int64)
    extra_mean = config.mean_interactions - config.min_interactions
    if extra_mean > 0:
        mu = np.log(extra_mean) - COUNT_SIGMA ** 2 / 2
        extra = np.floor(rng.lognormal(mu, COUNT_SIGMA, config.n_users) + rng.random(config.n_users))
    else:
        extra = np.zeros(config.n_users)
    cap = min(config.max_interactions, config.n_items)
    counts = np.minimum(config.min_interactions + extra.astype(np.int64), cap)
    return groups, counts


def _chunk_size(n_items: int) -> int:
    """Users per chunk: a fixed function of n_items (results depend on it)."""
    return max(16, CHUNK_CELLS // n_items)


@dataclass(frozen=True)
class _Sampler:
    """Everything a chunk of users needs, shared read-only between worker threads.

    item_design: [C + k + 1, I] float32. profiles: [G, C] float32. groups, counts: [U] int64.
    offsets: [U + 1] int64 first row of each user in the output. content_weight, id_weight:
    weights of the affinity mix. items, timestamps: [R] int64 outputs, filled chunk by chunk.
    workspaces: a queue of reusable buffers, one per worker thread.
    """

    config: SyntheticConfig
    item_design: np.ndarray
    profiles: np.ndarray
    groups: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    content_weight: float
    id_weight: float
    items: np.ndarray
    timestamps: np.ndarray
    workspaces: queue.SimpleQueue


@dataclass(frozen=True)
class _Workspace:
    """Buffers reused from chunk to chunk (fresh [B, I] arrays would cost a page fault per
    4 KiB on every chunk). keys, scratch: [B, I] float32; chosen: [B, I] bool."""

    keys: np.ndarray
    scratch: np.ndarray
    chosen: np.ndarray

    @classmethod
    def allocate(cls, rows: int, n_items: int) -> _Workspace:
        return cls(keys=np.empty((rows, n_items), np.float32), scratch=np.empty((rows, n_items), np.float32),
                   chosen=np.empty((rows, n_items), bool))


def _user_design(sampler: _Sampler, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[B, C + k + 1] float32 user side of the logit matmul for users of `groups` [B]:
    beta * (content weights, ID factor) and alpha for the log-popularity row."""
    config = sampler.config
    n_categories = sampler.profiles.shape[1]
    taste = sampler.profiles[groups] + rng.normal(0.0, TASTE_SPREAD, (len(groups), n_categories)).astype(np.float32)
    user_factor = rng.standard_normal((len(groups), config.id_dim), dtype=np.float32)
    alpha = np.full((len(groups), 1), config.popularity_alpha, dtype=np.float32)
    beta = config.affinity_beta
    return np.concatenate([taste * (beta * sampler.content_weight),
                           user_factor * (beta * sampler.id_weight), alpha], axis=1)


def _gumbel_noise(out: np.ndarray, rng: np.random.Generator) -> None:
    """Fill `out` [B, I] float32 with -Gumbel(0, 1) noise, i.e. log(-log(u)).

    u = (x + 0.5) / 2**16 with x uniform 16-bit: four draws per 64-bit output of the bit
    generator, about three times faster than float32 uniforms. The noise is quantised to 2**16
    levels and truncated at Gumbel ~ 11.8 (the 1 - 8e-6 quantile); the selection probabilities
    differ from the exact softmax by far less than any sampling error at these sizes.
    """
    raw = rng.bit_generator.random_raw(-(-out.size // 4)).view(np.uint16)[:out.size]
    np.add(raw.reshape(out.shape), np.float32(0.5), out=out)
    np.log(out, out=out)
    np.subtract(np.float32(16 * np.log(2.0)), out, out=out)  # -log(u)
    np.log(out, out=out)


def _gumbel_top_k(keys: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                  workspace: _Workspace) -> tuple[np.ndarray, np.ndarray]:
    """Sample counts[b] items without replacement from softmax(keys[b]) for every row b.

    keys: [B, I] float32 logits, overwritten with the Gumbel-perturbed keys (a view of
    workspace.keys). counts: [B] int64, each <= I. Returns (row [R], item [R]) int64, grouped
    by row, items ascending within a row (the order carries no information).
    """
    n_rows, n_items = keys.shape
    scratch, chosen = workspace.scratch[:n_rows], workspace.chosen[:n_rows]
    _gumbel_noise(scratch, rng)
    np.subtract(keys, scratch, out=keys)
    # the counts[b]-th largest key of each row is its threshold: partition a copy (values only,
    # in place: no [B, I] index array), sort the k_max largest, pick per row
    k_max = int(counts.max())
    np.copyto(scratch, keys)
    scratch.partition(n_items - k_max, axis=1)
    largest = np.sort(scratch[:, n_items - k_max:], axis=1)
    threshold = largest[np.arange(n_rows), k_max - counts]
    np.greater_equal(keys, threshold[:, None], out=chosen)
    rows, items = np.divmod(np.flatnonzero(chosen), n_items)
    tied = np.nonzero(np.bincount(rows, minlength=n_rows) != counts)[0]
    if len(tied):  # equal float32 keys at a row's threshold (~0.5% of rows): rank those rows
        order = np.argsort(-keys[tied], axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n_items)[None, :], axis=1)
        chosen[tied] = rank < counts[tied, None]
        rows, items = np.divmod(np.flatnonzero(chosen), n_items)
    return rows.astype(np.int64), items.astype(np.int64)


def _timestamps(rows: np.ndarray, counts: np.ndarray, config: SyntheticConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random chronological times for rows grouped by user, independent of the row order.

    rows: [R] int64 local user of each row (non-decreasing). counts: [B] rows per user.
    Returns (order [R], times [R] int64): the rows sorted by time within each user, and their
    times, strictly increasing within each user.
    """
    span = config.time_span_days * 86_400.0
    n_users = len(counts)
    begin = rng.uniform(0.0, 0.5 * span, n_users)
    length = rng.uniform(0.1, 1.0, n_users) * (span - begin)
    offset = (begin[rows] + rng.random(len(rows)) * length[rows]).astype(np.int64)
    # one int64 key per row: user in the high bits, time offset in the low 40 bits (> 34,000 years)
    key = (rows << 40) + offset
    order = np.argsort(key, kind="stable")
    key = key[order]
    rank = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    # strictly increasing within a user: cumulative max of (key - rank), then add rank back
    strict = np.maximum.accumulate(key - rank) + rank
    return order, config.start_time + (strict - (rows << 40))


def _sample_chunk(sampler: _Sampler, index: int) -> None:
    """Sample the interactions of user chunk `index` into the sampler's output arrays."""
    config = sampler.config
    size = _chunk_size(config.n_items)
    lo, hi = index * size, min((index + 1) * size, config.n_users)
    rng = _rng(config.seed, _CHUNK, index)
    counts = sampler.counts[lo:hi]
    workspace = sampler.workspaces.get()
    try:
        keys = np.matmul(_user_design(sampler, sampler.groups[lo:hi], rng), sampler.item_design,
                         out=workspace.keys[:hi - lo])
        rows, items = _gumbel_top_k(keys, counts, rng, workspace)
    finally:
        sampler.workspaces.put(workspace)
    order, times = _timestamps(rows, counts, config, rng)
    start, stop = sampler.offsets[lo], sampler.offsets[hi]
    sampler.items[start:stop] = items[order]
    sampler.timestamps[start:stop] = times


def _progress(iterable, *, total: int, desc: str, enabled: bool, unit: str):
    """tqdm over `iterable`, shown only when enabled and stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit,
                disable=not enabled or not sys.stderr.isatty(), leave=False)


def _sample_interactions(config: SyntheticConfig, item_design: np.ndarray, profiles: np.ndarray,
                         groups: np.ndarray, counts: np.ndarray, spread_variance: float,
                         progress: bool) -> Interactions:
    """All interactions, rows grouped by user in user order and chronological within a user."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    # the per-user taste deviation adds spread_variance to the unit-variance group content score
    content_scale = 1.0 / np.sqrt(1.0 + spread_variance)
    size = _chunk_size(config.n_items)
    n_chunks = -(-config.n_users // size)
    workers = min(MAX_WORKERS, os.cpu_count() or 1, n_chunks)
    workspaces = queue.SimpleQueue()
    for _ in range(workers):
        workspaces.put(_Workspace.allocate(min(size, config.n_users), config.n_items))
    sampler = _Sampler(config=config, item_design=item_design, profiles=profiles, groups=groups,
                       counts=counts, offsets=offsets,
                       content_weight=float(np.sqrt(config.content_signal) * content_scale),
                       id_weight=float(np.sqrt(1.0 - config.content_signal)),
                       items=np.empty(total, np.int64), timestamps=np.empty(total, np.int64),
                       workspaces=workspaces)
    # chunks write disjoint output slices from their own streams: thread count cannot matter.
    # BLAS threads on these small matmuls cost more in wake-ups than they gain: one per worker.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda index: _sample_chunk(sampler, index), range(n_chunks))
        for _ in _progress(done, total=n_chunks, desc="synthetic users", unit="chunk",
                           enabled=progress and n_chunks >= 8):
            pass
    users = np.repeat(np.arange(config.n_users, dtype=np.int64), counts)
    return Interactions(user=users, item=sampler.items, timestamp=sampler.timestamps)


# --------------------------------------------------------------------------------------------
# Text


def _describe(attributes: dict[str, int], noise: float, rng: np.random.Generator) -> str:
    """Description of one item: its topic and mood words (a synonym with probability `noise`)
    in a random template, plus Poisson(1 + 6 * noise) filler words."""
    words = {}
    for a in ATTRIBUTES:
        if a.modality != "text":
            continue
        synonyms = a.words[attributes[a.name]]
        use_synonym = rng.random() < noise
        words[a.name] = synonyms[int(rng.integers(1, len(synonyms)))] if use_synonym else synonyms[0]
    sentence = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(**words)
    filler = rng.choice(FILLER_WORDS, size=rng.poisson(1.0 + 6.0 * noise)).tolist()
    return " ".join([sentence, *filler])


def _describe_items(config: SyntheticConfig, attributes: dict[str, np.ndarray]) -> np.ndarray:
    """[I] object array of descriptions."""
    rng = _rng(config.seed, _TEXT)
    texts = [_describe({name: int(values[i]) for name, values in attributes.items()}, config.noise, rng)
             for i in range(config.n_items)]
    return np.array(texts, dtype=object)


# --------------------------------------------------------------------------------------------
# Images


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` (not circle) centred at (cx, cy) with radius r, rotated by angle."""
    if shape == "square":
        base = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        base = [(x * 0.8, y * 0.8) for x, y in base]
    elif shape == "triangle":
        base = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    elif shape == "diamond":
        base = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    else:  # cross
        t = 0.33
        base = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
                (-1, t), (-1, -t), (-t, -t)]
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in base]


def _shape_mask(shape: str, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """[S, S] bool mask of the item's shape, with position, size and rotation jitter."""
    cx, cy = size / 2 + rng.normal(0.0, 0.06 * size * noise, 2)
    r = size * rng.uniform(0.30, 0.38)
    angle = rng.normal(0.0, np.deg2rad(20.0) * noise)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(mask) > 127


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[S, S] float32 brightness factor of the texture (1 = full colour, 0.5 = dark pattern)."""
    period = max(4, size // 8)
    y, x = np.mgrid[0:size, 0:size] + rng.integers(period, size=2)[:, None, None]
    if texture == "stripes":
        dark = ((x + y) // (period // 2 + 1)) % 2 == 0
    elif texture == "dots":
        dark = (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (period / 3.5) ** 2
    elif texture == "checks":
        dark = (x // period + y // period) % 2 == 0
    else:
        dark = np.zeros((size, size), bool)
    return np.where(dark, 0.5, 1.0).astype(np.float32)


def render_image(truth: SyntheticTruth, config: SyntheticConfig, item: int) -> Image.Image:
    """The item's [S, S] RGB image: its shape, filled with its colour and texture, on a light
    background, with colour jitter and pixel noise scaled by config.noise. Deterministic per
    (seed, item): any item can be rendered on its own."""
    rng = _rng(config.seed, _IMAGE, item)
    size, noise = config.image_size, config.noise
    names = {a.name: a.categories[int(truth.item_attributes[a.name][item])]
             for a in ATTRIBUTES if a.modality == "image"}
    colour = np.array(PALETTE[int(truth.item_attributes["colour"][item])], np.float32)
    colour = colour + rng.normal(0.0, 25.0 * noise, 3).astype(np.float32)
    background = rng.uniform(215.0, 245.0) + rng.normal(0.0, 6.0 * noise, 3)
    mask = _shape_mask(names["shape"], size, rng, noise)
    foreground = _texture(names["texture"], size, rng)[:, :, None] * colour
    pixels = np.where(mask[:, :, None], foreground, background.astype(np.float32))
    pixels = pixels + rng.normal(0.0, 12.0 * noise, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Public API


def _split_profile(profiles: np.ndarray) -> dict[str, np.ndarray]:
    """[G, C] -> attribute name -> [G, n_categories]."""
    out, start = {}, 0
    for a in ATTRIBUTES:
        out[a.name] = profiles[:, start:start + len(a.categories)].copy()
        start += len(a.categories)
    return out


def generate(config: SyntheticConfig, *, progress: bool = True) -> SyntheticData:
    """Generate the dataset described by `config` (images are rendered by `write`)."""
    attributes, id_factor, popularity = _sample_items(config)
    one_hot = _one_hot(attributes)
    profiles = _sample_group_profiles(config, one_hot)
    groups, counts = _sample_user_groups_and_counts(config)
    interactions = _sample_interactions(config, _item_design(one_hot, id_factor, popularity), profiles,
                                        groups, counts, _taste_spread_variance(one_hot), progress)
    catalogue = Catalogue(item_id=np.arange(config.n_items, dtype=np.int64),
                          text=_describe_items(config, attributes),
                          image=np.full(config.n_items, "", dtype=object))
    truth = SyntheticTruth(
        user_group=groups, item_attributes=attributes, item_id_factor=id_factor,
        item_popularity=popularity, group_modality=_group_modality(config.n_groups),
        group_profile=_split_profile(profiles), vocabularies={a.name: a.categories for a in ATTRIBUTES},
        attribute_modality={a.name: a.modality for a in ATTRIBUTES})
    dataset = RawDataset(name="synthetic", interactions=interactions, catalogue=catalogue,
                         source={"synthetic": config.model_dump()})
    return SyntheticData(config=config, dataset=dataset, truth=truth)


def _is_synthetic(folder: Path) -> bool:
    try:
        load_config(folder)
    except (OSError, ValueError, TypeError):
        return False
    return True


SYNTHETIC_OUTPUT = OutputKind("data synth", "a synthetic dataset", "synthetic.json",
                              frozenset({"interactions.parquet", "catalogue.csv", "images", "truth.npz",
                                         "synthetic.json"}), _is_synthetic)


def write(data: SyntheticData, directory: Path, *, progress: bool = True, overwrite: bool = True) -> Path:
    """Write `data` in the generic format under `directory` and return it.

    interactions.parquet (user_id, item_id, timestamp: int64), catalogue.csv (item_id, text,
    image_path relative to the directory, '' without images), images/<item_id>.png when
    config.images, truth.npz, synthetic.json (the config). Everything is written into a
    temporary sibling directory that replaces `directory` at the end, so a crash leaves
    either the old directory or the new one, never a half-written one. Only an earlier synthetic
    dataset is replaced (with `overwrite`), nothing else (pipeline.outputs.check_output).
    """
    check_output(directory, SYNTHETIC_OUTPUT, overwrite=overwrite)

    def fill(staging: Path) -> None:
        _write_interactions(data.dataset.interactions, staging / "interactions.parquet")
        paths = _write_images(data, staging, progress) if data.config.images else [""] * data.config.n_items
        _write_catalogue(data.dataset.catalogue, paths, staging / "catalogue.csv")
        _save_truth(data.truth, staging / "truth.npz")
        (staging / "synthetic.json").write_text(data.config.model_dump_json(indent=2) + "\n")

    return write_atomically(Path(directory), fill)


def _write_interactions(interactions: Interactions, path: Path) -> None:
    table = pa.table({"user_id": pa.array(interactions.user, pa.int64()),
                      "item_id": pa.array(interactions.item, pa.int64()),
                      "timestamp": pa.array(interactions.timestamp, pa.int64())})
    pq.write_table(table, path)


def _write_images(data: SyntheticData, directory: Path, progress: bool) -> list[str]:
    """Render and save every item's PNG; returns the relative paths in item order."""
    (directory / "images").mkdir()
    paths = []
    for item in _progress(range(data.config.n_items), total=data.config.n_items, desc="synthetic images",
                          enabled=progress, unit="img"):
        relative = f"images/{item}.png"
        render_image(data.truth, data.config, item).save(directory / relative, format="PNG")
        paths.append(relative)
    return paths


def _write_catalogue(catalogue: Catalogue, image_paths: list[str], path: Path) -> None:
    pd.DataFrame({"item_id": catalogue.item_id, "text": catalogue.text,
                  "image_path": image_paths}).to_csv(path, index=False)


def _save_truth(truth: SyntheticTruth, path: Path) -> None:
    arrays = {"user_group": truth.user_group, "item_id_factor": truth.item_id_factor,
              "item_popularity": truth.item_popularity, "group_modality": truth.group_modality.astype(str),
              "attribute_names": np.array(list(truth.vocabularies), dtype=str),
              "attribute_modality": np.array([truth.attribute_modality[n] for n in truth.vocabularies], dtype=str)}
    for name, categories in truth.vocabularies.items():
        arrays[f"attribute__{name}"] = truth.item_attributes[name]
        arrays[f"profile__{name}"] = truth.group_profile[name]
        arrays[f"vocabulary__{name}"] = np.array(categories, dtype=str)
    np.savez(path, **arrays)


def load_truth(directory: Path) -> SyntheticTruth:
    """Read truth.npz written by `write`."""
    with np.load(Path(directory) / "truth.npz", allow_pickle=False) as npz:
        names = [str(n) for n in npz["attribute_names"]]
        return SyntheticTruth(
            user_group=npz["user_group"], item_id_factor=npz["item_id_factor"],
            item_popularity=npz["item_popularity"], group_modality=npz["group_modality"],
            item_attributes={n: npz[f"attribute__{n}"] for n in names},
            group_profile={n: npz[f"profile__{n}"] for n in names},
            vocabularies={n: tuple(str(c) for c in npz[f"vocabulary__{n}"]) for n in names},
            attribute_modality=dict(zip(names, (str(m) for m in npz["attribute_modality"]))))


def load_config(directory: Path) -> SyntheticConfig:
    """Read synthetic.json written by `write`."""
    return SyntheticConfig(**json.loads((Path(directory) / "synthetic.json").read_text()))
