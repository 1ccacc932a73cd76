"""BEiT v2 VQ-KD visual tokenizer, remote code: configuration and modeling (see `beit3_hf.models`)."""

from transformers import AutoConfig, AutoModel

from .configuration_vqkd import VqkdConfig
from .modeling_vqkd import VqkdModel, VqkdOutput, VqkdPreTrainedModel


def register() -> None:
    """Register the classes with the transformers Auto classes in this process, and mark them as remote code so that
    `save_pretrained` copies their files and writes `auto_map` (a saved folder then loads with
    `AutoModel.from_pretrained(folder, trust_remote_code=True)` where `beit3_hf` is not installed)."""
    AutoConfig.register(VqkdConfig.model_type, VqkdConfig, exist_ok=True)
    AutoModel.register(VqkdConfig, VqkdModel, exist_ok=True)
    VqkdConfig.register_for_auto_class()
    VqkdModel.register_for_auto_class("AutoModel")


__all__ = ["VqkdConfig", "VqkdModel", "VqkdOutput", "VqkdPreTrainedModel", "register"]
