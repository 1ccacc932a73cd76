"""Convert an original BEiT-3 checkpoint (microsoft/unilm `beit3`, torchscale) into a Hugging Face folder.

    python -m beit3_hf.convert --checkpoint beit3_base_patch16_384_coco_retrieval.pth --task retrieval \
        --output beit3-base-patch16-384-coco-retrieval [--image-size 480] [--verify]

The architecture is read from the tensors (never from the file name); every key goes through `KEY_MAPPING`, and
any key that is missing or left unused is an error. The output folder holds `model.safetensors`, `config.json` and
the code files, and loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..model_card import write_model_card_file
from ..models.beit3.configuration_beit3 import Beit3Config
from ..models.beit3.modeling_beit3 import (
    Beit3ForCaptioning,
    Beit3Model,
    Beit3PreTrainedModel,
    captioning_generation_config,
    resize_patch_position_embeddings,
)
from . import original
from .tasks import BACKBONE_RULES, FAIRSEQ_POSITION_OFFSET, LAYER_PATTERN, TASKS, ConversionError, get_task
from .tokenizer import load_sentencepiece_tokenizer, processor_for_task

#: `--task` name -> model class (read from the task table).
TASK_CLASSES: dict[str, type[Beit3PreTrainedModel]] = {name: spec.model_class for name, spec in TASKS.items()}


def load_checkpoint_dict(path: str | Path, containers: tuple[str, ...]) -> dict:
    """Read a `torch.save` dict safely (`weights_only=True`: a checkpoint never runs code); returns the first of
    `containers` that holds a dict (e.g. unilm's `{"model": state_dict, ...}`), else the whole dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, pickled code refused by weights_only, ...
        raise ConversionError(
            f"Could not read checkpoint {path} with torch.load(weights_only=True): it is corrupt, truncated or not "
            f"a PyTorch state dict ({type(error).__name__}: {error})."
        ) from error
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict.")
    return next((checkpoint[name] for name in containers if isinstance(checkpoint.get(name), dict)), checkpoint)


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint safely (`weights_only=True`: a checkpoint never runs code)."""
    checkpoint = load_checkpoint_dict(path, ("model", "module"))  # unilm's {"model": ...}, DeepSpeed's {"module": ...}
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not state_dict or "beit3.text_embed.weight" not in state_dict:
        raise ConversionError(
            f"Checkpoint {path} is not an original BEiT-3 checkpoint: no 'beit3.text_embed.weight' among its keys "
            f"{sorted(checkpoint)[:8]}..."
        )
    return state_dict


def detect_task(state_dict: dict[str, torch.Tensor]) -> str:
    """The task whose head keys the checkpoint carries ("backbone" when it has none)."""
    for spec in TASKS.values():
        key = spec.signature_key
        if (
            key is not None
            and key in state_dict
            and not (spec.name == "retrieval" and "mlm_head.weight" in state_dict)
        ):
            return spec.name
    return "backbone"


def _task_hint(state_dict: dict[str, torch.Tensor], task: str) -> str:
    found = detect_task(state_dict)
    return f" The checkpoint looks like a {found!r} checkpoint." if found != task else ""


#: The tensors `infer_config` reads the architecture from.
ARCHITECTURE_KEYS = (
    "beit3.text_embed.weight",
    "beit3.vision_embed.proj.weight",
    "beit3.encoder.embed_positions.A.weight",
    "beit3.encoder.embed_positions.B.weight",
    "beit3.encoder.layers.0.ffn.A.fc1.weight",
)

# `<mask>` of `beit3.spm`, the tokenizer of every released checkpoint (vocabulary of 64010 embedding rows).
RELEASED_VOCAB_SIZE, RELEASED_MASK_TOKEN_ID = 64010, 64001


def infer_config(
    state_dict: dict[str, torch.Tensor],
    task: str,
    num_attention_heads: int | None = None,
    mask_token_id: int | None = None,
) -> Beit3Config:
    """The architecture of the checkpoint, read from its tensors (and the tokenizer's `<mask>` id for captioning)."""
    missing = [key for key in ARCHITECTURE_KEYS if key not in state_dict]
    if missing:
        raise ConversionError(
            f"The checkpoint lacks {len(missing)} of the keys its architecture is read from: {', '.join(missing)}."
        )
    hidden_size = state_dict["beit3.text_embed.weight"].shape[1]
    layer_ids = {int(m.group(1)) for key in state_dict if (m := re.match(LAYER_PATTERN, key))}
    patch_weight = state_dict["beit3.vision_embed.proj.weight"]  # (hidden, channels, patch, patch)
    num_positions = state_dict["beit3.encoder.embed_positions.A.weight"].shape[0] - FAIRSEQ_POSITION_OFFSET - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ConversionError(f"The vision position table has {num_positions} patch rows, not a square grid.")
    heads = num_attention_heads or max(hidden_size // 64, 1)
    kwargs = {}
    labels_key = TASKS[task].num_labels_key
    if labels_key is not None and labels_key in state_dict:
        kwargs["num_labels"] = state_dict[labels_key].shape[0]
    vocab_size = state_dict["beit3.text_embed.weight"].shape[0]
    if mask_token_id is None and task == "captioning":
        if vocab_size != RELEASED_VOCAB_SIZE:
            raise ConversionError(
                "--task captioning decodes at the tokenizer's <mask> token: pass --sentencepiece or --mask-token-id "
                f"(the vocabulary has {vocab_size} rows, not the released {RELEASED_VOCAB_SIZE} of beit3.spm)."
            )
        mask_token_id = RELEASED_MASK_TOKEN_ID
    if mask_token_id is not None:
        kwargs["mask_token_id"] = mask_token_id
    if "mim_head.weight" in state_dict:  # the visual tokenizer's codebook size, never assumed
        kwargs["visual_vocab_size"] = state_dict["mim_head.weight"].shape[0]
    return Beit3Config(
        vision_only=TASKS[task].vision_only,
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=heads,
        intermediate_size=state_dict["beit3.encoder.layers.0.ffn.A.fc1.weight"].shape[0],
        image_size=grid * patch_weight.shape[-1],
        patch_size=patch_weight.shape[-1],
        num_channels=patch_weight.shape[1],
        vocab_size=vocab_size,
        max_position_embeddings=state_dict["beit3.encoder.embed_positions.B.weight"].shape[0]
        - FAIRSEQ_POSITION_OFFSET,
        use_final_layernorm="beit3.encoder.layer_norm.A.weight" in state_dict,
        **kwargs,
    )


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], task: str, ignore_unused: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map original keys to ours. Returns (converted state dict, dropped pretraining-only keys).

    Raises `ConversionError` listing every key that no rule of `task` consumes (except the pretraining-only keys
    when converting a backbone, and keys matching the `ignore_unused` regex).
    """
    spec = TASKS[task]
    rules = BACKBONE_RULES + spec.head_rules
    converted, sources, unused, dropped = {}, {}, [], []
    for key, tensor in state_dict.items():
        if spec.dropped_keys and re.fullmatch(spec.dropped_keys, key):  # not part of this task's model
            dropped.append(key)
            continue
        for rule in rules:
            target = rule.apply(key)
            if target is not None:
                converted[target] = rule.transform(tensor) if rule.transform else tensor
                sources[target] = key
                break
        else:
            (dropped if ignore_unused and re.fullmatch(ignore_unused, key) else unused).append(key)
    check_tensors(converted, sources)
    if unused:
        raise ConversionError(
            f"{len(unused)} checkpoint keys are not used by --task {task}: {abbreviate(unused)}."
            + _task_hint(state_dict, task)
        )
    if spec.model_class is Beit3Model:  # the bare model has no `beit3.` prefix of its own
        converted = {key.removeprefix("beit3."): value for key, value in converted.items()}
    return converted, dropped


def check_tensors(converted: dict[str, torch.Tensor], original_names: dict[str, str]) -> None:
    """Every weight must be a floating-point tensor with finite values; the error names the original keys.

    An integer or boolean tensor where a weight belongs is a corrupt or foreign checkpoint (casting it would build a
    model silently), and NaN / inf weights would make every output NaN, which `--verify` cannot compare.
    """
    not_float = sorted(
        original_names.get(key, key) for key, value in converted.items() if not value.is_floating_point()
    )
    if not_float:
        raise ConversionError(f"{len(not_float)} weights are not floating-point tensors: {abbreviate(not_float)}.")
    not_finite = sorted(original_names.get(key, key) for key, value in converted.items() if not value.isfinite().all())
    if not_finite:
        raise ConversionError(f"{len(not_finite)} weights hold NaN or inf values: {abbreviate(not_finite)}.")


def abbreviate(keys: Sequence[str], limit: int = 12) -> str:
    """At most `limit` of the sorted `keys`, comma-separated, and how many more there are."""
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_checkpoint(
    checkpoint: str | Path,
    task: str,
    *,
    image_size: int | None = None,
    num_attention_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    ignore_unused: str | None = None,
    mask_token_id: int | None = None,
) -> tuple[Beit3PreTrainedModel, list[str]]:
    """Build our model for `task` from an original checkpoint file; returns (model, dropped pretraining-only keys)."""
    get_task(task)  # an unknown task fails before the checkpoint is read
    return model_from_state_dict(
        load_original_state_dict(checkpoint),
        task,
        image_size=image_size,
        num_attention_heads=num_attention_heads,
        dtype=dtype,
        ignore_unused=ignore_unused,
        mask_token_id=mask_token_id,
    )


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    task: str,
    *,
    image_size: int | None = None,
    num_attention_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    ignore_unused: str | None = None,
    mask_token_id: int | None = None,
) -> tuple[Beit3PreTrainedModel, list[str]]:
    """Build our model for `task` from an original state dict; returns (model, dropped pretraining-only keys)."""
    model_class = get_task(task).model_class
    config = infer_config(state_dict, task, num_attention_heads, mask_token_id)
    converted, dropped = convert_state_dict(state_dict, task, ignore_unused)
    model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConversionError(
            f"{len(missing)} weights of --task {task} are missing from the checkpoint: {abbreviate(missing)}."
            + _task_hint(state_dict, task)
        )
    for key, tensor in converted.items():
        if tensor.shape != expected[key].shape:
            raise ConversionError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[key].shape)}."
            )
    model.load_state_dict({key: value.to(dtype) for key, value in converted.items()}, strict=True)
    if image_size is not None and image_size != config.image_size:
        model = resize_model(model, image_size)
    return model.to(dtype).eval(), dropped


@torch.no_grad()
def verify_against_original(
    ours: Beit3PreTrainedModel, state_dict: dict[str, torch.Tensor], task: str, seed: int = 0
) -> float:
    """Max |diff| (float32) between our converted model and the original implementation loaded with the original
    `state_dict`, on random images and a padded text batch at the checkpoint's own resolution; NaN when any output
    is not finite.

    The original is built from `ours.config`, so an assumption both share (the attention head count, which the
    tensors do not reveal) cannot show up as a difference.
    """
    reference = original.build_original_model(task, ours.config)
    reference_keys = reference.state_dict().keys()
    reference.load_state_dict({k: v.float() for k, v in state_dict.items() if k in reference_keys}, strict=True)
    inputs = random_inputs(ours.config, task, batch_size=2, seed=seed)
    expected = original.run_original(reference, task, **inputs)
    actual = ours(**inputs)
    diffs = torch.stack([(actual[name].float() - value.float()).abs().max() for name, value in expected.items()])
    return float("nan") if not diffs.isfinite().all() else diffs.max().item()


def resize_model(model: Beit3PreTrainedModel, image_size: int) -> Beit3PreTrainedModel:
    """A copy of `model` for `image_size`, its vision position table resized as the original loader does (bicubic
    interpolation, CLS row kept)."""
    config = copy.deepcopy(model.config)
    if image_size % config.patch_size:
        raise ConversionError(f"--image-size {image_size} is not a multiple of the patch size {config.patch_size}.")
    state_dict = model.state_dict()
    key = f"{'' if isinstance(model, Beit3Model) else 'beit3.'}vision_embeddings.position_embedding.weight"
    table = state_dict[key]
    old_grid = (config.image_size // config.patch_size,) * 2
    new_grid = (image_size // config.patch_size,) * 2
    state_dict[key] = torch.cat([table[:1], resize_patch_position_embeddings(table[1:], old_grid, new_grid)])
    config.image_size = image_size
    resized = type(model)(config)
    resized.load_state_dict(state_dict, strict=True)
    return resized.eval()


@contextlib.contextmanager
def staged_output(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Check `--output` before any work, yield an empty staging folder beside it, and move that folder into place
    only once the block completes.

    An unwritable location fails at once; `overwrite` replaces the whole folder (no stale processor or tokenizer file
    of an earlier conversion survives; a folder holding the current or the home folder is refused); a failed
    conversion leaves `output` as it was and no half-written folder.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is an existing file, not a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output {output} is not empty; pass --overwrite to replace its contents (every file in it is removed, "
            "so no stale processor or tokenizer file of an earlier conversion survives)."
        )
    resolved = output.resolve()
    if output.is_dir() and any(resolved == kept or resolved in kept.parents for kept in (Path.cwd(), Path.home())):
        raise ConversionError(f"--output {output} holds the current or the home folder, which is never replaced.")
    # Named beside `output` (made by mkdir, so with the usual permissions), so that the final move is a rename.
    staging = resolved.parent / f".{resolved.name}.partial-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise ConversionError(f"--output {output} cannot be written: {error}") from error
    try:
        yield staging
        previous = staging.with_name(f"{staging.name}-previous") if output.is_dir() else None
        try:
            if previous is not None:
                output.rename(previous)
            staging.rename(output)
        except OSError as error:
            if previous is not None and previous.is_dir() and not output.exists():
                previous.rename(output)  # the earlier folder back in place
            raise ConversionError(f"--output {output} could not be replaced: {error}") from error
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def random_inputs(config: Beit3Config, task: str, batch_size: int = 2, text_len: int = 8, seed: int = 0) -> dict:
    """Random images and a padded text batch (`<s> ... </s>` then padding) for `task`."""
    generator = torch.Generator().manual_seed(seed)
    image_shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    if task == "nlvr2":
        image_shape = (batch_size, 2, *image_shape[1:])
    pixel_values = torch.randn(image_shape, generator=generator)
    input_ids = torch.randint(3, config.vocab_size, (batch_size, text_len), generator=generator)
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long)
    lengths = torch.linspace(text_len, 3, batch_size).long()  # the first row is full, later rows padded
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, 0], input_ids[row, length - 1] = config.bos_token_id, config.eos_token_id
        input_ids[row, length:] = config.pad_token_id
        attention_mask[row, length:] = 0
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    if task == "image-classification":
        del inputs["input_ids"], inputs["attention_mask"]
    if task == "pretraining":  # about 40% of the patches masked
        num_patches = (config.image_size // config.patch_size) ** 2
        inputs["bool_masked_pos"] = torch.rand(batch_size, num_patches, generator=generator) < 0.4
    return inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m beit3_hf.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original .pth file (unilm BEiT-3)")
    parser.add_argument("--task", required=True, choices=sorted(TASK_CLASSES))
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--image-size", type=_positive_int, help="resize the vision position table to this image size")
    parser.add_argument(
        "--num-attention-heads",
        type=_positive_int,
        help="attention heads (default: hidden size / 64, as every released checkpoint; the tensors do not tell, "
        "and --verify cannot detect a wrong count)",
    )
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--ignore-unused", metavar="REGEX", help="drop checkpoint keys matching REGEX instead of failing"
    )
    parser.add_argument(
        "--sentencepiece",
        metavar="PATH",
        help="the original beit3.spm: also write the tokenizer, image processor and processor to the output",
    )
    parser.add_argument(
        "--mask-token-id", type=int, help="the tokenizer's <mask> id (captioning; default from the tokenizer)"
    )
    parser.add_argument("--verify", action="store_true", help="compare outputs with the original implementation")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output folder")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with staged_output(args.output, args.overwrite) as staging:
            model = convert_to(staging, args)
    except (ConversionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = model.config
    print(
        f"Saved {type(model).__name__} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} attention heads, image {config.image_size}) to {args.output}"
    )
    return 0


def convert_to(folder: Path, args: argparse.Namespace) -> Beit3PreTrainedModel:
    """Run the conversion that `args` asks for and save the result (model, and processor if asked) in `folder`."""
    spec = TASKS[args.task]
    tokenizer = None
    if args.sentencepiece is not None:
        # Read the tokenizer first: a bad --sentencepiece fails before the (large) checkpoint is loaded.
        tokenizer = load_sentencepiece_tokenizer(args.sentencepiece, max_length=spec.max_text_length)
        if args.mask_token_id is None:
            args.mask_token_id = tokenizer.mask_token_id
    state_dict = load_original_state_dict(args.checkpoint)  # read once, for the conversion and --verify
    # Converted in float32 at the checkpoint's own resolution first, so that --verify compares exactly what the
    # original computes; resizing and the output dtype come after.
    model, dropped = model_from_state_dict(
        state_dict,
        args.task,
        num_attention_heads=args.num_attention_heads,
        ignore_unused=args.ignore_unused,
        mask_token_id=args.mask_token_id,
    )
    if dropped:
        print(f"Dropped {len(dropped)} keys not used by --task {args.task}: {abbreviate(dropped)}")
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ConversionError(
            f"The tokenizer {args.sentencepiece} has {len(tokenizer)} ids but the checkpoint's vocabulary has "
            f"only {model.config.vocab_size} rows: it is not this checkpoint's tokenizer."
        )
    if args.verify:
        max_diff = verify_against_original(model, state_dict, args.task)
        print(
            f"Max |diff| against the original implementation (float32, {model.config.num_attention_heads} "
            f"attention heads assumed): {max_diff:.3e}"
        )
        if not max_diff <= 1e-4:  # also catches NaN, for which `nan > 1e-4` is False
            raise ConversionError(f"Outputs differ from the original by {max_diff:.3e} (> 1e-4).")
    if args.image_size is not None and args.image_size != model.config.image_size:
        model = resize_model(model, args.image_size)
    model = model.to(getattr(torch, args.dtype))
    if isinstance(model, Beit3ForCaptioning):
        # generation_config.json: the recipe's decoding with the original beam search (nothing else that would
        # reorder tokens: no repetition penalty, no minimum length).
        model.generation_config = captioning_generation_config(model.config)
    model.save_pretrained(folder)
    if tokenizer is not None:
        # The recipe's text length, within the model's position table (never pad beyond what the model takes).
        max_length = min(spec.max_text_length, model.config.max_position_embeddings)
        processor = processor_for_task(
            tokenizer, task=args.task, image_size=model.config.image_size, max_length=max_length
        )
        processor.save_pretrained(folder)
    write_conversion_card(Path(args.output), folder, model, args)
    return model


def write_conversion_card(output: Path, folder: Path, model: Beit3PreTrainedModel, args: argparse.Namespace) -> None:
    """The folder's `README.md`: Hub metadata, the source checkpoint and the task's usage snippet."""
    config = model.config
    summary = (
        f"BEiT-3 ([Image as a Foreign Language](https://arxiv.org/abs/2208.10442)), `{type(model).__name__}` "
        f"({config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.image_size}x"
        f"{config.image_size} images), converted with beit3-hf from the original checkpoint "
        f"`{Path(args.checkpoint).name}` of [microsoft/unilm](https://github.com/microsoft/unilm/tree/master/beit3)."
    )
    details = None
    if args.sentencepiece is None:
        details = (
            "This folder has no processor (converted without `--sentencepiece`): add one with "
            "`beit3_hf.conversion.tokenizer.build_processor` before using the snippet."
        )
    write_model_card_file(folder, args.task, repo=output.name, summary=summary, details=details)


if __name__ == "__main__":
    sys.exit(main())
