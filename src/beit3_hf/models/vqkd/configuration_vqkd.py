"""Configuration of the BEiT v2 VQ-KD visual tokenizer (encoder and codebook).

VQ-KD ("BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers", Peng et al. 2022,
arXiv:2208.06366) turns an image into a grid of discrete codes: a ViT encoder, a small task layer that projects each
patch feature to the codebook dimension, and a nearest-neighbour lookup in an l2-normalised codebook. Original code:
https://github.com/microsoft/unilm/tree/master/beit2 (`modeling_vqkd.py`, `norm_ema_quantizer.py`, MIT licence).

This file is remote code: it imports only the standard library and `transformers`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class VqkdConfig(PretrainedConfig):
    r"""Configuration of a [`VqkdModel`]: the VQ-KD encoder, its task layer and its codebook.

    The defaults are those of the released tokenizers (`vqkd_encoder_base_decoder_{1,3}x768x12_{clip,dino}`): a
    ViT-B/16 encoder at 224 pixels with mean-pooling layout (a final layer norm on the patch tokens, no layer
    scale), a 768 -> 768 -> 32 task layer and 8192 codes of dimension 32. The decoder, only needed to train the
    tokenizer, is not part of this model.

    Args:
        image_size: side of the square input image the position table is made for.
        patch_size: side of the square patches.
        num_channels: input image channels.
        hidden_size: width of the ViT encoder.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: attention heads per layer; `hidden_size` must be divisible by it.
        intermediate_size: width of the feed-forward blocks.
        layer_norm_eps: epsilon of every layer norm (1e-6 in the original).
        qkv_bias: whether the attention has query and value biases (the key has none, as in BEiT).
        codebook_size: number of codes (the vocabulary of the visual tokens).
        codebook_dim: dimension of each code, and output width of the task layer.
        initializer_range: standard deviation of the truncated-normal initialisation of linear layers.

    Example:

    ```python
    >>> from beit3_hf.models.vqkd.configuration_vqkd import VqkdConfig
    >>> config = VqkdConfig()
    >>> config.num_patches, config.codebook_size, config.codebook_dim
    (196, 8192, 32)
    >>> VqkdConfig(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4).num_patches
    16

    ```
    """

    model_type = "beit2_vqkd"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        codebook_size: int = 8192,
        codebook_dim: int = 32,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches (and visual tokens) per image."""
        return self.grid_size**2

    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the first inconsistent architecture setting."""
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "codebook_size",
            "codebook_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VqkdConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}."
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
