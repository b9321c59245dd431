"""GFMFR's grouping of a round's participants, pure numpy + scikit-learn + scipy.

From the participants' grouping vectors x_u (their locally trained score-function parameters):
standardise per feature over the round's participants, optionally reduce with PCA, cluster
into G groups (spectral clustering on an RBF affinity with the median-heuristic gamma, or
k-means; seeded by (run seed, round)), then give the clusters stable ids: clusters take the id
of the previous round's group they overlap most (Hungarian matching), the first grouping
numbers them by their smallest member user id.

Shapes: P = participants, F = features of a grouping vector, G = groups.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA

UNGROUPED = -1  # the group id of a user who has none (never grouped yet)
PCA_VARIANCE = 0.95


def standardise(x: np.ndarray) -> np.ndarray:
    """[P, F] -> per-feature z-scores over the P rows (population std); constant features -> 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return np.where(std > 0, (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)


def reduce(x: np.ndarray, variance: float = PCA_VARIANCE) -> np.ndarray:
    """[P, F] -> [P, k]: the fewest principal components explaining >= `variance` of it."""
    if x.shape[1] == 0 or not np.any(x):
        return x
    return PCA(n_components=variance, svd_solver="full").fit_transform(x)


def rbf_gamma(x: np.ndarray) -> float:
    """gamma = 1 / (2 m^2), m the median of the non-zero pairwise Euclidean distances (1 if none)."""
    distances = pdist(x)
    distances = distances[distances > 0]
    m = float(np.median(distances)) if len(distances) else 1.0
    return 1.0 / (2.0 * m * m)


def cluster_seed(seed: int, round_: int) -> int:
    """The clustering's random_state, from (run seed, round)."""
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0] & 0x7FFFFFFF)


def cluster(x: np.ndarray, n_groups: int, method: str, seed: int, round_: int) -> np.ndarray:
    """[P] raw cluster labels of the processed vectors x [P, F'] (each row its own cluster when
    P <= n_groups)."""
    n = len(x)
    if n <= n_groups:
        return np.arange(n)
    state = cluster_seed(seed, round_)
    if method == "kmeans":
        return KMeans(n_clusters=n_groups, n_init=10, random_state=state).fit_predict(x)
    if method == "spectral":
        affinity = np.exp(-rbf_gamma(x) * squareform(pdist(x, "sqeuclidean")))
        return SpectralClustering(n_clusters=n_groups, affinity="precomputed", random_state=state,
                                  assign_labels="kmeans").fit_predict(affinity)
    raise ValueError(f"group_method {method!r}: expected 'spectral' or 'kmeans' (or 'planted', see group_users)")


def assign_ids(labels: np.ndarray, users: np.ndarray, previous: np.ndarray | None, n_groups: int) -> np.ndarray:
    """[P] group ids in [0, G) for raw cluster `labels` of `users` (global ids).

    previous: [U] last group id of every user (UNGROUPED if none) or None. With no previous
    grouping of these users, ids follow the clusters' smallest member user id. Otherwise the
    overlap O[c, p] = |cluster c with previous group p| is matched by maximum weight
    (scipy's linear_sum_assignment on -O); a cluster matched with positive overlap keeps that
    id, the others take the smallest unused ids in ascending order of their raw label.
    """
    labels, users = np.asarray(labels), np.asarray(users)
    raw = np.unique(labels)
    if len(raw) > n_groups:
        raise ValueError(f"{len(raw)} clusters for {n_groups} group ids")
    before = np.full(len(users), UNGROUPED) if previous is None else np.asarray(previous)[users]
    known = before != UNGROUPED
    mapping: dict[int, int] = {}
    if known.any():
        overlap = np.zeros((len(raw), n_groups), dtype=np.int64)
        np.add.at(overlap, (np.searchsorted(raw, labels[known]), before[known]), 1)
        for c, p in zip(*linear_sum_assignment(-overlap)):
            if overlap[c, p] > 0:
                mapping[int(raw[c])] = int(p)
        free = iter(sorted(set(range(n_groups)) - set(mapping.values())))
        for label in raw.tolist():
            if label not in mapping:
                mapping[label] = next(free)
    else:
        first_member = {int(label): int(users[labels == label].min()) for label in raw}
        for new_id, label in enumerate(sorted(first_member, key=first_member.get)):
            mapping[label] = new_id
    new_id = np.array([mapping[int(label)] for label in raw], dtype=np.int64)
    return new_id[np.searchsorted(raw, labels)]


def group_users(vectors: np.ndarray, users: np.ndarray, n_groups: int, *, method: str = "spectral",
                use_pca: bool = False, seed: int = 0, round_: int = 0,
                previous: np.ndarray | None = None, planted: np.ndarray | None = None) -> np.ndarray:
    """[P] group id of each participant from its grouping vector (vectors [P, F], users [P]
    global ids, previous [U] last ids or None). The participants are clustered in user-id
    order, so the order they arrive in changes nothing. method "planted": planted[users]
    (planted [U]: the synthetic generator's taste groups), the vectors unused."""
    users = np.asarray(users)
    if method == "planted":
        if planted is None:
            raise ValueError("group_method 'planted' needs the planted groups (pipeline.data.datasets.planted_groups)")
        return np.asarray(planted, dtype=np.int64)[users]
    order = np.argsort(users, kind="stable")
    x = standardise(np.asarray(vectors)[order])
    if use_pca:
        x = reduce(x)
    ids = np.empty(len(users), dtype=np.int64)
    ids[order] = assign_ids(cluster(x, n_groups, method, seed, round_), users[order], previous, n_groups)
    return ids


def keep_groups(vectors: np.ndarray, users: np.ndarray, known: np.ndarray) -> np.ndarray | None:
    """[P] group ids without clustering (model.gfmfr.regroup_every's rounds between two
    groupings): a participant grouped before (known [U] != UNGROUPED) keeps known[user]; one
    never grouped takes the id of the nearest centroid (Euclidean; the first id on ties) of the
    participants grouped before, in this round's standardised vectors [P, F] (standardise over
    all P). None when no participant was grouped before (the caller then clusters)."""
    users = np.asarray(users)
    ids = np.asarray(known)[users].astype(np.int64)
    seen = ids != UNGROUPED
    if not seen.any():
        return None
    if seen.all():
        return ids
    order = np.argsort(users, kind="stable")  # the participants in user-id order, as group_users
    x = np.empty((len(users), np.asarray(vectors).shape[1]))
    x[order] = standardise(np.asarray(vectors)[order])
    present = np.unique(ids[seen])
    centroids = np.stack([x[ids == g].mean(axis=0) for g in present])
    distances = ((x[~seen, None, :] - centroids[None]) ** 2).sum(axis=2)
    ids[~seen] = present[np.argmin(distances, axis=1)]
    return ids
