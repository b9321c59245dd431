"""Typed experiment configuration: YAML files in configs/, overridable from the command line.

Unknown keys and out-of-range values are refused with a message naming the key; every option
either takes effect or is refused. Presets (train.preset, docs/recipes.md) only
set defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data.datasets import DatasetConfig
from pipeline.paths import default_run_dir
from pipeline.strict import ConfigModel, validation_reasons

Backbone = Literal["fedavg", "fcf", "fedncf", "pfedrec", "fedrap"]

Preset = Literal["default", "fedmr_reference", "pfedrec_paper", "fedmf_paper", "fedncf_paper", "fedrap_paper"]
BACKBONES: tuple[str, ...] = get_args(Backbone)
# Each backbone module declares its training recipes (RECIPES: preset -> defaults under what a
# config file or --set gives) and the FedMR authors' learning rates for it (REFERENCE_LR,
# REFERENCE_LR_DECAY, REFERENCE_FEDMR_LR; pipeline/models/recipes.py, docs/recipes.md). The
# negative pool is not part of a preset: the originals' pool (train.neg_exclude_heldout=true) is an
# explicit, labelled choice.


ORIGINAL_NEGATIVES = "negatives exclude held-out items, as in the original code: optimistic"
SYMMETRIC_NEGATIVES = "negatives from every item but the training positives (held-out items can be drawn)"


def lr_value(value: float | str, n_items: int, key: str = "lr") -> float:
    """A learning rate given as a number or as 'K*n' (K times the number of items)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        factor, star, n = str(value).replace(" ", "").partition("*")
        try:
            if not star or n != "n":
                raise ValueError
            number = float(factor) * n_items
        except ValueError:
            raise ValueError(f"{key}={value!r}: expected a number or 'K*n' (K times the number of items)") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{key}={value!r}: a learning rate must be positive and finite")
    return number


def _merge_defaults(defaults: dict, given: dict) -> dict:
    """given over defaults, recursively (given wins)."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _merge_defaults(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


Modality = Literal["id", "text", "image"]
MODALITIES: tuple[str, ...] = ("id", "text", "image")


class FusionConfig(ConfigModel):
    """FedMR's Mixing Feature Fusion Module (docs/methods.md); `model.fusion: null` = ID only.

    Keys that only matter for some settings are refused where they would do nothing:
    router and mixing keys need fusion=moe, attention_variant needs fusion=attention,
    server_lr / server_clip need fusion_agg=grad_adam.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fusion: Literal["moe", "sum", "mlp", "gate", "attention"] = Field(
        "moe", description="moe mixes the Sum, MLP and Gate experts; any other value uses that one fusion")
    router_scope: Literal["local", "global"] = Field(
        "local", description="local: each user's router is persisted in its pool, never uploaded; "
                             "global: aggregated with the experts")
    fusion_agg: Literal["fedavg", "grad_adam"] = Field(
        "fedavg", description="fedavg: weight averaging with the backbone's weights; grad_adam: averaged "
                              "last-batch gradients + one server Adam step per round (reference)")
    mixing_source: Literal["history", "batch"] = Field(
        "history", description="mixing weights from the user's training positives (history) or from the "
                               "rows of the forward call (batch, reference reproduction)")
    mixing_softmax: Literal["single", "double"] = Field(
        "single", description="double: softmax again over the averaged router outputs (2024 code)")
    layer_norm: bool = Field(True, description="on/off: the projection and expert LayerNorms")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout of the experts, router and attention")
    attention_variant: Literal["modality_tokens", "fedvlr"] = Field(
        "modality_tokens", description="fusion=attention: attention over the modality tokens, or FedVLR's "
                                       "length-1 attention")
    attention_heads: int = Field(4, ge=1, description="fusion=attention: heads")
    d_id: int | None = Field(
        None, ge=1, description="width of the ID input e_i; None = model.dim (the backbone's ID table). "
                                "FedNCF: width of FedMR's own item table E (any value); other backbones "
                                "feed their item table, so it must equal model.dim")
    d_f: int = Field(64, ge=1, description="fusion width (FedNCF additive: must equal model.dim)")
    d_r: int = Field(64, ge=1, description="router hidden width (fusion=moe)")
    modalities: tuple[Modality, ...] = Field(
        MODALITIES, description="inputs of the module; drop one for ablations (id, text, image)")
    server_lr: float | None = Field(
        None, gt=0, description="grad_adam: server Adam lr; None = the base client lr (never decayed)")
    server_clip: float | None = Field(
        None, gt=0, description="grad_adam: clip the averaged gradient to this global norm; None = off")

    @model_validator(mode="after")
    def _checks(self):
        # keys set to something other than their default (a dumped config repeats every default)
        given = {key for key in self.model_fields_set
                 if getattr(self, key) != type(self).model_fields[key].default}
        if not self.modalities:
            raise ValueError("fusion.modalities: at least one of id, text, image")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"fusion.modalities={list(self.modalities)}: repeated modality")
        object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in self.modalities))
        if self.fusion != "moe":
            for key in ("router_scope", "mixing_source", "mixing_softmax", "d_r"):
                if key in given:
                    raise ValueError(f"fusion.{key} has no effect with fusion={self.fusion} (no router, no "
                                     f"mixing): remove it or use fusion=moe")
        if self.fusion == "sum" and self.dropout > 0 and "dropout" in given:  # default 0.1 tolerated
            raise ValueError("fusion.dropout has no effect with fusion=sum (no parameters after the "
                             "projections): remove it")
        if self.fusion != "attention":
            for key in ("attention_variant", "attention_heads"):
                if key in given:
                    raise ValueError(f"fusion.{key} only applies to fusion=attention")
        else:
            width = self.d_f if self.attention_variant == "modality_tokens" else self.d_f * len(self.modalities)
            if width % self.attention_heads:
                raise ValueError(f"fusion.attention_heads={self.attention_heads} must divide the attention "
                                 f"width {width}")
        if self.fusion_agg != "grad_adam":
            for key in ("server_lr", "server_clip"):
                if key in given:
                    raise ValueError(f"fusion.{key} only applies to fusion_agg=grad_adam")
        return self


