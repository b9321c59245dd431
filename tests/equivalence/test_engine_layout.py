"""What makes the engine fast must not change its numbers: client blocks, the shuffle's sort
on a torch device, merged (not re-sorted) personal rows, per-round segments of PFedRec's
trained copies, the device a pool trains on, the dropout multipliers and the feature spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.backend import training_device
from pipeline.federated.engine.sampling import _shuffle_order, client_data, dropout_keep, dropout_scale, epoch_rows
from pipeline.federated.engine.state import PersonalStore, SparseRows
from pipeline.models import model_for
from pipeline.models.base import InitialState
from test_equivalence import VARIANTS, engine_dense, engine_scores, make_config, max_diffs, run_engine, synthetic


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.mark.parametrize("variant", ["pfedrec-two_step", "fedrap-l1", "fedncf", "fedavg"])
def test_blocks_of_clients_change_nothing(data, variant):
    """Training in blocks of ~20 rows per epoch (many blocks, uneven clients) = one block."""
    backbone, *extra = VARIANTS[variant]
    one = make_config(backbone, "train.participation=0.7", "runtime.block_rows=null", *extra)
    blocks = make_config(backbone, "train.participation=0.7", "runtime.block_rows=20", *extra)
    s1, g1 = run_engine(one, data, 3, n_shards=2)
    sb, gb = run_engine(blocks, data, 3, n_shards=2)
    diffs = max_diffs(engine_dense(s1, g1, data.n_items), engine_dense(sb, gb, data.n_items))
    assert max(diffs.values()) < 1e-10, diffs
    assert (engine_scores(s1, g1, data.n_users, data.n_items)
            - engine_scores(sb, gb, data.n_users, data.n_items)).abs().max().item() < 1e-10
    _, g_first = run_engine(one, data, 1, n_shards=2)  # the comparison has teeth: rounds move the model
    assert max((g1[k] - g_first[k]).abs().max().item() for k in g1) > 1e-3


def test_shuffle_sorted_by_torch_is_the_numpy_order(data):
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 60, 40)
    counts[0] = 10  # rows 5, 6, 7 belong to client 0
    client = np.repeat(np.arange(40), counts)
    keys = rng.integers(0, 1 << 53, len(client)) / float(1 << 53)
    keys[5] = keys[6] = keys[7]  # ties keep the row order
    order = _shuffle_order(client, keys, 40)
    assert np.array_equal(order, _shuffle_order(client, keys, 40, sort_device="cpu"))
    assert np.array_equal(client[order], client)  # rows stay grouped by client
    where = np.argsort(order)  # where each row went
    assert where[6] == where[5] + 1 and where[7] == where[6] + 1
    clients = client_data(data, np.arange(data.n_users))
    a = epoch_rows(clients, neg_ratio=2, rows_per_batch=24, seed=3, round_=1, epoch=0)
    b = epoch_rows(clients, neg_ratio=2, rows_per_batch=24, seed=3, round_=1, epoch=0, sort_device="cpu")
    assert np.array_equal(a.item, b.item) and np.array_equal(a.label, b.label)


def test_sparse_rows_write_merges_like_a_dict():
    rng = np.random.default_rng(0)
    rows = SparseRows(n_items=50, dim=3, dtype=torch.float64)
    reference: dict[int, np.ndarray] = {}
    for _ in range(30):
        keys = rng.choice(2000, size=rng.integers(1, 80), replace=False)  # unsorted, unique
        values = rng.normal(size=(len(keys), 3))
        rows.write(torch.as_tensor(keys), torch.as_tensor(values))
        reference.update({int(k): v for k, v in zip(keys, values)})
    assert rows.keys.tolist() == sorted(reference)
    assert np.allclose(rows.values.numpy(), np.stack([reference[k] for k in sorted(reference)]))


def test_trained_copies_are_kept_per_round_and_compacted():
    """PFedRec's copies: every user reads its own last copy; a round's segment goes once no
    user's copy is in it, and is compacted once most of its users trained again."""
    n_items, dim, n_users = 6, 2, 8
    model = model_for(load_config(None, ["model.backbone=pfedrec"]).model)
    initial = InitialState(global_params={"item": torch.zeros(n_items, dim, dtype=torch.float64)},
                           personal_shared={"w": torch.zeros(dim), "b": torch.zeros(())})
    store = PersonalStore(model, initial, np.arange(n_users), n_items, torch.float64)
    last = {}
    schedule = [[0, 1, 2, 3], [4, 5], [0, 1, 2], [4, 5, 6], [7]]
    for round_, users in enumerate(schedule):
        snapshot = torch.full((n_items, dim), float(round_), dtype=torch.float64)
        local = torch.as_tensor(users)
        ws_local = local.repeat_interleave(2)
        ws_item = torch.as_tensor([x for u in users for x in sorted({u % n_items, (u + 3) % n_items})])
        values = torch.randn(len(ws_local), dim, dtype=torch.float64)
        store.save_copies(round_, {"item": snapshot}, local, ws_local, ws_item, {"item": values.clone()})
        for u in users:  # untouched rows: the table the user downloaded in this round
            last[u] = {j: torch.full((dim,), float(round_), dtype=torch.float64) for j in range(n_items)}
        for u, i, v in zip(ws_local.tolist(), ws_item.tolist(), values):
            last[u][i] = v
        items = torch.arange(n_items)
        for u in last:
            got = store.copy_rows("item", torch.full((n_items,), u), items, torch.zeros(n_items, dim, dtype=torch.float64))
            assert torch.allclose(got, torch.stack([last[u][j] for j in range(n_items)])), (round_, u)
    # round 1's users (4, 5) all trained again: its segment is gone; round 0 keeps user 3 only
    assert set(store.copies["item"]) == set(store.snapshots) == {0, 2, 3, 4}
    assert store.segment_users[0] == 1 and len(store.copies["item"][0].keys) == 2
    live = {r: int((store.copy_round == r).sum()) for r in store.segment_users}
    assert all(2 * live[r] >= store.segment_users[r] for r in live)
    assert store.copy_rows_stored() == 2 * sum(live.values())


