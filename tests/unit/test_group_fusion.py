"""GFMFR server math and distillation term (pipeline/models/group_fusion.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.federated.strategy.group_server import group_means
from pipeline.models.base import linear_head_teacher
from pipeline.models.group_fusion import (GroupFusion, group_delta_sums, kd_per_row, kd_schedule, targets_from_sums,
                                          train_group_fusion, update_ratio_ema)


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
