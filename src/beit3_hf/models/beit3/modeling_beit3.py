"""PyTorch BEiT-3: the Multiway Transformer of "Image as a Foreign Language" (Wang et al. 2022, arXiv:2208.10442).

Original implementation: https://github.com/microsoft/unilm/tree/master/beit3 on top of torchscale (MIT licence).
This is an independent re-implementation in the structure of `transformers`; `beit3_hf.convert` maps the original
checkpoints onto it exactly.

How BEiT-3 differs from a ViT: the encoder runs over one sequence `[vision tokens; text tokens]` whose attention is
joint, but every projection, layer norm and feed-forward block exists twice, as a *vision expert* and a *text expert*.
`Beit3Multiway` routes the first `split_position` tokens (the vision tokens) to the vision expert and the rest to the
text expert. Blocks are pre-LN with Magneto sub-LNs: a layer norm before the attention output projection and one
inside the feed-forward block.

Conventions at the boundary are the ones of `transformers`: `pixel_values` (batch, channels, height, width),
`input_ids` (batch, text_len) and `attention_mask` with 1 = attend (the original uses 1 = pad).

This file is remote code: it imports only torch, transformers, the standard library and `configuration_beit3`.

```bibtex
@inproceedings{wang2023beit3,
  title={Image as a Foreign Language: {BEiT} Pretraining for Vision and Vision-Language Tasks},
  author={Wang, Wenhui and Bao, Hangbo and Dong, Li and Bjorck, Johan and Peng, Zhiliang and Liu, Qiang and
          Aggarwal, Kriti and Mohammed, Owais Khan and Singhal, Saksham and Som, Subhojit and Wei, Furu},
  booktitle={CVPR}, year={2023}
}

```
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_beit3 import Beit3Config

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Beit3ImageTextRetrievalOutput(ModelOutput):
    """Output of `Beit3ForImageTextRetrieval`: the fields of transformers' `CLIPOutput`, plus `logit_scale`.

    Args:
        loss: symmetric image-text contrastive loss over the batch, when `return_loss=True`.
        logits_per_image: (num_images, num_texts) scaled cosine similarities.
        logits_per_text: (num_texts, num_images), the transpose of `logits_per_image`.
        image_embeds: (num_images, hidden_size) L2-normalised image embeddings.
        text_embeds: (num_texts, hidden_size) L2-normalised text embeddings.
        logit_scale: the multiplier `exp(logit_scale)` of the similarities, for losses computed outside the model
            (e.g. over the global batch of several processes).
        text_model_output: the `get_text_features` output (encoder of the texts alone): `last_hidden_state`,
            `pooler_output` (= `text_embeds`) and, when requested, `hidden_states` and `attentions`.
        vision_model_output: the `get_image_features` output, likewise for the images.

    Images and texts are encoded separately, so there is no single `hidden_states` / `attentions` sequence: they
    are in the two tower outputs, as in `CLIPOutput`.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        # The tower outputs become tuples too, as `CLIPOutput.to_tuple` does.
        return tuple(
            value.to_tuple() if isinstance(value, ModelOutput) else value for value in (self[k] for k in self.keys())
        )


@dataclass
class Beit3CaptioningOutput(ModelOutput):
    """Output of `Beit3ForCaptioning`.

    Args:
        loss: label-smoothed masked-token loss over the positions with `labels != -100`.
        logits: (batch, text_len, vocab_size) scores of the text positions.
        cache: the key/value cache, when `use_cache=True`; also readable as `past_key_values`.
        hidden_states: when requested, the input of every layer and the output of the last (num_layers + 1
            tensors), each (batch, vision_len + text_len, hidden_size) on the first step and (batch, text_len,
            hidden_size) when continuing from a cache.
        attentions: when requested (eager attention), one (batch, heads, queries, keys) tensor per layer.

    The field is named `cache` on every supported transformers version: from 5.24 on, `ModelOutput` renames the
    keyword `past_key_values=` to `cache=` in every subclass's constructor, so a field named `past_key_values`
    cannot be filled there, while before 5.24 `cache` is an ordinary field name.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Beit3KeyValueCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> Beit3KeyValueCache | None:
        """The cache under its pre-5.24 name (transformers 5.24 defines the same alias on `ModelOutput`)."""
        return self.cache


class Beit3KeyValueCache:
    """Keys and values of the tokens seen so far, one (batch, heads, seq, head_dim) pair per layer.

    The methods have the names and signatures of transformers' `Cache` (`update`, `get_seq_length`,
    `reorder_cache`), but the class is our own: the `transformers` cache API changed inside the supported range
    (5.13 to 5.24), and generation only needs these.

    Args:
        transient_tokens: how many positions at the end of each `update` are attended to in that step but not kept.
            Captioning decodes at a `<mask>` query slot appended to every step's tokens (1 for its caches): the
            slot's keys and values never enter the cache, so the next step feeds the chosen token in its place.
    """

    # Read by `GenerationMixin`: no static shapes, no rollback of a step, no linear-attention layers.
    is_compileable = False
    is_croppable = False

    def __init__(self, transient_tokens: int = 0) -> None:
        if transient_tokens < 0:
            raise ValueError(f"transient_tokens must be >= 0, got {transient_tokens}.")
        self.transient_tokens = transient_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached tokens (image and text) of layer `layer_idx`."""
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys/values of layer `layer_idx`; returns the cached ones followed by this step's.

        The last `transient_tokens` positions are returned but not kept (the kept part is a view: no copy).
        """
        if key_states.shape[2] < self.transient_tokens:
            raise ValueError(
                f"A step must feed at least transient_tokens={self.transient_tokens} tokens, got {key_states.shape[2]}."
            )
        if layer_idx == len(self.keys):
            keys, values = key_states, value_states
            self.keys.append(keys)
            self.values.append(values)
        else:
            keys = torch.cat([self.keys[layer_idx], key_states], dim=2)
            values = torch.cat([self.values[layer_idx], value_states], dim=2)
        kept = keys.shape[2] - self.transient_tokens
        self.keys[layer_idx], self.values[layer_idx] = keys[:, :, :kept], values[:, :, :kept]
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep (and reorder) the batch rows `beam_idx`, e.g. the surviving beams."""
        self.keys = [key.index_select(0, beam_idx.to(key.device)) for key in self.keys]
        self.values = [value.index_select(0, beam_idx.to(value.device)) for value in self.values]


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class Beit3Multiway(nn.Module):
    """A vision expert and a text expert applied to the two parts of one token sequence.

    Tokens `[:split_position]` go through `vision`, tokens `[split_position:]` through `text`; the sequence axis is 1.
    `split_position == seq_len` is a vision-only sequence and `split_position == 0` a text-only one. A vision-only
    model (`config.vision_only`) has `text=None`: it holds no text expert and accepts vision-only sequences only.
    """

    def __init__(self, vision: nn.Module, text: nn.Module | None) -> None:
        super().__init__()
        self.vision = vision
        self.text = text

    def forward(self, hidden_states: torch.Tensor, split_position: int) -> torch.Tensor:
        seq_len = hidden_states.shape[1]
        if split_position >= seq_len:
            return self.vision(hidden_states)
        if self.text is None:
            raise ValueError("This Multiway block is vision-only (config.vision_only=True): it has no text expert.")
        if split_position <= 0:
            return self.text(hidden_states)
        vision_states, text_states = hidden_states.split([split_position, seq_len - split_position], dim=1)
        return torch.cat([self.vision(vision_states), self.text(text_states)], dim=1)


def _multiway(factory: Callable[[], nn.Module], vision_only: bool = False) -> Beit3Multiway:
    return Beit3Multiway(vision=factory(), text=None if vision_only else factory())