def test_training_device():
    auto = load_config(None, []).runtime
    forced = load_config(None, ["runtime.device=cuda"]).runtime
    assert training_device(auto, 0.0) == "cpu"
    assert training_device(load_config(None, ["runtime.device=cpu"]).runtime, 1.0) == "cpu"
    if torch.cuda.is_available():
        assert training_device(auto, 0.5) == training_device(forced, 0.0) == "cuda"
    else:
        for runtime, gpus in ((auto, 0.5), (forced, 0.0)):
            with pytest.raises(RuntimeError, match="no CUDA device"):
                training_device(runtime, gpus)


def runtime_of(*overrides):
    return load_config(None, list(overrides)).runtime


def test_pool_plan_from_cluster_resources():
    from pipeline.federated.runtime.placement import PoolPlan, plan_pools

    # CPU only: one pool per CPU, one thread each; cpus_per_pool / pools override
    assert plan_pools({"CPU": 8.0}, runtime_of()) == PoolPlan(8, 1.0, 0.0)
    assert plan_pools({"CPU": 8.0}, runtime_of("runtime.cpus_per_pool=2")) == PoolPlan(4, 2.0, 0.0)
    assert plan_pools({"CPU": 8.0}, runtime_of("runtime.pools=3")).pools == 3
    # GPUs and an ID backbone: one pool per GPU with a share of the CPUs
    plan = plan_pools({"CPU": 16.0, "GPU": 2.0}, runtime_of())
    assert plan == PoolPlan(2, 8.0, 1.0) and plan.threads == 8
    assert plan_pools({"CPU": 16.0, "GPU": 1.0}, runtime_of("runtime.pools=4")) == PoolPlan(4, 4.0, 0.25)
    assert plan_pools({"CPU": 16.0, "GPU": 4.0}, runtime_of("runtime.pools=2")).gpus_per_pool == 2.0
    # device=cpu or gpus_per_pool=0 keep pools off the GPUs, and so does a fusion module under auto
    for plan in (plan_pools({"CPU": 4.0, "GPU": 1.0}, runtime_of(), fusion=True),
                 plan_pools({"CPU": 4.0, "GPU": 1.0}, runtime_of("runtime.device=cpu")),
                 plan_pools({"CPU": 4.0, "GPU": 1.0}, runtime_of("runtime.gpus_per_pool=0"))):
        assert plan == PoolPlan(4, 1.0, 0.0)
    # a fusion module on the GPUs when asked for them
    assert plan_pools({"CPU": 4.0, "GPU": 1.0}, runtime_of("runtime.device=cuda"), fusion=True) == PoolPlan(1, 4.0, 1.0)
    assert plan_pools({"CPU": 4.0, "GPU": 1.0}, runtime_of("runtime.gpus_per_pool=0.5"),
                      fusion=True) == PoolPlan(1, 4.0, 0.5)


