"""Data preparation protocol, vectorised over all rows.

implicit feedback → clean (drop missing, exact duplicates, collapse repeated (u, i) to the
earliest) → k-core → id remap (ascending original id) → chronological leave-one-out (or the
dataset's predefined split) → features aligned to the new item ids and L2-normalised.

Shapes: U = users, I = items, T = training interactions, d_m = width of modality m.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field

from pipeline.data.schema import TEST, TRAIN, VALID, Catalogue, DataError, RawDataset
from pipeline.strict import ConfigModel

MIN_USER_INTERACTIONS = 3  # one train + one validation + one test item, always enforced


class PrepareConfig(ConfigModel):
    """Options of the preparation protocol; defaults are the FedMR preprocessing, which generic
    (your own) and synthetic data get. A named dataset overrides some of them with its published
    preparation (pipeline.data.datasets.NAMED: MovieLens has no k-core); every preparation prints
    what its filters removed (preparation_line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rating_threshold: float | None = Field(None, description="keep ratings >= this; None keeps all > 0")
    min_user: int = Field(5, ge=0, description="k-core: minimum interactions per user (0 disables)")
    min_item: int = Field(5, ge=0, description="k-core: minimum interactions per item (0 disables)")
    use_predefined_split: bool = Field(True, description="honour a shipped split_label column")
    tie_rule: Literal["last", "first"] = Field(
        "last", description="leave-one-out among a user's rows with the same latest timestamp: hold out the "
                            "last row in file order (last) or the first (first: pandas rank(method='first') "
                            "on descending time, as the PFedRec and FedRAP code)")


@dataclass
class PreparedDataset:
    """A dataset after the protocol, in remapped ids.

    train_indptr: [U+1] CSR offsets into train_items / train_time (per user, chronological).
    train_items:  [T] int64 item ids.      train_time: [T] timestamps.
    valid_item, test_item: [U] int64.      valid_time, test_time: [U].
    user_ids, item_ids: [U], [I] original ids (new id = index).
    features: modality -> float32 [I, d_m], L2-normalised rows.
    catalogue: content aligned to the new item ids, or None.
    stats: counts of every step (rows dropped and why).
    """

    name: str
    n_users: int
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    train_time: np.ndarray
    valid_item: np.ndarray
    test_item: np.ndarray
    valid_time: np.ndarray
    test_time: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    catalogue: Catalogue | None = None
    stats: dict = field(default_factory=dict)

    @property
    def train_counts(self) -> np.ndarray:
        """[U] number of training items per user."""
        return np.diff(self.train_indptr)

    @property
    def train_users(self) -> np.ndarray:
        """[T] user id of every training row."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.train_counts)

    def item_popularity(self) -> np.ndarray:
        """[I] number of training interactions of each item."""
        return np.bincount(self.train_items, minlength=self.n_items)

    def fingerprint(self) -> str:
        """Content hash of the split (what P1 negatives and checkpoints are tied to)."""
        digest = hashlib.sha256()
        digest.update(np.array([self.n_users, self.n_items], dtype=np.int64).tobytes())
        for array in (self.train_indptr, self.train_items, self.valid_item, self.test_item):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def features_fingerprint(self) -> str | None:
        """Content hash of the item features (modality names, shapes and float32 values), None
        without features: two feature stores of one catalogue (another encoder, another
        preparation) differ here while the split's fingerprint stays the same."""
        if not self.features:
            return None
        digest = hashlib.sha256()
        for modality in sorted(self.features):
            array = np.ascontiguousarray(self.features[modality], dtype=np.float32)
            digest.update(f"{modality}:{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    def identity(self) -> dict:
        """The `dataset` block of run summaries and model cards: name, sizes, the split's and the
        features' fingerprints, and the input rows skipped for an empty field (skip_missing)."""
        identity = {"name": self.name, "users": self.n_users, "items": self.n_items,
                    "fingerprint": self.fingerprint(), "features": self.features_fingerprint(),
                    "skipped_rows_missing_fields": int(self.stats.get("skipped_rows_missing_fields", 0))}
        if self.features and self.stats.get("features_recipe"):  # features from a store: its key
            identity["features_recipe"] = self.stats["features_recipe"]
        return identity

    def mismatch(self, identity: dict) -> str | None:
        """Why a run described by `identity` (an `identity()` block) was not made on this data, or None."""
        return identity_mismatch(identity, self.identity())


def identity_mismatch(made: dict, now: dict) -> str | None:
    """Why a run whose `dataset` block is `made` was not made on the data described by `now` (both
    PreparedDataset.identity() blocks), or None. Blocks written before the features fingerprint
    existed are checked on the split only."""
    if made.get("fingerprint") != now["fingerprint"]:
        return (f"another preparation of {now['name']!r} (fingerprint {made.get('fingerprint')}, now "
                f"{now['fingerprint']}: the data or the preparation protocol changed)")
    if "features" in made and made["features"] != now["features"]:
        return (f"other item features for {now['name']!r} (features fingerprint {made['features']}, now "
                f"{now['features']}: the feature store was encoded differently)")
    return None


def reencoding(made: dict, now: dict) -> bool:
    """Whether a run whose `dataset` block is `made` differs from the data described by `now` only
    in the bits of its item features, and those came from the same feature-store recipe (encoders,
    their settings and the inputs' content, the store's key) as now's: the same store encoded
    again, e.g. on another machine, whose float kernels round differently. A block from before
    runs recorded the recipe counts as the same recipe (who accepts it says so, see
    `experiments --accept-reencoded-features`)."""
    return (made.get("fingerprint") == now["fingerprint"] and "features" in made
            and made["features"] != now["features"] and now.get("features_recipe") is not None
            and made.get("features_recipe", now["features_recipe"]) == now["features_recipe"])


def prepare(raw: RawDataset, config: PrepareConfig | None = None) -> PreparedDataset:
    """Apply the whole protocol to a loaded dataset."""
    config = config or PrepareConfig()
    inter = raw.interactions
    stats: dict = {"raw_interactions": len(inter), **raw.source.get("stats", {}),
                   "skipped_rows_missing_fields": int(raw.source.get("dropped_missing", 0))}
    file = raw.source.get("interactions", raw.name)

    keep = _implicit_mask(inter.rating, config.rating_threshold, len(inter))
    stats["dropped_below_threshold"] = int((~keep).sum())
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise DataError(file, "no interaction is left after the rating threshold")

    user_codes, user_raw = _codes(inter.user[rows])
    item_codes, item_raw = _codes(inter.item[rows])
    time = np.asarray(inter.timestamp)[rows]
    split = None if inter.split is None or not config.use_predefined_split else inter.split[rows]

    keep, n_exact, n_repeat = _dedupe(user_codes, item_codes, time)
    stats["dropped_exact_duplicates"] = n_exact
    stats["collapsed_repeated_pairs"] = n_repeat
    user_codes, item_codes, time, rows = user_codes[keep], item_codes[keep], time[keep], rows[keep]
    split = None if split is None else split[keep]

    if split is None:
        keep = _k_core(user_codes, item_codes, max(config.min_user, MIN_USER_INTERACTIONS), config.min_item)
        stats["k_core"] = [config.min_user, config.min_item]
    else:  # a shipped split is used as-is; k-core would break it
        keep = np.ones(len(user_codes), dtype=bool)
        stats["k_core"] = "not applied (predefined split)"
    stats["dropped_users"] = int(len(user_raw) - np.unique(user_codes[keep]).size)
    stats["dropped_items"] = int(len(item_raw) - np.unique(item_codes[keep]).size)
    stats["dropped_k_core_interactions"] = int((~keep).sum())
    user_codes, item_codes, time, rows = user_codes[keep], item_codes[keep], time[keep], rows[keep]
    split = None if split is None else split[keep]
    if user_codes.size == 0:
        raise DataError(file, "no user has enough interactions after k-core filtering")

    # remap: np.unique sorts, so new ids follow ascending original ids
    kept_users, user_new = np.unique(user_codes, return_inverse=True)
    kept_items, item_new = np.unique(item_codes, return_inverse=True)
    user_ids, item_ids = user_raw[kept_users], item_raw[kept_items]

    if split is None:
        parts = _leave_one_out(user_new, time, rows, len(user_ids), config.tie_rule)
        stats["split"] = "chronological leave-one-out"
    else:
        parts = _predefined(user_new, time, rows, split, len(user_ids), file)
        stats["split"] = "predefined (split_label)"
    order_train, valid_rows, test_rows = parts

    train_users = user_new[order_train]
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(train_users, minlength=len(user_ids)), out=indptr[1:])
    prepared = PreparedDataset(
        name=raw.name,
        n_users=len(user_ids),
        n_items=len(item_ids),
        train_indptr=indptr,
        train_items=item_new[order_train].astype(np.int64),
        train_time=time[order_train],
        valid_item=item_new[valid_rows].astype(np.int64),
        test_item=item_new[test_rows].astype(np.int64),
        valid_time=time[valid_rows],
        test_time=time[test_rows],
        user_ids=user_ids,
        item_ids=item_ids,
        features=_align_features(raw, item_ids),
        catalogue=_align_catalogue(raw.catalogue, item_ids),
        stats=stats,
    )
    stats.update(users=prepared.n_users, items=prepared.n_items, train=int(indptr[-1]),
                 valid=prepared.n_users, test=prepared.n_users)
    return prepared


def preparation_line(name: str, stats: dict, config: PrepareConfig) -> str:
    """One line: the filters `config` applied to dataset `name` and what each removed (from a
    PreparedDataset's stats), then what is left."""
    threshold = ("none (every rating > 0 counts)" if config.rating_threshold is None
                 else f">= {config.rating_threshold:g}")
    parts = [f"rating threshold {threshold}: -{stats.get('dropped_below_threshold', 0)} interactions",
             f"duplicates: -{stats.get('dropped_exact_duplicates', 0)} exact, "
             f"{stats.get('collapsed_repeated_pairs', 0)} repeated (user, item) pairs kept at the earliest"]
    if isinstance(stats.get("k_core"), list):
        min_user, min_item = stats["k_core"]
        users = max(min_user, MIN_USER_INTERACTIONS)
        floor = "" if min_user >= MIN_USER_INTERACTIONS else f" (min_user {min_user}; 3 is the leave-one-out floor)"
        parts.append(f"k-core users >= {users}{floor}, items >= {min_item}: -{stats.get('dropped_users', 0)} users, "
                     f"-{stats.get('dropped_items', 0)} items, -{stats.get('dropped_k_core_interactions', 0)} "
                     f"interactions")
    else:
        parts.append(f"k-core {stats.get('k_core')}")
    if stats.get("skipped_rows_missing_fields"):
        parts.insert(0, f"rows with an empty field: -{stats['skipped_rows_missing_fields']} (skip_missing)")
    left = (f"{stats.get('users')} users, {stats.get('items')} items, {stats.get('train')} training interactions, "
            f"{stats.get('split')}")
    return f"prepared {name}: {'; '.join(parts)} -> {left}"


def _implicit_mask(rating: np.ndarray | None, threshold: float | None, n: int) -> np.ndarray:
    """[N] bool: which rows are positives (rating > 0, and >= threshold when set)."""
    if rating is None:
        if threshold is not None:
            raise DataError("config", "rating_threshold is set but the dataset has no ratings",
                            column="rating_threshold")
        return np.ones(n, dtype=bool)
    rating = np.asarray(rating, dtype=np.float64)
    keep = rating > 0
    if threshold is not None:
        keep &= rating >= threshold
    return keep


def _codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes of raw ids in ascending id order: ([N] int64 codes, [K] sorted unique ids)."""
    unique, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int64), unique


def _dedupe(user: np.ndarray, item: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Keep the earliest row of every (user, item) pair (file order breaks time ties).

    Returns ([N] keep mask, exact duplicate rows dropped, other repeated pairs collapsed).
    """
    position = np.arange(len(user))
    order = np.lexsort((position, time, item, user))
    u, i, t = user[order], item[order], time[order]
    same_pair = np.zeros(len(order), dtype=bool)
    same_pair[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1])
    exact = same_pair.copy()
    exact[1:] &= t[1:] == t[:-1]
    keep = np.ones(len(user), dtype=bool)
    keep[order[same_pair]] = False
    n_exact = int(exact.sum())
    return keep, n_exact, int(same_pair.sum()) - n_exact


