"""FedMR's Mixing Feature Fusion Module, and its composition with a backbone.

Per item i at client u (inputs: e_i [d_id] from the backbone, frozen t_i [d_t], v_i [d_v]):
  h_m = LN_m(W_m x_m + b_m) in R^{d_f}                   m in modalities (id, text, image)
  f1 = sum_m h_m                                          Sum expert
  f2 = LN(W_b Drop(ReLU(W_a [h_*] + a)) + b)              MLP expert  (M d_f -> 2 d_f -> d_f)
  f3 = LN(W_g [sigma(Drop(G_m h_m + c_m))]_m + c_g)       Gate expert (M gates, then M d_f -> d_f)
  s_i = softmax(W_r2 Drop(ReLU(W_r1 [f1; f2; f3] + b_r1)) + b_r2)     router, in the simplex
  a_u = mean_{j in S_u} s_j,  alpha_u = a_u (single) or softmax(a_u) (double)
  z_i = sum_k alpha_uk f_k_i in R^{d_f}                   what the backbone head scores
`fusion` other than moe: z_i = that expert's output (attention: see `expert_attention`).
S_u (mixing_source): history = u's training positives H_u (in training in the same forward
pass, dropout active); batch = the rows of the forward call.

Everything is written against a context (pipeline/models/base.py, FusionContext) that also
provides
  feature_linear(modality, name)  frozen features of the rows' items through Linear `name`
  dropout(x, site)                inverted dropout (identity in evaluation)
  subset(index)                   the same context on a subset of its rows
and the scored rows' fusion_rows(history) (FusionRows: the distinct rows to fuse, the mixing
rows), so one `logits(ctx)` serves training of many clients (client.StepRows/PaddedRows) and
evaluation (shard.EvalRows, which may add item_rows/personal_rows so that what does not depend
on the user is computed once per item), like the backbones.

Composition (FedMR below): a backbone module plugs in unchanged. Backbones with
FUSION_PLUG = "input" give e_i = item_input(ctx) and score z_i with score(ctx, z); FedNCF
("additive") keeps its item embeddings, takes e_i from FedMR's own global table `fedmr_item`
and adds z_i to both item towers: logits(ctx, extra=z).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.models.base import InitialState, broadcast_affine, embedding, kept_copies, linear_head_init, xavier

PREFIX = "fedmr."
ID_TABLE = "fedmr_item"  # FedNCF only: the ID input table E [I, d_id]
MODALITY_INDEX = {"id": 0, "text": 1, "image": 2}
# dropout sites (they key the masks; the oracle uses the same numbers)
SITE_MLP, SITE_GATE, SITE_ROUTER, SITE_ATTENTION = 1, 2, 5, 6  # gate of modality m: SITE_GATE + index
LN_EPS = 1e-5


def check_features(fusion, features, dataset: str | None = None) -> None:
    """ValueError unless the dataset has a feature matrix for every modality the fusion module
    reads (model.fusion.modalities besides id); fusion None (ID only) needs none. Checked on the
    driver before Ray starts, and again where the module is built."""
    if fusion is None:
        return
    needed = [m for m in fusion.modalities if m != "id"]
    missing = [m for m in needed if m not in features]
    if missing:
        have = ", ".join(sorted(features)) or "none"
        named = f"dataset {dataset!r}" if dataset else "the dataset"
        raise ValueError(f"model.fusion reads {' and '.join(needed)} features but {named} has "
                         f"{have}: set data.features to a feature store (python -m pipeline encode), or drop "
                         f"{' and '.join(missing)} from model.fusion.modalities, or set model.fusion: null (ID only)")



# --- parameters --------------------------------------------------------------------------------


def param_shapes(cfg, d_id: int, feature_dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every parameter of the module: name -> shape, in initialisation order.
    cfg: FusionConfig; feature_dims: modality -> d_m of the frozen features."""
    d_f, mods = cfg.d_f, cfg.modalities
    width = {"id": d_id, **feature_dims}
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, fan_in, fan_out):
        shapes[f"{PREFIX}{name}.weight"] = (fan_out, fan_in)
        shapes[f"{PREFIX}{name}.bias"] = (fan_out,)

    def norm(name, dim):
        if cfg.layer_norm:
            shapes[f"{PREFIX}{name}.weight"] = (dim,)
            shapes[f"{PREFIX}{name}.bias"] = (dim,)

    for m in mods:
        linear(f"proj.{m}", width[m], d_f)
        norm(f"ln.{m}", d_f)
    experts = ("sum", "mlp", "gate") if cfg.fusion == "moe" else (cfg.fusion,)
    if "mlp" in experts:
        linear("mlp.fc1", len(mods) * d_f, 2 * d_f)
        linear("mlp.fc2", 2 * d_f, d_f)
        norm("mlp.ln", d_f)
    if "gate" in experts:
        for m in mods:
            linear(f"gate.g.{m}", d_f, d_f)
        linear("gate.out", len(mods) * d_f, d_f)
        norm("gate.ln", d_f)
    if "attention" in experts:
        if cfg.attention_variant == "modality_tokens":
            for part in ("q", "k", "v", "o"):
                linear(f"attn.{part}", d_f, d_f)
        else:  # fedvlr: Linear, length-1 attention (value and output projections), Linear
            wide = len(mods) * d_f
            for part in ("pre", "v", "o"):
                linear(f"attn.{part}", wide, wide)
        linear("attn.out", len(mods) * d_f, d_f)
        norm("attn.ln", d_f)
    if cfg.fusion == "moe":
        linear("router.fc1", 3 * d_f, cfg.d_r)
        linear("router.fc2", cfg.d_r, 3)
    return shapes


