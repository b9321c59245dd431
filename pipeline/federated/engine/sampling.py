"""The rows a client trains on in one local epoch: positives, fresh negatives, shuffled,
cut into mini-batches. Shared by the vectorised engine and the one-client-at-a-time oracle:
every random draw is a pure function of (run seed, round, epoch, user, index), so a client
gets the same rows alone or inside any batch of clients.

Shapes: B = clients, P = their positives, R = rows of an epoch (P * (1 + neg_ratio)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.negatives import sample_training_negatives, stream_uniform

_SHUFFLE_TAG = 0x5F1E  # separates the shuffle stream from the negatives stream


@dataclass(frozen=True)
class ClientData:
    """What the clients of a batch hold: their positives and what negatives must avoid.

    users: [B] global user ids.  pos_indptr [B+1] / pos_items [P]: training positives (CSR).
    excl_indptr [B+1] / excl_items: sorted items a negative must not be.
    universe: sorted candidate items for negatives, or None (all items).
    """

    users: np.ndarray
    pos_indptr: np.ndarray
    pos_items: np.ndarray
    excl_indptr: np.ndarray
    excl_items: np.ndarray
    n_items: int
    universe: np.ndarray | None = None

    @property
    def n_clients(self) -> int:
        return len(self.users)

    def pos_counts(self) -> np.ndarray:
        return np.diff(self.pos_indptr)

    def select(self, index: np.ndarray) -> "ClientData":
        """The clients at `index` (positions in this batch), same order as given."""
        pos_indptr, pos_items = csr_take(self.pos_indptr, self.pos_items, index)
        excl_indptr, excl_items = csr_take(self.excl_indptr, self.excl_items, index)
        return ClientData(self.users[index], pos_indptr, pos_items, excl_indptr, excl_items,
                          self.n_items, self.universe)


def csr_take(indptr: np.ndarray, values: np.ndarray, index: np.ndarray):
    """(indptr, values) of the CSR rows `index`, in that order."""
    starts, counts = indptr[index], np.diff(indptr)[index]
    new_indptr = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_indptr[1:])
    offsets = np.arange(new_indptr[-1]) - np.repeat(new_indptr[:-1], counts)
    return new_indptr, values[np.repeat(starts, counts) + offsets]


def client_data(data, users: np.ndarray, *, neg_pool: str = "all", neg_exclude_heldout: bool = False) -> ClientData:
    """Build ClientData for `users` of a PreparedDataset under the negatives options."""
    users = np.asarray(users, dtype=np.int64)
    pos_indptr, pos_items = csr_take(data.train_indptr, data.train_items, users)
    if neg_exclude_heldout:
        counts = np.diff(pos_indptr) + 2
        excl_indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(counts, out=excl_indptr[1:])
        rows = np.repeat(np.arange(len(users)), counts)
        items = np.empty(excl_indptr[-1], dtype=np.int64)
        at = np.arange(len(pos_items)) + 2 * np.repeat(np.arange(len(users)), np.diff(pos_indptr))
        items[at] = pos_items
        items[excl_indptr[1:] - 2] = data.valid_item[users]
        items[excl_indptr[1:] - 1] = data.test_item[users]
    else:
        excl_indptr, items = pos_indptr, pos_items
        rows = np.repeat(np.arange(len(users)), np.diff(pos_indptr))
    order = np.lexsort((items, rows))
    excl_items = items[order]
    # a held-out item can equal nothing in train (dedupe), so rows stay unique
    universe = np.unique(data.train_items) if neg_pool == "train_items" else None
    return ClientData(users, pos_indptr, pos_items, excl_indptr, excl_items, data.n_items, universe)


@dataclass(frozen=True)
class EpochRows:
    """One local epoch of a batch of clients, rows grouped by client in shuffled order.

    client: [R] position of the client in the batch.  item: [R].  label: [R] float32 (1 / 0).
    batch: [R] mini-batch index within the client's epoch.  n_batches: [B].
    """

    client: np.ndarray
    item: np.ndarray
    label: np.ndarray
    batch: np.ndarray
    n_batches: np.ndarray


def epoch_rows(clients: ClientData, *, neg_ratio: int, rows_per_batch: int, seed: int, round_: int,
               epoch: int, sort_device: str | None = None, neg_draw: str = "epoch") -> EpochRows:
    """Positives + neg_ratio negatives per positive, shuffled per client, batched. The
    negatives are fresh every epoch (neg_draw 'epoch'), or epoch 0's in every epoch of the round
    (neg_draw 'round'); the shuffle is fresh every epoch either way.
    sort_device: a torch device that runs the shuffle's sort (a stable sort of the same keys:
    the same rows, faster on a GPU); None sorts with numpy."""
    n_pos = clients.pos_counts()
    negatives = sample_training_negatives(clients.users, clients.excl_indptr, clients.excl_items,
                                          n_pos * neg_ratio, clients.n_items, seed=seed, round_=round_,
                                          epoch=epoch if neg_draw == "epoch" else 0, universe=clients.universe)
    n_rows = n_pos * (1 + neg_ratio)
    b = clients.n_clients
    client = np.repeat(np.arange(b), n_rows)
    # per client: its positives first, then its negatives (the pre-shuffle order)
    row_start = np.cumsum(n_rows) - n_rows
    index_in_client = np.arange(client.size) - np.repeat(row_start, n_rows)
    is_pos = index_in_client < n_pos[client]
    item = np.empty(client.size, dtype=np.int64)
    item[is_pos] = clients.pos_items
    item[~is_pos] = negatives
    keys = stream_uniform(seed ^ _SHUFFLE_TAG, round_, epoch, clients.users[client], index_in_client)
    order = _shuffle_order(client, keys, b, sort_device)
    position = np.arange(client.size) - np.repeat(row_start, n_rows)
    return EpochRows(client=client, item=item[order], label=is_pos[order].astype(np.float32),
                     batch=position // rows_per_batch,
                     n_batches=-(-n_rows // rows_per_batch))


_SHUFFLE_KEY_BITS = 40  # a row's shuffle rank within its client: the top 40 of its 53 random bits


def _shuffle_order(client: np.ndarray, keys: np.ndarray, n_clients: int, sort_device: str | None = None) -> np.ndarray:
    """Row order: by client, then by the top _SHUFFLE_KEY_BITS bits of the row's uniform key
    (keys = k / 2^53 exactly), ties by position. One integer sort of (client, key) composites,
    several times faster than np.lexsort; the order of a client's rows depends only on its
    own keys, so it is the same alone and inside any batch of clients."""
    rank = (keys * float(1 << 53)).astype(np.int64) >> (53 - _SHUFFLE_KEY_BITS)
    if n_clients < 1 << (63 - _SHUFFLE_KEY_BITS):
        composite = (client.astype(np.int64) << _SHUFFLE_KEY_BITS) | rank
        if sort_device is not None:
            import torch

            keys_on_device = torch.from_numpy(composite).to(sort_device)
            return torch.sort(keys_on_device, stable=True).indices.cpu().numpy()
        return np.argsort(composite, kind="stable")
    return np.lexsort((np.arange(len(client)), rank, client))


# --- dropout masks -------------------------------------------------------------------------------
# A counter-based hash, so that a client's dropout masks depend only on
# (seed, round, epoch, step, user, item, site, unit): never on which pool trains it or which
# other clients share its step. uint32 arithmetic (wraps by definition).

_HASH_MUL = np.uint32(0x45D9F3B)
_SHIFT = np.uint32(16)
_DROPOUT_TAG = 0xD40F


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (uint32 in, uint32 out)."""
    x = np.array(x, dtype=np.uint32)
    return _hash32_in_place(x, np.empty_like(x))


