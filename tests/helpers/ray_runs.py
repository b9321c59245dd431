"""Helpers for tests that drive the real Server actor (no test here)."""

from __future__ import annotations

from pathlib import Path

import ray
import torch


def rounds_with_a_restart(cfg, data, negatives, before: int) -> tuple[list[dict], dict]:
    """Run `before` rounds on a Server, kill it, resume a new one from the last checkpoint and
    run one more round. Returns (the before + 1 rounds' metrics, the resumed checkpoint's
    global.pt)."""
    refs = [ray.put(data), ray.put(negatives)]
    from pipeline.federated.runtime.server import Server

    server = Server.remote(cfg.model_dump_json(), refs, str(cfg.runtime.out))
    history = [ray.get(server.next_round.remote()) for _ in range(before)]
    ray.kill(server)
    checkpoint = Path(cfg.runtime.out) / "checkpoints" / f"round-{before - 1:06d}" / "global.pt"
    state = torch.load(checkpoint, weights_only=False)
    server = Server.remote(cfg.model_dump_json(), refs, str(cfg.runtime.out))
    assert ray.get(server.resume.remote()) == before
    history.append(ray.get(server.next_round.remote()))
    ray.kill(server)
    return history, state