class Beit3DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)  # one draw per sample
        keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def resize_patch_position_embeddings(
    patch_positions: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a (old_h * old_w, hidden) table of patch position embeddings to (new_h * new_w, hidden).

    Bicubic interpolation with `align_corners=False`, as the original's `load_model_and_may_interpolate`. It runs in
    float32 whatever the table's dtype (bicubic interpolation is not implemented for half precision on every device,
    the cause of unilm issue #1056) and returns the input dtype.
    """
    if tuple(old_grid) == tuple(new_grid):
        return patch_positions
    hidden_size = patch_positions.shape[-1]
    grid = patch_positions.reshape(1, old_grid[0], old_grid[1], hidden_size).permute(0, 3, 1, 2)  # (1, hidden, h, w)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], hidden_size).to(patch_positions.dtype)


class Beit3VisionEmbeddings(nn.Module):
    """Patch embedding, optional mask-token replacement (masked image modelling), CLS token and positions.

    A vision-only model has no mask token: it is for masked image modelling only, and a parameter that no
    classification step uses would break plain DDP (`find_unused_parameters=False`).
    """

    def __init__(self, config: Beit3Config, use_mask_token: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = (config.image_size // config.patch_size,) * 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        use_mask_token = not config.vision_only if use_mask_token is None else use_mask_token
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        # Row 0 is the CLS token, rows 1.. the patches in raster order.
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def num_tokens(self, height: int, width: int) -> int:
        """Length of the vision sequence (patches + CLS) of a `height` x `width` image."""
        return (height // self.patch_size) * (width // self.patch_size) + 1

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {self.config.num_channels}."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"Image size ({height}x{width}) must be a multiple of the patch size {self.patch_size}.")
        if not interpolate_pos_encoding and (height, width) != (self.config.image_size,) * 2:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({self.config.image_size}x"
                f"{self.config.image_size}). Pass interpolate_pos_encoding=True to run at another resolution."
            )

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + grid_h * grid_w, hidden) position embeddings: CLS row, then patch rows resized to `grid`."""
        table = self.position_embedding.weight
        if tuple(grid) == self.grid_size:
            return table
        patch_positions = resize_patch_position_embeddings(table[1:], self.grid_size, grid)
        return torch.cat([table[:1], patch_positions], dim=0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        batch_size, _, height, width = pixel_values.shape
        weight = self.patch_embedding.weight
        embeddings = self.patch_embedding(pixel_values.to(weight.dtype))  # (batch, hidden, grid_h, grid_w)
        embeddings = embeddings.flatten(2).transpose(1, 2)  # (batch, num_patches, hidden)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError(
                    "bool_masked_pos needs the mask token, which a vision-only model (config.vision_only=True) "
                    "does not have."
                )
            if bool_masked_pos.shape != embeddings.shape[:2]:
                raise ValueError(
                    f"bool_masked_pos must have shape (batch, num_patches) = {tuple(embeddings.shape[:2])}, got "
                    f"{tuple(bool_masked_pos.shape)}."
                )
            masked = bool_masked_pos.unsqueeze(-1).to(embeddings.dtype)
            embeddings = embeddings * (1.0 - masked) + self.mask_token.to(embeddings.dtype) * masked
        cls_tokens = self.cls_token.to(embeddings.dtype).expand(batch_size, -1, -1)
        embeddings = torch.cat([cls_tokens, embeddings], dim=1)  # (batch, 1 + num_patches, hidden)
        grid = (height // self.patch_size, width // self.patch_size)
        return embeddings + self.position_embeddings(grid).to(embeddings.dtype)


class Beit3TextEmbeddings(nn.Module):
    """Token embeddings plus learned absolute positions (no scaling, no layer norm, as the original)."""

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_embedding.init_std = config.hidden_size**-0.5  # torchscale's TextEmbedding init; see _init_weights
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, text_len), got {tuple(input_ids.shape)}.")
        text_len = input_ids.shape[1]
        if position_offset + text_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Text of {position_offset + text_len} tokens is longer than the position table "
                f"(max_position_embeddings={self.config.max_position_embeddings}); truncate it."
            )
        position_ids = torch.arange(position_offset, position_offset + text_len, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: (batch, heads, q_len, head_dim) inputs, additive mask, softmax in float32."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, heads, q_len, kv_len)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (batch, q_len, heads, head_dim)
    return attn_output, attn_weights


class Beit3Attention(nn.Module):
    """Joint self-attention over the vision and text tokens; projections and the sub-LN are Multiway."""

    def __init__(self, config: Beit3Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        hidden, vision_only = config.hidden_size, config.vision_only
        self.q_proj = _multiway(lambda: nn.Linear(hidden, hidden), vision_only)
        self.k_proj = _multiway(lambda: nn.Linear(hidden, hidden), vision_only)
        self.v_proj = _multiway(lambda: nn.Linear(hidden, hidden), vision_only)
        self.sub_layernorm = _multiway(lambda: nn.LayerNorm(hidden, eps=config.layer_norm_eps), vision_only)
        self.out_proj = _multiway(lambda: nn.Linear(hidden, hidden), vision_only)

    def forward(
        self,
        hidden_states: torch.Tensor,
        split_position: int,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        past_key_values: Beit3KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        heads_shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states, split_position).view(heads_shape).transpose(1, 2)  # (batch, heads, seq, hd)
        key = self.k_proj(hidden_states, split_position).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, split_position).view(heads_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (batch, heads, past + seq, hd)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)  # (batch, seq, hidden)
        attn_output = self.sub_layernorm(attn_output, split_position)
        return self.out_proj(attn_output, split_position), attn_weights


class Beit3FeedForward(nn.Module):
    """fc1 -> GELU (in float32, as the original) -> sub-LN -> fc2. One instance per expert."""

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.sub_layernorm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = F.gelu(hidden_states.float()).to(hidden_states.dtype)
        return self.fc2(self.sub_layernorm(hidden_states))


class Beit3EncoderLayer(GradientCheckpointingLayer):
    """Pre-LN block: `x + attn(LN(x))`, then `x + ffn(LN(x))`, every LN and the FFN Multiway."""

    def __init__(self, config: Beit3Config, layer_idx: int = 0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        norm = lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: E731
        self.layernorm_before = _multiway(norm, config.vision_only)
        self.self_attn = Beit3Attention(config, layer_idx)
        self.layernorm_after = _multiway(norm, config.vision_only)
        self.ffn = _multiway(lambda: Beit3FeedForward(config), config.vision_only)
        self.drop_path = Beit3DropPath(drop_path_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        split_position: int,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        past_key_values: Beit3KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.layernorm_before(hidden_states, split_position)
        attn_output, attn_weights = self.self_attn(
            normed, split_position, attention_mask, output_attentions, past_key_values=past_key_values
        )
        hidden_states = hidden_states + self.drop_path(attn_output)
        ffn_output = self.ffn(self.layernorm_after(hidden_states, split_position), split_position)
        hidden_states = hidden_states + self.drop_path(ffn_output)
        return hidden_states, attn_weights


class Beit3Encoder(nn.Module):
    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        # Stochastic depth grows linearly from 0 (first layer) to drop_path_rate (last layer), as the original.
        rates = [config.drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.layers = nn.ModuleList(Beit3EncoderLayer(config, index, rate) for index, rate in enumerate(rates))
        norm = lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # noqa: E731
        self.layernorm = _multiway(norm, config.vision_only) if config.use_final_layernorm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        split_position: int,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        past_key_values: Beit3KeyValueCache | None = None,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(
                hidden_states, split_position, attention_mask, output_attentions, past_key_values=past_key_values
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        if self.layernorm is not None:
            hidden_states = self.layernorm(hidden_states, split_position)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


TextAttention = Literal["bidirectional", "causal"]


def build_attention_bias(
    key_mask: torch.Tensor | None,
    num_queries: int,
    num_vision_queries: int,
    past_length: int,
    text_attention: TextAttention,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The additive attention bias of every BEiT-3 forward: 0 where a query may attend, the dtype minimum elsewhere.

    Args:
        key_mask: (batch, num_queries) mask of the new tokens with 1 = attend (padding is 0), or None; cached
            tokens are always attended.
        num_queries: new tokens, `[vision tokens; text tokens]`, at positions `past_length ..` of the sequence.
        num_vision_queries: how many of them are vision tokens (they come first).
        past_length: cached tokens in front of them.
        text_attention: `"bidirectional"`: every token attends to every (unpadded) token. `"causal"` (captioning):
            vision tokens attend to the vision tokens only; a text token attends to the vision tokens and the text
            up to itself.

    Returns None (attend everywhere), a (batch, 1, 1, keys) padding bias, or a (batch or 1, 1, queries, keys) bias.
    The finite minimum (rather than -inf) keeps a fully masked row finite instead of NaN.
    """
    allowed = None
    if text_attention == "causal":
        query_positions = torch.arange(past_length, past_length + num_queries, device=device)[:, None]
        key_positions = torch.arange(past_length + num_queries, device=device)[None, :]
        vision_query = query_positions < past_length + num_vision_queries
        vision_key = (key_positions >= past_length) & (key_positions < past_length + num_vision_queries)
        allowed = torch.where(vision_query, vision_key, key_positions <= query_positions)[None, None]  # (1, 1, q, k)
    elif text_attention != "bidirectional":
        raise ValueError(f"text_attention must be 'bidirectional' or 'causal', got {text_attention!r}.")
    if key_mask is not None:
        attended = F.pad(key_mask != 0, (past_length, 0), value=True)[:, None, None, :]  # (batch, 1, 1, keys)
        allowed = attended if allowed is None else allowed & attended
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class Beit3ClassificationHead(nn.Module):
    """[LayerNorm ->] Linear -> LayerNorm -> GELU -> Linear: the VQA head (no input norm) and the NLVR2 head."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        num_labels: int,
        eps: float,
        normalize_input: bool,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(in_features, eps=eps) if normalize_input else None
        self.dense = nn.Linear(in_features, hidden_features)
        self.layernorm = nn.LayerNorm(hidden_features, eps=eps)
        self.activation = nn.GELU()
        self.out_proj = nn.Linear(hidden_features, num_labels)
        # The original multiplies the initial weights of some heads by 0.001; `_init_weights` reads `init_scale`.
        self.dense.init_scale = self.out_proj.init_scale = init_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.input_layernorm is not None:
            features = self.input_layernorm(features)
        return self.out_proj(self.activation(self.layernorm(self.dense(features))))


class Beit3Pooler(nn.Module):
    """LayerNorm -> Linear -> tanh on the first token (the VQA pooler)."""

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(self.layernorm(hidden_states[:, 0])))


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: cheap (a min / max per tensor), in one place, each error naming the argument. The value checks are
# skipped while torch.compile or torch.jit traces, where a data-dependent branch would break the graph.
# ----------------------------------------------------------------------------------------------------------------------


def _checking_values() -> bool:
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def check_tensor(name: str, value: Any) -> None:
    """A `TypeError` for numpy arrays, lists, ... where the model takes a `torch.Tensor` (or None)."""
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}; convert it with torch.as_tensor(...) or call "
            "the processor with return_tensors='pt'."
        )


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    """Float images (what the image processor returns), and at least one of them."""
    check_tensor("pixel_values", pixel_values)
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}: the model takes normalised float images, not raw pixels; "
            "run the images through Beit3ImageProcessor (or the processor) first."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(
            f"pixel_values is an empty batch (shape {tuple(pixel_values.shape)}); pass at least one image."
        )


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Integer ids in [0, vocab_size), at least one example and one token (else an index error or a CUDA assert)."""
    check_tensor("input_ids", input_ids)
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one text of at least one token."
        )
    if not _checking_values():
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync for both
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids holds token id {low if low < 0 else high}, outside the model's vocabulary [0, {vocab_size}). "
            "Is the tokenizer the model's? A tokenizer with a larger vocabulary needs "
            "model.resize_token_embeddings(len(tokenizer))."
        )


def check_attention_mask(attention_mask: torch.Tensor) -> bool:
    """1 = attend, 0 = padding, the first token attended: the mistakes of code ported from the original are named.

    Returns whether the mask is all ones (no padding), found in the same host sync as the checks; False when values
    are not checked (under torch.compile) or the mask is empty.
    """
    check_tensor("attention_mask", attention_mask)
    if not _checking_values() or attention_mask.numel() == 0:
        return False
    binary = (attention_mask == 0) | (attention_mask == 1)
    is_binary, first_attended, no_padding = torch.stack(
        [binary.all(), attention_mask[:, 0].bool().all(), attention_mask.bool().all()]
    ).tolist()
    if not is_binary:
        if bool((attention_mask < 0).any()):
            raise ValueError(
                "attention_mask holds negative values: it looks like an additive mask (0 = attend, -inf = masked). "
                "Pass a 0/1 mask with 1 = attend and 0 = padding, e.g. (additive_mask == 0).long()."
            )
        values = attention_mask.unique()[:6].tolist()
        raise ValueError(f"attention_mask must hold 1 (attend) and 0 (padding) only, got values {values}.")
    if not first_attended:
        raise ValueError(
            "attention_mask is 0 at the first text token of some rows, which would mask `<s>`. Either it is the "
            "original BEiT-3 code's `padding_mask`, of the opposite convention (1 = pad): pass attention_mask = 1 - "
            "padding_mask; or the text is padded on the left: BEiT-3's text positions start at `<s>`, so pad on the "
            "right (the tokenizer's padding_side='right', which Beit3Processor always uses)."
        )
    return no_padding


def check_token_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Token labels: -100 (ignored) or ids in [0, vocab_size), never a device-side assert."""
    check_tensor("labels", labels)
    if not _checking_values():
        return
    valid = labels != -100
    if bool(((labels[valid] < 0) | (labels[valid] >= vocab_size)).any()):
        raise ValueError(f"labels must be -100 or token ids in [0, {vocab_size}).")


def check_class_labels(labels: torch.Tensor, num_labels: int, batch_size: int) -> None:
    """Integer class labels: one per example, each in [0, num_labels)."""
    check_tensor("labels", labels)
    if labels.is_floating_point():
        return  # soft targets / regression: the heads check their shape
    if labels.numel() != batch_size:
        raise ValueError(f"labels must hold one class id per example ({batch_size}), got shape {tuple(labels.shape)}.")
    if _checking_values() and bool(((labels < 0) | (labels >= num_labels)).any()):
        raise ValueError(
            f"labels must be class ids in [0, {num_labels}) (config.num_labels), got {labels.flatten().tolist()[:8]}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class Beit3PreTrainedModel(PreTrainedModel):
    config_class = Beit3Config
    base_model_prefix = "beit3"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Beit3VisionEmbeddings", "Beit3TextEmbeddings", "Beit3EncoderLayer"]
    _supports_sdpa = True
    # The task Auto class (besides AutoModel) a saved checkpoint of this class declares in `auto_map`.
    _task_auto_class: str | None = None
    # (task, class of `pipeline_beit3.py`): a `transformers.pipeline` task that transformers does not offer for this
    # head, declared in a saved folder's `custom_pipelines` (the file is copied next to the model's code).
    _custom_pipeline: tuple[str, str] | None = None

    def _auto_map(self) -> dict[str, str]:
        """The `auto_map` of a saved folder: `AutoConfig`, and this class for `AutoModel` and its task Auto class.

        A checkpoint folder loads as its own class through `AutoModel` (so no head weights are dropped) and through
        its task Auto class. Entries that name other classes of this module (from a config shared with, or loaded
        from, another BEiT-3 class) are dropped; entries of other modules are kept.
        """
        module = type(self).__module__.rsplit(".", 1)[-1]
        model_reference = f"{module}.{type(self).__name__}"
        auto_map = {
            auto_class: reference
            for auto_class, reference in (getattr(self.config, "auto_map", None) or {}).items()
            if not (isinstance(reference, str) and reference.startswith(f"{module}."))
        }
        auto_map["AutoConfig"] = f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}"
        auto_map["AutoModel"] = model_reference
        if self._task_auto_class is not None:
            auto_map[self._task_auto_class] = model_reference
        return auto_map

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, writing `auto_map` (see `_auto_map`) into the saved `config.json`.

        The entries are set for the duration of the save only: neither building nor saving a model changes its
        config. They are written when the class is registered as remote code (`register_for_auto_class`, done by
        `import beit3_hf` and by `trust_remote_code` loading), the case in which the code files are saved too.
        """
        model_class = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        if model_class is not type(self):
            # torch's `fully_shard` (FSDP2) swaps the class for a dynamic `FSDP<Class>` defined in a torch module;
            # saved under it, `auto_map` would name that module and torch's files would be copied as the model code.
            sharded_class, self.__class__ = type(self), model_class
            try:
                return self.save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.__class__ = sharded_class
        if type(self)._auto_class is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        saved_fields = {"auto_map": self._auto_map()}
        # The pipeline file is next to this one in the package and in folders saved with it; a folder loaded as
        # remote code without it (saved before it existed) is re-saved without the custom pipeline.
        pipeline_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_beit3.py")
        if self._custom_pipeline is not None and os.path.isfile(pipeline_file):
            task, class_name = self._custom_pipeline
            saved_fields["custom_pipelines"] = {task: {"impl": f"pipeline_beit3.{class_name}", "pt": ["AutoModel"]}}
        previous = {name: self.config.__dict__[name] for name in saved_fields if name in self.config.__dict__}
        self.config.__dict__.update(saved_fields)
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
            if "custom_pipelines" in saved_fields:
                shutil.copy(pipeline_file, os.path.join(save_directory, "pipeline_beit3.py"))
            return result
        finally:
            for name in saved_fields:
                if name in previous:
                    self.config.__dict__[name] = previous[name]
                else:
                    del self.config.__dict__[name]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers skips modules without parameters of their own, so every rule here is on the module that owns
        # the parameters; head-specific scales travel as `init_scale` / `init_std` attributes set by the owner.
        # Linear and LayerNorm follow the original `BEiT3Wrapper._init_weights`: a normal truncated at +-1 std.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            std = self.config.initializer_range * getattr(module, "init_scale", 1.0)
            init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if hasattr(module, "init_std"):
                init.normal_(module.weight, std=module.init_std)
            else:
                std = self.config.initializer_range
                init.trunc_normal_(module.weight, std=std, a=-std, b=std)
        elif isinstance(module, Beit3VisionEmbeddings):
            init.zeros_(module.cls_token)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, (Beit3ForImageTextRetrieval, Beit3ForPreTraining)) and hasattr(module, "logit_scale"):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


def _require_text_experts(config: Beit3Config, model_name: str) -> None:
    if config.vision_only:
        raise ValueError(
            f"{model_name} reads text, but config.vision_only=True builds no text experts; use a config with "
            "vision_only=False."
        )


class Beit3Model(Beit3PreTrainedModel):
    r"""The BEiT-3 encoder: images, texts, or image-text pairs in one Multiway Transformer.

    `last_hidden_state` is the sequence `[vision tokens; text tokens]`: the CLS token and the patches of the image
    (`1 + (H / patch) * (W / patch)` tokens) followed by the text tokens, after the final Multiway layer norm when the
    config has one. Vision-only inputs use the vision experts throughout, text-only inputs the text experts.

    With `config.vision_only=True` the model holds the vision experts only (no text experts, text embeddings or
    text position table; the parameter names of the vision side are unchanged) and takes `pixel_values` only.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3Model
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100)
    >>> model = Beit3Model(config).eval()
    >>> pixel_values = torch.randn(2, 3, 32, 32)
    >>> input_ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    >>> attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    >>> model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.shape
    torch.Size([2, 9, 64])
    >>> out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    >>> out.last_hidden_state.shape, len(out.hidden_states)
    (torch.Size([2, 4, 64]), 3)
    >>> vision_config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                             image_size=32, patch_size=16, vision_only=True)
    >>> Beit3Model(vision_config)(pixel_values=pixel_values).last_hidden_state.shape
    torch.Size([2, 5, 64])

    ```
    """

    def __init__(self, config: Beit3Config, use_mask_token: bool | None = None) -> None:
        r"""
        Args:
            config: the architecture.
            use_mask_token: build the mask token of masked image modelling (`bool_masked_pos`); default: unless
                `config.vision_only` (an image classifier never masks, and an unused parameter breaks plain DDP).
        """
        super().__init__(config)
        self.vision_embeddings = Beit3VisionEmbeddings(config, use_mask_token)
        self.text_embeddings = None if config.vision_only else Beit3TextEmbeddings(config)
        self.encoder = Beit3Encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text token embedding; the patch embedding (as ViT's) in a vision-only model."""
        if self.text_embeddings is None:
            return self.vision_embeddings.patch_embedding
        return self.text_embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self.text_embeddings is None:
            self.vision_embeddings.patch_embedding = value
        else:
            self.text_embeddings.token_embedding = value

    def _check_inputs(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_length: int,
    ) -> bool:
        """Raise a `ValueError` (or `TypeError`) naming the first inconsistent input; return whether an
        `attention_mask` was given that masks nothing (it can then be dropped)."""
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass pixel_values, input_ids, or both.")
        if input_ids is not None and self.config.vision_only:
            raise ValueError(
                "This model is vision-only (config.vision_only=True): it has no text experts or text embeddings, "
                "so it takes pixel_values only, not input_ids."
            )
        if pixel_values is not None:
            check_pixel_values(pixel_values)
        if input_ids is not None:
            check_input_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None:
            if input_ids is None:
                raise ValueError("attention_mask masks text tokens, but no input_ids were given.")
            check_tensor("attention_mask", attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} doesn't match input_ids shape "
                    f"{tuple(input_ids.shape)}."
                )
            if past_length == 0:
                return check_attention_mask(attention_mask)
            if _checking_values() and not bool(attention_mask.bool().all()):
                raise ValueError("Padding is not supported when continuing from past_key_values.")
        if pixel_values is not None and past_length > 0:
            raise ValueError("pixel_values start a sequence: they cannot follow a filled past_key_values.")
        return False

    def _embed(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        bool_masked_pos: torch.BoolTensor | None,
        interpolate_pos_encoding: bool,
        text_position_offset: int,
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Embed the inputs into one sequence; returns (embeddings, split_position, key mask with 1 = attend)."""
        parts, key_mask = [], None
        if pixel_values is not None:
            parts.append(self.vision_embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding))
        split_position = parts[0].shape[1] if parts else 0
        if input_ids is not None:
            text_embeddings = self.text_embeddings(input_ids, position_offset=text_position_offset)
            if attention_mask is not None:
                # The original zeroes the embeddings of padding tokens; it only changes the outputs at those tokens.
                text_embeddings = text_embeddings * attention_mask.unsqueeze(-1).to(text_embeddings.dtype)
                vision_mask = attention_mask.new_ones(attention_mask.shape[0], split_position)
                key_mask = torch.cat([vision_mask, attention_mask], dim=1)
            parts.append(text_embeddings)
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(
                f"pixel_values has batch size {parts[0].shape[0]} but input_ids has {parts[1].shape[0]}; an image-text "
                "pair input needs one image per text."
            )
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (batch, vision_len + text_len, hidden)
        return embeddings, split_position, key_mask

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Beit3KeyValueCache | None = None,
        text_attention: TextAttention = "bidirectional",
        text_position_offset: int = 0,
    ) -> BaseModelOutput:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images.
            input_ids: (batch, text_len) token ids, `<s> ... </s>` followed by padding.
            attention_mask: (batch, text_len), 1 for tokens to attend to and 0 for padding.
            bool_masked_pos: (batch, num_patches), True where a patch is replaced by the mask token.
            interpolate_pos_encoding: resize the vision position embeddings to the input resolution.
            output_attentions / output_hidden_states: also return the attention maps (eager attention only; SDPA
                gives None) / the input of every layer and the final output.
            past_key_values: a `Beit3KeyValueCache`, filled in place with this call's keys and values; the new
                tokens attend to the cached ones. Images can only start a sequence (an empty cache).
            text_attention: `"bidirectional"` (default: every token sees every unpadded token) or `"causal"`
                (captioning: image tokens see the image only, a text token the image and the text up to itself).
            text_position_offset: position of the first text token in the text position table (the number of
                text tokens already in the cache).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        past_length = 0 if past_key_values is None else past_key_values.get_seq_length()
        mask_without_padding = self._check_inputs(pixel_values, input_ids, attention_mask, past_length)
        if past_length > 0 or mask_without_padding:
            # No padding (checked when continuing a cache): no mask, so that SDPA can pick its fastest kernel.
            attention_mask = None
        embeddings, split_position, key_mask = self._embed(
            pixel_values, input_ids, attention_mask, bool_masked_pos, interpolate_pos_encoding, text_position_offset
        )
        attention_bias = build_attention_bias(
            key_mask,
            num_queries=embeddings.shape[1],
            num_vision_queries=split_position,
            past_length=past_length,
            text_attention=text_attention,
            dtype=embeddings.dtype,
            device=embeddings.device,
        )
        return self.encoder(
            embeddings,
            split_position,
            attention_bias,
            output_attentions,
            output_hidden_states,
            past_key_values=past_key_values,
        )


class Beit3ForImageClassification(Beit3PreTrainedModel):
    r"""BEiT-3 with an image classification head: mean of the patch tokens -> LayerNorm -> Linear.

    The released ImageNet checkpoints have no final encoder layer norm (`use_final_layernorm=False`). Integer
    `labels` give a cross-entropy loss; float `labels` of the logits' shape (mixup / cutmix targets) give the
    soft-target cross-entropy of the original recipe; `config.problem_type` `"multi_label_classification"` or
    `"regression"` select BCE or MSE as in `transformers`.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForImageClassification
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, use_final_layernorm=False, num_labels=10)
    >>> model = Beit3ForImageClassification(config)
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([3, 7]))
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([2, 10]), 0)

    ```
    """

    _task_auto_class = "AutoModelForImageClassification"

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.classifier.init_scale = 0.001  # the original starts the classifier at 0.001 x its usual init
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ImageClassifierOutput:
        if pixel_values is None:
            raise ValueError("Beit3ForImageClassification needs pixel_values.")
        outputs = self.beit3(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,  # whatever config.return_dict says: the head reads the fields
        )
        pooled = self.fc_norm(outputs.last_hidden_state[:, 1:].mean(dim=1))  # mean over patches, CLS excluded
        logits = self.classifier(pooled)
        loss = None if labels is None else self._classification_loss(logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' `ForSequenceClassificationLoss` (by `config.problem_type`, in float32, without inferring
        the problem type from the labels) plus the original's soft-target cross-entropy for float labels."""
        problem_type = self.config.problem_type
        if problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Float labels are soft targets and must have the logits' shape {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}."
                )
            return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        check_class_labels(labels, logits.shape[-1], logits.shape[0])
        return F.cross_entropy(logits.float(), labels.view(-1))