@pytest.mark.parametrize("bitmap_keys, rank_keys", [(1 << 28, 1 << 25), (1 << 28, 0), (0, 0)])
def test_working_set_paths_agree(data, monkeypatch, bitmap_keys, rank_keys):
    """Bitmap with ranks, bitmap with searchsorted, np.unique: the same working set and rows."""
    from pipeline.federated.engine import client as client_module

    clients = client_data(data, np.arange(data.n_users))
    epochs = [epoch_rows(clients, neg_ratio=2, rows_per_batch=24, seed=3, round_=0, epoch=e) for e in range(3)]
    keys = np.concatenate([rows.client * data.n_items + rows.item for rows in epochs])
    monkeypatch.setattr(client_module, "_BITMAP_KEYS", bitmap_keys)
    monkeypatch.setattr(client_module, "_RANK_KEYS", rank_keys)
    ws = client_module.WorkingSet.of(epochs, data.n_items)
    assert (ws.rank is not None) == (rank_keys > 0)
    assert np.array_equal(ws.client * data.n_items + ws.item, np.unique(keys))
    for rows in epochs:
        at = ws.locate(rows.client, rows.item)
        assert np.array_equal(ws.client[at], rows.client) and np.array_equal(ws.item[at], rows.item)


def test_pfedrec_global_eval_table_keeps_no_copies(data):
    """Evaluated on the current Q, PFedRec's fine-tuned copies are never read: none is kept."""
    kept, _ = run_engine(make_config("pfedrec"), data, 2, n_shards=2)
    dropped, _ = run_engine(make_config("pfedrec", "model.pfedrec_eval_table=global"), data, 2, n_shards=2)
    assert sum(s.store.copy_rows_stored() for s in kept) > 0
    assert sum(s.store.copy_rows_stored() for s in dropped) == 0


@pytest.mark.parametrize("rows, units, p", [(0, 4, 0.1), (1, 1, 0.5), (3000, 64, 0.1), (700, 50000, 0.3), (9, 7, 0.9)])
def test_dropout_multipliers_are_the_keep_mask(rows, units, p):
    """dropout_scale (chunked, in place) gives exactly dropout_keep's mask times 1 / (1 - p), as
    the engine used to apply it (a float tensor times the Python scalar), in float32 and
    float64, across chunk boundaries (the [N, units] shapes span one to many chunks)."""
    rng = np.random.default_rng(rows + units)
    users, items = rng.integers(0, 2 ** 40, rows), rng.integers(0, 10 ** 6, rows)
    keep = dropout_keep(7, 3, 2, 1, 5, users, items, units, p)
    assert rows * units < 100 or 0 < keep.mean() < 1  # (tiny shapes may keep all)
    for np_dtype, torch_dtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        scale = dropout_scale(7, 3, 2, 1, 5, users, items, units, p, dtype=np_dtype)
        assert scale.dtype == np_dtype and scale.shape == (rows, units)
        expected = torch.from_numpy(keep).to(torch_dtype).mul_(1.0 / (1.0 - p))
        assert torch.equal(torch.from_numpy(scale), expected)


