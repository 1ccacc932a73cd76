"""Convert the original visual tokenizers to transformers folders: BEiT v2 VQ-KD and the DALL-E dVAE encoder.

```bash
python -m beit3_hf.conversion.visual_tokenizers --kind vqkd \
    --checkpoint vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --output beit2-vqkd-3x768x12-clip
python -m beit3_hf.conversion.visual_tokenizers --kind dall-e --checkpoint encoder.pkl --output dall-e-dvae-encoder
```

The output folder holds the weights (safetensors), `config.json` and the code files, and loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` (a `VqkdModel` or a `DallEEncoderModel`), also where
`beit3_hf` is not installed.

- `--kind vqkd` reads a unilm `beit2` tokenizer checkpoint (`{"model": state_dict}` or `{"state_dict": ...}`) with
  `torch.load(weights_only=True)`. Every key is either mapped (encoder, encode task layer, codebook) or in an explicit
  list of keys the tokenizer does not need (decoder, decode task layer, codebook training statistics, and the
  teacher / scaling-layer / loss keys that the original's own tokenizer loader deletes); any other key is an error
  that names it. The architecture is read from the tensors; attention heads default to hidden size / 64.
- `--kind dall-e` reads OpenAI's `encoder.pkl`, a pickled `dall_e.encoder.Encoder` module, with the restricted
  unpickler of `beit3_hf.conversion.safe_pickle`: no code from the file runs, and nothing relaxes that. Widths,
  blocks per group and the vocabulary are read from the tensors and checked against the recorded attributes.
- Mapped tensors must be floating point and finite. `--output` is handled as by `beit3-convert`: a file or a
  non-empty folder is refused before the checkpoint is read unless `--overwrite` is given, which replaces the whole
  folder; the model is written to a staging folder and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from beit3_hf.conversion.checkpoint import (
    ConversionError,
    abbreviate,
    check_tensors,
    load_checkpoint_dict,
    staged_output,
)
from beit3_hf.conversion.safe_pickle import PickledModule, UnsafePickleError, read_pickled_module
from beit3_hf.models.dall_e import DallEConfig, DallEEncoderModel
from beit3_hf.models.dall_e import register as register_dall_e
from beit3_hf.models.vqkd import VqkdConfig, VqkdModel
from beit3_hf.models.vqkd import register as register_vqkd


def _load_into(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    where: str,
    original_name: Callable[[str], str],
) -> None:
    """Strict load with shape checks, naming every missing, unexpected or mis-shaped key by its original name."""
    expected = model.state_dict()
    missing = sorted(original_name(key) for key in set(expected) - set(state_dict))
    unexpected = sorted(original_name(key) for key in set(state_dict) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{where}: the checkpoint does not fit the architecture read from it. Missing keys: "
            f"{abbreviate(missing) or 'none'}. Unexpected keys: {abbreviate(unexpected) or 'none'}."
        )
    wrong = [
        f"{original_name(key)} {tuple(value.shape)} (expected {tuple(expected[key].shape)})"
        for key, value in state_dict.items()
        if value.shape != expected[key].shape
    ]
    if wrong:
        raise ConversionError(f"{where}: tensors of unexpected shape: {abbreviate(wrong)}.")
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in state_dict.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# BEiT v2 VQ-KD
# ----------------------------------------------------------------------------------------------------------------------

# Original key (unilm beit2 `VQKD.state_dict()`) -> `VqkdModel` key.
VQKD_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"encoder\.cls_token", r"embeddings.cls_token"),
    (r"encoder\.pos_embed", r"embeddings.position_embeddings"),
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"layers.\1.layernorm_before.\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"layers.\1.attention.qkv.weight"),
    (r"encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"layers.\1.attention.\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"layers.\1.attention.proj.\2"),
    (r"encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"layers.\1.layernorm_after.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"encoder\.fc_norm\.(weight|bias)", r"layernorm.\1"),
    (r"encode_task_layer\.0\.(weight|bias)", r"task_layer.fc1.\1"),
    (r"encode_task_layer\.2\.(weight|bias)", r"task_layer.fc2.\1"),
    (r"quantize\.embedding\.weight", r"quantizer.codebook"),
)


def _reverse_rule(pattern: str, target: str) -> tuple[str, str]:
    """(original regex, converted template) -> (converted regex, original template), for error messages."""
    groups = re.findall(r"\([^()]*\)", pattern)  # the map's patterns have no nested groups
    regex = re.escape(target)
    for index, group in enumerate(groups, start=1):
        regex = regex.replace(re.escape(f"\\{index}"), group)
    numbers = iter(range(1, len(groups) + 1))
    template = re.sub(r"\([^()]*\)", lambda _: f"\\{next(numbers)}", pattern).replace("\\.", ".")
    return regex, template


_VQKD_REVERSE = tuple(_reverse_rule(pattern, target) for pattern, target in VQKD_KEY_MAP)


def _rename(rules: Sequence[tuple[str, str]], key: str) -> str | None:
    """`key` renamed by the first (regex, template) rule that matches all of it; None when none does."""
    for pattern, template in rules:
        if match := re.fullmatch(pattern, key):
            return match.expand(template)
    return None


def vqkd_original_name(key: str) -> str:
    """`VqkdModel` key -> the original checkpoint key it is converted from."""
    return _rename(_VQKD_REVERSE, key) or key


_VIT_KEY = (
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|fc_norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|blocks\.\d+\.attn\.(qkv\.weight|q_bias|v_bias))"
)

# Keys of the original checkpoints that tokenizing does not use, by reason. Anything neither here nor in
# VQKD_KEY_MAP is an error.
VQKD_DROPPED_KEYS: dict[str, str] = {
    "decoder (only trains the tokenizer)": rf"decoder\.{_VIT_KEY}|decode_task_layer\.[02]\.(weight|bias)",
    "codebook training statistics (EMA, k-means init)": (
        r"quantize\.embedding\.(cluster_size|embed_avg|initted)|quantize\.cluster_size"
    ),
    # The original tokenizer loader (`vqkd_encoder_base_decoder_*(as_tokenzer=True)`) deletes the keys starting with
    # "loss", "teacher" or "scaling": the distillation teacher and its input scaling.
    "teacher, its input scaling and loss (deleted by the original loader too)": (
        r"teacher_model\..+|scaling_layer\.(shift|scale)|loss\..+"
    ),
}


def load_vqkd_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a unilm beit2 VQ-KD checkpoint safely (`weights_only=True`) and return its state dict."""
    checkpoint = load_checkpoint_dict(path, ("model", "state_dict"))  # as the original loader: weights["model"], ...
    non_tensors = sorted(key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if non_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {abbreviate(non_tensors)}.")
    if "quantize.embedding.weight" not in checkpoint or "encoder.pos_embed" not in checkpoint:
        raise ConversionError(
            f"{path} is not a BEiT v2 VQ-KD checkpoint: no 'quantize.embedding.weight' / 'encoder.pos_embed' among "
            f"its keys ({abbreviate(list(checkpoint))})."
        )
    return checkpoint


def map_vqkd_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Rename the original keys; returns the mapped state dict and the dropped keys by reason. Unknown keys raise."""
    mapped: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {reason: [] for reason in VQKD_DROPPED_KEYS}
    unknown = []
    for key, value in state_dict.items():
        if target := _rename(VQKD_KEY_MAP, key):
            mapped[target] = value
        elif reason := next((r for r, pattern in VQKD_DROPPED_KEYS.items() if re.fullmatch(pattern, key)), None):
            dropped[reason].append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"Keys that are neither part of the VQ-KD tokenizer nor known decoder / training-only keys: "
            f"{abbreviate(unknown)}. Is this a BEiT v2 VQ-KD checkpoint?"
        )
    return mapped, {reason: keys for reason, keys in dropped.items() if keys}


def infer_vqkd_config(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> VqkdConfig:
    """The architecture of an original VQ-KD checkpoint, read from its (original-named) tensors."""
    try:
        patch_weight = state_dict["encoder.patch_embed.proj.weight"]  # (hidden, channels, patch, patch)
        positions = state_dict["encoder.pos_embed"]  # (1, 1 + num_patches, hidden)
        codebook = state_dict["quantize.embedding.weight"]  # (codebook_size, codebook_dim)
        intermediate_size = state_dict["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ConversionError(f"The checkpoint lacks the key {error.args[0]!r}.") from None
    hidden_size, num_channels, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    num_patches = positions.shape[1] - 1
    grid = math.isqrt(num_patches)
    if positions.ndim != 3 or grid * grid != num_patches:
        raise ConversionError(
            f"encoder.pos_embed {tuple(positions.shape)} is not 1 + a square grid of patch positions."
        )
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.blocks\.(\d+)\.", key))}
    if layers != set(range(len(layers))):
        raise ConversionError(f"The encoder blocks are not numbered 0..n-1: {sorted(layers)}.")
    heads = num_attention_heads or max(hidden_size // 64, 1)
    try:
        return VqkdConfig(
            image_size=grid * patch_size,
            patch_size=patch_size,
            num_channels=num_channels,
            hidden_size=hidden_size,
            num_hidden_layers=len(layers),
            num_attention_heads=heads,
            intermediate_size=intermediate_size,
            qkv_bias="encoder.blocks.0.attn.q_bias" in state_dict,
            codebook_size=codebook.shape[0],
            codebook_dim=codebook.shape[1],
        )
    except ValueError as error:
        raise ConversionError(f"Inconsistent architecture: {error}") from None


def convert_vqkd(
    checkpoint: str | Path, num_attention_heads: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[VqkdModel, dict[str, list[str]]]:
    """A unilm beit2 VQ-KD checkpoint -> (`VqkdModel` in eval mode, dropped keys by reason)."""
    state_dict = load_vqkd_state_dict(checkpoint)
    mapped, dropped = map_vqkd_keys(state_dict)
    check_tensors(mapped, {key: vqkd_original_name(key) for key in mapped})
    config = infer_vqkd_config(state_dict, num_attention_heads)
    model = VqkdModel(config)
    _load_into(model, mapped, "VQ-KD", vqkd_original_name)
    return model.to(dtype).eval(), dropped


# ----------------------------------------------------------------------------------------------------------------------
# DALL-E dVAE encoder
# ----------------------------------------------------------------------------------------------------------------------

_DALL_E_ENCODER_CLASS = "dall_e.encoder.Encoder"
_DALL_E_PARAM = {"w": "weight", "b": "bias"}


def _dall_e_target(key: str) -> str | None:
    """Original `Encoder.state_dict()` key -> `DallEEncoderModel` key (None when the key is not an encoder key)."""
    if m := re.fullmatch(r"blocks\.input\.(w|b)", key):
        return f"input_conv.{_DALL_E_PARAM[m[1]]}"
    if m := re.fullmatch(r"blocks\.output\.conv\.(w|b)", key):
        return f"output_conv.{_DALL_E_PARAM[m[1]]}"
    m = re.fullmatch(r"blocks\.group_(\d+)\.block_(\d+)\.(id_path|res_path\.conv_[1-4])\.(w|b)", key)
    if m and int(m[1]) >= 1 and int(m[2]) >= 1:
        return f"groups.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{m[3]}.{_DALL_E_PARAM[m[4]]}"
    return None


def dall_e_original_name(key: str) -> str:
    """`DallEEncoderModel` key -> the original `Encoder.state_dict()` key it is converted from."""
    param = {"weight": "w", "bias": "b"}
    if m := re.fullmatch(r"(input|output)_conv\.(weight|bias)", key):
        return f"blocks.{'input' if m.group(1) == 'input' else 'output.conv'}.{param[m.group(2)]}"
    if m := re.fullmatch(r"groups\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)", key):
        return f"blocks.group_{int(m[1]) + 1}.block_{int(m[2]) + 1}.{m[3]}.{param[m[4]]}"
    return key


def infer_dall_e_config(module: PickledModule, state_dict: dict[str, torch.Tensor]) -> DallEConfig:
    """The encoder's architecture, read from its tensors and checked against the recorded attributes."""
    try:
        input_weight = state_dict["blocks.input.w"]  # (hidden, channels, kernel, kernel)
        output_weight = state_dict["blocks.output.conv.w"]  # (vocab, width of the last group, 1, 1)
    except KeyError as error:
        raise ConversionError(f"The encoder lacks the tensor {error.args[0]!r}.") from None
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if m := re.match(r"blocks\.group_(\d+)\.block_(\d+)\.", key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or set(blocks) != set(range(1, len(blocks) + 1)):
        raise ConversionError(f"The encoder groups are not numbered 1..n: {sorted(blocks)}.")
    counts = {len(ids) for ids in blocks.values()}
    if len(counts) != 1 or any(ids != set(range(1, len(ids) + 1)) for ids in blocks.values()):
        raise ConversionError(f"The groups have different or gapped blocks: {blocks}.")
    num_groups, blocks_per_group = len(blocks), counts.pop()
    # The residual scale of the blocks: recorded on every EncoderBlock (1 / n_layers**2), identical across blocks.
    gains = {
        child.attributes["post_gain"]
        for child in module.modules().values()
        if child.class_name == "dall_e.encoder.EncoderBlock" and "post_gain" in child.attributes
    }
    if len(gains) > 1:
        raise ConversionError(f"The blocks have different post_gain values: {sorted(gains)}.")
    try:
        config = DallEConfig(
            num_channels=input_weight.shape[1],
            hidden_size=input_weight.shape[0],
            num_groups=num_groups,
            num_blocks_per_group=blocks_per_group,
            vocab_size=output_weight.shape[0],
            input_kernel_size=input_weight.shape[-1],
            post_gain=gains.pop() if gains else None,
        )
    except ValueError as error:
        raise ConversionError(f"Inconsistent architecture: {error}") from None
    recorded = {"n_hid": "hidden_size", "n_blk_per_group": "num_blocks_per_group", "vocab_size": "vocab_size"}
    recorded["input_channels"] = "num_channels"
    for attribute, name in recorded.items():
        value = module.attributes.get(attribute)
        if value is not None and value != getattr(config, name):
            raise ConversionError(
                f"The pickled Encoder records {attribute}={value} but its tensors give {name}={getattr(config, name)}."
            )
    return config


def convert_dall_e(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> DallEEncoderModel:
    """OpenAI's `encoder.pkl` (a pickled `dall_e.encoder.Encoder`) -> `DallEEncoderModel` in eval mode.

    The file is read by `safe_pickle.read_pickled_module`: none of its code runs.
    """
    try:
        module = read_pickled_module(checkpoint)
    except UnsafePickleError as error:
        raise ConversionError(f"Refused {checkpoint}: {error}") from None
    if module.class_name != _DALL_E_ENCODER_CLASS:
        raise ConversionError(
            f"{checkpoint} holds a pickled {module.class_name}, not a {_DALL_E_ENCODER_CLASS} (the dVAE encoder; "
            f"decoder.pkl is not needed for tokenizing)."
        )
    state_dict = module.state_dict()
    unused = [key for key in state_dict if _dall_e_target(key) is None]
    if unused:
        raise ConversionError(f"Tensors that are not dVAE encoder weights: {abbreviate(unused)}.")
    check_tensors(state_dict, {})
    config = infer_dall_e_config(module, state_dict)
    model = DallEEncoderModel(config)
    converted = {_dall_e_target(key): value for key, value in state_dict.items()}
    _load_into(model, converted, "dVAE encoder", dall_e_original_name)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m beit3_hf.conversion.visual_tokenizers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kind", required=True, choices=("vqkd", "dall-e"), help="which tokenizer the file holds")
    parser.add_argument(
        "--checkpoint", required=True, help="vqkd: unilm beit2 .pth; dall-e: OpenAI encoder.pkl (read without code)"
    )
    parser.add_argument("--output", required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument(
        "--num-attention-heads", type=int, help="vqkd: attention heads (default: hidden size / 64, 12 for ViT-B)"
    )
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    try:
        if args.kind != "vqkd" and args.num_attention_heads is not None:
            raise ConversionError("--num-attention-heads applies to --kind vqkd only.")
        with staged_output(args.output, args.overwrite) as staging:  # checked before the (large) checkpoint is read
            if args.kind == "vqkd":
                model, dropped = convert_vqkd(args.checkpoint, args.num_attention_heads, dtype)
            else:
                model, dropped = convert_dall_e(args.checkpoint, dtype), {}
            for reason, keys in dropped.items():
                print(f"Dropped {len(keys)} keys, {reason}: {abbreviate(keys, limit=4)}")
            register_vqkd()
            register_dall_e()
            model.save_pretrained(staging)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = model.config
    if isinstance(model, VqkdModel):
        summary = (
            f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, image {config.image_size}, "
            f"{config.codebook_size} codes x {config.codebook_dim}"
        )
    else:
        summary = (
            f"{config.num_groups} groups x {config.num_blocks_per_group} blocks, width {config.hidden_size}, "
            f"vocabulary {config.vocab_size}"
        )
    print(f"Saved {type(model).__name__} ({summary}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
