"""GFMFR server math and distillation term (pipeline/models/group_fusion.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.federated.strategy.group_server import group_means
from pipeline.models.base import linear_head_teacher
from pipeline.models.group_fusion import (GroupFusion, group_delta_sums, kd_per_row, kd_schedule, target_scale,
                                          targets_from_sums, train_group_fusion, update_ratio_ema)
from reference.group_fusion import train_group_fusion_reference


def test_group_targets_are_the_members_mean_trained_tables():
    rng = torch.Generator().manual_seed(0)
    n_items, d, n_groups = 7, 3, 3
    table = torch.randn(n_items, d, generator=rng, dtype=torch.float64)
    client_group = torch.tensor([0, 1, 0, -1])  # client 3 has no group; group 2 is empty
    row_client = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    row_item = torch.tensor([1, 4, 4, 0, 1, 6, 2])
    delta = torch.randn(len(row_client), d, generator=rng, dtype=torch.float64)
    # what the pools reduce (per-group sums of their clients' changes), then the server's mean
    sums, members = group_delta_sums(delta, row_client, row_item, client_group, n_groups, n_items)
    targets = targets_from_sums(table, sums, members)
    full = table.repeat(4, 1, 1)
    full[row_client, row_item] += delta  # each client's trained table
    assert members.tolist() == [2, 1, 0]
    assert torch.allclose(targets[0], (full[0] + full[2]) / 2)
    assert torch.allclose(targets[1], full[1])
    assert torch.equal(targets[2], table)


def test_group_sums_add_the_grouped_rows_alone_bit_for_bit():
    """The pools' reduction sends ungrouped clients' rows to a spare row instead of selecting the
    grouped rows first: the same float32 sums, bit for bit, as adding the grouped rows alone."""
    rng = torch.Generator().manual_seed(1)
    n_items, d, n_groups, n_clients, n_rows = 50, 6, 4, 30, 2000
    row_client = torch.sort(torch.randint(0, n_clients, (n_rows,), generator=rng)).values
    row_item = torch.randint(0, n_items, (n_rows,), generator=rng)
    delta = torch.randn(n_rows, d, generator=rng) * 10 ** torch.randint(-3, 3, (n_rows, 1), generator=rng)
    client_group = torch.randint(-1, n_groups - 1, (n_clients,), generator=rng)  # group 3 empty, some -1
    sums, members = group_delta_sums(delta, row_client, row_item, client_group, n_groups, n_items)
    rows = client_group[row_client] >= 0
    expected = torch.zeros(n_groups, n_items, d)
    for r in torch.nonzero(rows).flatten().tolist():  # row by row, in row order
        expected[client_group[row_client[r]], row_item[r]] += delta[r]
    assert (client_group < 0).any() and torch.equal(sums, expected)
    assert members.tolist() == [int((client_group == g).sum()) for g in range(n_groups)]


def planted_targets(n_groups=3, n_items=40, d_c=8, seed=0):
    rng = torch.Generator().manual_seed(seed)
    features = {"text": torch.randn(n_items, 12, generator=rng), "image": torch.randn(n_items, 10, generator=rng)}
    mix = torch.randn(n_groups, 12, d_c, generator=rng) * 0.3
    targets = torch.einsum("nt,gtd->gnd", features["text"], mix)  # group-dependent map of the content
    return features, targets


def test_group_fusion_learns_the_targets_and_warm_starts():
    features, targets = planted_targets()
    members = torch.tensor([2, 5, 1])
    model = GroupFusion(3, 8, {"text": 12, "image": 10}, group_dim=16, generator=torch.Generator().manual_seed(1))
    first = train_group_fusion(model, targets, members, features, epochs=40, lr=0.2, batch=32, seed=3)
    assert first[-1] < 0.5 * first[0] and first[-1] < 0.6 * targets.var().item()  # beats predicting the mean
    second = train_group_fusion(model, targets, members, features, epochs=2, lr=0.2, batch=32, seed=4)
    assert second[0] < first[0]  # the model persists across rounds (warm start)
    twin = GroupFusion(3, 8, {"text": 12, "image": 10}, group_dim=16, generator=torch.Generator().manual_seed(1))
    again = train_group_fusion(twin, targets, members, features, epochs=40, lr=0.2, batch=32, seed=3)
    assert again == first  # seeded
    z = model.table(1, features, 40)
    assert z.shape == (40, 8) and not z.requires_grad
    every = model.tables(features, 40)  # all groups at once
    assert every.shape == (3, 40, 8) and not every.requires_grad
    assert torch.allclose(every[1], z, rtol=1e-5, atol=1e-6)


def test_rms_target_scale_fits_large_tables_as_small_ones():
    """server_target_scale: the same content-to-table map at 100x the size (FedRAP's tables
    under the default recipe are that large) defeats the unscaled SGD fit at the lr that fits the
    unit-size one; divided by their RMS (the scale over the non-empty groups only), the large
    targets give the unit-size fit's relative error."""
    features, targets = planted_targets()
    members = torch.tensor([2, 5, 0])
    targets[2] = 1e6  # an empty group's rows never count
    fits = {}
    for size in (1.0, 100.0):
        for how in ("none", "rms"):
            big = targets * size
            scale = target_scale(big, members, how)
            model = GroupFusion(3, 8, {"text": 12, "image": 10}, group_dim=16,
                                generator=torch.Generator().manual_seed(1))
            train_group_fusion(model, big / scale, members, features, epochs=40, lr=0.2, batch=32, seed=3)
            z = model.tables(features, 40)[:2] * scale
            fits[size, how] = (scale, float((z - big[:2]).norm() / big[:2].norm()))
    assert fits[1.0, "none"][0] == fits[100.0, "none"][0] == 1.0
    assert fits[100.0, "rms"][0] == pytest.approx(100 * fits[1.0, "rms"][0], rel=1e-6)
    assert fits[1.0, "rms"][0] == pytest.approx(float(targets[:2].double().square().mean().sqrt()), rel=1e-6)
    assert fits[1.0, "none"][1] < 0.7 and fits[1.0, "rms"][1] < 0.7
    assert fits[100.0, "none"][1] > 0.95 or not math.isfinite(fits[100.0, "none"][1])  # the large fit fails
    assert fits[100.0, "rms"][1] == pytest.approx(fits[1.0, "rms"][1], rel=1e-4)
    assert target_scale(torch.zeros(2, 3, 4), torch.tensor([1, 1]), "rms") == 1.0
    with pytest.raises(ValueError, match="server_target_scale"):
        target_scale(targets, members, "max")


