"""PyTorch BEiT v2 VQ-KD visual tokenizer: ViT encoder, task layer and nearest-code lookup.

Original implementation: https://github.com/microsoft/unilm/tree/master/beit2 (`modeling_vqkd.py` `VQKD`,
`norm_ema_quantizer.py` `NormEMAVectorQuantizer`, `modeling_finetune.py` `VisionTransformer`; MIT licence). This is an
independent re-implementation of the encoding path in the structure of `transformers`;
`python -m beit3_hf.conversion.visual_tokenizers --kind vqkd` maps the released checkpoints onto it exactly.

Input contract: `pixel_values` are RGB images in **[0, 1]** (`torchvision.transforms.ToTensor()` output, no
mean/std normalisation) at `config.image_size`. The model rescales them once to [-1, 1] (`x * 255 / 127.5 - 1`),
which is the original's `pre_process` for `process_type="default"`. The original guesses the input range per batch
(it multiplies by 255 only when the batch maximum is <= 1); this port does not guess: a batch whose maximum is
above 1 is refused with an error.

Differences from the original, all on purpose:

- Inference is pure. The original quantizer updates its `cluster_size` buffer on every forward, even in eval mode,
  and may call `torch.distributed.all_reduce`; in train mode it also moves the codebook (EMA, k-means init). Here
  the codebook is a plain parameter that no forward changes, and nothing is reduced across processes.
- Only the encoder side exists: no decoder, no teacher, no loss.
- The task layer and the lookup run with autocast disabled, in the dtype of the task layer, as in the original.

This file is remote code: it imports only torch, transformers, the standard library and `configuration_vqkd`.

```bibtex
@article{peng2022beitv2,
  title={{BEiT} v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers},
  author={Peng, Zhiliang and Dong, Li and Bao, Hangbo and Ye, Qixiang and Wei, Furu},
  journal={arXiv preprint arXiv:2208.06366}, year={2022}
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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_vqkd import VqkdConfig


@dataclass
class VqkdOutput(ModelOutput):
    """Output of [`VqkdModel`].

    Args:
        codebook_indices: (batch, num_patches) the visual token of each patch, in row-major patch order.
        last_hidden_state: (batch, num_patches, hidden_size): encoder patch features after the final layer norm
            (the original `encoder(x, return_patch_tokens=True)`).
        projected_features: (batch, num_patches, codebook_dim): the task layer's output, before l2 normalisation
            (the original `to_quantizer_features`, laid out per patch instead of as a feature map).
        quantized_features: (batch, num_patches, codebook_dim): the chosen code vectors.
        distances: (batch, num_patches, codebook_size): squared distance of each l2-normalised patch feature to
            every code, as the original computes it; only with `output_distances=True` (it is large).
        hidden_states: the embeddings and the output of every encoder layer, each (batch, 1 + num_patches,
            hidden_size); only with `output_hidden_states=True`.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf.models.vqkd.modeling_vqkd import VqkdOutput
    >>> outputs = VqkdOutput(codebook_indices=torch.tensor([[3, 1]]), projected_features=torch.zeros(1, 2, 8))
    >>> outputs.codebook_indices.tolist(), len(outputs.to_tuple())
    ([[3, 1]], 2)

    ```
    """

    codebook_indices: torch.LongTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    projected_features: torch.FloatTensor | None = None
    quantized_features: torch.FloatTensor | None = None
    distances: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class VqkdEmbeddings(nn.Module):
    """Patch embedding, CLS token and absolute position embeddings."""

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values are {height}x{width} but this tokenizer's position table is for "
                f"{self.image_size}x{self.image_size} images; resize the images (the tokenizer view of BEiT v2 is "
                f"a bicubic resize to the configured size)."
            )
        patches = self.patch_embeddings(pixel_values)  # (batch, hidden, grid, grid)
        patches = patches.flatten(2).transpose(1, 2)  # (batch, num_patches, hidden)
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)  # (batch, 1, hidden)
        return torch.cat((cls_tokens, patches), dim=1) + self.position_embeddings


class VqkdAttention(nn.Module):
    """BEiT self-attention: one fused qkv projection with query and value biases (no key bias)."""

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(config.hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(hidden_states, self.qkv.weight, bias)  # (batch, length, 3 * hidden)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]  # each (batch, heads, length, head_dim)
        # Eager attention in the original's order of operations (scale the query, then softmax), so that the
        # codes match the original's exactly.
        weights = ((query * self.scaling) @ key.transpose(-2, -1)).softmax(dim=-1)  # (batch, heads, length, length)
        context = (weights @ value).transpose(1, 2).reshape(batch, length, -1)  # (batch, length, hidden)
        return self.proj(context)


class VqkdMlp(nn.Module):
    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class VqkdLayer(GradientCheckpointingLayer):
    """Pre-LN ViT block without layer scale: `x + attn(LN(x))`, then `x + mlp(LN(x))`."""

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VqkdAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VqkdMlp(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states))
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))


class VqkdTaskLayer(nn.Module):
    """Projection of the encoder features to the codebook dimension: Linear -> Tanh -> Linear."""

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(config.hidden_size, config.codebook_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class VqkdQuantizer(nn.Module):
    """Nearest code of each l2-normalised feature in the codebook; no state changes, no collectives."""

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(config.codebook_size, config.codebook_dim))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, num_patches, dim) features -> (batch, num_patches) ids and (batch, num_patches, codebook_size)
        squared distances."""
        batch, num_patches, dim = features.shape
        flat = F.normalize(features, p=2, dim=-1).reshape(-1, dim)  # (batch * num_patches, dim)
        codebook = self.codebook.to(flat.dtype)
        # The original's expression, term for term: |z|^2 + |e|^2 - 2 z.e (the codebook is l2-normalised by
        # training, so this orders the codes as the cosine similarity does).
        distances = (
            flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,nd->bn", flat, codebook)
        )  # (batch * num_patches, codebook_size)
        indices = distances.argmin(dim=1)  # (batch * num_patches,)
        return indices.view(batch, num_patches), distances.view(batch, num_patches, -1)


class VqkdPreTrainedModel(PreTrainedModel):
    config_class = VqkdConfig
    base_model_prefix = "vqkd"
    main_input_name = "pixel_values"
    input_modalities = "image"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VqkdEmbeddings", "VqkdLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The original's initialisation (timm `trunc_normal_(std=.02)`, i.e. cut at +-2 absolute), for training from
        # scratch; converted checkpoints overwrite all of it.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VqkdEmbeddings):
            init.trunc_normal_(module.cls_token, std=std, a=-2.0, b=2.0)
            init.trunc_normal_(module.position_embeddings, std=std, a=-2.0, b=2.0)
        elif isinstance(module, VqkdAttention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, VqkdQuantizer):
            # Random unit vectors (the original's `kmeans_init=False` codebook).
            init.copy_(module.codebook, F.normalize(torch.randn(module.codebook.shape), dim=-1))


class VqkdModel(VqkdPreTrainedModel):
    r"""The BEiT v2 VQ-KD tokenizer: images in [0, 1] -> one visual token per patch.

    `pixel_values` are (batch, channels, image_size, image_size) RGB images in **[0, 1]** (`ToTensor()` output, no
    mean/std normalisation); the model maps them to [-1, 1] itself, once, as the original's `pre_process` does. A
    batch with values above 1 is refused (the original would silently treat it as [0, 255]).
    `get_codebook_indices(pixel_values)` returns the (batch, num_patches) token ids used as BEiT v2 / BEiT-3 MIM
    targets; `forward` also returns the features before quantisation.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf.models.vqkd.configuration_vqkd import VqkdConfig
    >>> from beit3_hf.models.vqkd.modeling_vqkd import VqkdModel
    >>> config = VqkdConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                     intermediate_size=64, codebook_size=16, codebook_dim=8)
    >>> model = VqkdModel(config).eval()
    >>> pixel_values = torch.rand(2, 3, 32, 32)  # [0, 1]
    >>> ids = model.get_codebook_indices(pixel_values)
    >>> ids.shape, ids.dtype, bool(ids.max() < 16)
    (torch.Size([2, 16]), torch.int64, True)
    >>> outputs = model(pixel_values, output_distances=True)
    >>> outputs.projected_features.shape, outputs.distances.shape
    (torch.Size([2, 16, 8]), torch.Size([2, 16, 16]))
    >>> torch.equal(outputs.distances.argmin(-1), ids)
    True

    ```
    """

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__(config)
        self.embeddings = VqkdEmbeddings(config)
        self.layers = nn.ModuleList(VqkdLayer(config) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.task_layer = VqkdTaskLayer(config)
        self.quantizer = VqkdQuantizer(config)
        self.post_init()

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> [-1, 1], in the original's order of operations (`x * 255 / 127.5 - 1`)."""
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor in [0, 1], got {pixel_values.dtype}.")
        if not torch.compiler.is_compiling() and pixel_values.numel() and pixel_values.max() > 1:
            raise ValueError(
                f"pixel_values must be in [0, 1] (ToTensor() output, no normalisation); this batch reaches "
                f"{pixel_values.max().item():.4g}. Divide [0, 255] images by 255, and do not apply a mean/std "
                f"normalisation for the tokenizer."
            )
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
        return pixel_values * 255.0 / 127.5 - 1.0

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_distances: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
    ) -> VqkdOutput | tuple:
        r"""
        Args:
            pixel_values: (batch, channels, image_size, image_size) images in [0, 1].
            output_distances: also return the (batch, num_patches, codebook_size) distances to every code.
            output_hidden_states: also return the output of every encoder layer.
        """
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        hidden_states = self.embeddings(self.preprocess(pixel_values))  # (batch, 1 + num_patches, hidden)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        # Mean-pooling layout of the original ViT: the final layer norm applies to the patch tokens, CLS dropped.
        patch_features = self.layernorm(hidden_states[:, 1:])  # (batch, num_patches, hidden)
        with torch.autocast(device_type=patch_features.device.type, enabled=False):
            projected = self.task_layer(patch_features.to(self.task_layer.fc2.weight.dtype))  # (batch, n, dim)
            indices, distances = self.quantizer(projected)
            quantized = F.embedding(indices, self.quantizer.codebook)  # (batch, num_patches, dim)
        outputs = VqkdOutput(
            codebook_indices=indices,
            last_hidden_state=patch_features,
            projected_features=projected,
            quantized_features=quantized,
            distances=distances if output_distances else None,
            hidden_states=all_hidden_states,
        )
        return outputs if return_dict else outputs.to_tuple()

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """(batch, channels, image_size, image_size) images in [0, 1] -> (batch, num_patches) token ids."""
        return self(pixel_values, return_dict=True).codebook_indices