class GfmfrConfig(ConfigModel):
    """GFMFR's group-wise fusion with preference distillation (docs/methods.md);
    `model.gfmfr: null` = off. The server groups each round's participants, regresses every
    group's mean item table from content, and the clients distil the group's teacher scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_num: int = Field(5, ge=1, description="G, the number of groups")
    group_method: Literal["spectral", "kmeans", "planted"] = Field(
        "spectral", description="spectral: RBF affinity with the median-heuristic gamma; kmeans; planted: the "
                                "synthetic generator's taste groups, not the uploads (a diagnostic: GFMFR with "
                                "the right groups; synthetic data only, group_num = its n_groups)")
    use_pca: bool = Field(False, description="PCA keeping 95% of the variance before clustering (one default: "
                                             "off)")
    group_fusion: Literal["mlp", "sum"] = Field("mlp", description="Fuse of the server's group fusion model")
    group_emb_dim: int = Field(512, ge=1, description="D_g, width of the learned group embeddings")
    server_epochs: int = Field(50, ge=1, description="epochs of the group fusion model per round")
    server_lr: float = Field(0.01, gt=0, description="its SGD lr (never decayed)")
    server_weight_decay: float = Field(1e-4, ge=0, description="its SGD weight decay")
    server_batch: int = Field(256, ge=1, description="its (group, item) pairs per batch")
    server_tol: float | None = Field(
        None, ge=0, description="early stop of the group fusion model: end a round's epochs after the first "
                                "that lowers its mean loss by at most this fraction of the previous epoch's; "
                                "null (default) = always server_epochs (docs/methods.md: cost and effect)")
    server_target_scale: Literal["none", "rms"] = Field(
        "none", description="none (default, GFMFR's recipe): the group fusion model regresses the group "
                            "targets as they are; rms: it regresses them divided by their root mean square "
                            "over the non-empty groups (one number per round) and its tables are scaled back, "
                            "so its SGD at server_lr fits large item tables as it fits small ones (FedRAP's "
                            "under the default recipe reach an RMS near 100, where the unscaled fit diverges; "
                            "docs/methods.md)")
    regroup_every: int = Field(
        1, ge=1, description="k: cluster the participants in rounds 0, k, 2k, ... only (1, the default = every "
                             "round). In the rounds between, a participant grouped before keeps its latest group "
                             "id and one never grouped joins the nearest group centroid (Euclidean, in that "
                             "round's standardised grouping vectors, over the participants grouped before; the "
                             "round clusters as usual when none of them is). Saves the spectral clustering; "
                             "its measured effect on quality: docs/methods.md. Equivalence with the reference "
                             "(reference/oracle.py) is pinned at the default")
    kd_schedule: Literal["cosine", "linear_increase", "exponential_increase", "constant"] = Field(
        "cosine", description="a(t) of the distillation weight kappa = rho * a(t)")
    ema_scope: Literal["client", "shared_round"] = Field(
        "client", description="rho: each client's own loss-ratio EMA (persisted), or one value per round "
                              "(clients start from the mean of the previous round's final values); the "
                              "reference's sequential shared EMA is not parallel and is refused")
    rho_max: float | None = Field(
        1.0, gt=0, description="project default: cap the loss-ratio EMA rho, so kappa <= rho_max * a(t); null "
                               "= uncapped (only rho >= 0). kappa * L_KD matches L_BCE in value, so uncapped its "
                               "gradient grows as student and teacher agree and runs diverge (README, GFMFR)")
    group_membership: Literal["last_round", "last_known"] = Field(
        "last_round", description="who distils in round t: last_round = only participants of round t-1 "
                                  "(reference); last_known = anyone ever grouped, with its latest id")


class ModelConfig(ConfigModel):
    """The backbone and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Backbone = "fedavg"
    dim: int = Field(64, ge=4, description="ID embedding size d (FedNCF needs a multiple of 4)")
    pfedrec_update: Literal["two_step", "joint"] = "two_step"
    pfedrec_eta: float = Field(1.0, gt=0, description="PFedRec item lr = lr * n * eta")
    pfedrec_eval_table: Literal["personal", "global"] = "personal"
    fedrap_lambda: float = Field(0.1, ge=0, description="base weight of -MSE(P, C)")
    fedrap_mu: float = Field(0.1, ge=0, description="base weight of the regulariser R(C)")
    fedrap_reg: Literal["l1", "l2"] = "l1"
    fedrap_schedule: Literal["ramp", "constant"] = Field(
        "ramp", description="lambda_t, mu_t: ramp = tanh(t / 10) * base (the FedRAP paper); constant = base "
                            "every round (what the FedRAP code's loss reads)")
    init: Literal["xavier", "torch"] = Field(
        "xavier", description="initialisation: xavier = Xavier-normal tables and weights, zero biases (FedMR "
                              "code); torch = PyTorch's defaults as the PFedRec and FedRAP code use them: "
                              "embedding tables N(0, 1), Linear weights and biases U(-1/sqrt(fan_in), "
                              "1/sqrt(fan_in))")
    fusion: FusionConfig | None = Field(None, description="FedMR fusion module; null = ID only")
    gfmfr: GfmfrConfig | None = Field(None, description="GFMFR group-wise fusion and distillation; null = off")

    @model_validator(mode="after")
    def _ncf_dim(self):
        if self.backbone == "fedncf" and self.dim % 4:
            raise ValueError(f"dim={self.dim}: FedNCF's tower halves twice, dim must be a multiple of 4")
        fusion = self.fusion
        if fusion is not None:
            if self.backbone == "fedncf":
                if fusion.d_f != self.dim:
                    raise ValueError(f"fusion.d_f={fusion.d_f}: FedNCF's additive FedMR adds z_i to the item "
                                     f"embeddings, so d_f must equal model.dim={self.dim}")
            elif fusion.d_id is not None and fusion.d_id != self.dim:
                raise ValueError(f"fusion.d_id={fusion.d_id}: {self.backbone} feeds its item table (width "
                                 f"model.dim={self.dim}) to FedMR; set model.dim instead")
            if "id" not in fusion.modalities and self.backbone == "fedncf" and fusion.d_id is not None:
                raise ValueError("fusion.d_id has no effect when fusion.modalities drops id")
            if self.gfmfr is not None and "id" not in fusion.modalities:
                raise ValueError("gfmfr with fusion.modalities without id: GFMFR's teacher feeds its group "
                                 "embedding z into the module's ID input; keep id")
        return self

    def id_width(self) -> int:
        """d_id: the width of the ID input of the fusion module."""
        return self.fusion.d_id if self.fusion is not None and self.fusion.d_id is not None else self.dim


