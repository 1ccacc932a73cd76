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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput, SequenceClassifierOutput
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
    """Output of `Beit3ForImageTextRetrieval` (the fields of `CLIPOutput` without the tower outputs).

    Args:
        loss: symmetric image-text contrastive loss over the batch, when `return_loss=True`.
        logits_per_image: (num_images, num_texts) scaled cosine similarities.
        logits_per_text: (num_texts, num_images), the transpose of `logits_per_image`.
        image_embeds: (num_images, hidden_size) L2-normalised image embeddings.
        text_embeds: (num_texts, hidden_size) L2-normalised text embeddings.
        logit_scale: the multiplier `exp(logit_scale)` of the similarities, for losses computed outside the model
            (e.g. over the global batch of several processes).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


@dataclass
class Beit3CaptioningOutput(ModelOutput):
    """Output of `Beit3ForCaptioning`.

    Args:
        loss: label-smoothed masked-token loss over the positions with `labels != -100`.
        logits: (batch, text_len, vocab_size) scores of the text positions.
        cache: the key/value cache, when `use_cache=True`; also readable as `past_key_values`.

    The field is named `cache` on every supported transformers version: from 5.24 on, `ModelOutput` renames the
    keyword `past_key_values=` to `cache=` in every subclass's constructor, so a field named `past_key_values`
    cannot be filled there, while before 5.24 `cache` is an ordinary field name.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Beit3KeyValueCache | None = None

    @property
    def past_key_values(self) -> Beit3KeyValueCache | None:
        """The cache under its pre-5.24 name (transformers 5.24 defines the same alias on `ModelOutput`)."""
        return self.cache