def test_group_fusion_trains_only_non_empty_groups():
    features, targets = planted_targets()
    model = GroupFusion(3, 8, {"text": 12}, group_dim=16, fusion="sum")
    before = model.group.detach().clone()
    train_group_fusion(model, targets, torch.tensor([1, 0, 2]), features, epochs=2, weight_decay=0.0)
    moved = (model.group.detach() - before).abs().sum(1)
    assert moved[0] > 0 and moved[2] > 0 and moved[1] == 0
    with pytest.raises(ValueError, match="group_fusion"):
        GroupFusion(3, 8, {"text": 12}, fusion="moe")


def test_teacher_scores_use_the_group_mean_head():
    rng = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 4, generator=rng, dtype=torch.float64)
    head_w = torch.randn(4, 4, generator=rng, dtype=torch.float64)
    head_b = torch.randn(4, generator=rng, dtype=torch.float64)
    ids = np.array([2, 0, 2, 1])
    head = {"w": group_means(head_w, ids, 3), "b": group_means(head_b, ids, 3)}
    s = torch.sigmoid(linear_head_teacher(head, z))
    w2, b2 = (head_w[0] + head_w[2]) / 2, (head_b[0] + head_b[2]) / 2
    assert torch.allclose(s[2], torch.sigmoid(z[2] @ w2 + b2))
    assert torch.allclose(s[0], torch.sigmoid(z[0] @ head_w[1] + head_b[1]))