def test_feature_span_is_the_per_client_weight(monkeypatch):
    """_SpanLinear (the Gram entries at each client's working-set items times its span rows)
    gives every row its client's X[item] (A_c^T X_c)^T, in buckets of several widths and in
    chunks of one or many clients."""
    from pipeline.federated.engine import client as client_module
    from pipeline.federated.engine.client import FeatureSpan, FusionInputs, PaddedRows, _SpanLinear

    rng = np.random.default_rng(0)
    n_items, d, out, n_clients = 40, 6, 3, 7
    features = torch.as_tensor(rng.normal(size=(n_items, d)))
    sizes = [1, 3, 12, 5, 30, 0, 9]  # working-set rows per client (distinct items each)
    ws_client = np.repeat(np.arange(n_clients), sizes)
    ws_item = np.concatenate([np.sort(rng.choice(n_items, s, replace=False)) for s in sizes])
    table = torch.as_tensor(rng.normal(size=(len(ws_item), out)))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    fusion = FusionInputs(features={"x": features}, ws_client=ws_client, ws_item=ws_item,
                          users=np.arange(n_clients), seed=0, dropout=0.0, n_clients=n_clients)
    span = FeatureSpan(modality="x", weight="w", table="a", base=torch.zeros(len(ws_item), out),
                       gram=features @ features.T, offsets=offsets)
    step_rows = np.sort(rng.choice(len(ws_item), 40, replace=False))  # some rows of some clients
    ctx = PaddedRows({"a": table}, fusion, ws_client[step_rows], step_rows, native=True)
    assert len({width for *_, width in ctx.layout.buckets}) > 2
    expected = torch.stack([
        features[ws_item[r]] @ (table[offsets[c]:offsets[c + 1]].T @ features[ws_item[offsets[c]:offsets[c + 1]]]).T
        for r, c in zip(ctx._ws, ctx._client)])
    for chunk in (1 << 22, 1):  # all of a bucket's clients at once; one client per bmm
        monkeypatch.setattr(client_module, "_SPAN_CHUNK", chunk)
        got = _SpanLinear.apply(table, ctx, span)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_weight", [True, False])
def test_padded_affine_is_the_broadcast_formula(with_weight):
    """PaddedLayout.affine (per bucket, no broadcast copies) = x * weight[client] + bias[client]
    on every row, and the same gradients for x, weight and bias (the loss reads real rows only,
    as in training, so padding rows get zero gradient)."""
    from pipeline.federated.engine.grouped import PaddedLayout

    rng = np.random.default_rng(1)
    n_clients, d = 6, 5
    client = rng.permutation(np.repeat(np.arange(n_clients), [1, 4, 0, 9, 2, 17]))
    layout = PaddedLayout(client, n_clients)
    assert len(layout.buckets) > 2 and layout.n_rows > len(client)
    x = torch.as_tensor(rng.normal(size=(layout.n_rows, d)), dtype=torch.float64)
    weight = torch.as_tensor(rng.normal(size=(n_clients, d)), dtype=torch.float64) if with_weight else None
    bias = torch.as_tensor(rng.normal(size=(n_clients, d)), dtype=torch.float64)
    row_client = torch.as_tensor(layout.row_client)
    real = torch.as_tensor(layout.real)
    target = torch.as_tensor(rng.normal(size=(layout.n_rows, d)), dtype=torch.float64)

    def run(affine):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
        out = affine(*([leaves[0], leaves[1] if with_weight else None, leaves[-1]]))
        (((out - target) ** 2).sum(1) * real).sum().backward()
        return out.detach(), [leaf.grad for leaf in leaves]

    out, grads = run(layout.affine)
    expected_out, expected_grads = run(lambda xs, w, b: (xs if w is None else xs * w[row_client]) + b[row_client])
    assert torch.allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, expected_grads):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