class Beit3KeyValueCache:
    """Keys and values of the tokens seen so far, one (batch, heads, seq, head_dim) pair per layer.

    BEiT-3 captioning decodes with a query slot (`<mask>`) whose keys and values are dropped after each step
    (`drop_last`), and reorders beams (`select`). A small cache of our own keeps that independent of the
    `transformers` cache API, which changed across the supported versions.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.num_image_tokens = 0

    def __len__(self) -> int:
        return len(self.keys)

    def seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values of layer `layer_idx`; returns all keys/values of that layer."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def drop_last(self, num_tokens: int = 1) -> None:
        self.keys = [key[:, :, :-num_tokens] for key in self.keys]
        self.values = [value[:, :, :-num_tokens] for value in self.values]

    def select(self, batch_indices: torch.Tensor) -> None:
        """Keep (and reorder) the batch entries `batch_indices`, e.g. the surviving beams."""
        self.keys = [key.index_select(0, batch_indices) for key in self.keys]
        self.values = [value.index_select(0, batch_indices) for value in self.values]


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class Beit3Multiway(nn.Module):
    """A vision expert and a text expert applied to the two parts of one token sequence.

    Tokens `[:split_position]` go through `vision`, tokens `[split_position:]` through `text`; the sequence axis is 1.
    `split_position == seq_len` is a vision-only sequence and `split_position == 0` a text-only one.
    """

    def __init__(self, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.text = text

    def forward(self, hidden_states: torch.Tensor, split_position: int) -> torch.Tensor:
        seq_len = hidden_states.shape[1]
        if split_position >= seq_len:
            return self.vision(hidden_states)
        if split_position <= 0:
            return self.text(hidden_states)
        vision_states, text_states = hidden_states.split([split_position, seq_len - split_position], dim=1)
        return torch.cat([self.vision(vision_states), self.text(text_states)], dim=1)


def _multiway(factory: Callable[[], nn.Module]) -> Beit3Multiway:
    return Beit3Multiway(vision=factory(), text=factory())


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
    """Patch embedding, optional mask-token replacement (masked image modelling), CLS token and positions."""

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = (config.image_size // config.patch_size,) * 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
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
        hidden = config.hidden_size
        self.q_proj = _multiway(lambda: nn.Linear(hidden, hidden))
        self.k_proj = _multiway(lambda: nn.Linear(hidden, hidden))
        self.v_proj = _multiway(lambda: nn.Linear(hidden, hidden))
        self.sub_layernorm = _multiway(lambda: nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.out_proj = _multiway(lambda: nn.Linear(hidden, hidden))

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
        self.layernorm_before = _multiway(norm)
        self.self_attn = Beit3Attention(config, layer_idx)
        self.layernorm_after = _multiway(norm)
        self.ffn = _multiway(lambda: Beit3FeedForward(config))
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
        self.layernorm = _multiway(norm) if config.use_final_layernorm else None

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


def padding_mask_to_attention_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, kv_len) mask with 1 = attend -> (batch, 1, 1, kv_len) additive bias: 0 to attend, dtype-min to skip.

    The finite minimum (rather than -inf) keeps a fully padded row finite instead of NaN.
    """
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias = bias.masked_fill(key_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


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

    def post_init(self) -> None:
        super().post_init()
        # A checkpoint folder must load as its own class through AutoModel (so no head weights are dropped) and
        # through its task Auto class: `auto_map` names this class for both, next to the config. `save_pretrained`
        # copies the code files next to it once the classes are registered (see `beit3_hf/__init__.py`).
        module = type(self).__module__.rsplit(".", 1)[-1]
        model_reference = f"{module}.{type(self).__name__}"
        # Entries of other model classes (a config shared by several models) must not leak into this checkpoint.
        auto_map = {
            auto_class: reference
            for auto_class, reference in (getattr(self.config, "auto_map", None) or {}).items()
            if not (isinstance(reference, str) and reference.startswith(f"{module}."))
        }
        auto_map["AutoConfig"] = f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}"
        auto_map["AutoModel"] = model_reference
        if self._task_auto_class is not None:
            auto_map[self._task_auto_class] = model_reference
        self.config.auto_map = auto_map

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
            init.zeros_(module.mask_token)
        elif isinstance(module, Beit3ForImageTextRetrieval):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class Beit3Model(Beit3PreTrainedModel):
    r"""The BEiT-3 encoder: images, texts, or image-text pairs in one Multiway Transformer.

    `last_hidden_state` is the sequence `[vision tokens; text tokens]`: the CLS token and the patches of the image
    (`1 + (H / patch) * (W / patch)` tokens) followed by the text tokens, after the final Multiway layer norm when the
    config has one. Vision-only inputs use the vision experts throughout, text-only inputs the text experts.

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
    >>> model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.shape
    torch.Size([2, 4, 64])

    ```
    """

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        self.vision_embeddings = Beit3VisionEmbeddings(config)
        self.text_embeddings = Beit3TextEmbeddings(config)
        self.encoder = Beit3Encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_embeddings.token_embedding = value

    def embed(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Embed the inputs into one sequence; returns (embeddings, split_position, key mask with 1 = attend)."""
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass pixel_values, input_ids, or both.")
        if attention_mask is not None:
            if input_ids is None:
                raise ValueError("attention_mask masks text tokens, but no input_ids were given.")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} doesn't match input_ids shape "
                    f"{tuple(input_ids.shape)}."
                )
        parts, key_mask = [], None
        if pixel_values is not None:
            parts.append(self.vision_embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding))
        split_position = parts[0].shape[1] if parts else 0
        if input_ids is not None:
            text_embeddings = self.text_embeddings(input_ids)
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
    ) -> BaseModelOutput:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images.
            input_ids: (batch, text_len) token ids, `<s> ... </s>` followed by padding.
            attention_mask: (batch, text_len), 1 for tokens to attend to and 0 for padding.
            bool_masked_pos: (batch, num_patches), True where a patch is replaced by the mask token.
            interpolate_pos_encoding: resize the vision position embeddings to the input resolution.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        embeddings, split_position, key_mask = self.embed(
            pixel_values, input_ids, attention_mask, bool_masked_pos, interpolate_pos_encoding
        )
        attention_bias = None if key_mask is None else padding_mask_to_attention_bias(key_mask, embeddings.dtype)
        return self.encoder(embeddings, split_position, attention_bias, output_attentions, output_hidden_states)


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
        )
        pooled = self.fc_norm(outputs.last_hidden_state[:, 1:].mean(dim=1))  # mean over patches, CLS excluded
        logits = self.classifier(pooled)
        loss = None if labels is None else self._classification_loss(logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
        return F.cross_entropy(logits.float(), labels.view(-1))


class Beit3ForImageTextRetrieval(Beit3PreTrainedModel):
    r"""BEiT-3 as a dual encoder for image-text retrieval (CLIP-style).

    Images and texts are encoded separately (images by the vision experts, texts by the text experts); the first
    token of each goes through a bias-free projection and is L2-normalised. `return_loss=True` gives the symmetric
    contrastive loss over the batch with temperature `logit_scale.exp()` (not clamped, as the original).

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForImageTextRetrieval
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100)
    >>> model = Beit3ForImageTextRetrieval(config)
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[0, 5, 2], [0, 6, 2]]),
    ...             return_loss=True)
    >>> out.logits_per_image.shape, torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2))
    (torch.Size([2, 2]), True)

    ```
    """

    _task_auto_class = "AutoModelForZeroShotImageClassification"

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.vision_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.text_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(batch, hidden_size) L2-normalised image embeddings."""
        hidden = self.beit3(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return F.normalize(self.vision_projection(hidden.last_hidden_state[:, 0]), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, hidden_size) L2-normalised text embeddings (from the `<s>` token)."""
        hidden = self.beit3(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_projection(hidden.last_hidden_state[:, 0]), dim=-1)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> Beit3ImageTextRetrievalOutput:
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass pixel_values, input_ids, or both.")
        image_embeds = (
            None if pixel_values is None else self.get_image_features(pixel_values, interpolate_pos_encoding)
        )
        text_embeds = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
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

    def __init__(self, config: Beit3Config) -> None:
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
        )
        logits = self.classifier(self.pooler(outputs.last_hidden_state))
        loss = None
        if labels is not None:
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

    `pixel_values` has shape (batch, 2, channels, height, width). Each image is fused with the text; the vision CLS
    and the first text token of both fused sequences are concatenated (4 x hidden) and classified by an MLP.

    Example:

    ```python
    >>> import torch
    >>> from beit3_hf import Beit3Config, Beit3ForVisualReasoning
    >>> config = Beit3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      image_size=32, patch_size=16, vocab_size=100, num_labels=2)
    >>> model = Beit3ForVisualReasoning(config)
    >>> out = model(pixel_values=torch.randn(3, 2, 3, 32, 32), input_ids=torch.tensor([[0, 5, 2]] * 3),
    ...             labels=torch.tensor([0, 1, 1]))
    >>> out.logits.shape
    torch.Size([3, 2])

    ```
    """

    def __init__(self, config: Beit3Config) -> None:
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
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                "Beit3ForVisualReasoning takes an image pair per example: pixel_values of shape "
                f"(batch, 2, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        batch_size = pixel_values.shape[0]
        # Both images of a pair see the same text: run them as one batch [first images; second images].
        images = pixel_values.transpose(0, 1).flatten(0, 1)  # (2 * batch, channels, height, width)
        outputs = self.beit3(
            pixel_values=images,
            input_ids=input_ids.repeat(2, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(2, 1),
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        split_position = self.beit3.vision_embeddings.num_tokens(*images.shape[-2:])
        pair_features = torch.cat([hidden[:, 0], hidden[:, split_position]], dim=-1)  # (2 * batch, 2 * hidden)
        first, second = pair_features.split(batch_size, dim=0)
        logits = self.classifier(torch.cat([first, second], dim=-1))  # (batch, num_labels) from (batch, 4 * hidden)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def captioning_attention_bias(
    num_image_tokens: int, num_queries: int, past_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(1, 1, queries, past + queries) additive bias of the captioning model.

    Image tokens see every image token and no text; a text token sees the image and the text up to itself. Queries
    sit at positions `past_length ..` of the sequence (the first `num_image_tokens` of which are the image).
    """
    query_positions = torch.arange(past_length, past_length + num_queries, device=device)[:, None]
    key_positions = torch.arange(past_length + num_queries, device=device)[None, :]
    allowed = key_positions <= query_positions  # causal
    image_query = query_positions < num_image_tokens
    allowed = torch.where(image_query, key_positions < num_image_tokens, allowed)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[None, None]


class Beit3ForCaptioning(Beit3PreTrainedModel):
    r"""BEiT-3 image captioning: a causal text decoder on top of the image, trained by masked language modelling.

    Training (as the original): `input_ids` is the caption with some tokens replaced by `<mask>`, `labels` holds the
    original token at those positions and -100 elsewhere; text sees the image and earlier text, the image sees only
    itself. The loss is the original's label-smoothed KL (`config.label_smoothing`, 0.1 by default) averaged over the
    labelled tokens. `generate` decodes with the original's scheme: `[<s>, <mask>]` after the image, then
    `[last token, <mask>]` steps with cached keys and values, predicting at the `<mask>` slot.

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

    ```
    """

    _task_auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Beit3KeyValueCache | None = None,
        use_cache: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> Beit3CaptioningOutput:
        r"""
        Args:
            pixel_values: (batch, channels, height, width) images; omit them when continuing from `past_key_values`.
            input_ids: (batch, text_len) caption tokens (with `<mask>` at the positions to predict when training).
            attention_mask: (batch, text_len), 1 for tokens to attend to and 0 for padding.
            labels: (batch, text_len) target ids at the predicted positions, -100 elsewhere.
            past_key_values: cache of earlier steps; the new text continues at the next position.
            use_cache: return the (updated) cache.
        """
        if input_ids is None:
            raise ValueError("Beit3ForCaptioning needs input_ids (at least `<s> <mask>` to start a caption).")
        if use_cache and past_key_values is None:
            past_key_values = Beit3KeyValueCache()
        past_length = past_key_values.seq_length() if past_key_values is not None else 0
        if pixel_values is None and past_length == 0:
            raise ValueError("Beit3ForCaptioning needs an image: pass pixel_values (or past_key_values holding one).")
        if pixel_values is not None and past_length > 0:
            raise ValueError("pixel_values must only be given on the first step, not with a filled past_key_values.")
        embeddings, split_position, key_mask = self._embed(
            pixel_values, input_ids, attention_mask, past_key_values, interpolate_pos_encoding
        )
        num_image_tokens = split_position if past_length == 0 else past_key_values.num_image_tokens
        bias = captioning_attention_bias(
            num_image_tokens, embeddings.shape[1], past_length, embeddings.dtype, embeddings.device
        )
        if key_mask is not None:
            bias = bias + padding_mask_to_attention_bias(key_mask, embeddings.dtype)
        hidden = self.beit3.encoder(embeddings, split_position, bias, past_key_values=past_key_values)
        logits = self.lm_head(hidden.last_hidden_state[:, split_position:])  # text positions only
        loss = None if labels is None else self.captioning_loss(logits, labels)
        return Beit3CaptioningOutput(loss=loss, logits=logits, cache=past_key_values if use_cache else None)

    def _embed(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Beit3KeyValueCache | None,
        interpolate_pos_encoding: bool,
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        if pixel_values is not None:
            embeddings, split_position, key_mask = self.beit3.embed(
                pixel_values, input_ids, attention_mask, interpolate_pos_encoding=interpolate_pos_encoding
            )
            if cache is not None:
                cache.num_image_tokens = split_position
            return embeddings, split_position, key_mask
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Padding is not supported when continuing from past_key_values.")
        # Text continues after the cached text tokens (the cache also holds the image tokens).
        offset = cache.seq_length() - cache.num_image_tokens
        return self.beit3.text_embeddings(input_ids, position_offset=offset), 0, None

    def captioning_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original `BertCaptioningLoss` (without its drop-worst schedule): KL to label-smoothed targets."""
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

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        num_beams: int = 3,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        length_penalty: float = 0.6,
        interpolate_pos_encoding: bool = False,
    ) -> torch.LongTensor:
        """Caption images with the original BEiT-3 beam search; returns (batch, length) ids `<s> ... </s>` + padding.

        Args:
            pixel_values: (batch, channels, height, width) images.
            num_beams: beams per image (3 in the original recipes); 1 decodes with a single beam.
            max_length: longest output, `<s>` and `</s>` included (the original's `num_max_bpe_tokens`, default 32).
            max_new_tokens: alternatively, the most tokens generated after `<s>` (`</s>` included).
            length_penalty: a finished caption of `n` generated tokens (its `</s>` included) scores
                `sum of log-probabilities / (n + 1) ** length_penalty`: the original counts `<s>` in the length.

        Decoding follows the original `CaptioningHandler.eval_batch`: 3 candidates per beam, a caption ends at
        `</s>` or at `max_length`, search stops for an image once no open beam can beat its best caption.
        """
        max_length = self._generation_length(pixel_values, num_beams, max_length, max_new_tokens)
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
        cache = Beit3KeyValueCache()
        for length in range(2, max_length):  # `length`: tokens of a caption finished at this step, counting <s>
            logits = self(
                pixel_values=images if length == 2 else None,
                input_ids=step_ids,
                past_key_values=cache,
                use_cache=True,
                interpolate_pos_encoding=interpolate_pos_encoding,
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
            cache.select(rows)
            cache.drop_last(1)  # forget the <mask> slot: the next step feeds the chosen token in its place
            step_ids = torch.stack([tokens, torch.full_like(tokens, config.mask_token_id)], dim=1)
        captions = [[*caption, config.eos_token_id] for _, caption in best]
        output = torch.full((batch_size, max(map(len, captions))), config.pad_token_id, dtype=torch.long)
        for example, caption in enumerate(captions):
            output[example, : len(caption)] = torch.tensor(caption)
        return output.to(device)

    def _generation_length(
        self, pixel_values: torch.Tensor | None, num_beams: int, max_length: int | None, max_new_tokens: int | None
    ) -> int:
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values: the images to caption.")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
        if self.config.mask_token_id is None:
            raise ValueError("config.mask_token_id is not set: captioning decodes at the tokenizer's <mask> slot.")
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("Pass max_length or max_new_tokens, not both.")
        if max_new_tokens is not None:
            max_length = max_new_tokens + 1
        max_length = 32 if max_length is None else max_length
        if max_length < 3:
            raise ValueError(
                f"max_length={max_length} is shorter than a caption: the prompt is `<s> <mask>` and a caption needs "
                "`<s>`, at least one token and `</s>` (max_length >= 3, max_new_tokens >= 2)."
            )
        if max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} exceeds max_position_embeddings={self.config.max_position_embeddings}."
            )
        return max_length

    @staticmethod
    def _cannot_improve(
        best: tuple[float, list[int]] | None, best_open_score: float, max_length: int, length_penalty: float
    ) -> bool:
        """The original's `BeamHypotheses.is_done` (one kept hypothesis, no early stopping)."""
        return best is not None and best[0] >= best_open_score / (max_length - 1) ** length_penalty


__all__ = [
    "Beit3CaptioningOutput",
    "Beit3ForCaptioning",
    "Beit3ForImageClassification",
    "Beit3ForImageTextRetrieval",
    "Beit3ForVisualQuestionAnswering",
    "Beit3ForVisualReasoning",
    "Beit3ImageTextRetrievalOutput",
    "Beit3KeyValueCache",
    "Beit3Model",
    "Beit3Multiway",
    "Beit3PreTrainedModel",
    "image_text_contrastive_loss",
    "resize_patch_position_embeddings",
]
