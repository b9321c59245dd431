"""Hugging Face encoders: CLIP (either tower of a ``CLIPModel``) and any text or vision model.

Shapes: B = batch; T = tokens; S = image side; d = the model's feature width.

- ClipTextEncoder:  [B] texts -> text_projection(pooled EOS state)        -> [B, projection_dim]
- ClipImageEncoder: uint8 [B, S, S, 3] -> visual_projection(pooled CLS)   -> [B, projection_dim]
- HFTextEncoder:    [B] texts -> masked mean of the last hidden states    -> [B, hidden]
- HFImageEncoder:   uint8 [B, S, S, 3] -> the model's pooled output (or the mean of its last
  hidden states where it has none)                                        -> [B, hidden]

All rows are L2-normalised. Models load by hub name (from the local cache; the project runs
offline) or by local path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.encode._torch import (CLIP_MEAN, CLIP_STD, masked_mean, module_dtype, pixels_to_tensor,
                                    place, unit_rows)
from pipeline.encode.encoders import FEDMR_PROMPT

MAX_TEXT_TOKENS = 512  # cap for tokenizers that report no real limit


def model_id(source: str) -> str:
    """A local path as an absolute path, a hub name as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _config(source: str):
    """Load the model config or fail with a message that says what to do offline."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load Hugging Face model {source!r}: {error}. Without network access, "
                         "pass a local directory (save_pretrained) or a name already in the local cache") from error


def _image_processor(source: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def processor_size(processor, fallback: int) -> int:
    """Square input side S from an image processor's crop_size / size (or `fallback`)."""
    for name in ("crop_size", "size"):
        size = getattr(processor, name, None) if processor is not None else None
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height")
        elif size is not None and not isinstance(size, int):
            size = getattr(size, "shortest_edge", None) or getattr(size, "height", None)
        if size:
            return int(size)
    return int(fallback)


def hf_tokenizer(tokenizer, max_length: int):
    """Wrap a transformers tokenizer as texts -> {input_ids, attention_mask} [B, T] tensors."""

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return tokenize


def _text_limit(tokenizer, positions: int | None) -> int:
    limit = int(getattr(tokenizer, "model_max_length", MAX_TEXT_TOKENS) or MAX_TEXT_TOKENS)
    limit = min(limit, MAX_TEXT_TOKENS)
    return min(limit, int(positions)) if positions else limit


class ClipTextEncoder:
    """The text tower of a CLIPModel. [B] texts -> float32 [B, projection_dim]."""

    default_prompt = FEDMR_PROMPT

    def __init__(self, source: str, *, device: str = "cpu", half: bool = False):
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        limit = _text_limit(tokenizer, model.config.text_config.max_position_embeddings)
        self._setup(model, hf_tokenizer(tokenizer, limit), model_id(source), device, half)

    def _setup(self, model, tokenize, model_id: str, device: str, half: bool) -> None:
        # keep the text tower only; the vision tower is freed with `model`
        self.tower = place(model.text_model, device, half)
        self.projection = place(model.text_projection, device, half)
        self.tokenize, self.model_id, self.device = tokenize, model_id, device
        self.dim = int(model.config.projection_dim)

    @classmethod
    def describe(cls, source: str) -> dict:
        _config(source)
        return {"model_id": model_id(source)}

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        with torch.inference_mode():
            pooled = self.tower(**batch).pooler_output
            return unit_rows(self.projection(pooled))


class ClipImageEncoder:
    """The vision tower of a CLIPModel. uint8 [B, S, S, 3] -> float32 [B, projection_dim]."""

    def __init__(self, source: str, *, device: str = "cpu", half: bool = False):
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(source)
        processor = _image_processor(source)
        self._setup(model, model_id(source), device, half, processor)

    def _setup(self, model, model_id: str, device: str, half: bool, processor=None) -> None:
        self.tower = place(model.vision_model, device, half)
        self.projection = place(model.visual_projection, device, half)
        self.model_id, self.device = model_id, device
        self.dim = int(model.config.projection_dim)
        self.size = processor_size(processor, model.config.vision_config.image_size)
        self.scale = float(getattr(processor, "rescale_factor", 1 / 255))
        self.mean = tuple(getattr(processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(processor, "image_std", None) or CLIP_STD)

    @classmethod
    def describe(cls, source: str) -> dict:
        config = _config(source)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            raise ValueError(f"{source!r} is not a CLIP model (its config has no vision_config)")
        return {"model_id": model_id(source), "size": processor_size(_image_processor(source), vision.image_size)}

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels_to_tensor(pixels, self.device, module_dtype(self.tower), scale=self.scale,
                             mean=self.mean, std=self.std)
        with torch.inference_mode():
            return unit_rows(self.projection(self.tower(pixel_values=x).pooler_output))


class HFTextEncoder:
    """Any Hugging Face text model: masked mean of last hidden states. [B] -> float32 [B, hidden]."""

    def __init__(self, source: str, *, device: str = "cpu", half: bool = False, max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = place(AutoModel.from_pretrained(source), device, half)
        limit = max_length or _text_limit(tokenizer, getattr(self.model.config, "max_position_embeddings", None))
        self.tokenize = hf_tokenizer(tokenizer, limit)
        self.model_id, self.device = model_id(source), device
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def describe(cls, source: str) -> dict:
        _config(source)
        return {"model_id": model_id(source)}

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            return unit_rows(masked_mean(hidden, batch["attention_mask"]))


class HFImageEncoder:
    """Any Hugging Face vision model: its pooled output. uint8 [B, S, S, 3] -> float32 [B, d]."""

    def __init__(self, source: str, *, device: str = "cpu", half: bool = False):
        from transformers import AutoModel

        processor = _image_processor(source)
        self.model = place(AutoModel.from_pretrained(source), device, half)
        config = self.model.config
        self.size = processor_size(processor, getattr(config, "image_size", 224))
        self.scale = float(getattr(processor, "rescale_factor", 1 / 255))
        self.mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
        self.std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
        self.model_id, self.device = model_id(source), device
        self.dim = int(self._probe_dim())

    @classmethod
    def describe(cls, source: str) -> dict:
        config = _config(source)
        return {"model_id": model_id(source),
                "size": processor_size(_image_processor(source), getattr(config, "image_size", 224))}

    def _probe_dim(self) -> int:
        return self.encode(np.zeros((1, self.size, self.size, 3), dtype=np.uint8)).shape[1]

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels_to_tensor(pixels, self.device, module_dtype(self.model), scale=self.scale,
                             mean=self.mean, std=self.std)
        with torch.inference_mode():
            out = self.model(pixel_values=x)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:  # no pooling head: average the last hidden states
                hidden = out.last_hidden_state
                pooled = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)
            return unit_rows(pooled.flatten(1))