class Beit3ForImageTextRetrieval(Beit3PreTrainedModel):
    r"""BEiT-3 as a dual encoder for image-text retrieval (CLIP-style).

    Images and texts are encoded separately (images by the vision experts, texts by the text experts); the first
    token of each goes through a bias-free projection and is L2-normalised. `return_loss=True` gives the symmetric
    contrastive loss over the batch with temperature `logit_scale.exp()` (not clamped, as the original).

    `get_image_features` / `get_text_features` return a `BaseModelOutputWithPooling` as CLIP's do in transformers 5;
    unlike CLIP's, their `pooler_output` is already L2-normalised (the embedding the original retrieves with). The
    forward output carries both as `vision_model_output` / `text_model_output`, with the towers' `hidden_states`
    and `attentions` when requested.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForImageTextRetrieval
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100)
    >>> model = Beit3ForImageTextRetrieval(config)
    >>> pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.tensor([[0, 5, 2], [0, 6, 2]])
    >>> out = model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)
    >>> out.logits_per_image.shape, torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2))
    (torch.Size([2, 2]), True)
    >>> image_embeds = model.get_image_features(pixel_values).pooler_output
    >>> image_embeds.shape, torch.allclose(image_embeds, out.image_embeds)
    (torch.Size([2, 64]), True)

    ```
    """

    _task_auto_class = "AutoModelForZeroShotImageClassification"

    def __init__(self, config: Beit3Config) -> None:
        _require_text_experts(config, type(self).__name__)
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.vision_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.text_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """Encode images alone; `pooler_output` is the (batch, hidden_size) L2-normalised image embedding."""
        outputs = self.beit3(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return self._pooled(outputs, self.vision_projection)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """Encode texts alone; `pooler_output` is the (batch, hidden_size) L2-normalised embedding of `<s>`."""
        outputs = self.beit3(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return self._pooled(outputs, self.text_projection)

    @staticmethod
    def _pooled(outputs: BaseModelOutput, projection: nn.Linear) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=F.normalize(projection(outputs.last_hidden_state[:, 0]), dim=-1),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> Beit3ImageTextRetrievalOutput:
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass pixel_values, input_ids, or both.")
        requested = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_outputs = text_outputs = None
        if pixel_values is not None:
            vision_outputs = self.get_image_features(
                pixel_values, interpolate_pos_encoding, **requested, return_dict=True
            )
        if input_ids is not None:
            text_outputs = self.get_text_features(input_ids, attention_mask, **requested, return_dict=True)
        image_embeds = None if vision_outputs is None else vision_outputs.pooler_output
        text_embeds = None if text_outputs is None else text_outputs.pooler_output
        logits_per_image = logits_per_text = loss = None
        logit_scale = self.logit_scale.exp()
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = logit_scale * image_embeds @ text_embeds.t()  # (num_images, num_texts)
            logits_per_text = logits_per_image.t()
            if return_loss:
                loss = image_text_contrastive_loss(logits_per_image)
        elif return_loss:
            raise ValueError("return_loss=True needs both pixel_values and input_ids.")
        return Beit3ImageTextRetrievalOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


def image_text_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; pair i of the batch is the positive of row i."""
    if logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"The contrastive loss pairs image i with text i, so it needs as many texts as images; got "
            f"{tuple(logits_per_image.shape)}."
        )
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    logits = logits_per_image.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class Beit3ForVisualQuestionAnswering(Beit3PreTrainedModel):
    r"""BEiT-3 for VQA: the fused image+question sequence, pooled at its first (vision CLS) token, then an MLP.

    `labels` are soft scores of shape (batch, num_labels) (VQAv2: 0, 0.3, 0.6, 0.9 or 1 per answer); the loss is the
    original's: mean binary cross-entropy times the number of answers.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForVisualQuestionAnswering
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, use_final_layernorm=False, num_labels=5)
    >>> model = Beit3ForVisualQuestionAnswering(config)
    >>> labels = torch.tensor([[0.0, 1.0, 0.3, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0, 0.0]])
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[0, 5, 2], [0, 6, 2]]),
    ...             labels=labels)
    >>> out.logits.shape
    torch.Size([2, 5])

    ```
    """

    _task_auto_class = "AutoModelForVisualQuestionAnswering"
    _custom_pipeline = ("visual-question-answering", "Beit3VisualQuestionAnsweringPipeline")

    def __init__(self, config: Beit3Config) -> None:
        _require_text_experts(config, type(self).__name__)
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.pooler = Beit3Pooler(config)
        hidden = config.hidden_size
        self.classifier = Beit3ClassificationHead(
            hidden, 2 * hidden, config.num_labels, config.layer_norm_eps, normalize_input=False
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        if pixel_values is None or input_ids is None:
            raise ValueError("Beit3ForVisualQuestionAnswering needs both pixel_values and input_ids.")
        outputs = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.pooler(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_tensor("labels", labels)
            if labels.shape != logits.shape:
                raise ValueError(
                    f"VQA labels are soft scores of shape (batch, num_labels) = {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}."
                )
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[1]
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class Beit3ForVisualReasoning(Beit3PreTrainedModel):
    r"""BEiT-3 for NLVR2: is a statement true of a pair of images?

    `pixel_values` has shape (batch, 2, channels, height, width): the (left, right) images of each example. Each
    image is fused with the text; the vision CLS and the first text token of both fused sequences are concatenated
    (4 x hidden: left CLS, left text, right CLS, right text) and classified by an MLP.

    The two images run as one encoder batch of 2 x batch rows ordered by example: `[example 0 left, example 0 right,
    example 1 left, ...]`. `hidden_states` and `attentions` keep that layout, (2 * batch, ...); row `2 * i` is the
    left and row `2 * i + 1` the right image of example `i` (`tensor.view(batch, 2, ...)` separates them).

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForVisualReasoning
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, num_labels=2)
    >>> model = Beit3ForVisualReasoning(config)
    >>> out = model(pixel_values=torch.randn(3, 2, 3, 32, 32), input_ids=torch.tensor([[0, 5, 2]] * 3),
    ...             labels=torch.tensor([0, 1, 1]), output_hidden_states=True)
    >>> out.logits.shape, out.hidden_states[-1].shape  # 3 examples x 2 images; 5 image + 3 text tokens
    (torch.Size([3, 2]), torch.Size([6, 8, 64]))

    ```
    """

    _custom_pipeline = ("visual-reasoning", "Beit3VisualReasoningPipeline")

    def __init__(self, config: Beit3Config) -> None:
        _require_text_experts(config, type(self).__name__)
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        hidden = config.hidden_size
        self.classifier = Beit3ClassificationHead(
            4 * hidden, 2 * hidden, config.num_labels, config.layer_norm_eps, normalize_input=True, init_scale=0.001
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        if pixel_values is None or input_ids is None:
            raise ValueError("Beit3ForVisualReasoning needs both pixel_values and input_ids.")
        check_tensor("pixel_values", pixel_values)
        check_tensor("input_ids", input_ids)
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                "Beit3ForVisualReasoning takes an image pair per example: pixel_values of shape "
                f"(batch, 2, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        batch_size = pixel_values.shape[0]
        if input_ids.ndim != 2 or input_ids.shape[0] != batch_size:
            raise ValueError(
                f"pixel_values holds {batch_size} image pairs but input_ids has shape {tuple(input_ids.shape)}; "
                "Beit3ForVisualReasoning needs one text (batch, text_len) per image pair."
            )
        if labels is not None:
            check_class_labels(labels, self.config.num_labels, batch_size)
        # Both images of an example see its text: one batch [ex 0 left, ex 0 right, ex 1 left, ...].
        outputs = self.beit3(
            pixel_values=pixel_values.flatten(0, 1),  # (batch * 2, channels, height, width)
            input_ids=input_ids.repeat_interleave(2, dim=0),
            attention_mask=None if attention_mask is None else attention_mask.repeat_interleave(2, dim=0),
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state  # (batch * 2, vision_len + text_len, hidden)
        split_position = hidden.shape[1] - input_ids.shape[1]
        image_text_features = torch.cat([hidden[:, 0], hidden[:, split_position]], dim=-1)  # (batch * 2, 2 * hidden)
        left_features, right_features = image_text_features.view(batch_size, 2, -1).unbind(dim=1)
        logits = self.classifier(torch.cat([left_features, right_features], dim=-1))  # from (batch, 4 * hidden)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def captioning_generation_config(config: Beit3Config) -> GenerationConfig:
    """The original recipe's decoding (`--num_beams 3 --num_max_bpe_tokens 32 --length_penalty 0.6`, with the
    original beam search) for `config`'s token ids, `max_length` capped by its text position table."""
    return GenerationConfig(
        num_beams=3,
        max_length=min(32, config.max_position_embeddings),
        length_penalty=0.6,
        original_beam_search=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


# Generation settings that change what a search returns but that the original beam search does not have, with
# their neutral values (None also counts as neutral: transformers versions differ in which defaults they spell out).
_NOT_IN_ORIGINAL_SEARCH = {
    "do_sample": False, "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None,
    "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "stop_strings": None, "max_time": None, "early_stopping": False,
    "watermarking_config": None, "output_scores": False, "output_logits": False, "output_attentions": False,
    "output_hidden_states": False,
}  # fmt: skip


def _generation_cache_name() -> str:
    """The model keyword under which `GenerationMixin` keeps the cache: `past_key_values` up to transformers 5.23,
    `cache` from 5.24 on (the first of `ALL_CACHE_NAMES` in both)."""
    from transformers.generation import utils as generation_utils

    return getattr(generation_utils, "ALL_CACHE_NAMES", ["past_key_values"])[0]


class Beit3ForCaptioning(Beit3PreTrainedModel, GenerationMixin):
    r"""BEiT-3 image captioning: a causal text decoder on top of the image, trained by masked language modelling.

    Training (as the original): `input_ids` is the caption with some tokens replaced by `<mask>`, `labels` holds the
    original token at those positions and -100 elsewhere; text sees the image and earlier text, the image sees only
    itself (the base model with `text_attention="causal"`). The loss is the original's label-smoothed KL (`config.label_smoothing`, 0.1 by default) averaged over the
    labelled tokens. `generate` decodes with the original's scheme: `[<s>, <mask>]` after the image, then
    `[last token, <mask>]` steps with cached keys and values, predicting at the `<mask>` slot; by default with the
    original beam search, with `original_beam_search=False` through transformers' `GenerationMixin` (greedy,
    sampling, streaming...).

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForCaptioning
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, mask_token_id=99)
    >>> model = Beit3ForCaptioning(config).eval()
    >>> input_ids = torch.tensor([[0, 99, 12, 99, 2]])
    >>> labels = torch.tensor([[-100, 11, -100, 13, -100]])
    >>> out = model(pixel_values=torch.randn(1, 3, 32, 32), input_ids=input_ids, labels=labels)
    >>> out.logits.shape
    torch.Size([1, 5, 100])
    >>> model.generate(torch.randn(2, 3, 32, 32), num_beams=3, max_length=6).shape[0]
    2
    >>> sampled = model.generate(torch.randn(1, 3, 32, 32), original_beam_search=False, do_sample=True, max_new_tokens=4)
    >>> sampled.shape[0], int(sampled[0, 0]) == config.bos_token_id
    (1, True)

    ```
    """

    _task_auto_class = "AutoModelForImageTextToText"
    # `GenerationMixin` reads the prompt from `main_input_name`; the images travel as a model keyword.
    main_input_name = "input_ids"

    def __init__(self, config: Beit3Config) -> None:
        _require_text_experts(config, type(self).__name__)
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()
        # The original recipe, unless `from_pretrained` finds a `generation_config.json`.
        self.generation_config = captioning_generation_config(config)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Beit3KeyValueCache | None = None,
        use_cache: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        text_position_offset: int | None = None,
    ) -> Beit3CaptioningOutput:
        r"""
        Args:
            input_ids: (batch, text_len) caption tokens (with `<mask>` at the positions to predict when training);
                first, as `GenerationMixin` expects of its `main_input_name`.
            pixel_values: (batch, channels, height, width) images; omit them when continuing from `past_key_values`.
            attention_mask: (batch, text_len), 1 for tokens to attend to and 0 for padding.
            labels: (batch, text_len) target ids at the predicted positions, -100 elsewhere.
            past_key_values: cache of earlier steps; the new text continues at the next position.
            use_cache: return the (updated) cache.
            text_position_offset: text position of the first token of `input_ids`. By default 0 on the first step
                and, when continuing, the number of cached text tokens for an image of `config.image_size` (pass
                it when the first step ran at another resolution with `interpolate_pos_encoding=True`).
        """
        if input_ids is None:
            raise ValueError("Beit3ForCaptioning needs input_ids (at least `<s> <mask>` to start a caption).")
        if use_cache and past_key_values is None:
            past_key_values = Beit3KeyValueCache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if pixel_values is None and past_length == 0:
            raise ValueError("Beit3ForCaptioning needs an image: pass pixel_values (or past_key_values holding one).")
        if text_position_offset is None:
            text_position_offset = 0 if past_length == 0 else past_length - self.config.num_patches - 1
            if text_position_offset < 0:
                raise ValueError(
                    "The cache is shorter than the image at config.image_size: pass text_position_offset."
                )
        outputs = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            past_key_values=past_key_values,
            text_attention="causal",
            text_position_offset=text_position_offset,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state[:, -input_ids.shape[1] :])  # text positions only
        loss = None if labels is None else self.captioning_loss(logits, labels)
        return Beit3CaptioningOutput(
            loss=loss,
            logits=logits,
            cache=past_key_values if use_cache else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def captioning_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original `BertCaptioningLoss` (without its drop-worst schedule): KL to label-smoothed targets."""
        check_token_labels(labels, logits.shape[-1])
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels must have shape (batch, text_len) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}."
            )
        selected = labels != -100
        logits, targets = logits[selected].float(), labels[selected]  # (num_labelled, vocab), (num_labelled,)
        smoothing, num_classes = self.config.label_smoothing, logits.shape[-1]
        smoothed = torch.full_like(logits, smoothing / (num_classes - 1))
        smoothed.scatter_(1, targets[:, None], 1.0 - smoothing)
        return F.kl_div(F.log_softmax(logits, dim=-1), smoothed, reduction="none").sum(dim=-1).mean()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # `generate` brings a `Beit3KeyValueCache` of its own, which never stores the `<mask>` slot

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        cache: Beit3KeyValueCache | None = None,
        past_key_values: Beit3KeyValueCache | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """One `GenerationMixin` step, the original's: the new tokens followed by a `<mask>` query slot.

        The first step feeds the image and the whole prompt, later ones the last chosen token; the cache holds the
        image and every token but the last (`transient_tokens=1` keeps the slot out of it), and the `<mask>` slot's
        logits (`logits[:, -1]`) predict the next token. Without a cache every step starts again from the image.
        """
        cache = cache if cache is not None else past_key_values  # its name depends on the transformers version
        first_step = cache is None or cache.get_seq_length() == 0
        new_ids = input_ids if first_step else input_ids[:, -1:]
        mask_slot = new_ids.new_full((new_ids.shape[0], 1), self.config.mask_token_id)
        return {
            "pixel_values": pixel_values if first_step else None,
            "input_ids": torch.cat([new_ids, mask_slot], dim=1),  # (batch, new + 1)
            "past_key_values": cache,
            "use_cache": cache is not None,
            "text_position_offset": input_ids.shape[1] - new_ids.shape[1],
            "interpolate_pos_encoding": interpolate_pos_encoding,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | ModelOutput:
        """Caption images; returns (batch, length) ids `<s> ... </s>` followed by padding.

        Two searches, chosen by `original_beam_search` (a `generation_config` attribute, or a keyword here):

        - `True` (the default of new and converted models, whose `generation_config` is the original recipe:
          `num_beams=3, max_length=32, length_penalty=0.6`): the original beam search of
          `CaptioningHandler.eval_batch`, token for token. It reads `num_beams`, `max_length` (the original's
          `num_max_bpe_tokens`, which counts the `<mask>` slot of the last step: captions have at most
          `max_length - 1` tokens, `<s>` and `</s>` included) or `max_new_tokens` (`max_length = max_new_tokens +
          2`) and `length_penalty`; it refuses every other generation setting (sampling, streamers, penalties...).
        - `False`: transformers' `GenerationMixin.generate`, with every decoding strategy and option it has
          (greedy, sampling, its own beam search, `streamer`, `GenerationConfig`), one `[last token, <mask>]` step
          at a time. `max_length` counts the tokens returned, `<s>` included; `num_beams=1, do_sample=False` is
          greedy decoding. Its beam search is not the original's: it keeps `2 * num_beams` candidates per step
          (the original `3 * num_beams`), divides a finished caption's score by (generated tokens) **
          `length_penalty` (the original also counts `<s>`), and at `max_length` keeps the unfinished captions
          (the original drops the candidate of its last step).

        `input_ids` (optional) is a prompt that the caption continues, one length for the whole batch; the
        processor's `</s>` and padding are dropped, so an empty prompt (`processor(images=..., text="")`) is the
        plain caption. The original beam search takes no prompt.
        """
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values: the images to caption.")
        check_pixel_values(pixel_values)
        if self.config.mask_token_id is None:
            raise ValueError("config.mask_token_id is not set: captioning decodes at the tokenizer's <mask> slot.")
        if kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is not None:
            raise ValueError("Pass max_length or max_new_tokens, not both.")
        prompt = self._generation_prompt(
            pixel_values, kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        )
        merged = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = merged.update(**{key: value for key, value in kwargs.items() if key != "original_beam_search"})
        original = kwargs.pop("original_beam_search", getattr(merged, "original_beam_search", False))
        if original:
            return self._original_beam_search(pixel_values, prompt, merged, unused)
        self._check_position_table(
            merged.max_length if merged.max_new_tokens is None else prompt.shape[1] + merged.max_new_tokens
        )
        cache_name = _generation_cache_name()
        if merged.use_cache and kwargs.get(cache_name) is None:
            kwargs[cache_name] = Beit3KeyValueCache(transient_tokens=1)
        return super().generate(
            input_ids=prompt, pixel_values=pixel_values, generation_config=generation_config, **kwargs
        )

    def _generation_prompt(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.LongTensor:
        """The caption prefix (batch, prompt_len), `<s>` first: the prompt without the processor's `</s>` and padding."""
        batch_size, bos = pixel_values.shape[0], self.config.bos_token_id
        if input_ids is None or (isinstance(input_ids, torch.Tensor) and input_ids.numel() == 0):
            return torch.full((batch_size, 1), bos, dtype=torch.long, device=pixel_values.device)
        check_input_ids(input_ids, self.config.vocab_size)
        if input_ids.dim() != 2 or input_ids.shape[0] != batch_size:
            raise ValueError(
                f"input_ids must be (batch={batch_size}, prompt_len), got shape {tuple(input_ids.shape)}."
            )
        if attention_mask is not None:
            check_attention_mask(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}."
                )
            length = int(attention_mask[0].sum())
            if not bool(attention_mask[:, :length].all()) or bool(attention_mask[:, length:].any()):
                raise ValueError(
                    "Prompts must all have the same length (attention_mask: ones, then padding); caption prompts of "
                    "different lengths in separate calls."
                )
            input_ids = input_ids[:, :length]
        if input_ids.shape[1] > 0 and bool((input_ids[:, -1] == self.config.eos_token_id).all()):
            input_ids = input_ids[:, :-1]  # the processor's `</s>`: the caption continues the prompt instead
        starts = input_ids[:, 0] == bos if input_ids.shape[1] > 0 else torch.zeros(batch_size, dtype=torch.bool)
        if not bool(starts.all()):
            if bool(starts.any()):
                raise ValueError("Either every prompt starts with <s> (bos_token_id) or none does.")
            input_ids = torch.cat([input_ids.new_full((batch_size, 1), bos), input_ids], dim=1)
        return input_ids.to(pixel_values.device)

    def _original_beam_search(
        self,
        pixel_values: torch.Tensor,
        prompt: torch.LongTensor,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
    ) -> torch.LongTensor:
        """The original `CaptioningHandler.eval_batch`: 3 candidates per beam, a caption ends at `</s>` or at
        `max_length`, search stops for an image once no open beam can beat its best caption."""
        unsupported = [
            name
            for name, neutral in _NOT_IN_ORIGINAL_SEARCH.items()
            if getattr(generation_config, name, None) not in (neutral, None)
        ]
        unsupported += sorted(
            key for key, value in model_kwargs.items() if value is not None and key != "interpolate_pos_encoding"
        )
        if prompt.shape[1] > 1:
            unsupported.append("a prompt (input_ids)")
        if unsupported:
            raise ValueError(
                f"The original beam search (original_beam_search=True) does not support {', '.join(unsupported)}; "
                "pass original_beam_search=False to decode with transformers' generation."
            )
        num_beams, length_penalty = generation_config.num_beams, generation_config.length_penalty
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
        max_length = self._original_max_length(generation_config.max_length, generation_config.max_new_tokens)
        config = self.config
        batch_size, vocab_size = pixel_values.shape[0], config.vocab_size
        device = pixel_values.device
        images = pixel_values.repeat_interleave(num_beams, dim=0)  # (batch * beams, channels, height, width)
        sequences = torch.full((batch_size * num_beams, 1), config.bos_token_id, dtype=torch.long, device=device)
        step_ids = torch.tensor([[config.bos_token_id, config.mask_token_id]], device=device)
        step_ids = step_ids.expand(batch_size * num_beams, 2)
        beam_scores = torch.zeros(batch_size, num_beams, device=device)
        beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first one at the first step
        beam_scores = beam_scores.view(-1)
        best: list[tuple[float, list[int]] | None] = [None] * batch_size
        done = [False] * batch_size
        cache = Beit3KeyValueCache(transient_tokens=1)  # the <mask> slot is never cached
        for length in range(2, max_length):  # `length`: tokens of a caption finished at this step, counting <s>
            logits = self(
                pixel_values=images if length == 2 else None,
                input_ids=step_ids,
                past_key_values=cache,
                use_cache=True,
                interpolate_pos_encoding=model_kwargs.get("interpolate_pos_encoding", False),
                text_position_offset=length - 2,  # the cache holds the image and the caption but its last token
                return_dict=True,
            ).logits[:, 1]  # the <mask> slot predicts the next token
            scores = F.log_softmax(logits.float(), dim=-1) + beam_scores[:, None]
            top_scores, top_ids = scores.view(batch_size, num_beams * vocab_size).topk(3 * num_beams, dim=1)
            top_scores, top_ids = top_scores.tolist(), top_ids.tolist()
            next_beams = []  # (score, token, source beam row) for every row of the next step
            for example in range(batch_size):
                done[example] = done[example] or self._cannot_improve(
                    best[example], max(top_scores[example]), max_length, length_penalty
                )
                if done[example]:
                    next_beams.extend([(0.0, config.pad_token_id, 0)] * num_beams)
                    continue
                example_beams = []
                for score, index in zip(top_scores[example], top_ids[example]):
                    row, token = example * num_beams + index // vocab_size, index % vocab_size
                    if token == config.eos_token_id or length + 1 == max_length:
                        # A finished caption; at the length limit the candidate token is dropped.
                        candidate = (score / length**length_penalty, sequences[row].tolist())
                        if best[example] is None or candidate[0] > best[example][0]:
                            best[example] = candidate
                    else:
                        example_beams.append((score, token, row))
                    if len(example_beams) == num_beams:
                        break
                next_beams.extend(example_beams or [(0.0, config.pad_token_id, 0)] * num_beams)
            if all(done) or length + 1 == max_length:
                break
            beam_scores = torch.tensor([beam[0] for beam in next_beams], device=device)
            tokens = torch.tensor([beam[1] for beam in next_beams], device=device)
            rows = torch.tensor([beam[2] for beam in next_beams], device=device)
            sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
            cache.reorder_cache(rows)
            step_ids = torch.stack([tokens, torch.full_like(tokens, config.mask_token_id)], dim=1)
        captions = [[*caption, config.eos_token_id] for _, caption in best]
        output = torch.full((batch_size, max(map(len, captions))), config.pad_token_id, dtype=torch.long)
        for example, caption in enumerate(captions):
            output[example, : len(caption)] = torch.tensor(caption)
        if generation_config.return_dict_in_generate:  # as transformers' searches return it, without scores
            return GenerateDecoderOnlyOutput(sequences=output.to(device))
        return output.to(device)

    def _original_max_length(self, max_length: int | None, max_new_tokens: int | None) -> int:
        if max_new_tokens is not None:
            asked, max_length = f"max_new_tokens={max_new_tokens}", max_new_tokens + 2  # <s>, the last <mask> slot
        else:
            asked = f"max_length={max_length}"
        if max_length < 4:
            # With max_length=3 the original's search can only return `<s> </s>`: the token predicted at the
            # length limit is dropped.
            raise ValueError(
                f"{asked} is shorter than a caption: captions have at most max_length - 1 tokens and "
                "need `<s>`, at least one token and `</s>` (max_length >= 4, max_new_tokens >= 2)."
            )
        self._check_position_table(max_length)
        return max_length

    def _check_position_table(self, max_length: int) -> None:
        """Both searches feed the last step's `<mask>` slot at text position `max_length - 1`."""
        if max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds max_position_embeddings={self.config.max_position_embeddings}."
            )

    @staticmethod
    def _cannot_improve(
        best: tuple[float, list[int]] | None, best_open_score: float, max_length: int, length_penalty: float
    ) -> bool:
        """The original's `BeamHypotheses.is_done` (one kept hypothesis, no early stopping)."""
        return best is not None and best[0] >= best_open_score / (max_length - 1) ** length_penalty


