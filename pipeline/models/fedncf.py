"""FedNCF: GMF + MLP tower (Perifanis & Efraimidis 2022), user vectors local.

Personal: m_u^mf, m_u^mlp [d].  Global: item tables Q^mf, Q^mlp [I, d]; tower
Linear(2d->d) ReLU Linear(d->d/2) ReLU Linear(d/2->d/4) ReLU; head Linear(d/4 + d -> 1).
score(u, i) = sigma(head([tower([m_u^mlp; q_i^mlp]); m_u^mf * q_i^mf])).
One lr for everything; uniform mean of all globals.
"""

from __future__ import annotations

import torch

from pipeline.models import recipes
from pipeline.models.base import InitialState, RowContext, embedding, linear

GLOBAL_TABLES = ("item_mf", "item_mlp")
GLOBAL_DENSE = ("tower.0.weight", "tower.0.bias", "tower.1.weight", "tower.1.bias",
                "tower.2.weight", "tower.2.bias", "head.weight", "head.bias")
PERSONAL_DENSE = ("user_mf", "user_mlp")
PERSONAL_TABLES: tuple[str, ...] = ()
AGGREGATION = "uniform"
LAYERS = ("tower.0", "tower.1", "tower.2")
# GFMFR: the teacher feeds z into the MLP item slot, and clients are grouped by their trained
# tower and head
GROUP_TABLE = "item_mlp"
GROUP_VECTOR = GLOBAL_DENSE
# what FedNCF has none of (pipeline.models.base.Method)
KEEP_TRAINED_COPY: tuple[str, ...] = ()
UPLOAD_GRADS: tuple[str, ...] = ()
TWO_STEP_GROUPS: tuple[tuple[str, ...], ...] = ()
MODALITIES: tuple[str, ...] = ()
row_regulariser = None
fuse_teacher = None
FUSION = None
ITEM_INPUT: tuple[str, ...] = ()  # no single item input: FedMR adds to both item embeddings


LR_GROUPS = {"item_mf": "item", "item_mlp": "item", "user_mf": "user", "user_mlp": "user",
             **{name: "network" for name in GLOBAL_DENSE}}


def init(n_users: int, n_items: int, dim: int, generator: torch.Generator, scheme: str = "xavier") -> InitialState:
    params = {"item_mf": embedding((n_items, dim), generator, scheme),
              "item_mlp": embedding((n_items, dim), generator, scheme)}
    widths = [2 * dim, dim, dim // 2, dim // 4]
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"tower.{index}.weight"], params[f"tower.{index}.bias"] = linear(fan_out, fan_in, generator, scheme)
    params["head.weight"], params["head.bias"] = linear(1, dim // 4 + dim, generator, scheme)
    per_user = {"user_mf": embedding((n_users, dim), generator, scheme),
                "user_mlp": embedding((n_users, dim), generator, scheme)}
    return InitialState(global_params=params, personal_per_user=per_user)


def lr_scale(n_items: int, config) -> dict[str, float]:
    return {name: 1.0 for name in (*GLOBAL_TABLES, *GLOBAL_DENSE, *PERSONAL_DENSE)}


FUSION_PLUG = "additive"  # FedMR adds z_i [R, d] to both item embeddings


def teacher_logits(head: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """[G, N] logits head_g([tower_g([0; z_{g,i}]); 0]) with the groups' mean tower and head
    (each [G, ...]) and z [G, N, d]: both user vectors are 0, so the GMF part vanishes."""
    hidden = torch.cat([torch.zeros_like(z), z], dim=-1)
    for layer in LAYERS:
        hidden = torch.relu(torch.einsum("gni,goi->gno", hidden, head[f"{layer}.weight"])
                            + head[f"{layer}.bias"][:, None, :])
    hidden = torch.cat([hidden, torch.zeros_like(z)], dim=-1)
    return torch.einsum("gni,gi->gn", hidden, head["head.weight"][:, 0]) + head["head.bias"][:, 0, None]


def logits(ctx: RowContext, extra: torch.Tensor | None = None) -> torch.Tensor:
    """[R] logits; `extra` [R, d] (FedMR's z_i) is added to q_i^mlp and q_i^mf when given."""
    item_mlp, item_mf = ctx.table("item_mlp"), ctx.table("item_mf")
    if extra is not None:
        item_mlp, item_mf = item_mlp + extra, item_mf + extra
    hidden = torch.cat([ctx.vector("user_mlp"), item_mlp], dim=-1)
    for layer in LAYERS:
        hidden = torch.relu(ctx.linear(hidden, layer))
    gmf = ctx.vector("user_mf") * item_mf
    return ctx.linear(torch.cat([hidden, gmf], dim=-1), "head").squeeze(-1)

# Training recipes (train.preset; docs/recipes.md). The FedMR authors' learning rate, alone and
# with their fusion module (MM-FedNCF: 0.01) (train.preset=fedmr_reference)
REFERENCE_LR = 0.1
REFERENCE_LR_DECAY = 1.0
REFERENCE_FEDMR_LR = 0.01
# the PFedRec paper's FedNCF baseline (no code was published; its stated setting): the paper's loop,
# item tables at 0.1 x n x 80, the user vectors at 5.0 (at 0.1 they barely move in one short epoch
# per round) and x0.98 per round (at constant rates seed 0 diverged in round 78)
PAPER = recipes.merged(recipes.TORCH_32, {"train": {**recipes.PAPER_LOOP, "lr_groups": {"item": "8*n", "user": 5.0},
                                                    "lr_decay": 0.98}})
RECIPES = {"default": PAPER, "fedmr_reference": {}, "fedncf_paper": PAPER}
