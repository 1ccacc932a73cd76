"""Encoder of OpenAI's DALL-E dVAE (the BEiT v1 visual tokenizer), remote code (see `beit3_hf.models`)."""

from transformers import AutoConfig, AutoModel

from .configuration_dall_e import DallEConfig
from .modeling_dall_e import DallEEncoderModel, DallEEncoderOutput, DallEPreTrainedModel


def register() -> None:
    """Register the classes with the transformers Auto classes in this process, and mark them as remote code so that
    `save_pretrained` copies their files and writes `auto_map` (a saved folder then loads with
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` where `beit3_hf` is not installed)."""
    AutoConfig.register(DallEConfig.model_type, DallEConfig, exist_ok=True)
    AutoModel.register(DallEConfig, DallEEncoderModel, exist_ok=True)
    DallEConfig.register_for_auto_class()
    DallEEncoderModel.register_for_auto_class("AutoModel")


__all__ = ["DallEConfig", "DallEEncoderModel", "DallEEncoderOutput", "DallEPreTrainedModel", "register"]
