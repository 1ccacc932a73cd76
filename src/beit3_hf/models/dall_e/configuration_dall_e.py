"""Configuration of the encoder of OpenAI's DALL-E discrete VAE (the BEiT v1 visual tokenizer).

The dVAE of "Zero-Shot Text-to-Image Generation" (Ramesh et al. 2021, arXiv:2102.12092) encodes an image into a grid
of logits over a visual vocabulary; BEiT (v1) uses the argmax as its masked-image-modelling targets. Original code:
PyPI `dall-e` (https://github.com/openai/DALL-E, `dall_e/encoder.py`, `dall_e/utils.py`; MIT licence), vendored by
unilm as `beit/dall_e`.

This file is remote code: it imports only the standard library and `transformers`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class DallEConfig(PretrainedConfig):
    r"""Configuration of a [`DallEEncoderModel`].

    The defaults are those of the released `encoder.pkl`: a 7x7 input convolution to 256 channels, 4 groups of 2
    residual blocks at 256, 512, 1024 and 2048 channels with a 2x2 max-pool after each of the first three groups,
    and a 1x1 output convolution to 8192 logits. The total stride is 8: BEiT's 112x112 tokenizer view gives 14x14
    tokens.

    Args:
        num_channels: input image channels.
        hidden_size: width of the first group (`n_hid` of the original); group `g` (from 0) has
            `hidden_size * 2**g` channels.
        num_groups: number of groups (4 in the original, which always builds 4).
        num_blocks_per_group: residual blocks per group (`n_blk_per_group`).
        vocab_size: number of visual tokens (output channels of the last convolution).
        input_kernel_size: kernel of the input convolution (7).
        post_gain: scale of each block's residual path; `None` means the original's `1 / (num_groups *
            num_blocks_per_group) ** 2`.
        logit_laplace_eps: the `eps` of the original `map_pixels(x) = (1 - 2 eps) x + eps`, which the model applies
            to its [0, 1] input.
        image_size: side of the tokenizer's input images (informational: any size works; 112 for BEiT at 224).

    Example:

    ```python
    >>> from beit3_hf.models.dall_e.configuration_dall_e import DallEConfig
    >>> config = DallEConfig()
    >>> config.group_widths, config.post_gain, config.token_grid_size
    ([256, 512, 1024, 2048], 0.015625, 14)

    ```
    """

    model_type = "dall_e_dvae"

    def __init__(
        self,
        num_channels: int = 3,
        hidden_size: int = 256,
        num_groups: int = 4,
        num_blocks_per_group: int = 2,
        vocab_size: int = 8192,
        input_kernel_size: int = 7,
        post_gain: float | None = None,
        logit_laplace_eps: float = 0.1,
        image_size: int = 112,
        **kwargs: Any,
    ) -> None:
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.num_blocks_per_group = num_blocks_per_group
        self.vocab_size = vocab_size
        self.input_kernel_size = input_kernel_size
        self.post_gain = 1.0 / (num_groups * num_blocks_per_group) ** 2 if post_gain is None else float(post_gain)
        self.logit_laplace_eps = logit_laplace_eps
        self.image_size = image_size
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def group_widths(self) -> list[int]:
        """Output channels of each group."""
        return [self.hidden_size * 2**group for group in range(self.num_groups)]

    @property
    def token_grid_size(self) -> int:
        """Tokens along each side for an `image_size` input (one 2x2 max-pool per group but the last)."""
        return self.image_size // 2 ** (self.num_groups - 1)

    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the first inconsistent architecture setting."""
        for name in ("num_channels", "hidden_size", "num_groups", "num_blocks_per_group", "vocab_size", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DallEConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (blocks use width / 4).")
        if self.input_kernel_size <= 0 or self.input_kernel_size % 2 == 0:
            raise ValueError(f"input_kernel_size must be a positive odd integer, got {self.input_kernel_size}.")
        if not 0.0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in [0, 0.5), got {self.logit_laplace_eps}.")
