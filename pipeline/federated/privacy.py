"""Client-level differential privacy on the aggregate (DP-FedAvg, McMahan et al. 2018).

Pure functions (no Ray). A client's update is everything it uploads for the global model, as
one vector: its changes to the global item tables' rows it touched, to the global dense weights
(FedNCF's tower, FedMR's fusion module), or FedMR's last-batch gradients (fusion_agg grad_adam).
Each client scales that vector to L2 norm at most C (clip_factors); the server adds Gaussian
noise of std sigma * C to every coordinate of the sum of every uploaded parameter, all rows of
the item tables included (which items a client touched is private too), and divides by the
number of clients that arrived (aggregation is uniform under DP: a row-weighted mean would let
one client's weight grow without bound). The privacy loss is tracked by Opacus' RDP accountant
(epsilon_after): sampling rate q = train.participation, one step per round (the analysis
assumes Poisson sampling; rounds sample a fixed number of clients uniformly without
replacement, the usual approximation of DP-FedAvg).

What the server sees is the noisy sum only if the pools are trusted aggregators (in a
deployment: secure aggregation); GFMFR's per-client grouping vectors and per-group sums are
not covered, so config refuses privacy with GFMFR.
"""

from __future__ import annotations

import numpy as np
import torch

_NOISE_TAG = 0xD1FF


def clip_factors(squared_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """[B] min(1, C / ||u_c||) from the clients' squared update norms [B] (1 for a zero update)."""
    norms = squared_norms.sqrt()
    return torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))


def noise_names(model) -> dict[str, tuple[str, ...]]:
    """Which global parameters a client's update touches, by how they are uploaded."""
    grads = tuple(model.UPLOAD_GRADS)
    return {"tables": tuple(model.GLOBAL_TABLES),
            "dense": tuple(name for name in model.GLOBAL_DENSE if name not in grads),
            "grads": grads}


def gaussian_noise(shapes: dict[str, tuple[int, ...]], std: float, seed: int, round_: int,
                   dtype=torch.float32) -> dict[str, torch.Tensor]:
    """name -> N(0, std^2) noise of that shape: a pure function of (seed, round), drawn in
    float64 in sorted name order (the engine and the oracle add the same noise)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_, _NOISE_TAG])
                                                  .generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return {name: (torch.randn(shapes[name], generator=generator, dtype=torch.float64) * std).to(dtype)
            for name in sorted(shapes)}


def privatize(uploads: list, global_params: dict[str, torch.Tensor], model, privacy, seed: int, round_: int):
    """One Upload: the pools' sums of clipped updates plus the server's noise on every
    coordinate of every uploaded parameter; weight = clients that arrived."""
    from pipeline.federated.messages import Upload

    names = noise_names(model)
    covered = (*names["tables"], *names["dense"], *names["grads"])
    noise = gaussian_noise({name: tuple(global_params[name].shape) for name in covered},
                           privacy.noise_multiplier * privacy.clip, seed, round_, global_params[covered[0]].dtype)
    out = Upload(clients=sum(u.clients for u in uploads), rows=sum(u.rows for u in uploads),
                 loss_sum=sum(u.loss_sum for u in uploads), seconds=max((u.seconds for u in uploads), default=0.0))
    out.weight = float(out.clients)
    if out.clients == 0:
        return out
    for name in names["tables"]:
        total = noise[name].clone()
        for upload in uploads:
            if name in upload.table_items:
                total.index_add_(0, upload.table_items[name], upload.table_sums[name].to(total.dtype))
        out.table_items[name] = torch.arange(len(total))
        out.table_sums[name] = total
    for kind, field in (("dense", "dense_sums"), ("grads", "grad_sums")):
        for name in names[kind]:
            total = noise[name].clone()
            for upload in uploads:
                if name in getattr(upload, field):
                    total += getattr(upload, field)[name].to(total.dtype)
            getattr(out, field)[name] = total
    return out


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """epsilon of (epsilon, delta)-DP after `rounds` rounds of the subsampled Gaussian mechanism
    (Opacus' RDP accountant); inf without noise, 0 before any round."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(accountant.get_epsilon(delta=delta))


def privacy_report(privacy, sample_rate: float, rounds: int) -> dict:
    """The (epsilon, delta) guarantee after `rounds` rounds, with what it rests on."""
    return {"epsilon": epsilon_after(rounds, privacy.noise_multiplier, sample_rate, privacy.delta),
            "delta": privacy.delta, "clip": privacy.clip, "noise_multiplier": privacy.noise_multiplier,
            "rounds": rounds, "sample_rate": sample_rate, "accountant": "opacus RDPAccountant"}