def _k_core(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """[N] mask of the rows that survive iterated user/item count filtering."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        user_count = np.bincount(user[keep], minlength=user.max() + 1)
        item_count = np.bincount(item[keep], minlength=item.max() + 1)
        new_keep = keep & (user_count[user] >= min_user) & (item_count[item] >= min_item)
        if (new_keep == keep).all():
            return keep
        keep = new_keep


def _leave_one_out(user: np.ndarray, time: np.ndarray, rows: np.ndarray, n_users: int, tie_rule: str = "last"):
    """Chronological leave-one-out: last = test, second-last = validation; among rows with the
    same timestamp the later row in file order counts as later (tie_rule 'last') or the earlier
    one does (tie_rule 'first').

    Returns (training positions in per-user chronological order, ties in file order, [U]
    validation positions, [U] test positions), all indices into the given arrays.
    """
    order = np.lexsort((rows, time, user))  # stable: ties broken by file order
    counts = np.bincount(user, minlength=n_users)
    ends = np.cumsum(counts)
    held_order = order if tie_rule == "last" else np.lexsort((-np.asarray(rows), time, user))
    test_pos, valid_pos = held_order[ends - 1], held_order[ends - 2]
    is_train = np.ones(len(order), dtype=bool)
    is_train[test_pos] = False
    is_train[valid_pos] = False
    return order[is_train[order]], valid_pos, test_pos


def _predefined(user, time, rows, split, n_users: int, file):
    """Use a shipped split; every user needs one validation, one test and >= 1 train row."""
    order = np.lexsort((rows, time, user))
    label = split[order]
    for name, value, expected in (("validation", VALID, "exactly one"), ("test", TEST, "exactly one")):
        count = np.bincount(user[order][label == value], minlength=n_users)
        bad = np.flatnonzero(count != 1)
        if bad.size:
            raise DataError(file, f"predefined split: user code {bad[0]} has {count[bad[0]]} {name} "
                                  f"rows, needs {expected}", column="split_label")
    train_count = np.bincount(user[order][label == TRAIN], minlength=n_users)
    if (train_count < 1).any():
        bad = int(np.flatnonzero(train_count < 1)[0])
        raise DataError(file, f"predefined split: user code {bad} has no training row",
                        column="split_label")
    valid_pos = np.empty(n_users, dtype=np.int64)
    test_pos = np.empty(n_users, dtype=np.int64)
    valid_pos[user[order][label == VALID]] = order[label == VALID]
    test_pos[user[order][label == TEST]] = order[label == TEST]
    return order[label == TRAIN], valid_pos, test_pos


def _align_features(raw: RawDataset, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feature rows in new item-id order, L2-normalised; items without a row get the mean row."""
    if raw.features is None or not raw.features.matrices:
        return {}
    source_ids = raw.features.item_id
    order = np.argsort(source_ids, kind="stable")
    pos = np.searchsorted(source_ids[order], item_ids)
    pos = np.minimum(pos, len(order) - 1)
    found = source_ids[order][pos] == item_ids
    rows = order[pos]
    aligned = {}
    for name, matrix in raw.features.matrices.items():
        matrix = l2_normalise(np.asarray(matrix, dtype=np.float32))
        out = np.empty((len(item_ids), matrix.shape[1]), dtype=np.float32)
        out[found] = matrix[rows[found]]
        if not found.all():
            out[~found] = l2_normalise(matrix.mean(axis=0, keepdims=True))
        aligned[name] = out
    return aligned


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero). [n, d] -> [n, d] float32."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _align_catalogue(catalogue: Catalogue | None, item_ids: np.ndarray) -> Catalogue | None:
    """Catalogue rows in new item-id order; items it lacks get empty text and image."""
    if catalogue is None:
        return None
    order = np.argsort(catalogue.item_id, kind="stable")
    sorted_ids = catalogue.item_id[order]
    pos = np.minimum(np.searchsorted(sorted_ids, item_ids), len(order) - 1)
    found = sorted_ids[pos] == item_ids
    text = np.where(found, catalogue.text[order][pos], "").astype(object)
    image = np.where(found, catalogue.image[order][pos], "").astype(object)
    title = None if catalogue.title is None else np.where(found, catalogue.title[order][pos], "").astype(object)
    return Catalogue(item_id=item_ids, text=text, image=image, title=title)