@dataclass
class Beit3PreTrainingOutput(ModelOutput):
    """Output of `Beit3ForPreTraining`.

    Args:
        loss: the sum of `mlm_loss`, `mim_loss` and `itc_loss` over the objectives computed.
        mlm_loss: mean cross-entropy of the text positions with `mlm_labels != -100`.
        mim_loss: mean cross-entropy of the masked patches with `mim_labels != -100`.
        itc_loss: the image-text contrastive loss of the batch (`image_text_contrastive=True`).
        mlm_logits: (batch, text_len, vocab_size) scores of every text position (full length, not packed).
        mim_logits: (batch, num_patches, visual_vocab_size) scores of every patch (full length, not packed).
        image_embeds / text_embeds: (batch, hidden_size) L2-normalised embeddings (`image_text_contrastive=True`).
        logit_scale: `exp` of the learned temperature (`image_text_contrastive=True`).
        hidden_states / attentions: as `Beit3Model` returns them (the fused image-text pass; none for the
            contrastive pass, which encodes images and texts separately).
    """

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mim_loss: torch.Tensor | None = None
    itc_loss: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    mim_logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def masked_image_modeling_loss(
    logits: torch.Tensor, labels: torch.Tensor, bool_masked_pos: torch.BoolTensor | None
) -> torch.Tensor:
    """Mean loss over the masked patches (`bool_masked_pos`) whose label is not -100.

    Integer `labels` (batch, num_patches) are visual token ids (cross-entropy, BEiT); float `labels`
    (batch, num_patches, channels) are normalised pixel targets (mean squared error, `--mim_target pixels`).
    """
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"pixel labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
        selected = torch.ones(labels.shape[:2], dtype=torch.bool, device=labels.device)
        if bool_masked_pos is not None:
            selected = selected & bool_masked_pos
        return F.mse_loss(logits[selected].float(), labels[selected].float())
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (batch, num_patches) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}."
        )
    if bool_masked_pos is not None:
        labels = labels.masked_fill(~bool_masked_pos, -100)  # only masked patches are predicted
    return token_cross_entropy(logits, labels)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (float32) over the positions whose label is not -100; 0 (with a gradient path) if none.

    Token ids outside the vocabulary are a clear error, not a device-side assert.
    """
    check_token_labels(labels, logits.shape[-1])
    labels = labels.flatten()
    valid = labels != -100
    losses = F.cross_entropy(logits.flatten(0, -2).float(), labels, ignore_index=-100, reduction="sum")
    return losses / valid.sum().clamp(min=1)


class Beit3ForMaskedImageModeling(Beit3PreTrainedModel):
    r"""BEiT-3 for BEiT-style masked image modelling, image only (no text branch).

    Patches where `bool_masked_pos` is True are replaced by the mask token; `mim_head` (a linear layer over the patch
    tokens) scores each patch against the visual vocabulary (`config.visual_vocab_size`, the codebook of a VQ-KD or
    DALL-E tokenizer), or regresses its normalised pixels (`--mim_target pixels`: `visual_vocab_size =
    patch_size**2 * num_channels`). The loss is the mean over the masked patches only. A folder of
    `Beit3ForPreTraining` (a converted pretrained checkpoint) loads directly: its vision side and `mim_head` are used.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForMaskedImageModeling
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, visual_vocab_size=50)
    >>> model = Beit3ForMaskedImageModeling(config)
    >>> bool_masked_pos = torch.tensor([[True, False, True, False]])
    >>> labels = torch.tensor([[3, 7, 9, 1]])  # visual token ids of the 4 patches
    >>> out = model(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=bool_masked_pos, labels=labels)
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([1, 4, 50]), 0)

    ```
    """

    _task_auto_class = "AutoModelForMaskedImageModeling"

    def __init__(self, config: Beit3Config) -> None:
        if not config.vision_only:  # image-only: the text side would be dead weight (and break plain DDP)
            config = copy.deepcopy(config)
            config.vision_only = True
        super().__init__(config)
        self.beit3 = Beit3Model(config, use_mask_token=True)
        self.mim_head = nn.Linear(config.hidden_size, config.visual_vocab_size)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> MaskedLMOutput:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images.
            bool_masked_pos: (batch, num_patches), True where a patch is replaced by the mask token.
            labels: (batch, num_patches) visual token ids (-100: ignore), or (batch, num_patches, visual_vocab_size)
                float pixel targets; the loss covers the masked patches only.
        """
        if pixel_values is None:
            raise ValueError("Beit3ForMaskedImageModeling needs pixel_values.")
        outputs = self.beit3(
            pixel_values=pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.mim_head(outputs.last_hidden_state[:, 1:])  # (batch, num_patches, visual_vocab), CLS dropped
        loss = None if labels is None else masked_image_modeling_loss(logits, labels, bool_masked_pos)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class Beit3ForPreTraining(Beit3PreTrainedModel):
    r"""BEiT-3 with the pretraining heads of the released checkpoints: `mlm_head` (text) and `mim_head` (images).

    It computes masked language modelling on texts and on image-text pairs (the text of a pair attends to the
    image) and masked image modelling on images, from one forward: give `input_ids` (+ `attention_mask`,
    `mlm_labels`), `pixel_values` (+ `bool_masked_pos`, `mim_labels`), or both. Labels use -100 for positions
    without a target; `mlm_logits` / `mim_logits` are full length (every text position / every patch).
    `python -m beit3_hf.convert --task pretraining` converts `beit3_{base,large}_patch16_224.pth` with every key.

    With `config.contrastive_head=True` the model also has `Beit3ForImageTextRetrieval`'s projections and
    temperature, and `image_text_contrastive=True` encodes images and texts separately and gives their embeddings
    and the contrastive loss of the batch (`itc_loss`); a pretraining folder then starts a retrieval model with
    its projections.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForPreTraining
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, visual_vocab_size=50)
    >>> model = Beit3ForPreTraining(config)
    >>> input_ids = torch.tensor([[0, 99, 12, 2]])
    >>> mlm_labels = torch.tensor([[-100, 11, -100, -100]])
    >>> out = model(input_ids=input_ids, mlm_labels=mlm_labels)  # text only
    >>> out.mlm_logits.shape, out.mim_logits is None
    (torch.Size([1, 4, 100]), True)

    ```
    """

    _task_auto_class = "AutoModelForPreTraining"

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        _require_text_experts(config, type(self).__name__)
        self.beit3 = Beit3Model(config, use_mask_token=True)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.mim_head = nn.Linear(config.hidden_size, config.visual_vocab_size)
        if config.contrastive_head:  # the names of Beit3ForImageTextRetrieval's, so that it loads them
            self.vision_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.text_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head

    def _contrastive(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> Beit3PreTrainingOutput:
        """Images and texts encoded separately, as `Beit3ForImageTextRetrieval` does, and their contrastive loss."""
        if not self.config.contrastive_head:
            raise ValueError("image_text_contrastive=True needs a model built with config.contrastive_head=True.")
        if pixel_values is None or input_ids is None:
            raise ValueError("image_text_contrastive=True needs both pixel_values and input_ids.")
        images = self.beit3(pixel_values=pixel_values, return_dict=True, **kwargs)
        texts = self.beit3(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        image_embeds = Beit3ForImageTextRetrieval._pooled(images, self.vision_projection).pooler_output
        text_embeds = Beit3ForImageTextRetrieval._pooled(texts, self.text_projection).pooler_output
        logit_scale = self.logit_scale.exp()
        loss = image_text_contrastive_loss(logit_scale * image_embeds @ text_embeds.t())
        return Beit3PreTrainingOutput(
            loss=loss, itc_loss=loss, image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=logit_scale
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        mim_labels: torch.Tensor | None = None,
        image_text_contrastive: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> Beit3PreTrainingOutput:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images, alone or paired with `input_ids`.
            input_ids: (batch, text_len) text with `<mask>` at the positions to predict.
            attention_mask: (batch, text_len), 1 for tokens to attend to and 0 for padding.
            bool_masked_pos: (batch, num_patches), True where a patch is replaced by the mask token.
            mlm_labels: (batch, text_len) target token ids, -100 elsewhere.
            mim_labels: (batch, num_patches) target visual token ids, -100 elsewhere (only masked patches count).
            image_text_contrastive: encode `pixel_values` and `input_ids` separately (pair i = image i, text i) and
                return their embeddings and contrastive loss instead (needs `config.contrastive_head`).
        """
        if image_text_contrastive:
            if mlm_labels is not None or mim_labels is not None or bool_masked_pos is not None:
                raise ValueError("image_text_contrastive=True takes no mlm_labels, mim_labels or bool_masked_pos.")
            return self._contrastive(
                pixel_values, input_ids, attention_mask, interpolate_pos_encoding=interpolate_pos_encoding
            )
        if mlm_labels is not None and input_ids is None:
            raise ValueError("mlm_labels were given without input_ids.")
        if mim_labels is not None and pixel_values is None:
            raise ValueError("mim_labels were given without pixel_values.")
        outputs = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        split_position = (
            0 if pixel_values is None else hidden.shape[1] - (0 if input_ids is None else input_ids.shape[1])
        )
        mim_logits = None if pixel_values is None else self.mim_head(hidden[:, 1:split_position])  # patches, no CLS
        mlm_logits = None if input_ids is None else self.mlm_head(hidden[:, split_position:])  # text positions
        mlm_loss = mim_loss = None
        if mlm_labels is not None:
            if mlm_labels.shape != input_ids.shape:
                raise ValueError(
                    f"mlm_labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(mlm_labels.shape)}."
                )
            mlm_loss = token_cross_entropy(mlm_logits, mlm_labels)
        if mim_labels is not None:
            mim_loss = masked_image_modeling_loss(mim_logits, mim_labels, bool_masked_pos)
        losses = [value for value in (mlm_loss, mim_loss) if value is not None]
        return Beit3PreTrainingOutput(
            loss=sum(losses) if losses else None,
            mlm_loss=mlm_loss,
            mim_loss=mim_loss,
            mlm_logits=mlm_logits,
            mim_logits=mim_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "Beit3CaptioningOutput",
    "Beit3ForCaptioning",
    "Beit3ForImageClassification",
    "Beit3ForImageTextRetrieval",
    "Beit3ForMaskedImageModeling",
    "Beit3ForPreTraining",
    "Beit3ForVisualQuestionAnswering",
    "Beit3ForVisualReasoning",
    "Beit3ImageTextRetrievalOutput",
    "Beit3KeyValueCache",
    "Beit3Model",
    "Beit3Multiway",
    "Beit3PreTrainedModel",
    "Beit3PreTrainingOutput",
    "build_attention_bias",
    "image_text_contrastive_loss",
    "resize_patch_position_embeddings",
]