def _hash32_in_place(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """_hash32 of uint32 x, written over x (scratch: a buffer of x's shape). Returns x."""
    for _ in range(2):
        np.right_shift(x, _SHIFT, out=scratch)
        np.bitwise_xor(x, scratch, out=x)
        np.multiply(x, _HASH_MUL, out=x)  # (uint32 multiplication wraps)
    np.right_shift(x, _SHIFT, out=scratch)
    np.bitwise_xor(x, scratch, out=x)
    return x


def _u32(values) -> np.ndarray:
    return (np.asarray(values, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _dropout_hashes(seed: int, round_: int, epoch: int, step: int, site: int, users, items,
                    units: int) -> tuple[np.ndarray, np.ndarray]:
    """([N] row hashes, [units] unit hashes) of dropout_keep's masks: bit (n, u) hashes row ^ unit."""
    with np.errstate(over="ignore"):
        head = _hash32(_u32([_DROPOUT_TAG ^ (seed & 0xFFFFFFFF)]))
        for part in (round_, epoch, step, site):
            head = _hash32(head ^ _u32([part]))
        row = _hash32(_hash32(head ^ _u32(users)) ^ _u32(items))
        unit = _hash32(_u32(np.arange(units) + 0x3C6EF372))
    return row, unit


def _dropout_threshold(p: float) -> np.uint32:
    return np.uint32(min(int(round(p * 2 ** 32)), 2 ** 32 - 1))


def dropout_keep(seed: int, round_: int, epoch: int, step: int, site: int, users, items, units: int,
                 p: float) -> np.ndarray:
    """[N, units] bool keep-mask (True = kept, probability 1 - p) for N (user, item) rows at
    dropout site `site` of mini-batch `step` of local epoch `epoch` of round `round_`.
    users, items: [N] ints. The same (user, item) in the same step gets the same mask."""
    row, unit = _dropout_hashes(seed, round_, epoch, step, site, users, items, units)
    with np.errstate(over="ignore"):
        bits = _hash32(row[:, None] ^ unit[None, :])
    return bits >= _dropout_threshold(p)


_MASK_CHUNK = 1 << 15  # mask entries hashed at once by dropout_scale (its buffers stay in cache)


def dropout_scale(seed: int, round_: int, epoch: int, step: int, site: int, users, items, units: int,
                  p: float, dtype=np.float32) -> np.ndarray:
    """[N, units] inverted-dropout multipliers of dropout_keep's mask: 1 / (1 - p) (rounded to
    dtype) where kept, 0 where dropped. The same bits as dropout_keep, hashed in place in
    cache-sized chunks rather than one pass per operation over [N, units] temporaries."""
    row, unit = _dropout_hashes(seed, round_, epoch, step, site, users, items, units)
    threshold, scale = _dropout_threshold(p), np.asarray(1.0 / (1.0 - p), dtype=dtype)
    out = np.empty((len(row), units), dtype=dtype)
    rows_per_chunk = max(1, _MASK_CHUNK // max(units, 1))
    bits = np.empty((min(rows_per_chunk, len(row)), units), dtype=np.uint32)
    shifted, keep = np.empty_like(bits), np.empty(bits.shape, dtype=bool)
    for start in range(0, len(row), rows_per_chunk):
        n = min(rows_per_chunk, len(row) - start)
        x, t, k = bits[:n], shifted[:n], keep[:n]
        np.bitwise_xor(row[start:start + n, None], unit[None, :], out=x)
        np.greater_equal(_hash32_in_place(x, t), threshold, out=k)
        np.multiply(k, scale, out=out[start:start + n])
    return out


_LOW32 = 0xFFFFFFFF


def _hash32_torch(x):
    """_hash32 on a torch int64 tensor holding uint32 values, in place (the product of a value
    below 2^32 and _HASH_MUL stays below 2^59: int64 holds it exactly, then the low 32 bits are kept)."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16)
        x.mul_(int(_HASH_MUL)).bitwise_and_(_LOW32)
    return x.bitwise_xor_(x >> 16)


def dropout_scale_on(device, seed: int, round_: int, epoch: int, step: int, site: int, users, items, units: int,
                     p: float, dtype):
    """dropout_scale as a torch tensor of `dtype` on `device`, the [N, units] hashes computed there
    (only the [N] row and [units] unit hashes are made in numpy): the same bits, the same values."""
    import torch

    row, unit = _dropout_hashes(seed, round_, epoch, step, site, users, items, units)
    row_bits, unit_bits = (torch.from_numpy(h.astype(np.int64)).to(device) for h in (row, unit))
    bits = row_bits[:, None] ^ unit_bits[None, :]
    keep = _hash32_torch(bits) >= int(_dropout_threshold(p))
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype, device=device)
    return torch.where(keep, scale, torch.zeros((), dtype=dtype, device=device))
