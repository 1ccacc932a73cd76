"""BEiT-3 configuration.

BEiT-3 ("Image as a Foreign Language", Wang et al. 2022, arXiv:2208.10442) is a Multiway Transformer: one encoder whose
self-attention is shared by image and text tokens, while every projection, layer norm and feed-forward block has a
vision expert and a text expert. Original code: https://github.com/microsoft/unilm/tree/master/beit3 (MIT licence) on
top of torchscale.

This file is remote code: it imports only the standard library and `transformers`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

# Sizes of the released checkpoints (unilm `beit3/modeling_utils.py`). Every released model uses patch size 16.
_SIZES: dict[str, dict[str, int]] = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}
_IMAGE_SIZES = (224, 384, 480, 768)

#: Named presets, e.g. ``"beit3-base-patch16-384"``: architecture only, no task head settings.
BEIT3_PRESETS: dict[str, dict[str, int]] = {
    f"beit3-{size}-patch16-{image_size}": {**dims, "patch_size": 16, "image_size": image_size, "mask_token_id": 64001}
    for size, dims in _SIZES.items()
    for image_size in _IMAGE_SIZES
}

_SUPPORTED_ACTIVATIONS = ("gelu",)


class Beit3Config(PretrainedConfig):
    r"""Configuration of a BEiT-3 model and its task heads.

    Args:
        hidden_size: width of the encoder.
        num_hidden_layers: number of Multiway encoder layers.
        num_attention_heads: attention heads per layer; `hidden_size` must be divisible by it.
        intermediate_size: width of the feed-forward blocks.
        hidden_act: feed-forward activation. Only `"gelu"` (exact erf GELU, computed in float32 as the original
            does) is supported.
        layer_norm_eps: epsilon of every layer norm (1e-5 in the original).
        attention_dropout: dropout on the attention probabilities.
        drop_path_rate: stochastic-depth rate of the last layer; rates grow linearly from 0 at the first layer.
        initializer_range: standard deviation of the truncated-normal initialisation of linear layers.
        image_size: side of the square input image the vision position table is made for.
        patch_size: side of the square patches.
        num_channels: input image channels.
        vocab_size: text vocabulary (64010 rows in the released checkpoints; `beit3.spm` uses the first 64002).
        max_position_embeddings: longest text sequence, in tokens (1022 in the released checkpoints).
        use_final_layernorm: whether the encoder ends with a Multiway layer norm. The original drops it for image
            classification and VQA and keeps it for every other task.
        logit_scale_init_value: initial value of the retrieval temperature parameter (log of 1/0.07).
        label_smoothing: label smoothing of the captioning loss (0.1 in the original recipes).
        visual_vocab_size: width of the masked-image-modelling head `mim_head`: the codebook size of the visual
            tokenizer (8192 for VQ-KD and the DALL-E dVAE; the converter reads it from a checkpoint's `mim_head`),
            or `patch_size**2 * num_channels` for pixel regression.
        vision_only: build the vision side only: no text experts in any Multiway block, no text embedding and no
            text position table (base at 224: about 87M parameters with the classification head instead of
            222M). For image classification; the vision parameters keep their names, so a full checkpoint loads
            with only its text keys (and the masked-image-modelling `mask_token`) unused. Such a model takes
            `pixel_values` only, and every parameter gets a gradient in a classification step, so plain DDP
            (`find_unused_parameters=False`) works.
        contrastive_head: `Beit3ForPreTraining` also carries the image-text contrastive projections
            (`vision_projection`, `text_projection`, `logit_scale`, named as `Beit3ForImageTextRetrieval`'s, which
            therefore loads them from a pretraining folder). The released pretraining checkpoints have none.
        num_labels / id2label / label2id: classification labels (standard `PretrainedConfig` arguments).
        pad_token_id / bos_token_id / eos_token_id / mask_token_id: special token ids of the tokenizer
            (`<pad>`=1, `<s>`=0, `</s>`=2, `<mask>`=64001 for `beit3.spm`; the presets set it, and the converter
            takes it from the tokenizer).

    Example:

    ```python
    >>> from beit3_hf import Beit3Config
    >>> config = Beit3Config.from_preset("beit3-base-patch16-384")
    >>> config.hidden_size, config.image_size, config.num_patches
    (768, 384, 576)
    >>> tiny = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                    image_size=32, patch_size=16, vocab_size=100)
    >>> tiny.head_dim
    16
    >>> Beit3Config.from_preset("beit3-base-patch16-224", vision_only=True).vision_only
    True

    ```
    """

    model_type = "beit3"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        vocab_size: int = 64010,
        max_position_embeddings: int = 1022,
        use_final_layernorm: bool = True,
        logit_scale_init_value: float = math.log(1 / 0.07),
        label_smoothing: float = 0.1,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        mask_token_id: int | None = None,
        visual_vocab_size: int = 8192,
        vision_only: bool = False,
        contrastive_head: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.use_final_layernorm = use_final_layernorm
        self.logit_scale_init_value = logit_scale_init_value
        self.label_smoothing = label_smoothing
        self.mask_token_id = mask_token_id
        self.visual_vocab_size = visual_vocab_size
        self.vision_only = vision_only
        self.contrastive_head = contrastive_head
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        # AutoModel picks the BEiT-3 class named by `architectures`; transformers cannot handle None there, so a
        # config that no model has been saved with names the base model.
        if self.architectures is None:
            self.architectures = ["Beit3Model"]
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the first inconsistent architecture setting."""
        positive = (
            "visual_vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
            "num_channels",
            "vocab_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Beit3Config.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"Beit3Config.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"Beit3Config.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"Beit3Config.hidden_act must be one of {_SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}."
            )
        for name in ("attention_dropout", "drop_path_rate", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Beit3Config.{name} must be in [0, 1), got {value!r}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"Beit3Config.layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")
        for name in ("vision_only", "contrastive_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Beit3Config.{name} must be True or False, got {getattr(self, name)!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches of an `image_size` x `image_size` image (the vision sequence is one longer: the CLS token)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> Beit3Config:
        """Build the configuration of a released size, e.g. `"beit3-large-patch16-480"`; kwargs override fields."""
        if name not in BEIT3_PRESETS:
            raise ValueError(f"Unknown BEiT-3 preset {name!r}; choose one of {sorted(BEIT3_PRESETS)}.")
        return cls(**{**BEIT3_PRESETS[name], **kwargs})


__all__ = ["BEIT3_PRESETS", "Beit3Config"]
