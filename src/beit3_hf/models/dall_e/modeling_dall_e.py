"""PyTorch encoder of OpenAI's DALL-E discrete VAE, the visual tokenizer of BEiT (v1).

Original implementation: PyPI `dall-e` 0.1 (https://github.com/openai/DALL-E, `dall_e/encoder.py` `Encoder`,
`dall_e/utils.py` `Conv2d` and `map_pixels`; MIT licence), vendored by unilm as `beit/dall_e`. This is an independent
re-implementation in the structure of `transformers`; `python -m beit3_hf.conversion.visual_tokenizers --kind dall-e`
converts the released `encoder.pkl` onto it exactly, without unpickling any code.

Input contract: `pixel_values` are RGB images in **[0, 1]** (`ToTensor()` output, no mean/std normalisation) at the
tokenizer resolution, which for BEiT v1 is half the model view: 112x112 for 224 (a Lanczos resize in BEiT's
`DataAugmentationForBEiT`). The model applies the original `map_pixels` (`(1 - 2 eps) x + eps` with eps = 0.1, i.e.
[0, 1] -> [0.1, 0.9]) itself, once; do not apply it before.

Difference from the original, on purpose: the original's convolutions (all but the last) cast their input and
weights to float16 when the weights are on a CUDA device. Here every convolution runs in the model's dtype (float32
unless you cast the model), the same on every device.

This file is remote code: it imports only torch, transformers, the standard library and `configuration_dall_e`.

```bibtex
@inproceedings{ramesh2021dalle,
  title={Zero-Shot Text-to-Image Generation},
  author={Ramesh, Aditya and Pavlov, Mikhail and Goh, Gabriel and Gray, Scott and Voss, Chelsea and Radford, Alec and
          Chen, Mark and Sutskever, Ilya},
  booktitle={ICML}, year={2021}
}

```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dall_e import DallEConfig


@dataclass
class DallEEncoderOutput(ModelOutput):
    """Output of [`DallEEncoderModel`].

    Args:
        logits: (batch, vocab_size, height / 8, width / 8) logits over the visual vocabulary at each position.
        codebook_indices: (batch, (height / 8) * (width / 8)) argmax of the logits, positions in row-major order.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf.models.dall_e.modeling_dall_e import DallEEncoderOutput
    >>> logits = torch.randn(1, 64, 2, 2)
    >>> outputs = DallEEncoderOutput(logits=logits, codebook_indices=logits.argmax(1).flatten(1))
    >>> outputs.codebook_indices.shape
    torch.Size([1, 4])

    ```
    """

    logits: torch.FloatTensor | None = None
    codebook_indices: torch.LongTensor | None = None


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    # The original `dall_e.utils.Conv2d`: "same" padding for odd kernels.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2)


class DallEResidualPath(nn.Module):
    """ReLU -> 3x3 -> ReLU -> 3x3 -> ReLU -> 3x3 -> ReLU -> 1x1, through a bottleneck of a quarter of the output."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = out_channels // 4
        self.conv_1 = _conv(in_channels, hidden, 3)
        self.conv_2 = _conv(hidden, hidden, 3)
        self.conv_3 = _conv(hidden, hidden, 3)
        self.conv_4 = _conv(hidden, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv_1, self.conv_2, self.conv_3, self.conv_4):
            hidden_states = conv(F.relu(hidden_states))
        return hidden_states


class DallEEncoderBlock(nn.Module):
    """`id_path(x) + post_gain * res_path(x)`; `id_path` is a 1x1 convolution when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, post_gain: float) -> None:
        super().__init__()
        self.post_gain = post_gain
        self.id_path = _conv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.res_path = DallEResidualPath(in_channels, out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states if self.id_path is None else self.id_path(hidden_states)
        return identity + self.post_gain * self.res_path(hidden_states)


class DallEEncoderGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, post_gain: float, pool: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            DallEEncoderBlock(in_channels if index == 0 else out_channels, out_channels, post_gain)
            for index in range(num_blocks)
        )
        self.pool = pool

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return F.max_pool2d(hidden_states, kernel_size=2) if self.pool else hidden_states  # halves height, width


class DallEPreTrainedModel(PreTrainedModel):
    config_class = DallEConfig
    base_model_prefix = "dall_e"
    main_input_name = "pixel_values"
    input_modalities = "image"
    _no_split_modules = ["DallEEncoderGroup"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The original `dall_e.utils.Conv2d` initialisation: N(0, 1 / fan_in) weights, zero biases.
        if isinstance(module, nn.Conv2d):
            init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            init.zeros_(module.bias)


class DallEEncoderModel(DallEPreTrainedModel):
    r"""The DALL-E dVAE encoder: images in [0, 1] -> logits over the visual vocabulary, one position per 8x8 pixels.

    `pixel_values` are (batch, channels, height, width) RGB images in **[0, 1]** at the tokenizer resolution (112x112
    for BEiT at 224: half the model view). The model applies the original `map_pixels` ([0, 1] -> [0.1, 0.9]) once,
    itself. `get_codebook_indices(pixel_values)` returns the argmax token of each position, flattened to
    (batch, (height / 8) * (width / 8)): the BEiT v1 MIM targets.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf.models.dall_e.configuration_dall_e import DallEConfig
    >>> from beit3_hf.models.dall_e.modeling_dall_e import DallEEncoderModel
    >>> config = DallEConfig(hidden_size=16, num_blocks_per_group=1, vocab_size=64)
    >>> model = DallEEncoderModel(config).eval()
    >>> pixel_values = torch.rand(2, 3, 32, 32)  # [0, 1]
    >>> model(pixel_values).logits.shape
    torch.Size([2, 64, 4, 4])
    >>> ids = model.get_codebook_indices(pixel_values)
    >>> ids.shape, ids.dtype
    (torch.Size([2, 16]), torch.int64)

    ```
    """

    def __init__(self, config: DallEConfig) -> None:
        super().__init__(config)
        widths = config.group_widths
        self.input_conv = _conv(config.num_channels, config.hidden_size, config.input_kernel_size)
        self.groups = nn.ModuleList(
            DallEEncoderGroup(
                widths[max(index - 1, 0)],
                widths[index],
                config.num_blocks_per_group,
                config.post_gain,
                pool=index < config.num_groups - 1,
            )
            for index in range(config.num_groups)
        )
        self.output_conv = _conv(widths[-1], config.vocab_size, 1)
        self.post_init()

    def map_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The original `dall_e.utils.map_pixels`: [0, 1] -> [eps, 1 - eps]."""
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor in [0, 1], got {pixel_values.dtype}.")
        eps = self.config.logit_laplace_eps
        return (1 - 2 * eps) * pixel_values.to(self.input_conv.weight.dtype) + eps

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None) -> DallEEncoderOutput | tuple:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images in [0, 1] at the tokenizer resolution.
        """
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        hidden_states = self.input_conv(self.map_pixels(pixel_values))  # (batch, hidden, height, width)
        for group in self.groups:
            hidden_states = group(hidden_states)  # (batch, width_g, height / 2**g', width / 2**g')
        logits = self.output_conv(F.relu(hidden_states))  # (batch, vocab, height / 8, width / 8)
        codebook_indices = logits.argmax(dim=1).flatten(1)  # (batch, (height / 8) * (width / 8))
        outputs = DallEEncoderOutput(logits=logits, codebook_indices=codebook_indices)
        return outputs if return_dict else outputs.to_tuple()

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """(batch, channels, height, width) images in [0, 1] -> (batch, (height / 8) * (width / 8)) token ids."""
        return self(pixel_values, return_dict=True).codebook_indices