def test_fedncf_teacher_zeroes_the_user_vectors():
    """sigma(head_g([tower_g([0; z]); 0])): the same as FedNCF's own logits with both user
    vectors 0 and z in the MLP item slot."""
    from pipeline.models import fedncf

    generator = torch.Generator().manual_seed(1)
    init = fedncf.init(3, 6, 8, generator)
    params = {k: v.double() for k, v in init.global_params.items()}
    z = torch.randn(1, 6, 8, generator=generator, dtype=torch.float64)
    head = {name: params[name][None] for name in fedncf.GROUP_VECTOR}
    got = fedncf.teacher_logits(head, z)[0]

    class Ctx:
        def table(self, name):
            return z[0] if name == "item_mlp" else torch.zeros(6, 8, dtype=torch.float64)

        def vector(self, name):
            return torch.zeros(6, 8, dtype=torch.float64)

        def linear(self, x, name):
            return torch.nn.functional.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])

    assert torch.allclose(got, fedncf.logits(Ctx()))


def test_distillation_term_is_zero_when_teacher_and_student_agree():
    p = torch.tensor([0.0, 1e-9, 0.2, 0.5, 0.93, 1.0], dtype=torch.float64)
    assert torch.equal(kd_per_row(p, p), torch.zeros_like(p))
    student = torch.tensor([0.3, 0.8, 0.01], dtype=torch.float64)
    teacher = torch.tensor([0.6, 0.2, 0.5], dtype=torch.float64)
    kd = kd_per_row(student, teacher)
    q = torch.stack([teacher, 1 - teacher], -1)
    log_p = torch.stack([student, 1 - student], -1).log()
    expected = torch.nn.functional.kl_div(log_p, q, reduction="none").sum(-1)
    assert (kd > 0).all() and torch.allclose(kd, expected)
    grad_at = student.clone().requires_grad_(True)
    kd_per_row(grad_at, teacher).sum().backward()
    assert (torch.sign(grad_at.grad) == torch.sign(student - teacher)).all()  # pulls towards the teacher


def test_kd_weight_schedules_and_ratio_ema():
    assert kd_schedule("cosine", 0, 100) == 1.0 and kd_schedule("cosine", 50, 100) == pytest.approx(math.sqrt(0.5))
    assert kd_schedule("linear_increase", 25, 100) == 0.25 and kd_schedule("constant", 7, 10) == 1.0
    assert kd_schedule("exponential_increase", 10, 100) == pytest.approx(1 - math.exp(-1))
    with pytest.raises(ValueError):
        kd_schedule("step", 1, 10)
    rho = np.array([np.nan, 2.0, 2.0, np.nan])
    bce = np.array([1.0, 1.0, 1.0, -5.0])
    kd = np.array([0.5, 0.5, 0.0, 1.0])
    out = update_ratio_ema(rho, bce, kd)
    assert out[0] == pytest.approx(1.0 / (0.5 + 1e-8))  # unset: takes the ratio
    assert out[1] == pytest.approx(0.9 * 2.0 + 0.1 / (0.5 + 1e-8))
    assert out[2] == 2.0  # L_KD <= 1e-8: no update
    assert out[3] == 0.0  # clamped at 0


def _twin_models(fusion: str, modalities: dict[str, int], seed: int = 1):
    make = lambda: GroupFusion(4, 8, modalities, group_dim=16, fusion=fusion,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed)).double()
    return make(), make()