class TrainConfig(ConfigModel):
    """Local training, sampling, schedule and selection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Preset | None = Field(
        None, description="a training recipe as defaults (each backbone module's RECIPES): default = the project's recipe per "
                          "backbone (the configs of configs/ name it), or an original's; every key can still be "
                          "overridden. None = the FedMR authors' settings (= fedmr_reference)")
    rounds: int = Field(100, ge=1)
    participation: float = Field(1.0, gt=0, le=1)
    local_epochs: int = Field(5, ge=1)
    tol: float = Field(1e-4, ge=0, description="per-client early stop on relative epoch-loss change")
    batch_size: int = Field(2048, ge=1, description="positives per mini-batch")
    batch_rows: int | None = Field(None, ge=1, description="rows per mini-batch; overrides batch_size")
    neg_ratio: int = Field(1, ge=1)
    neg_pool: Literal["all", "train_items"] = "all"
    neg_exclude_heldout: bool = Field(
        False, description="the originals' negative pool: a user's validation and test items are never "
                           "drawn as its training negatives (optimistic: the 99 evaluation negatives are)")
    neg_draw: Literal["epoch", "round"] = Field(
        "epoch", description="training negatives drawn afresh every local epoch, or once per round and "
                             "reused (reshuffled) by every epoch of that round (the PFedRec/FedRAP code)")
    lr: float | None = Field(None, gt=0, description="client lr; None = the backbone's default")
    lr_groups: dict[str, float | str] = Field(
        default_factory=dict, description="lr per parameter group (head, item, item_global, item_personal, "
                                          "user, network, fusion; the backbone says which it has): a number, "
                                          "or 'K*n' for K times the number of items. Replaces lr and the "
                                          "backbone's item rule for that group; decays are still applied")
    lr_decay: float | None = Field(None, gt=0, le=1, description="per-round lr factor; None = backbone default")
    lr_batch_decay: float = Field(1.0, gt=0, le=1, description="per-mini-batch lr factor inside a client's round "
                                                              "(the k-th step of a round uses lr * factor^k; "
                                                              "FedRAP code: 0.95)")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay on every client parameter (every row "
                                                        "of every item table, as the dense optimiser does)")
    seed: int = Field(0, ge=0, description="run seed: sampling, negatives, shuffling")
    model_seed: int = Field(0, ge=0, description="initialisation seed")
    protocol: Literal["p1", "p3"] = "p3"
    also_protocols: tuple[Literal["p1", "p3"], ...] = Field(
        (), description="protocols evaluated besides `protocol` after every evaluated round, on every user, "
                        "recorded as <p>/valid/<m> and <p>/test/<m>; selection and early stopping read "
                        "`protocol` alone, and summary.json's `also` reports, per protocol, the round a run "
                        "under it would select (its own selection metric, the same rule and patience): one "
                        "run gives the rows of several protocols (docs/protocols.md)")
    selection_metric: str | None = Field(None, description="validation metric; default hr@10 (P1), hr@50 (P3)")
    patience: int = Field(20, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate after rounds 0, k, 2k, ... (k = eval_every; round 0 "
                                                 "only with eval_round0)")
    eval_round0: bool = Field(True, description="evaluate after round 0 (false: the first evaluation is after "
                                                "round eval_every)")
    eval_users: int | float | None = Field(
        None, description="users of a scheduled evaluation: None = every user; a count >= 1 or a fraction in "
                          "(0, 1] = a fixed sample drawn once from eval_seed (the same users every round). "
                          "Selection and early stopping read the sample's validation metric; a round that "
                          "improves it, and the last round, are evaluated again on every user, and the "
                          "summary reports those (docs/methods.md, evaluation schedules)")
    eval_seed: int = Field(0, ge=0, description="seed of the eval_users sample (independent of train.seed, so "
                                                "runs of every seed are evaluated on the same users)")
    eval_ks: tuple[int, ...] = (10, 20, 50)
    dropout: float = Field(0.0, ge=0, lt=1, description="probability that a sampled client drops out of a round "
                                                         "(its upload never arrives; it keeps its state)")
    deadline: float | None = Field(None, gt=0, description="round deadline as a multiple of the round's median "
                                                           "simulated client time: slower clients are stragglers, "
                                                           "dropped like dropouts (None: no deadline)")
    speed_spread: float = Field(0.5, ge=0, description="sigma of a client's log device speed, drawn per round; "
                                                       "simulated time = training rows x local epochs / speed")

    @field_validator("eval_users", mode="before")
    @classmethod
    def _eval_users_number(cls, value):
        """One clear line for a value that is no number (pydantic would report the int and the
        float reading apart); 1 is one user, 1.0 every user."""
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    return float(value)
                except ValueError:
                    pass
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"expected a count >= 1, a fraction in (0, 1], or null for every user (got {value!r})")
        return value

    @model_validator(mode="after")
    def _checks(self):
        for group, value in self.lr_groups.items():
            lr_value(value, 1, f"train.lr_groups.{group}")  # raises on a malformed value
        if not self.eval_ks or any(k < 1 for k in self.eval_ks):
            raise ValueError(f"train.eval_ks={list(self.eval_ks)}: expected one or more cut-offs K >= 1")
        if isinstance(self.eval_users, float) and not 0 < self.eval_users <= 1:
            raise ValueError(f"train.eval_users={self.eval_users}: a fraction must be in (0, 1]; give a whole "
                             f"number for a count of users, or null for every user")
        if isinstance(self.eval_users, int) and self.eval_users < 1:
            raise ValueError(f"train.eval_users={self.eval_users}: expected a count >= 1, a fraction in (0, 1], "
                             f"or null for every user")
        if self.protocol in self.also_protocols or len(set(self.also_protocols)) != len(self.also_protocols):
            raise ValueError(f"train.also_protocols={list(self.also_protocols)}: name each protocol once, and not "
                             f"train.protocol ({self.protocol}), which is evaluated anyway")
        if self.also_protocols and self.eval_users is not None:
            raise ValueError(f"train.also_protocols with train.eval_users={self.eval_users}: other protocols are "
                             f"evaluated on every user only; set train.eval_users=null or drop train.also_protocols")
        metric = self.selection()  # the default too: it is read from the validation metrics every round
        name, _, k = metric.partition("@")
        if name not in ("hr", "ndcg", "mrr") or not k.isdigit() or int(k) not in self.eval_ks:
            ks = ", ".join(map(str, self.eval_ks))
            if self.selection_metric is None:
                raise ValueError(f"train.eval_ks=[{ks}] lacks {k}, the K of the default selection metric {metric} "
                                 f"(protocol {self.protocol}): add {k} to train.eval_ks or set "
                                 f"train.selection_metric to hr@K, ndcg@K or mrr@K with K in [{ks}]")
            raise ValueError(f"train.selection_metric={metric!r}: expected hr@K, ndcg@K or mrr@K with K in "
                             f"train.eval_ks=[{ks}]")
        return self

    def negatives_label(self) -> str:
        """How the training negatives were drawn, as every table, report and summary states it."""
        if self.neg_exclude_heldout:
            return ORIGINAL_NEGATIVES
        return SYMMETRIC_NEGATIVES

    def rows_per_batch(self) -> int:
        return self.batch_rows or self.batch_size * (1 + self.neg_ratio)

    def selection(self, protocol: str | None = None) -> str:
        """The validation metric that selects a run under `protocol` (default train.protocol)."""
        return self.selection_metric or ("hr@10" if (protocol or self.protocol) == "p1" else "hr@50")


class PrivacyConfig(ConfigModel):
    """Client-level differential privacy on the aggregate (DP-FedAvg): every client's update is
    clipped to L2 norm `clip`, the server adds N(0, (noise_multiplier * clip)^2) to every
    coordinate of the sum, and (epsilon, delta) is tracked with Opacus' RDP accountant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(..., gt=0, description="L2 norm bound of one client's update (all its uploads together)")
    noise_multiplier: float = Field(..., ge=0, description="noise std / clip (0: clipping only, epsilon infinite)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta)")


