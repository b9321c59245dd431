"""What every backbone module provides, and the row context its math runs on.

A backbone is pure math over *rows* (one row = one (client, item) pair to score). The same
`logits(ctx)` serves local training of many clients at once, the one-client case, and
evaluation: the context decides where per-client parameters come from.

Parameter kinds:
  global tables   [I, d] item tables that are downloaded, trained per client and aggregated
  global dense    other global weights (FedNCF tower and head), trained per client, aggregated
  personal dense  per-client vectors (linear head, NCF user vectors), persisted, never uploaded
  personal tables per-client [I, d] item tables (FedRAP P_u, PFedRec's fine-tuned copy)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class RowContext(Protocol):
    """Where a backbone reads its inputs for R rows."""

    def table(self, name: str) -> torch.Tensor:
        """[R, d] rows of item table `name` (the row's client's copy, the row's item)."""

    def vector(self, name: str) -> torch.Tensor:
        """[R, ...] the row's client's copy of per-client parameter `name`."""

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [R, in] -> [R, out] through the row's client's copy of Linear `name`
        (parameters `name.weight` [out, in] and `name.bias` [out])."""


class FusionContext(RowContext, Protocol):
    """What a fusion module (pipeline/models/fusion.py) reads besides a backbone's inputs.
    Training: client.PaddedRows; evaluation: shard.EvalRows."""

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        """[R, out]: the frozen `modality` features of the rows' items through Linear `name`."""

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """Inverted dropout of x [R, ...] (training; masks keyed by the row's user and item and
        `site`, identical wherever the client trains), identity in evaluation."""

    def subset(self, index: torch.Tensor) -> "FusionContext":
        """The same context on the rows `index`, in that order."""

    # optional: affine(x, weight, bias) -> broadcast_affine's result, computed without [R, d]
    # copies of the vectors (client.PaddedRows); the module's LayerNorms use it when present


def broadcast_affine(ctx: RowContext, x: torch.Tensor, weight: str | None, bias: str) -> torch.Tensor:
    """x [R, d] * vector(weight) + vector(bias) with the rows' clients' vectors (weight None:
    x + vector(bias))."""
    out = x if weight is None else x * ctx.vector(weight)
    return out + ctx.vector(bias)


class ScoredRows(RowContext, Protocol):
    """The context a composed model's logits(ctx) receives: the rows to score, and where the
    fusion module computes (client.StepRows, shard.EvalRows)."""

    def fusion_rows(self, history: bool):
        """FusionRows (pipeline/federated/engine/client.py): a FusionContext over the distinct rows to
        fuse, plus each client's training positives when `history`; how they map back."""


class Method(Protocol):
    """What every method declares, in one place per method: a backbone module (fedavg.py, fcf.py,
    fedncf.py, pfedrec.py, fedrap.py), or FedMR's composition of one (fusion.FedMR). Every field
    is declared by every method (an empty tuple or None where a method has no such part), so
    nothing is discovered by looking for attributes.

    The partition of the parameters (InitialState holds their initial values):
      GLOBAL_TABLES     [I, d] item tables: downloaded, trained per client, uploaded as the rows the
                        client touched, averaged by the server
      GLOBAL_DENSE      other global weights, uploaded whole (or as gradients, UPLOAD_GRADS)
      PERSONAL_DENSE    per-client vectors, persisted by the client's pool, never uploaded
      PERSONAL_TABLES   per-client [I, d] tables, persisted, never uploaded
      KEEP_TRAINED_COPY global tables whose trained copy the client keeps as its own between rounds
                        (PFedRec's fine-tuned item table; used when model.pfedrec_eval_table=personal)
    How the server aggregates and what crosses the network:
      AGGREGATION       'weighted' (by rows processed) or 'uniform' mean of the clients' updates
      UPLOAD_GRADS      global dense weights uploaded as last-batch gradients for the server's Adam
                        step (FedMR's fusion_agg=grad_adam) instead of as updates
    Training:
      LR_GROUPS         parameter -> its learning-rate group (train.lr_groups); lr_scale(n_items,
                        model_config) its multiplier of the base lr
      TWO_STEP_GROUPS   parameter groups stepped one after the other per mini-batch (PFedRec's
                        head, then its item table); () for one joint step
      row_regulariser   (ctx, round, model_config) -> [R] extra loss per row (FedRAP), or None
      MODALITIES        frozen item-feature modalities the method reads (FedMR), () for ID only
    GFMFR (group-wise fusion with distillation), on every method:
      GROUP_TABLE       the global table each group's target averages
      GROUP_VECTOR      the trained parameters a client is grouped by (its grouping vector)
      teacher_logits    (group heads, [G, N, d] tables) -> [G, N] the groups' teacher logits
      fuse_teacher      FedMR: passes the group tables through the global fusion module first; None
    FUSION              FedMR's FusionConfig (None: ID only)
    """

    GLOBAL_TABLES: tuple[str, ...]
    GLOBAL_DENSE: tuple[str, ...]
    PERSONAL_DENSE: tuple[str, ...]
    PERSONAL_TABLES: tuple[str, ...]
    KEEP_TRAINED_COPY: tuple[str, ...]
    AGGREGATION: str
    UPLOAD_GRADS: tuple[str, ...]
    LR_GROUPS: dict[str, str]
    TWO_STEP_GROUPS: tuple[tuple[str, ...], ...]
    MODALITIES: tuple[str, ...]
    GROUP_TABLE: str
    GROUP_VECTOR: tuple[str, ...]
    row_regulariser: object  # callable or None
    fuse_teacher: object  # callable or None
    FUSION: object  # FedMR's FusionConfig; None for an ID-only backbone

    def init(self, *args, **kwargs) -> "InitialState": ...

    def lr_scale(self, n_items: int, model_config) -> dict[str, float]: ...

    def logits(self, ctx) -> torch.Tensor: ...

    def teacher_logits(self, head: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor: ...


METHOD_FIELDS = ("GLOBAL_TABLES", "GLOBAL_DENSE", "PERSONAL_DENSE", "PERSONAL_TABLES", "KEEP_TRAINED_COPY",
                 "AGGREGATION", "UPLOAD_GRADS", "LR_GROUPS", "TWO_STEP_GROUPS", "MODALITIES", "GROUP_TABLE",
                 "GROUP_VECTOR", "row_regulariser", "fuse_teacher", "FUSION", "init", "lr_scale", "logits",
                 "teacher_logits")
# a backbone module declares besides:
#   how FedMR plugs into it: FUSION_PLUG 'input' (FedMR fuses item_input(ctx), the sum of the
#     ITEM_INPUT tables, and score() scores the fused vector) or 'additive' (FedNCF: the fused
#     vector is added to its item embeddings; ITEM_INPUT ())
#   its training recipes: RECIPES (train.preset -> defaults under what a config gives) and the
#     FedMR authors' learning rate for it, its per-round decay and the lr with their fusion module
#     (REFERENCE_LR, REFERENCE_LR_DECAY, REFERENCE_FEDMR_LR: train.preset=fedmr_reference)
BACKBONE_FIELDS = (*METHOD_FIELDS, "FUSION_PLUG", "ITEM_INPUT", "RECIPES", "REFERENCE_LR", "REFERENCE_LR_DECAY",
                   "REFERENCE_FEDMR_LR")


def backbone_of(model: Method):
    """The backbone module of a method (itself when ID only)."""
    return model if model.FUSION is None else model.backbone


def kept_copies(model: Method, model_config) -> tuple[str, ...]:
    """The tables whose trained copy each client keeps and is evaluated with (PFedRec with
    model.pfedrec_eval_table=personal); () otherwise."""
    return model.KEEP_TRAINED_COPY if model_config.pfedrec_eval_table == "personal" else ()


@dataclass
class InitialState:
    """A backbone's initial parameters.

    global_params: name -> full tensor ([I, d] tables, dense weights).
    personal_shared: name -> initial value every client starts from (heads: [d], []).
    personal_per_user: name -> [U, ...] tables whose row u is user u's initial value.
    personal_table_base: name -> [I, d] initial personal item table shared by all clients
        (FedRAP P); PFedRec's fine-tuned copy has no base: it starts each round from Q.
    """

    global_params: dict[str, torch.Tensor]
    personal_shared: dict[str, torch.Tensor] = field(default_factory=dict)
    personal_per_user: dict[str, torch.Tensor] = field(default_factory=dict)
    personal_table_base: dict[str, torch.Tensor] = field(default_factory=dict)


def xavier(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Xavier-normal tensor of a 2-D shape [fan_out, fan_in]."""
    tensor = torch.empty(shape)
    torch.nn.init.xavier_normal_(tensor, generator=generator)
    return tensor


def embedding(shape: tuple[int, int], generator: torch.Generator, scheme: str = "xavier") -> torch.Tensor:
    """An embedding table [rows, d]: Xavier-normal, or N(0, 1) as torch.nn.Embedding (scheme 'torch')."""
    if scheme == "torch":
        return torch.randn(shape, generator=generator)
    return xavier(shape, generator)


def linear(fan_out: int, fan_in: int, generator: torch.Generator, scheme: str = "xavier"):
    """(weight [fan_out, fan_in], bias [fan_out]) of a Linear: Xavier-normal weight and zero bias,
    or torch.nn.Linear's default (scheme 'torch'): both U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if scheme == "torch":
        bound = 1.0 / fan_in ** 0.5
        weight = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
        return weight, torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
    return xavier((fan_out, fan_in), generator), torch.zeros(fan_out)


def linear_head_init(dim: int, generator: torch.Generator, scheme: str = "xavier") -> dict[str, torch.Tensor]:
    """Personal Linear(d -> 1) as (w [d], b []): see `linear`."""
    weight, bias = linear(1, dim, generator, scheme)
    return {"w": weight[0], "b": bias[0]}


def linear_head(ctx: RowContext, item: torch.Tensor) -> torch.Tensor:
    """w_u . q + b_u per row: [R, d] -> [R] logits."""
    return (item * ctx.vector("w")).sum(-1) + ctx.vector("b")


def linear_head_teacher(head: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """GFMFR's group teacher of a linear head: [G, N] logits
    w̄_g . z_{g,i} + b̄_g from the groups' mean heads (w [G, d], b [G]) and z [G, N, d]."""
    return torch.einsum("gnd,gd->gn", z, head["w"]) + head["b"][:, None]
