"""A tiny randomly initialised CLIP, built from a config, for tests (no files, no network).

Both towers are a real transformers ``CLIPModel``, so tests exercise the same tower code as a
pretrained CLIP; only the weights (seeded random init) and the tokenizer (UTF-8 bytes) differ.

- text:  [B] texts -> bytes (at most 62) between BOS and EOS -> [B, 16]
- image: uint8 [B, 32, 32, 3] -> 8x8 patches -> [B, 16]
"""

from __future__ import annotations

import torch

from pipeline.encode.hf import ClipImageEncoder, ClipTextEncoder

SEED = 0
SIZE = 32
MAX_TOKENS = 64
PAD, BOS, EOS, OFFSET = 0, 1, 259, 3  # byte b -> id b + 3; EOS is the largest id
VOCAB = 260
MODEL_ID = f"tiny-clip (random init, seed {SEED})"


def tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build_tiny_clip(seed: int = SEED):
    """The CLIPModel with weights drawn from `seed` (same weights in every process)."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return CLIPModel(tiny_clip_config())


def byte_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """[B] texts -> input_ids, attention_mask [B, T] (T <= 64): BOS, UTF-8 bytes + 3, EOS, PAD."""
    rows = [[BOS, *(b + OFFSET for b in text.encode("utf-8")[: MAX_TOKENS - 2]), EOS] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TinyClipTextEncoder(ClipTextEncoder):
    """[B] texts -> float32 [B, 16], unit rows."""

    def __init__(self, *, device: str = "cpu", half: bool = False):
        self._setup(build_tiny_clip(), byte_tokenize, MODEL_ID, device, half)

    @classmethod
    def describe(cls) -> dict:
        return {"model_id": MODEL_ID}


class TinyClipImageEncoder(ClipImageEncoder):
    """uint8 [B, 32, 32, 3] -> float32 [B, 16], unit rows."""

    def __init__(self, *, device: str = "cpu", half: bool = False):
        self._setup(build_tiny_clip(), MODEL_ID, device, half)

    @classmethod
    def describe(cls) -> dict:
        return {"model_id": MODEL_ID, "size": SIZE}
