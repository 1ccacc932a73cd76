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
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.mixup import mixup_target
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import beit3_hf  # noqa: F401  (registers the BEiT-3 classes with the Auto classes in this process)
from beit3_hf import BEIT3_PRESETS, Beit3ImageProcessor
from beit3_hf.data.loaders import (
    IMAGE_EXTENSIONS,
    ImageRowDecoder,
    check_images,
    gather_skipped,
    image_name,
    load_imagefolder,
    open_image,
    transform_with_skipping,
)
from beit3_hf.training.scripts import (
    ScriptTrainingArguments,
    check_distributed_launch,
    load_config,
    parse_script_args,
    resolve_checkpoint,
    save_final_model,
    setup_logging,
    write_model_card,
)
from beit3_hf.training.trainer import Beit3Trainer

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
    test_dir: str | None = field(
        default=None,
        metadata={
            "help": "--do_predict: a folder of images to classify, flat (predictions only) or with the training "
            "class folders (predictions and test_top1 / test_top5). Writes predictions.jsonl."
        },
    )
    # timm.data.create_transform(is_training=True, ...) as the original `build_imagenet_transform`
    auto_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm auto-augment policy; 'none' to disable."}
    )
    color_jitter: float = field(
        default=0.4, metadata={"help": "Color jitter strength (timm skips it when auto_augment is set)."}
    )
    train_interpolation: str = field(default="bicubic", metadata={"help": "Interpolation of the random crop."})
    min_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area of the random resized crop (the original and timm: 0.08)."}
    )
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
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"--min_crop_scale must be in (0, 1], got {self.min_crop_scale}.")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise ValueError(f"--cutmix_minmax takes two numbers (min max), got {self.cutmix_minmax}.")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"--mixup_mode must be 'batch', 'pair' or 'elem', got {self.mixup_mode!r}.")

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass
class ImageClassificationTrainingArguments(ScriptTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options) and the defaults of the original recipe
    where they do not depend on the hardware."""

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
        scale=(data_args.min_crop_scale, 1.0),
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

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        batch: dict[str, Any] = {"pixel_values": pixel_values}
        if "skipped_images" in examples[0]:  # training: the images replaced by other examples, for the report
            batch["skipped_images"] = gather_skipped(examples)
        if "labels" not in examples[0]:  # unlabelled test images
            return batch
        labels = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        if self.mixup is None and self.label_smoothing <= 0:
            return {**batch, "labels": labels}
        smoothing = self.mixup.label_smoothing if self.mixup is not None else self.label_smoothing
        targets = mixup_target(labels, self.num_labels, lam=1.0, smoothing=smoothing)
        even = len(labels) - len(labels) % 2
        if self.mixup is not None and even > 0:
            # Mixup mixes the views in place and returns the targets of the mixed images.
            _, targets[:even] = self.mixup(pixel_values[:even], labels[:even])
        return {**batch, "labels": targets}


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
    # Image classification needs no text side: the model is built without it (87M / 305M parameters at base /
    # large), and every parameter gets a gradient, so plain DDP works. A full checkpoint's text keys are unused.
    config.vision_only = True
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


def model_card(results: dict[str, float] | None = None) -> dict[str, Any]:
    """`write_model_card` arguments (the card's usage snippet comes from `beit3_hf.model_card`)."""
    return {"results": results, "tags": ["image-classification"], "license": "mit"}


def load_test_folder(test_dir: str, class_names: Sequence[str]) -> Any:
    """`--test_dir` as a `datasets.Dataset` of `image` paths (sorted), with `label` when the images lie in class
    folders named like the training classes; flat folders give unlabelled images. Errors name the folder."""
    import datasets

    root = Path(test_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--test_dir {root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--test_dir {root}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    flat = [p for p in files if p.parent == root]
    if len(flat) == len(files):
        return datasets.Dataset.from_dict({"image": [str(p) for p in files]})
    if flat:
        raise ValueError(f"--test_dir {root}: mixes images in class folders with loose images (e.g. {flat[0].name})")
    label_of = {name: label for label, name in enumerate(class_names)}
    unknown = sorted({p.parent.name for p in files if p.parent.parent != root or p.parent.name not in label_of})
    if unknown:
        raise ValueError(f"--test_dir {root}: folders that are not training classes: {unknown[:5]}")
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [label_of[p.parent.name] for p in files]}
    )


def write_predictions(path: Path, dataset: Any, top_indices: np.ndarray, id2label: dict[int, str]) -> None:
    """One JSON line per test image: its file, the predicted class, the top-5 and (if known) the true label."""
    with path.open("w", encoding="utf-8") as f:
        for row, top in zip(dataset, np.asarray(top_indices).reshape(len(dataset), -1)):
            line = {"file": image_name(row["image"]), "prediction": id2label[int(top[0])]}
            line["top5"] = [id2label[int(i)] for i in top[:5]]
            if "label" in row:
                line["label"] = id2label[int(row["label"])]
            f.write(json.dumps(line) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns the final metrics."""
    model_args, data_args, training_args = parse_script_args(
        (ModelArguments, DataTrainingArguments, ImageClassificationTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    check_distributed_launch(training_args)

    # Settings this script relies on.
    if training_args.remove_unused_columns:
        logger.warning("Setting remove_unused_columns=False: the transforms need the raw 'image' column.")
        training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        # The model is vision-only (see build_config): every parameter is used, so DDP need not search for unused
        # ones (the original, which keeps the text experts, needs find_unused_parameters=True).
        training_args.ddp_find_unused_parameters = False
    if training_args.do_train and data_args.mixup_active and training_args.per_device_train_batch_size % 2:
        raise ValueError(
            f"Mixup / cutmix mix pairs of images of a batch, so --per_device_train_batch_size must be even (got "
            f"{training_args.per_device_train_batch_size}); or turn them off with --mixup 0 --cutmix 0."
        )
    if training_args.do_predict and data_args.test_dir is None:
        raise ValueError("--do_predict needs --test_dir, a folder of images to classify.")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        logger.warning("None of --do_train, --do_eval, --do_predict was given: nothing to do.")
    # Before anything else: refuse an output folder this run would clobber, find the checkpoint to resume.
    checkpoint = resolve_checkpoint(training_args) if training_args.do_train else None

    set_seed(training_args.seed)

    # Data first: a malformed folder is reported before any model is built. Images stay undecoded (paths) until the
    # transforms, which name the file of an image that cannot be decoded.
    with training_args.main_process_first(desc="loading the image folder"):
        data = load_imagefolder(data_args.data_dir, cache_dir=model_args.cache_dir, decode_images=False)
    dataset = data.dataset
    logger.info("%s: %d classes, %s", data.root, len(data.class_names), dataset)

    def subset(split: Any, count: int | None) -> Any:
        if count is None:
            return split
        return split.shuffle(seed=training_args.seed).select(range(min(count, len(split))))

    raw_train = subset(dataset["train"], data_args.max_train_samples) if training_args.do_train else None
    raw_eval = subset(dataset["validation"], data_args.max_eval_samples) if training_args.do_eval else None
    raw_test = load_test_folder(data_args.test_dir, data.class_names) if training_args.do_predict else None
    if training_args.check_images:
        for name, split in (("training", raw_train), ("validation", raw_eval), ("test", raw_test)):
            if split is not None:
                check_images(
                    split["image"],
                    source=f"the {name} images of {data.root if name != 'test' else data_args.test_dir}",
                )

    config = build_config(model_args, data.id2label)
    model = build_model(model_args, config)
    image_processor = load_eval_image_processor(model_args, config.image_size)
    mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)

    train_transform = build_train_transform(data_args, config.image_size, mean, std)

    def build_train_batch(batch: dict[str, list], images: list) -> dict[str, list]:
        return {"pixel_values": [train_transform(image) for image in images], "labels": batch["label"]}

    def eval_transforms(batch: dict[str, list]) -> dict[str, list]:
        images = [open_image(value) for value in batch["image"]]  # an undecodable image stops, naming its file
        out = {"pixel_values": list(image_processor(images, return_tensors="pt")["pixel_values"])}
        if "label" in batch:
            out["labels"] = batch["label"]
        return out

    train_dataset = eval_dataset = test_dataset = None
    if raw_train is not None:
        decoder = ImageRowDecoder(raw_train, "image", skip=training_args.skip_undecodable_images)
        train_dataset = raw_train.with_transform(transform_with_skipping(decoder, build_train_batch))
    if raw_eval is not None:
        eval_dataset = raw_eval.with_transform(eval_transforms)
    if raw_test is not None:
        test_dataset = raw_test.with_transform(eval_transforms)

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
        callbacks=[PerProcessAugmentationSeed(), *training_args.early_stopping_callbacks()],
        layer_decay=training_args.layer_decay,
    )

    results: dict[str, float] = {}

    def report(split: str, metrics: dict[str, float]) -> None:
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        results.update(metrics)

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        # Weights, config, code files, image processor and card, before any evaluation can fail.
        save_final_model(trainer, **model_card())
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        metrics["train_skipped_images"] = len(trainer.skipped_images)
        report("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        report("eval", dict(trainer.evaluate(), eval_samples=len(eval_dataset)))
    if training_args.do_predict:
        prediction = trainer.predict(test_dataset, metric_key_prefix="test")
        report("test", dict(prediction.metrics, test_samples=len(test_dataset)))
        if trainer.is_world_process_zero():
            path = Path(training_args.output_dir) / "predictions.jsonl"
            write_predictions(path, raw_test, prediction.predictions, config.id2label)
            logger.info("Predictions of %d images: %s", len(raw_test), path)
    if training_args.do_train and (training_args.do_eval or training_args.do_predict):
        write_model_card(trainer, **model_card(results))  # again, with the evaluation
    return results


if __name__ == "__main__":
    main()