class RuntimeConfig(ConfigModel):
    """Where and how the run executes; none of it changes the numbers, but precision=bf16 (which rounds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["ray", "local"] = Field(
        "ray", description="what runs the rounds: ray = a Server actor and ClientPool actors on a local Ray "
                           "instance or the cluster named; local = the same round loop, server and pools in "
                           "the command's own process (no Ray: no start-up or call costs, one process's "
                           "CPUs; for small datasets and short runs; `pools` pools, default 1, of "
                           "cpus_per_pool torch threads, default 1)")
    pools: int | None = Field(None, ge=1, description="ClientPool actors; None = one per GPU on a cluster with "
                                                       "GPUs (ID backbones, or any model with device=cuda), else one "
                                                       "per cpus_per_pool CPUs")
    cpus_per_pool: float | None = Field(None, gt=0, description="None = 1, or an equal share of the CPUs when "
                                                                "pools hold GPUs")
    gpus_per_pool: float | None = Field(None, ge=0, description="None = an equal share of the cluster's GPUs "
                                                                "(0 without GPUs, and with a fusion module unless "
                                                                "device=cuda)")
    server_gpus: float = Field(0.0, ge=0, description="GPUs (a share below 1) the Server actor holds on the "
                                                  "driver's node so that GFMFR's group fusion model trains "
                                                  "there; the pools share the cluster's other GPUs. 0: the "
                                                  "server computes on the CPU. Needs model.gfmfr and "
                                                  "runtime.backend=ray (the local backend's server uses the "
                                                  "process's own device)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where pools run local training: auto = cuda when the pool holds a GPU, else "
                            "cpu (cpu also keeps pools off GPUs); cuda without a visible GPU is an error")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="arithmetic of local training's forward pass: fp32 (the default, exact as before) or "
                            "bf16 (mixed precision: matrix products in bfloat16 under torch.autocast on the "
                            "pool's device, parameters and their SGD updates kept in float32, the losses and "
                            "their per-client reductions in float32; evaluation scoring stays float32). Not a "
                            "default anywhere (docs/methods.md, How it runs); needs float32 pools")
    block_rows: int | None = Field(1 << 15, ge=1, description="rows of one local epoch per block of clients "
                                                              "trained together on a CPU (None: all at once; "
                                                              "a GPU always trains all at once)")
    train_block_clients: int | None = Field(
        1024, ge=1, description="clients a pool trains at once in a round: each block builds its rows, working "
                                "sets and per-client weight copies, trains and adds its share of the upload "
                                "before the next, so memory follows this number, not the clients sampled "
                                "(with FedMR about 0.6 MB per client at text width 384); None: all at once")
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints (0 = never)")
    keep_best: bool = Field(True, description="also keep the state of the best validation round "
                                              "(checkpoints/best: what recommend and export use)")
    out: Path = Field(default_factory=lambda: default_run_dir("train"),
                      description="run directory (default: the runs root's train/, pipeline/paths.py)")
    progress: bool = True
    tensorboard: bool = True


class CentralizedConfig(ConfigModel):
    """The centralized upper bound (pipeline/centralized/): the same model trained on pooled data
    with Ray Train. Negatives (neg_ratio, neg_pool, neg_exclude_heldout), seeds, protocol,
    selection metric and eval_ks come from `train`; these keys are its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(50, ge=1, description="epochs cap (one epoch = every user's positives once, fresh negatives)")
    batch_size: int = Field(1024, ge=1, description="positives per global mini-batch (rows: x (1 + neg_ratio)), "
                            "split evenly over the workers")
    lr: float = Field(1e-3, gt=0, description="Adam lr (dense globals) and SparseAdam lr (per-user tables)")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay of the dense globals")
    patience: int = Field(10, ge=0, description="epochs without a strictly better validation metric before stopping")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel: gradients all-reduced over "
                         "Ray Train's process group, gloo on CPU, NCCL on GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    checkpoint_every: int = Field(5, ge=1, description="epochs between Ray Train checkpoints (the last epoch always)")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter dtype (float64: N workers match "
                                                 "1 worker to ~1e-12; float32 drifts apart at Adam's float noise)")


class ExperimentConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "experiment"
    data: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig | None = Field(None, description="client-level differential privacy (None: off)")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    centralized: CentralizedConfig = Field(default_factory=CentralizedConfig,
                                           description="the centralized upper bound (pipeline centralized)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, tree):
        """train.preset's defaults under the keys given."""
        if not isinstance(tree, dict) or not isinstance(tree.get("train"), dict):
            return tree
        name = tree["train"].get("preset")
        if name is None or name not in get_args(Preset):
            return tree  # (an unknown name is refused by the field's type)
        backbone = (tree.get("model") or {}).get("backbone", "fedavg")
        if backbone not in BACKBONES:
            return tree  # (refused by model.backbone's type)
        recipes = backbone_module(backbone).RECIPES
        if name not in recipes:
            raise ValueError(f"train.preset={name} is the recipe of {', '.join(preset_backbones(name))}, not of "
                             f"model.backbone={backbone}")
        return _merge_defaults(recipes[name], tree)

    @model_validator(mode="after")
    def _step_schedule(self):
        train = self.train
        used = [key for key, on in (("train.weight_decay", train.weight_decay > 0),
                                    ("train.lr_batch_decay", train.lr_batch_decay != 1.0)) if on]
        if not used:
            return self
        for part, present in (("model.fusion", self.model.fusion is not None),
                              ("model.gfmfr", self.model.gfmfr is not None), ("privacy", self.privacy is not None)):
            if present:
                raise ValueError(f"{' and '.join(used)} with {part}: implemented for the ID backbones' local "
                                 f"training only; remove {part} or set "
                                 f"{' and '.join(k + ('=0' if 'weight' in k else '=1') for k in used)}")
        return self

    @model_validator(mode="after")
    def _lr_groups(self):
        known = set(model_lr_groups(self.model).values())
        unknown = sorted(set(self.train.lr_groups) - known)
        if unknown:
            raise ValueError(f"train.lr_groups: {unknown} not a parameter group of {self.model.backbone}"
                             f"{' + FedMR' if self.model.fusion else ''} (groups: {sorted(known)})")
        return self

    @model_validator(mode="after")
    def _planted_groups(self):
        gfmfr = self.model.gfmfr
        if gfmfr is None or gfmfr.group_method != "planted":
            return self
        if not self.data.generated:
            raise ValueError("model.gfmfr.group_method=planted needs the synthetic generator (data.name: synthetic, "
                             f"no data.path): dataset {self.data.name!r} has no planted taste groups")
        from pipeline.data.synthetic import SyntheticConfig

        planted = SyntheticConfig(**self.data.synthetic).n_groups
        if gfmfr.group_num != planted:
            raise ValueError(f"model.gfmfr.group_method=planted: group_num is {gfmfr.group_num} but the generator "
                             f"plants {planted} groups (data.synthetic.n_groups)")
        return self

    @model_validator(mode="after")
    def _server_gpus(self):
        runtime = self.runtime
        if runtime.server_gpus == 0:
            return self
        why = ("model.gfmfr is not set (only GFMFR's server trains a model)" if self.model.gfmfr is None else
               "runtime.backend=local (its server uses the process's own device)" if runtime.backend == "local" else
               "runtime.device=cpu keeps the server on the CPU" if runtime.device == "cpu" else None)
        if why:
            raise ValueError(f"runtime.server_gpus={runtime.server_gpus} would do nothing: {why}; set it to 0")
        return self

    @model_validator(mode="after")
    def _privacy_scope(self):
        if self.privacy is None:
            return self
        if self.model.gfmfr is not None:
            raise ValueError("privacy with model.gfmfr: GFMFR uploads each client's grouping vector and per-group "
                             "table sums, which noise on the aggregate cannot protect; client-level DP covers the "
                             "backbone's and FedMR's aggregated uploads only (see README, Privacy)")
        return self

    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        module = backbone_module(self.model.backbone)
        return module.REFERENCE_LR if self.model.fusion is None else module.REFERENCE_FEDMR_LR

    def lr_decay(self) -> float:
        if self.train.lr_decay is not None:
            return self.train.lr_decay
        return backbone_module(self.model.backbone).REFERENCE_LR_DECAY


def backbone_module(name: str):
    """The module declaring backbone `name` (imported on first use: it imports torch)."""
    from pipeline.models import backbone

    return backbone(name)


def preset_backbones(preset: str) -> list[str]:
    """The backbones that declare a recipe for `preset`."""
    return [name for name in BACKBONES if preset in backbone_module(name).RECIPES]


def model_lr_groups(model_config: ModelConfig) -> dict[str, str]:
    """parameter name -> its lr group, for a model config."""
    from pipeline.models import model_for

    return model_for(model_config).LR_GROUPS


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for dotted='a.b' (creating levels)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


class ConfigError(ValueError):
    """A config that cannot run, in one line: the file (or --set override), the key and the reason."""


def yaml_error(source, error: yaml.YAMLError, *, one_line: bool = False) -> str:
    """`source:line:column: the parser's reason` of a YAML syntax error (one_line: a --set value,
    `source: ... (column C)`)."""
    mark = getattr(error, "problem_mark", None)
    reason = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    reason += f" ({context})" if context else ""
    if mark is None:
        return f"{source}: not valid YAML: {reason}"
    if one_line:
        return f"{source}: not a YAML value: {reason} (column {mark.column + 1})"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {reason}"


def read_yaml(path) -> object:
    """A YAML file's document; ConfigError (file:line:column and the reason) when it does not parse."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ConfigError(yaml_error(path, error)) from None


def describe_validation(error: ValidationError, path=None, overrides: dict[str, str] | None = None) -> str:
    """One line per ValidationError, joined by '; ': where the value came from (the --set override
    or the file), its dotted key, the reason and the value given."""
    overrides = overrides or {}
    parts = []
    for key, reason in validation_reasons(error):
        given = [k for k in overrides if k == key or k.startswith(key + ".") or key.startswith(k + ".")] if key \
            else []
        source = (f"--set {given[0]}={overrides[given[0]]}" if len(given) == 1 else
                  str(path) if path is not None else "--set " + " ".join(f"{k}={v}" for k, v in overrides.items())
                  if overrides else "the config")
        named = not key or reason.startswith(key + ".")  # a model's own check names its keys in full
        parts.append(f"{source}: {'' if named else key + ': '}{reason}")
    return "; ".join(parts)


def load_config(path: Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """YAML file (optional) plus `key.sub=value` overrides (values parsed as YAML scalars).
    Raises ConfigError, one line naming the file or override, the key and the reason."""
    tree: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping at top level")
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.rounds=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(yaml_error(f"--set {item}", error, one_line=True)) from None
        given[key.strip()] = raw
        try:
            set_dotted(tree, key.strip(), value)
        except (AttributeError, TypeError):
            raise ConfigError(f"--set {item}: {key.strip()} lies under a key that holds a value, not a section") \
                from None
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_validation(error, path, given)) from None
