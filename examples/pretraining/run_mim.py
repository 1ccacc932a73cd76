#!/usr/bin/env python
"""BEiT-style masked image modelling (MIM) of BEiT-3 with `Trainer`: pretraining or continued pretraining.

Blocks of patches (BEiT: 75 of 14x14) are replaced by the mask token, and `Beit3ForMaskedImageModeling` predicts,
at the masked patches only, either the visual tokens a tokenizer gives for the same crop (`--visual_tokenizer` with a
converted BEiT v2 VQ-KD or DALL-E dVAE folder: BEiT v2 / v1) or the patch's pixels (`--mim_target pixels`: no
tokenizer needed, for new domains; normalised per patch unless `--norm_pix_loss False`). Images come from an
ImageNet-style folder (`--train_dir`, through `datasets`) or from webdataset shards as `img2dataset` writes them
(`--webdataset 'shards/{00000..00099}.tar'`), streamed.

    python examples/pretraining/run_mim.py --config_name beit3-base-patch16-224 --train_dir imagenet/train \
        --visual_tokenizer vqkd-clip --output_dir beit3-mim --do_train --max_steps 100000
    accelerate launch --num_processes 8 examples/pretraining/run_mim.py ...

The saved folder is a `Beit3ForMaskedImageModeling` checkpoint that
`examples/image-classification/run_image_classification.py --model_name_or_path` fine-tunes directly. See
`README.md` next to this file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import set_seed

import beit3_hf  # noqa: F401  (registers the BEiT-3 and visual tokenizer classes with the Auto classes)
from beit3_hf import Beit3ForMaskedImageModeling, Beit3ImageProcessor
from beit3_hf.data.pretraining import (
    MaskedImageModelingCollator,
    PretrainingImageFolder,
    PretrainingWebDataset,
    TwoViewTransform,
)
from beit3_hf.training.masking import BEIT_MASK_RATIO, BlockMaskingGenerator
from beit3_hf.training.objectives import load_visual_tokenizer, mim_targets, visual_vocab_size
from beit3_hf.training.scripts import (
    ScriptTrainingArguments,
    check_distributed_launch,
    load_config,
    parse_script_args,
    report_training,
    resolve_checkpoint,
    save_final_model,
    setup_logging,
)
from beit3_hf.training.trainer import Beit3Trainer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The model to pretrain and what it predicts."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A BEiT-3 folder to continue from: a converted pretrained checkpoint (`convert --task "
            "pretraining`: its vision side and mim_head are used), a converted backbone, or an earlier MIM run."
        },
    )
    config_name: str = field(
        default="beit3-base-patch16-224",
        metadata={"help": "Preset or config folder when training from scratch (without --model_name_or_path)."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config changes, e.g. "hidden_size=128,num_hidden_layers=4,image_size=64".'}
    )
    visual_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "A converted VQ-KD or DALL-E folder (beit3-convert-visual-tokenizer); its codes are the targets."
        },
    )
    mim_target: str = field(
        default="tokens",
        metadata={
            "help": "tokens: the visual tokenizer's codes (cross-entropy); pixels: each masked patch's pixels, "
            "normalised per patch (mean squared error), no tokenizer needed.",
            "choices": ["tokens", "pixels"],
        },
    )
    norm_pix_loss: bool | None = field(
        default=None,
        metadata={
            "help": "With --mim_target pixels: normalise each patch's targets to zero mean and unit variance (MAE's "
            "norm_pix_loss; the default). False regresses the pixels themselves, which keeps uniform patches "
            "informative (see examples/pretraining/README.md)."
        },
    )
    layer_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (1.0: none)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth of the last layer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model / tokenizer folders."})


@dataclass
class DataArguments:
    """The images and the masking."""

    train_dir: str | None = field(default=None, metadata={"help": "An ImageNet-style folder (labels ignored)."})
    webdataset: str | None = field(
        default=None, metadata={"help": "Webdataset shards, e.g. 'cc3m/{00000..00331}.tar' (needs --max_steps)."}
    )
    num_masking_patches: int | None = field(
        default=None, metadata={"help": "Patches masked per image (default: BEiT's 75/196 of the grid)."}
    )
    min_num_patches: int | None = field(
        default=None, metadata={"help": "Smallest masked block (default: BEiT's 16/196 of the grid)."}
    )
    exact_masking: bool = field(default=False, metadata={"help": "Mask exactly that many patches (BEiT v2)."})
    min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest crop area fraction (BEiT v2: 0.2)."})
    color_jitter: float = field(default=0.4, metadata={"help": "Colour jitter strength (0: off)."})


class MaskedImageModelingTrainer(Beit3Trainer):
    """`Beit3Trainer` computing the MIM targets on the fly and logging the MIM accuracy.

    With a visual tokenizer the targets are its codes for the tokenizer view (`tokenizer_pixel_values`), computed
    under `no_grad` in eval mode; with `mim_target="pixels"` they are the model view's patches, normalised per patch
    when `normalize_pixels`.
    """

    def __init__(
        self, *args: Any, visual_tokenizer: nn.Module | None = None, normalize_pixels: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.visual_tokenizer = visual_tokenizer.eval().requires_grad_(False) if visual_tokenizer else None
        self.normalize_pixels = normalize_pixels
        self._accuracy_sum, self._accuracy_count = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = mim_targets(self.visual_tokenizer, inputs, self.model.config.patch_size, self.normalize_pixels)
        outputs = model(pixel_values=inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"], labels=labels)
        if not labels.is_floating_point() and model.training:
            with torch.no_grad():
                masked = inputs["bool_masked_pos"]
                correct = (outputs.logits.argmax(-1) == labels)[masked]
                self._accuracy_sum += correct.float().sum().item()
                self._accuracy_count += correct.numel()
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._accuracy_count and "loss" in logs:  # the training-loss log line: add the MIM accuracy since the last
            logs["mim_accuracy"] = round(self._accuracy_sum / self._accuracy_count, 4)
            self._accuracy_sum, self._accuracy_count = 0.0, 0
        super().log(logs, *args, **kwargs)


def build_model(model_args: ModelArguments, visual_tokenizer: nn.Module | None) -> Beit3ForMaskedImageModeling:
    """The MIM model, with a head as wide as the targets: the tokenizer's codebook, or a patch's pixels."""
    overrides = [model_args.config_overrides or ""]
    if model_args.drop_path_rate is not None:
        overrides.append(f"drop_path_rate={model_args.drop_path_rate}")
    source = model_args.model_name_or_path or model_args.config_name
    config = load_config(source, ",".join(filter(None, overrides)), trust_remote_code=model_args.trust_remote_code)
    config.visual_vocab_size = visual_vocab_size(visual_tokenizer, config)
    if model_args.model_name_or_path is None:
        return Beit3ForMaskedImageModeling(config)
    # A pretraining checkpoint's mim_head is kept when its vocabulary matches the targets; otherwise it starts fresh.
    return Beit3ForMaskedImageModeling.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True
    )


def choose_visual_tokenizer(model_args: ModelArguments) -> tuple[nn.Module | None, str | None]:
    """(tokenizer model, its `TwoViewTransform` view preset), or (None, None) for pixel targets."""
    if model_args.mim_target == "pixels":
        if model_args.visual_tokenizer is not None:
            raise ValueError("--mim_target pixels uses no --visual_tokenizer.")
        return None, None
    if model_args.norm_pix_loss is not None:
        raise ValueError("--norm_pix_loss applies to --mim_target pixels only.")
    if model_args.visual_tokenizer is None:
        raise ValueError("--mim_target tokens needs --visual_tokenizer FOLDER (or use --mim_target pixels).")
    return load_visual_tokenizer(model_args.visual_tokenizer, model_args.trust_remote_code)


def build_dataset(data_args: DataArguments, transform: TwoViewTransform, training_args: ScriptTrainingArguments):
    if (data_args.train_dir is None) == (data_args.webdataset is None):
        raise ValueError("Pass exactly one of --train_dir (an image folder) and --webdataset (shards).")
    if data_args.train_dir is not None:
        return PretrainingImageFolder(data_args.train_dir, transform, argument="--train_dir")
    if training_args.max_steps <= 0:
        raise ValueError("--webdataset streams without a length: pass --max_steps.")
    return PretrainingWebDataset(data_args.webdataset, transform, seed=training_args.seed)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_script_args(
        (ModelArguments, DataArguments, ScriptTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    check_distributed_launch(training_args)
    if not training_args.do_train or training_args.do_eval or training_args.do_predict:
        raise ValueError(
            "run_mim.py pretrains and has no evaluation data: pass --do_train, without --do_eval / --do_predict "
            "(evaluate the saved model with linear_probe.py or a fine-tuning script)."
        )
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    visual_tokenizer, view = choose_visual_tokenizer(model_args)
    model = build_model(model_args, visual_tokenizer)
    config = model.config

    grid = config.image_size // config.patch_size
    num_patches = grid * grid
    num_masking_patches = data_args.num_masking_patches or round(BEIT_MASK_RATIO * num_patches)
    if not 0 < num_masking_patches < num_patches:
        raise ValueError(f"--num_masking_patches must be in [1, {num_patches - 1}], got {num_masking_patches}.")
    masking = BlockMaskingGenerator.for_grid(
        grid,
        mask_ratio=num_masking_patches / num_patches,
        min_num_patches=data_args.min_num_patches,
        exact=data_args.exact_masking,
    )
    transform = TwoViewTransform(
        config.image_size,
        patch_size=config.patch_size,
        visual_tokenizer=view,
        scale=(data_args.min_crop_scale, 1.0),
        color_jitter=data_args.color_jitter or None,
        mask_generator=masking,
        seed=training_args.seed,
    )
    train_dataset = build_dataset(data_args, transform, training_args)
    logger.info("MIM: %d of %d patches masked, target %s", num_masking_patches, num_patches, model_args.mim_target)

    trainer = MaskedImageModelingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=MaskedImageModelingCollator(),
        visual_tokenizer=visual_tokenizer,
        normalize_pixels=model_args.norm_pix_loss is not False,
        layer_decay=model_args.layer_decay,
        callbacks=training_args.early_stopping_callbacks(),
        # Saved with the model: the eval transform (resize, center crop) with the training normalisation.
        processing_class=Beit3ImageProcessor(
            task="image-classification",
            image_size=config.image_size,
            image_mean=transform.mean,
            image_std=transform.std,
        ),
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    failures = getattr(train_dataset, "failures", None)
    metrics = dict(result.metrics)
    if failures is not None:
        metrics["train_undecodable_images"] = failures.count
    save_final_model(
        trainer,
        description=f"BEiT-3 pretrained by masked image modelling ({model_args.mim_target} targets); fine-tune it "
        "with examples/image-classification/run_image_classification.py --model_name_or_path.",
        tags=["beit3", "masked-image-modeling"],
    )
    return report_training(trainer, metrics)


if __name__ == "__main__":
    main()
