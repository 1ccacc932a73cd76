#!/usr/bin/env python
"""Fine-tune (or train from scratch) BEiT-3 for image classification on an ImageNet-style folder with `Trainer`.

The original BEiT-3 ImageNet recipe (unilm `beit3/`, `get_started_for_image_classification.md`) is the default:
timm's RandAugment / random-erasing train transform, mixup 0.8 + cutmix 1.0 with label smoothing 0.1 (timm `Mixup`,
batch mode, soft-target cross-entropy), layer-wise learning-rate decay, drop path, AdamW with weight decay 0.05 and
the original's exclusions, linear warmup then cosine decay, and top-1 / top-5 accuracy on the validation split with
the original eval transform (short side to S, center crop, ImageNet mean/std). Every part is a flag.

The same command runs on one process or many, with no code change:

    python examples/image-classification/run_image_classification.py --data_dir imagenet ...
    accelerate launch --num_processes 8 examples/image-classification/run_image_classification.py ...

See `README.md` next to this file for the full recipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.mixup import mixup_target
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import beit3_hf  # noqa: F401  (registers the BEiT-3 classes with the Auto classes in this process)
from beit3_hf import BEIT3_PRESETS, Beit3ImageProcessor
from beit3_hf.data import load_imagefolder
from beit3_hf.training import Beit3Trainer, load_config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to fine-tune, or which configuration to train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder (or Hub id) of a BEiT-3 checkpoint: made by `python -m beit3_hf.convert` or "
            "`save_pretrained`, any task. The classifier is re-initialised when the labels differ."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Configuration to use instead of the checkpoint's: a preset name (e.g. beit3-base-patch16-224, "
            f"one of {', '.join(sorted(BEIT3_PRESETS))}) or a config folder / file. Without --model_name_or_path "
            "the model is trained from scratch."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config fields to override, e.g. "
            "'hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128,image_size=32'."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "Image processor (folder or Hub id) for evaluation. Default: the checkpoint's own if it is an "
            "image-classification one, else Beit3ImageProcessor(task='image-classification') at the model's size."
        },
    )
    drop_path_rate: float = field(
        default=0.1,
        metadata={"help": "Stochastic depth of the last layer (linear from 0). The base recipe uses 0.15."},
    )
    use_final_layernorm: bool = field(
        default=False,
        metadata={
            "help": "Keep the encoder's final layer norm. The original image classifier has none (a pretrained "
            "backbone's final norm is dropped)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Re-initialise checkpoint weights whose shape differs (the classifier of other labels)."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder for downloaded models and for the datasets Arrow cache."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private checkpoints."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the code files of the checkpoint folder. Not needed for BEiT-3 folders: importing beit3_hf "
            "registers the classes in this process."
        },
    )


@dataclass
class DataTrainingArguments:
    """The data, the train-time augmentation and the mixup / cutmix / label-smoothing targets."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "ImageNet-style folder: DATA_DIR/train/CLASS/*.JPEG and DATA_DIR/val/CLASS/*.JPEG."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of this many images (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a random subset of this many images."}
    )
    # timm.data.create_transform(is_training=True, ...) as the original `build_imagenet_transform`
    auto_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm auto-augment policy; 'none' to disable."}
    )
    color_jitter: float = field(
        default=0.4, metadata={"help": "Color jitter strength (timm skips it when auto_augment is set)."}
    )
    train_interpolation: str = field(default="bicubic", metadata={"help": "Interpolation of the random crop."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    remode: str = field(default="pixel", metadata={"help": "Random erasing mode."})
    recount: int = field(default=1, metadata={"help": "Random erasing count."})
    # timm.data.Mixup, applied by the training data collator only
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha; mixup is active if mixup or cutmix > 0."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha."})
    cutmix_minmax: list[float] | None = field(
        default=None, metadata={"help": "CutMix min and max box ratio (two numbers); overrides the alpha when set."}
    )
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of cutmix instead of mixup when both are on."}
    )
    mixup_mode: str = field(default="batch", metadata={"help": "Mixup mode: 'batch', 'pair' or 'elem'."})
    label_smoothing: float = field(
        default=0.1, metadata={"help": "Label smoothing of the training targets (with or without mixup)."}
    )

    def __post_init__(self) -> None:
        if self.data_dir is None:
            raise ValueError("Pass --data_dir, an ImageNet-style folder with train/CLASS/* and val/CLASS/*.")
        if self.auto_augment is not None and self.auto_augment.lower() == "none":
            self.auto_augment = None
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise ValueError(f"--cutmix_minmax takes two numbers (min max), got {self.cutmix_minmax}.")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"--mixup_mode must be 'batch', 'pair' or 'elem', got {self.mixup_mode!r}.")

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass
class ImageClassificationTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults of the original recipe where they do not depend on the hardware."""

    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: a step count (>= 1) or a ratio of the training steps (< 1)."}
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on biases, norms, tokens, position tables)."}
    )
    layer_decay: float = field(
        default=0.65,
        metadata={"help": "Layer-wise LR decay: layer i trains at lr * layer_decay ** (num_layers - i). 1 = off."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the transforms read the raw 'image' column, which the model never sees."},
    )


# ----------------------------------------------------------------------------------------------------------------
# Train transform
# ----------------------------------------------------------------------------------------------------------------


def posterize_keeping_any_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, where keeping 0 bits gives a black image as in the Pillow versions the original ran with.

    timm's RandAugment asks for 0 bits ("PosterizeIncreasing" at magnitude 10, which "m9-mstd0.5" reaches in about 2%
    of the draws, so in about 0.15% of the images); recent Pillow (13.0 here) raises `ValueError: bits must be
    between or equal to 1 and 8` there, which would stop an ImageNet run within its first batches.
    """
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def build_train_transform(
    data_args: DataTrainingArguments, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Any:
    """The original `build_imagenet_transform(is_train=True)`: timm's `create_transform` with the recipe's flags."""
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=data_args.color_jitter,
        auto_augment=data_args.auto_augment,
        interpolation=data_args.train_interpolation,
        re_prob=data_args.reprob,
        re_mode=data_args.remode,
        re_count=data_args.recount,
        mean=tuple(mean),
        std=tuple(std),
    )
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]  # AutoAugment
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = posterize_keeping_any_bits
    return transform


# ----------------------------------------------------------------------------------------------------------------
# Batches, metrics, trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageClassificationCollator:
    """Stack `{"pixel_values", "labels"}` examples; for training, turn the labels into soft targets.

    - `mixup` set (a `timm.data.Mixup` carrying the label smoothing): the batch is mixed and `labels` become the
      mixed, smoothed targets of shape (batch, num_labels). Mixup pairs sample i with sample n-1-i, so it needs an
      even batch: in a batch of odd size (the last, partial batch of an epoch) the first n-1 samples are mixed and
      the last one only gets label smoothing.
    - no `mixup`, `label_smoothing > 0`: smoothed one-hot targets (what timm's `LabelSmoothingCrossEntropy` and
      the original recipe without mixup train with).
    - neither (evaluation): integer labels.

    The model computes the soft-target cross-entropy for float labels.
    """

    num_labels: int
    mixup: Mixup | None = None
    label_smoothing: float = 0.0

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        labels = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        if self.mixup is None and self.label_smoothing <= 0:
            return {"pixel_values": pixel_values, "labels": labels}
        smoothing = self.mixup.label_smoothing if self.mixup is not None else self.label_smoothing
        targets = mixup_target(labels, self.num_labels, lam=1.0, smoothing=smoothing)
        even = len(labels) - len(labels) % 2
        if self.mixup is not None and even > 0:
            # Mixup mixes the views in place and returns the targets of the mixed images.
            _, targets[:even] = self.mixup(pixel_values[:even], labels[:even])
        return {"pixel_values": pixel_values, "labels": targets}


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep the top-5 class indices of each image (on the device, before gathering) instead of all the logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) from the top-k indices of `preprocess_logits_for_metrics`."""
    topk, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    if topk.ndim == 1:
        topk = topk[:, None]
    hits = topk == labels.reshape(-1, 1)
    return {"top1": float(hits[:, 0].mean()), "top5": float(hits[:, :5].any(axis=1).mean())}


class ImageClassificationTrainer(Beit3Trainer):
    """`Beit3Trainer` (layer-wise LR decay) whose evaluation and prediction batches use `eval_data_collator`, so
    that mixup and label smoothing never touch evaluation."""

    def __init__(self, *args: Any, eval_data_collator: ImageClassificationCollator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    @contextlib.contextmanager
    def _evaluation_collator(self) -> Iterator[None]:
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Any) -> torch.utils.data.DataLoader:
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)


class PerProcessAugmentationSeed(TrainerCallback):
    """Seed Python's and NumPy's generators with `seed + process index` when training starts.

    With `dataloader_num_workers=0` the augmentations and mixup draw from these generators in the training process,
    which `Trainer` seeds identically on every process; the original seeds each process with `seed + rank`, so
    that processes draw different augmentations. (Data-loader workers are already seeded per process.)
    """

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        seed = args.seed + args.process_index
        random.seed(seed)
        np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------------


def build_config(model_args: ModelArguments, id2label: dict[int, str]) -> Any:
    """The model configuration: preset / config / checkpoint, then overrides, labels, drop path and final norm."""
    source = model_args.config_name or model_args.model_name_or_path
    if source is None:
        raise ValueError(
            "Pass --model_name_or_path (a checkpoint to fine-tune) or --config_name (a preset such as "
            "beit3-base-patch16-224, to train from scratch)."
        )
    if model_args.config_overrides:
        logger.info("Overriding config: %s", model_args.config_overrides)
    config = load_config(
        source,
        model_args.config_overrides,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    config.id2label = dict(id2label)
    config.label2id = {name: label for label, name in id2label.items()}
    config.drop_path_rate = model_args.drop_path_rate
    config.use_final_layernorm = model_args.use_final_layernorm
    if hasattr(config, "validate_architecture"):
        config.validate_architecture()
    return config


def build_model(model_args: ModelArguments, config: Any) -> torch.nn.Module:
    if model_args.model_name_or_path is None:
        logger.info("Training a new model from scratch: %s", config.to_diff_dict())
        return AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    return AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
    )


def load_eval_image_processor(model_args: ModelArguments, image_size: int) -> Any:
    """`--image_processor_name`, else the checkpoint's image-classification processor, else the original eval
    transform at the model's resolution."""
    kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.image_processor_name:
        return AutoImageProcessor.from_pretrained(model_args.image_processor_name, **kwargs)
    if model_args.model_name_or_path:
        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **kwargs)
        except OSError:
            logger.info("%s has no image processor.", model_args.model_name_or_path)
        else:
            # A BEiT-3 checkpoint converted for a vision-language task carries the vision-language transform
            # (squash, mean = std = 0.5); ImageNet training and evaluation use the classification one.
            if getattr(processor, "task", "image-classification") == "image-classification":
                return processor
            logger.info("Not using the checkpoint's %r image processor for classification.", processor.task)
    return Beit3ImageProcessor(task="image-classification", image_size=image_size)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(
    argv: Sequence[str] | None,
) -> tuple[ModelArguments, DataTrainingArguments, ImageClassificationTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ImageClassificationTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns the final metrics."""
    model_args, data_args, training_args = parse_args(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        "Process rank: %d, world size: %d, device: %s, distributed training: %s, mixed precision: %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        training_args.parallel_mode.value == "distributed",
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no",
    )

    # Settings this script relies on.
    if training_args.remove_unused_columns:
        logger.warning("Setting remove_unused_columns=False: the transforms need the raw 'image' column.")
        training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        # Images never reach the text experts, so DDP must expect unused parameters (as the original does); with
        # non-reentrant checkpointing this also works with --gradient_checkpointing.
        training_args.ddp_find_unused_parameters = True
    # `--gradient_checkpointing` (or `--activation_checkpointing`, its name since transformers 5.2x): non-reentrant
    # checkpointing, which works with DDP and unused parameters.
    checkpointing = getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing
    if checkpointing and not training_args.gradient_checkpointing_kwargs:
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            if hasattr(training_args, name):
                setattr(training_args, name, {"use_reentrant": False})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training_args.world_size == 1:
        raise RuntimeError(
            f"{os.environ['WORLD_SIZE']} processes were launched but they do not form a distributed group. On a "
            "machine without GPUs pass --use_cpu, e.g. `accelerate launch --multi_gpu --num_processes 2 "
            "run_image_classification.py ... --use_cpu` (gloo)."
        )
    if training_args.do_train and data_args.mixup_active and training_args.per_device_train_batch_size % 2:
        raise ValueError(
            f"Mixup / cutmix mix pairs of images of a batch, so --per_device_train_batch_size must be even (got "
            f"{training_args.per_device_train_batch_size}); or turn them off with --mixup 0 --cutmix 0."
        )
    if not (training_args.do_train or training_args.do_eval):
        logger.warning("Neither --do_train nor --do_eval was given: nothing to do.")

    set_seed(training_args.seed)

    # Data first: a malformed folder is reported before any model is built.
    with training_args.main_process_first(desc="loading the image folder"):
        data = load_imagefolder(data_args.data_dir, cache_dir=model_args.cache_dir)
    dataset = data.dataset
    logger.info("%s: %d classes, %s", data.root, len(data.class_names), dataset)

    config = build_config(model_args, data.id2label)
    model = build_model(model_args, config)
    image_processor = load_eval_image_processor(model_args, config.image_size)
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)

    train_transform = build_train_transform(data_args, config.image_size, mean, std)

    def train_transforms(batch: dict[str, list]) -> dict[str, list]:
        pixel_values = [train_transform(image.convert("RGB")) for image in batch["image"]]
        return {"pixel_values": pixel_values, "labels": batch["label"]}

    def eval_transforms(batch: dict[str, list]) -> dict[str, list]:
        pixel_values = image_processor(batch["image"], return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixel_values), "labels": batch["label"]}

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = dataset["train"]
        if data_args.max_train_samples is not None:
            count = min(data_args.max_train_samples, len(train_dataset))
            train_dataset = train_dataset.shuffle(seed=training_args.seed).select(range(count))
        train_dataset.set_transform(train_transforms)
    if training_args.do_eval:
        eval_dataset = dataset["validation"]
        if data_args.max_eval_samples is not None:
            count = min(data_args.max_eval_samples, len(eval_dataset))
            eval_dataset = eval_dataset.shuffle(seed=training_args.seed).select(range(count))
        eval_dataset.set_transform(eval_transforms)

    mixup = None
    if data_args.mixup_active:
        mixup = Mixup(
            mixup_alpha=data_args.mixup,
            cutmix_alpha=data_args.cutmix,
            cutmix_minmax=data_args.cutmix_minmax,
            prob=data_args.mixup_prob,
            switch_prob=data_args.mixup_switch_prob,
            mode=data_args.mixup_mode,
            label_smoothing=data_args.label_smoothing,
            num_classes=config.num_labels,
        )
    train_collator = ImageClassificationCollator(config.num_labels, mixup, data_args.label_smoothing)

    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=ImageClassificationCollator(config.num_labels),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[PerProcessAugmentationSeed()],
        layer_decay=training_args.layer_decay,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # weights, config, code files and the image processor
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(eval_dataset))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
