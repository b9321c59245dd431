"""What the backbones' training recipes (train.preset) are built of. Each backbone module
declares its own recipes (RECIPES: preset -> defaults under what a config gives) and the FedMR
authors' learning rates for it (REFERENCE_*); this module holds the parts several share. Plain
data, no torch: docs/recipes.md says where each value comes from."""

from __future__ import annotations


def merged(base: dict, extra: dict) -> dict:
    """base with extra's keys set, section by section (one level deep, as the recipes nest)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return out


# the originals' model: latent 32, PyTorch's default initialisation, leave-one-out ties to the first
TORCH_32 = {"model": {"dim": 32, "init": "torch"}, "data": {"protocol": {"tie_rule": "first"}}}
# the PFedRec paper's loop (Zhangcx19/IJCAI-23-PFedRec): 1 epoch of 256-row batches, 4 negatives
# drawn once per round, SGD at lr 0.1, no decay
PAPER_LOOP = {"local_epochs": 1, "batch_rows": 256, "neg_ratio": 4, "neg_draw": "round", "lr": 0.1,
              "lr_decay": 1.0, "patience": 100}
# the PFedRec paper's FedMF baseline (no code was published; its stated setting): the paper's loop
# with the item table at 0.1 x n x 80
FEDMF_PAPER = merged(TORCH_32, {"train": {**PAPER_LOOP, "lr_groups": {"item": "8*n"}}})
