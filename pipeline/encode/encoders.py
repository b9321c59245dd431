"""Encoders behind one interface, and the registry that names them.

Every encoder turns one batch of item content into L2-normalised float32 features:

- text:  ``encode(texts: list[str]) -> float32 [B, d_t]``
- image: ``encode(pixels: uint8 [B, S, S, 3]) -> float32 [B, d_i]``, where S is the spec's
  ``image_input().size``; decoding and resizing happen outside the encoder (in the CPU tasks
  of the Ray Data stage, or in the plain loop of the benchmark) with :mod:`pipeline.encode.images`.

The feature width d is whatever the model gives; nothing downstream assumes it.

Specs (what the CLI takes for --text-model / --image-model):

=====================  ====================================================================
``minilm``             all-MiniLM-L6-v2, packaged offline (text, 384-d)
``efficientnet-lite0`` EfficientNet-Lite0, packaged offline (image, 1280-d pooled)
``clip:<name|path>``   a Hugging Face ``CLIPModel``; the tower that matches the modality
``hf:<path>``          any Hugging Face text model (mean pooled) or vision model (pooled)
``tiny-clip``          a tiny randomly initialised CLIP built from a config (tests)
``none``               skip this modality
=====================  ====================================================================

This module and the model modules it names are pure PyTorch/transformers: no Ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TEXT, IMAGE = "text", "image"
MODALITIES = (TEXT, IMAGE)
FEDMR_PROMPT = "The title of this item is: {title}."

DEFAULT_TEXT = "minilm"
DEFAULT_IMAGE = "efficientnet-lite0"

# kind -> modality -> "module:Class" (imported lazily: the driver never needs torch for this)
_REGISTRY: dict[str, dict[str, str]] = {
    "minilm": {TEXT: "pipeline.encode.minilm:MiniLMTextEncoder"},
    "efficientnet-lite0": {IMAGE: "pipeline.encode.efficientnet:EfficientNetLite0Encoder"},
    "clip": {TEXT: "pipeline.encode.hf:ClipTextEncoder", IMAGE: "pipeline.encode.hf:ClipImageEncoder"},
    "hf": {TEXT: "pipeline.encode.hf:HFTextEncoder", IMAGE: "pipeline.encode.hf:HFImageEncoder"},
    "tiny-clip": {TEXT: "pipeline.encode.tiny_clip:TinyClipTextEncoder",
                  IMAGE: "pipeline.encode.tiny_clip:TinyClipImageEncoder"},
}
_NEEDS_SOURCE = {"clip", "hf"}


class TextEncoder(Protocol):
    """model_id: what was loaded; dim: d_t."""

    model_id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """[B] strings -> float32 [B, d_t], unit L2 norm per row."""


class ImageEncoder(Protocol):
    """model_id: what was loaded; dim: d_i; size: S, the square input side in pixels."""

    model_id: str
    dim: int
    size: int

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB -> float32 [B, d_i], unit L2 norm per row."""


@dataclass(frozen=True)
class ImageInput:
    """What the decode step must produce for an image encoder: RGB uint8 [S, S, 3], made by
    resizing the short side to S (bicubic) and centre-cropping."""

    size: int


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed --text-model / --image-model value.

    kind: a registry key or "none"; modality: "text" or "image"; source: the name or path for
    ``clip:`` and ``hf:`` (None otherwise).
    """

    kind: str
    modality: str
    source: str | None = None

    @classmethod
    def parse(cls, value: str, modality: str) -> "EncoderSpec":
        """'minilm', 'clip:openai/clip-vit-base-patch32', 'hf:/models/vit', 'tiny-clip', 'none'."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        value = str(value).strip()
        kind, _, source = value.partition(":")
        kind = kind.lower()
        if kind == "none" and not source:
            return cls("none", modality)
        if kind not in _REGISTRY:
            raise ValueError(f"unknown {modality} model {value!r}; choose one of {', '.join(choices(modality))}")
        if modality not in _REGISTRY[kind]:
            raise ValueError(f"{kind!r} has no {modality} encoder; {modality} models: {', '.join(choices(modality))}")
        if kind in _NEEDS_SOURCE and not source:
            raise ValueError(f"{kind!r} needs a model name or path: '{kind}:<name-or-path>'")
        if kind not in _NEEDS_SOURCE and source:
            raise ValueError(f"{kind!r} takes no argument, got {value!r}")
        return cls(kind, modality, source or None)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def label(self) -> str:
        """The spec as the CLI writes it."""
        return self.kind if self.source is None else f"{self.kind}:{self.source}"

    def encoder_class(self):
        module, _, name = _REGISTRY[self.kind][self.modality].partition(":")
        return getattr(importlib.import_module(module), name)


def choices(modality: str) -> list[str]:
    """Valid spec forms for one modality (for help texts and errors)."""
    forms = [f"{kind}:<name-or-path>" if kind in _NEEDS_SOURCE else kind
             for kind, towers in _REGISTRY.items() if modality in towers]
    return [*forms, "none"]


def build_encoder(spec: EncoderSpec, *, device: str = "cpu", half: bool = False, threads: int | None = None):
    """Load the model of `spec` once; returns a TextEncoder or ImageEncoder.

    device: "cpu" or "cuda"; half: float16 weights (GPU only); threads: torch intra-op threads
    for this process (None leaves torch's default).
    """
    if not spec.enabled:
        raise ValueError(f"no {spec.modality} encoder: the spec is 'none'")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    cls = spec.encoder_class()
    kwargs = {"device": device, "half": half}
    return cls(spec.source, **kwargs) if spec.kind in _NEEDS_SOURCE else cls(**kwargs)


def describe(spec: EncoderSpec) -> dict:
    """Cheap driver-side facts about `spec` without loading weights: model_id, and for images
    the input size S. Fails early (ValueError) when a named model cannot be found offline."""
    if not spec.enabled:
        return {"model": "none"}
    info = spec.encoder_class().describe(spec.source) if spec.kind in _NEEDS_SOURCE \
        else spec.encoder_class().describe()
    return {"model": spec.label, **info}


def default_prompt(spec: EncoderSpec) -> str | None:
    """The text template the encoder is meant to be used with (FedMR prompt for CLIP)."""
    if spec.enabled and spec.modality == TEXT:
        return getattr(spec.encoder_class(), "default_prompt", None)
    return None