def init_params(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Xavier-normal weights, zero biases, LayerNorm gain 1 (not N(0, 0.01) as in the reference) and bias 0, seeded."""
    params = {}
    for name, shape in shapes.items():
        if ".ln." in name or name.startswith(f"{PREFIX}ln."):
            params[name] = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        elif name.endswith(".weight"):
            params[name] = xavier(shape, generator)
        else:
            params[name] = torch.zeros(shape)
    return params


def param_names(cfg) -> tuple[str, ...]:
    """Parameter names (they do not depend on the input widths)."""
    return tuple(param_shapes(cfg, 1, {"text": 1, "image": 1}))


def is_router(name: str) -> bool:
    return name.startswith(f"{PREFIX}router.")


# --- forward ------------------------------------------------------------------------------------


def _norm(ctx, x: torch.Tensor, name: str, on: bool) -> torch.Tensor:
    """LayerNorm with the row's client's gain and bias (through ctx.affine where the context has
    one: client.PaddedRows applies them per bucket instead of broadcasting them to every row)."""
    if not on:
        return x
    normed = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    weight, bias = f"{PREFIX}{name}.weight", f"{PREFIX}{name}.bias"
    if hasattr(ctx, "affine"):
        return ctx.affine(normed, weight, bias)
    return broadcast_affine(ctx, normed, weight, bias)


def project(ctx, e: torch.Tensor | None, cfg) -> list[torch.Tensor]:
    """[h_m for m in modalities], each [F, d_f]."""
    out = []
    for m in cfg.modalities:
        x = ctx.linear(e, f"{PREFIX}proj.id") if m == "id" else ctx.feature_linear(m, f"{PREFIX}proj.{m}")
        out.append(_norm(ctx, x, f"ln.{m}", cfg.layer_norm))
    return out


def expert_sum(hs: list[torch.Tensor]) -> torch.Tensor:
    out = hs[0]
    for h in hs[1:]:
        out = out + h
    return out


def expert_mlp(ctx, hs: list[torch.Tensor], cfg) -> torch.Tensor:
    hidden = ctx.dropout(torch.relu(ctx.linear(torch.cat(hs, -1), f"{PREFIX}mlp.fc1")), SITE_MLP)
    return _norm(ctx, ctx.linear(hidden, f"{PREFIX}mlp.fc2"), "mlp.ln", cfg.layer_norm)


def expert_gate(ctx, hs: list[torch.Tensor], cfg) -> torch.Tensor:
    """The sigmoid gates are concatenated and projected; they do not multiply the features
    (the reference behaviour, kept on purpose)."""
    gates = [torch.sigmoid(ctx.dropout(ctx.linear(h, f"{PREFIX}gate.g.{m}"), SITE_GATE + MODALITY_INDEX[m]))
             for m, h in zip(cfg.modalities, hs)]
    return _norm(ctx, ctx.linear(torch.cat(gates, -1), f"{PREFIX}gate.out"), "gate.ln", cfg.layer_norm)


def expert_attention(ctx, hs: list[torch.Tensor], cfg) -> torch.Tensor:
    """modality_tokens: multi-head self-attention over the M tokens [h_m] of each item (dropout on
    the attention weights), output projection per token, then z = LN(W_o flatten + b_o).
    fedvlr: Linear(M d_f -> M d_f), attention over a length-1 sequence (its one weight is 1, so
    it is the value and output projections, dropout still acting on the weight per head), then
    Linear(M d_f -> d_f) + LN. Per item in both: no item sees another (the reference attends across a batch)."""
    rows, heads, d_f = len(hs[0]), cfg.attention_heads, cfg.d_f
    if cfg.attention_variant == "modality_tokens":
        m, dh = len(hs), d_f // heads

        def split(part):  # [F, H, M, dh]
            x = torch.stack([ctx.linear(h, f"{PREFIX}attn.{part}") for h in hs], 1)
            return x.view(rows, m, heads, dh).transpose(1, 2)

        q, k, v = split("q"), split("k"), split("v")
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1)  # [F, H, M, M]
        weights = ctx.dropout(weights, SITE_ATTENTION)
        out = (weights @ v).transpose(1, 2).reshape(rows, m, d_f)
        flat = torch.cat([ctx.linear(out[:, t], f"{PREFIX}attn.o") for t in range(m)], -1)
    else:
        x = ctx.linear(torch.cat(hs, -1), f"{PREFIX}attn.pre")
        v = ctx.linear(x, f"{PREFIX}attn.v")
        weight = ctx.dropout(v.new_ones(rows, heads), SITE_ATTENTION)  # softmax over one key = 1
        v = (v.view(rows, heads, -1) * weight[:, :, None]).view(rows, -1)
        flat = ctx.linear(v, f"{PREFIX}attn.o")
    return _norm(ctx, ctx.linear(flat, f"{PREFIX}attn.out"), "attn.ln", cfg.layer_norm)


def router(ctx, c: torch.Tensor) -> torch.Tensor:
    """c [S, 3 d_f] -> s [S, 3] in the simplex."""
    hidden = ctx.dropout(torch.relu(ctx.linear(c, f"{PREFIX}router.fc1")), SITE_ROUTER)
    return torch.softmax(ctx.linear(hidden, f"{PREFIX}router.fc2"), -1)


def experts(ctx, e: torch.Tensor | None, cfg) -> list[torch.Tensor]:
    """The expert outputs [F, d_f] the module mixes: [f1, f2, f3] (moe) or [the one expert]."""
    hs = project(ctx, e, cfg)
    if cfg.fusion == "moe":
        return [expert_sum(hs), expert_mlp(ctx, hs, cfg), expert_gate(ctx, hs, cfg)]
    one = {"sum": lambda: expert_sum(hs), "mlp": lambda: expert_mlp(ctx, hs, cfg),
           "gate": lambda: expert_gate(ctx, hs, cfg), "attention": lambda: expert_attention(ctx, hs, cfg)}
    return [one[cfg.fusion]()]


def mixing(rows, outputs: list[torch.Tensor], cfg, of_row: torch.Tensor | None = None) -> torch.Tensor:
    """alpha [n_segments, 3]: the router's outputs averaged over each segment's mixing rows
    S_u (history: its training positives; batch: the scored rows, with multiplicity).
    outputs: the experts at the rows of `rows`, or at shared item rows with `of_row` [F]."""
    weight = rows.history.to(outputs[0].dtype) if cfg.mixing_source == "history" else rows.count
    chosen = torch.nonzero(weight > 0).squeeze(1)
    c = torch.cat(outputs, -1)
    s = router(rows.ctx.subset(chosen), c.index_select(0, chosen if of_row is None else of_row[chosen]))
    segment, w = rows.segment[chosen], weight[chosen]
    total = torch.zeros(rows.n_segments, dtype=s.dtype, device=s.device).index_add_(0, segment, w)
    a = torch.zeros(rows.n_segments, 3, dtype=s.dtype, device=s.device).index_add_(0, segment, s * w[:, None])
    a = a / total.clamp(min=1e-12)[:, None]
    return torch.softmax(a, -1) if cfg.mixing_softmax == "double" else a


def fuse(rows, outputs: list[torch.Tensor], cfg, of_row: torch.Tensor | None = None) -> torch.Tensor:
    """z [F, d_f] for the FusionRows `rows` from the expert outputs at its rows (see `experts`),
    or at shared item rows with `of_row` [F] (evaluation, when they do not depend on the user)."""
    if cfg.fusion != "moe":
        return outputs[0] if of_row is None else outputs[0][of_row]
    alpha = mixing(rows, outputs, cfg, of_row).index_select(0, rows.segment)
    if of_row is not None:
        outputs = [f[of_row] for f in outputs]
    return alpha[:, 0:1] * outputs[0] + alpha[:, 1:2] * outputs[1] + alpha[:, 2:3] * outputs[2]


class GlobalItems:
    """A FusionContext over rows that are items, read with the global weights in evaluation
    mode (GFMFR's teacher on the server). items: [R] item of every row."""

    def __init__(self, params: dict[str, torch.Tensor], features: dict[str, torch.Tensor], items: torch.Tensor):
        self.params, self.features, self.items = params, features, items

    def vector(self, name: str) -> torch.Tensor:
        return self.params[name]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.params[f"{name}.weight"], self.params[f"{name}.bias"])

    def feature_linear(self, modality: str, name: str) -> torch.Tensor:
        return self.linear(self.features[modality], name).index_select(0, self.items)

    def dropout(self, x: torch.Tensor, site: int) -> torch.Tensor:
        return x

    def subset(self, index: torch.Tensor) -> "GlobalItems":
        return GlobalItems(self.params, self.features, self.items[index])


# --- composition with a backbone ----------------------------------------------------------------


class FedMR:
    """A backbone module with the fusion module plugged in: a method of its own, declaring what
    every method declares (pipeline.models.base.Method) as a transformation of its backbone's
    declaration, plus:

    FUSION: the FusionConfig.  MODALITIES: the frozen feature modalities it reads.
    UPLOAD_GRADS: global fusion parameters uploaded as last-batch gradients (grad_adam).
    Local/global is an explicit partition (not by name substrings): the router is personal dense (never
    uploaded) under router_scope=local, global dense otherwise; projections and experts are
    global dense.
    """

    def __init__(self, backbone, model_config):
        cfg = model_config.fusion
        self.backbone, self.FUSION = backbone, cfg
        self.additive = backbone.FUSION_PLUG == "additive"
        self.d_id = model_config.id_width()
        self.MODALITIES = tuple(m for m in cfg.modalities if m != "id")
        # whether e_i is the same for every user in evaluation (then so are the experts): it is unless
        # the backbone's item input reads a personal table (FedRAP's P_u) or a kept trained copy (PFedRec)
        kept = kept_copies(backbone, model_config)
        self.id_is_global = ("id" not in cfg.modalities or self.additive
                             or not (backbone.PERSONAL_TABLES or kept))
        self.id_from_base = not self.id_is_global and not kept  # FedRAP: P_u starts from a shared base
        names = param_names(cfg)
        local = tuple(n for n in names if is_router(n)) if cfg.router_scope == "local" else ()
        self.fusion_global = tuple(n for n in names if n not in local)
        self.fusion_local = local
        uses_table = self.additive and "id" in cfg.modalities
        self.GLOBAL_TABLES = (*backbone.GLOBAL_TABLES, *((ID_TABLE,) if uses_table else ()))
        self.GLOBAL_DENSE = (*backbone.GLOBAL_DENSE, *self.fusion_global)
        self.PERSONAL_DENSE = (*backbone.PERSONAL_DENSE, *local)
        self.PERSONAL_TABLES = backbone.PERSONAL_TABLES
        self.AGGREGATION = backbone.AGGREGATION
        self.LR_GROUPS = {**backbone.LR_GROUPS, **{name: "fusion" for name in names},
                          **({ID_TABLE: "item"} if uses_table else {})}
        self.UPLOAD_GRADS = self.fusion_global if cfg.fusion_agg == "grad_adam" else ()
        self.KEEP_TRAINED_COPY = backbone.KEEP_TRAINED_COPY
        self.TWO_STEP_GROUPS = ()
        if backbone.TWO_STEP_GROUPS:  # PFedRec: (a) head + fusion + router, (b) the ID table
            head, *rest = backbone.TWO_STEP_GROUPS
            self.TWO_STEP_GROUPS = ((*head, *names), *rest)
        self.row_regulariser = backbone.row_regulariser  # FedRAP's terms on the batch rows, unchanged
        # GFMFR: groups regress the ID table that feeds the module, are formed
        # from the personal head on z_i (FedNCF: its tower and head), and the teacher passes
        # z_{g,i} through the global module (fuse_teacher) before the backbone's teacher head
        self.GROUP_TABLE = ID_TABLE if self.additive else backbone.GROUP_TABLE
        self.GROUP_VECTOR = backbone.GROUP_VECTOR
        self.teacher_logits = backbone.teacher_logits

    def init(self, n_users: int, n_items: int, dim: int, generator: torch.Generator,
             feature_dims: dict[str, int], scheme: str = "xavier") -> InitialState:
        """The backbone's initial model (same draws as ID only), then: the personal head on z_i
        (Linear(d_f -> 1)) for linear-head backbones, FedNCF's table E, the module."""
        check_features(self.FUSION, feature_dims)
        state = self.backbone.init(n_users, n_items, dim, generator, scheme)
        if not self.additive:
            state.personal_shared.update(linear_head_init(self.FUSION.d_f, generator, scheme))
        elif ID_TABLE in self.GLOBAL_TABLES:
            state.global_params[ID_TABLE] = embedding((n_items, self.d_id), generator, scheme)
        params = init_params(param_shapes(self.FUSION, self.d_id, feature_dims), generator)
        state.global_params.update({n: params[n] for n in self.fusion_global})
        state.personal_shared.update({n: params[n] for n in self.fusion_local})
        return state

    def lr_scale(self, n_items: int, config) -> dict[str, float]:
        """The backbone's item lr rule for its tables; lr for the module, the head and E."""
        scale = dict(self.backbone.lr_scale(n_items, config))
        scale.update({name: 1.0 for name in (*self.fusion_global, *self.fusion_local)})
        if ID_TABLE in self.GLOBAL_TABLES:
            scale[ID_TABLE] = 1.0  # MM-FedNCF: one lr for everything
        return scale

    def id_input(self, ctx) -> torch.Tensor | None:
        if "id" not in self.FUSION.modalities:
            return None
        return ctx.table(ID_TABLE) if self.additive else self.backbone.item_input(ctx)

    def _experts(self, ctx) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The expert outputs for the rows of ctx: per row in training; in evaluation once per
        item where e_i does not depend on the user, and for FedRAP once per item from the shared
        base of P plus per row where the user's P has its own row (base + sparse rows)."""
        if not hasattr(ctx, "item_rows") or not (self.id_is_global or self.id_from_base):
            return experts(ctx, self.id_input(ctx), self.FUSION), None
        items, of_row = ctx.item_rows()
        shared = experts(items, self.id_input(items), self.FUSION)
        if self.id_is_global:
            return shared, of_row
        own = ctx.personal_rows()
        outputs = [f[of_row] for f in shared]
        if len(own):
            mine = ctx.subset(own)
            for f, g in zip(outputs, experts(mine, self.id_input(mine), self.FUSION)):
                f[own] = g
        return outputs, None

    def mixing_weights(self, ctx) -> torch.Tensor:
        """[n_segments, 3] alpha_u of the clients of ctx over their training positives (the
        history rows), whatever mixing_source says (GFMFR's upload)."""
        rows = ctx.fusion_rows(history=True)
        outputs, _ = self._experts(rows.ctx)
        return mixing(rows, outputs, self.FUSION.model_copy(update={"mixing_source": "history"}))

    def fuse_teacher(self, z: torch.Tensor, params: dict[str, torch.Tensor], features: dict[str, torch.Tensor],
                     alpha: torch.Tensor | None) -> torch.Tensor:
        """[G, N, d_f] MFFM_theta(z_{g,i}, t_i, v_i; alpha_g): the groups' ID inputs z [G, N, d_id]
        through the global module (params, evaluation mode), mixed with the groups' mean mixing
        weights alpha [G, 3] (moe) or the single expert's output."""
        n_groups, n_items = z.shape[:2]
        ctx = GlobalItems(params, features, torch.arange(n_items, device=z.device).repeat(n_groups))
        outputs = [f.view(n_groups, n_items, -1) for f in experts(ctx, z.reshape(n_groups * n_items, -1), self.FUSION)]
        if self.FUSION.fusion != "moe":
            return outputs[0]
        return sum(alpha[:, k, None, None] * f for k, f in enumerate(outputs))

    def logits(self, ctx) -> torch.Tensor:
        """[R] logits of the scored rows of ctx."""
        rows = ctx.fusion_rows(history=self.FUSION.fusion == "moe" and self.FUSION.mixing_source == "history")
        outputs, of_row = self._experts(rows.ctx)
        z = fuse(rows, outputs, self.FUSION, of_row)
        if rows.index is not None:
            z = z.index_select(0, rows.index)  # (index_select: a faster gather than [] on a CPU)
        if self.additive:
            return self.backbone.logits(ctx, extra=z)
        return self.backbone.score(ctx, z)
