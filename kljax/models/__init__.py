"""Policy and reference models: the decoder, its presets, and Hugging Face checkpoint import/export."""

from kljax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from kljax.models.hf import check_hf, config_from_hf, config_to_hf, export_hf, from_hf
from kljax.models.transformer import Decoder, KVCache, abstract, count_params, create

__all__ = [
    "PRESETS",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "abstract",
    "check_hf",
    "config_from_hf",
    "config_to_hf",
    "count_params",
    "create",
    "export_hf",
    "from_hf",
    "preset",
]
