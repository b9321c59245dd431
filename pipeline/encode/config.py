"""Options of the encode stage: typed, validated, loadable from YAML (configs/encode/*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.encode.encoders import DEFAULT_IMAGE, DEFAULT_TEXT, IMAGE, TEXT, EncoderSpec, default_prompt


class EncodeConfig(BaseModel):
    """What to encode with and how. Defaults: the embedded offline encoders on local resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_model: str = Field(DEFAULT_TEXT, description="minilm | clip:<name-or-path> | hf:<path> | tiny-clip | none")
    image_model: str = Field(DEFAULT_IMAGE,
                             description="efficientnet-lite0 | clip:<name-or-path> | hf:<path> | tiny-clip | none")
    prompt: str = Field("auto", description="text template with {title} (or {text}); 'auto' = the text "
                                            "model's own (FedMR prompt for CLIP), 'none' = raw text")
    empty_text: Literal["auto", "mean", "missing"] = Field(
        "auto", description="an empty text gets the mean text feature ('mean') or is encoded as the word "
                            "'missing' inside the prompt ('missing'); 'auto' = 'missing' with a prompt, else 'mean'")
    batch_size: int = Field(32, ge=1, le=65536, description="rows per model call (map_batches batch_size)")
    actors: int | None = Field(None, ge=1, description="model actors per modality (default: one per GPU, "
                                                       "else up to 4 per node sharing its CPUs)")

    @field_validator("text_model")
    @classmethod
    def _text(cls, value: str) -> str:
        return EncoderSpec.parse(value, TEXT).label

    @field_validator("image_model")
    @classmethod
    def _image(cls, value: str) -> str:
        return EncoderSpec.parse(value, IMAGE).label

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if value in ("auto", "none"):
            return value
        if "{title}" not in value and "{text}" not in value:
            raise ValueError("a prompt must contain {title} or {text} (or be 'auto' / 'none')")
        try:
            value.format(title="x", text="x")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"bad prompt template: {error!r}; only {{title}} and {{text}} are filled in") from None
        return value

    @model_validator(mode="after")
    def _something(self):
        if not (self.text_spec.enabled or self.image_spec.enabled):
            raise ValueError("text_model and image_model are both 'none': nothing to encode")
        return self

    @property
    def text_spec(self) -> EncoderSpec:
        return EncoderSpec.parse(self.text_model, TEXT)

    @property
    def image_spec(self) -> EncoderSpec:
        return EncoderSpec.parse(self.image_model, IMAGE)

    def template(self) -> str | None:
        """The text template in force (None = raw text)."""
        if self.prompt == "none":
            return None
        if self.prompt == "auto":
            return default_prompt(self.text_spec)
        return self.prompt

    def empty_text_policy(self) -> str:
        """'mean' or 'missing' (see empty_text)."""
        if self.empty_text != "auto":
            return self.empty_text
        return "missing" if self.template() else "mean"

    def prompted(self, text: str, title: str = "") -> str:
        """The string the text model sees for one catalogue item: the template with {text} = its
        text (empty -> 'missing') and {title} = its title, or its text when it has none; without a
        template, the text itself."""
        template = self.template()
        text = text or "missing"
        return text if template is None else template.format(title=title or text, text=text)

    def prompted_texts(self, texts, titles=None) -> list[str]:
        """[n] catalogue texts (and [n] titles, or None) -> [n] strings for the text model."""
        titles = [""] * len(texts) if titles is None else titles
        return [self.prompted(str(text), str(title)) for text, title in zip(texts, titles)]

    @classmethod
    def from_yaml(cls, path, **overrides) -> "EncodeConfig":
        """Load a YAML file; keyword overrides (None = not given) win over the file."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
        data.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**data)