@pytest.mark.parametrize("fusion, block_values", [("mlp", 1 << 22), ("mlp", 700), ("sum", 1 << 22)])
def test_hand_written_training_equals_autograd_sgd(fusion, block_values):
    """train_group_fusion (hand-written gradients, one flat SGD buffer, per-epoch gathers in
    blocks) takes the same steps as autograd + torch.optim.SGD (train_group_fusion_reference):
    float64, an empty group, a last batch shorter than the others, weight decay, a second
    (warm-started) call; block_values=700 gathers a few batches at a time."""
    features, targets = planted_targets(n_groups=4, n_items=37)
    features = {m: x.double() for m, x in features.items()}
    targets = targets.double() + 0.5
    members = torch.tensor([3, 0, 2, 1])
    fast, reference = _twin_models(fusion, {"text": 12, "image": 10})
    for seed, epochs in ((5, 6), (6, 3)):
        got = train_group_fusion(fast, targets, members, features, epochs=epochs, lr=0.1, weight_decay=0.01,
                                 batch=16, seed=seed, block_values=block_values)
        want = train_group_fusion_reference(reference, targets, members, features, epochs=epochs, lr=0.1,
                                            weight_decay=0.01, batch=16, seed=seed)
        assert len(got) == epochs and np.allclose(got, want, rtol=1e-12, atol=0)
        assert got[-1] < got[0]  # it trains
    for (name, a), (_, b) in zip(fast.named_parameters(), reference.named_parameters()):
        assert (a - b).abs().max() < 1e-10, name
    assert not fast.training and (fast.group[1] != reference.group[1] * 0).any()
    assert torch.allclose(fast.table(2, features, 37), reference.table(2, features, 37), rtol=0, atol=1e-10)
    every = fast.tables(features, 37)
    for g in range(4):
        assert (every[g] - fast.table(g, features, 37)).abs().max() < 1e-12


def test_hand_written_training_follows_the_model_without_image_features():
    features, targets = planted_targets(n_items=20)
    features = {"text": features["text"].double()}
    fast, reference = _twin_models("mlp", {"text": 12})
    members = torch.tensor([1, 2, 3, 0])
    targets = torch.cat([targets.double(), targets[:1].double()])
    got = train_group_fusion(fast, targets, members, features, epochs=3, lr=0.05, batch=7, seed=2)
    want = train_group_fusion_reference(reference, targets, members, features, epochs=3, lr=0.05, batch=7, seed=2)
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert max((a - b).abs().max() for a, b in zip(fast.parameters(), reference.parameters())) < 1e-10


def test_early_stop_on_the_fusion_loss():
    """tol: the epochs end after the first that lowers the mean loss by at most tol of the one
    before; what ran is the prefix of the full run (same seed), in both implementations."""
    features, targets = planted_targets()
    features = {m: x.double() for m, x in features.items()}
    members = torch.tensor([2, 5, 1])
    full_model, _ = _twin_models("mlp", {"text": 12, "image": 10})
    full = train_group_fusion(full_model, targets.double()[:, :, :8].contiguous(), members, features, epochs=30,
                              lr=0.2, batch=32, seed=3)
    gains = [(a - b) / a for a, b in zip(full, full[1:])]
    tol = float(np.median(gains))  # stops somewhere inside the run
    expected = next(k + 2 for k, g in enumerate(gains) if g <= tol)
    assert expected < 30
    for trainer in (train_group_fusion, train_group_fusion_reference):
        model, _ = _twin_models("mlp", {"text": 12, "image": 10})
        stopped = trainer(model, targets.double()[:, :, :8].contiguous(), members, features, epochs=30, lr=0.2,
                          batch=32, seed=3, tol=tol)
        assert len(stopped) == expected and np.allclose(stopped, full[:expected], rtol=1e-12, atol=0)
    model, _ = _twin_models("mlp", {"text": 12, "image": 10})
    assert len(train_group_fusion(model, targets.double()[:, :, :8].contiguous(), members, features, epochs=30,
                                  lr=0.2, batch=32, seed=3, tol=None)) == 30
