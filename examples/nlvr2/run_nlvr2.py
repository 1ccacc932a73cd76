#!/usr/bin/env python
"""Fine-tune BEiT-3 for NLVR2 (is a statement true of a pair of images?) with `Trainer` (one process, `torchrun` or
`accelerate launch`).

    python examples/nlvr2/run_nlvr2.py \
        --model_name_or_path beit3-base-patch16-224 --data_dir nlvr2_data \
        --train_file nlvr/nlvr2/data/train.json --validation_file nlvr/nlvr2/data/dev.json \
        --test_file nlvr/nlvr2/data/test1.json \
        --output_dir runs/nlvr2 --do_train --do_eval --do_predict \
        --per_device_train_batch_size 32 --learning_rate 7e-4 --layer_decay 0.65 --num_train_epochs 20 --bf16

Data: NLVR2 as released: the JSON Lines statement files of the `nlvr` repository (`identifier`, `sentence`, `label`
"True"/"False", `directory` for training) and the image pairs laid out as the original recipe has them
(`DATA_DIR/images/train/N/train-...-img0.png`, `DATA_DIR/dev/...`, `DATA_DIR/test1/...`; other folders with
`--train_image_dir` etc.). Each example's two images go through the processor as a pair (`pixel_values` of shape
(batch, 2, 3, H, W)) and both are fused with the statement; the loss is cross-entropy over true / false.

`--do_eval` reports the accuracy on `--validation_file` (dev), `--do_predict` on `--test_file` (test-P) and writes
`predictions_<file>.csv` (`identifier,prediction`, the NLVR2 evaluation script's format). Rerunning an interrupted
command resumes from the last complete checkpoint of `--output_dir`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from beit3_hf import Beit3ForVisualReasoning
from beit3_hf.data.loaders import ImageRowDecoder, check_images, open_image, transform_with_skipping
from beit3_hf.data.nlvr2 import (
    DEFAULT_IMAGE_DIRS,
    Nlvr2Example,
    load_nlvr2,
    nlvr2_accuracy,
    nlvr2_dataset,
)
from beit3_hf.training.scripts import (
    ImageTextCollator,
    ImageTextDataArguments,
    ImageTextTrainingArguments,
    ModelArguments,
    fit_text_vocabulary,
    keep_special_token_ids,
    load_processor,
    run_stages,
    start_run,
)
from beit3_hf.training.trainer import Beit3Trainer

logger = logging.getLogger(__name__)

LABELS = {0: "False", 1: "True"}


@dataclass
class DataArguments(ImageTextDataArguments):
    """NLVR2 statement files, image folders and the augmentation."""

    data_dir: str | None = field(
        default=None, metadata={"help": "Folder holding images/train/, dev/ and test1/ (the original's layout)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "NLVR2 train.json (JSON Lines)."})
    validation_file: str | None = field(default=None, metadata={"help": "NLVR2 dev.json, for --do_eval."})
    test_file: str | None = field(default=None, metadata={"help": "NLVR2 test1.json (test-P), for --do_predict."})
    train_image_dir: str | None = field(default=None, metadata={"help": "Default: DATA_DIR/images/train."})
    validation_image_dir: str | None = field(default=None, metadata={"help": "Default: DATA_DIR/dev."})
    test_image_dir: str | None = field(default=None, metadata={"help": "Default: DATA_DIR/test1."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N statements."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N statements."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Predict the first N statements."})

    def image_dir(self, split: str) -> str:
        """The image folder of `split` ("train", "validation", "test")."""
        explicit = {
            "train": self.train_image_dir,
            "validation": self.validation_image_dir,
            "test": self.test_image_dir,
        }
        if explicit[split] is not None:
            return explicit[split]
        if self.data_dir is None:
            raise ValueError(f"Pass --data_dir (or --{split}_image_dir): the folder of the {split} images.")
        default = {"train": "train", "validation": "dev", "test": "test1"}[split]
        return str(Path(self.data_dir) / DEFAULT_IMAGE_DIRS[default])


@dataclass
class Nlvr2TrainingArguments(ImageTextTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options) and the NLVR2 recipe's defaults."""

    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay (the NLVR2 recipe: 0.2)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(
        default=0.25, metadata={"help": "Warmup: a step count (>= 1) or a ratio of the training steps (< 1)."}
    )
    layer_decay: float = field(default=0.65, metadata={"help": "Layer-wise learning-rate decay (base: 0.65)."})


def load_split(data: DataArguments, split: str, file: str | None, limit: int | None) -> list[Nlvr2Example]:
    """The statements of a file with their image pairs; errors name the file and line."""
    if file is None:
        flag = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}[split]
        raise ValueError(f"Pass {flag}, an NLVR2 statement file (JSON Lines).")
    return load_nlvr2(file, data.image_dir(split))[:limit]


def build_model(model_args: ModelArguments) -> Beit3ForVisualReasoning:
    """The NLVR2 model: pretrained (a backbone gets a new head) or new from a config."""
    config = model_args.load_config()
    config.id2label = dict(LABELS)
    config.label2id = {name: label for label, name in LABELS.items()}
    if model_args.model_name_or_path is None:
        return Beit3ForVisualReasoning(config)
    return Beit3ForVisualReasoning.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
    )


def pair_dataset(
    examples: list[Nlvr2Example], *, transform: Any, image_processor: Any, train: bool, skip_bad: bool
) -> Any:
    """The statements as a `datasets.Dataset` whose rows decode and transform their image pair lazily: training pairs
    through `transform` (each image on its own, as the original; a pair with an undecodable image replaced and
    recorded when `skip_bad`), others through the processor's eval transform (an undecodable image stops)."""
    rows = nlvr2_dataset(examples)

    def build(batch: dict[str, list], pairs: list) -> dict[str, list]:
        pixels = [torch.stack([transform(left), transform(right)]) for left, right in pairs]
        return {"pixel_values": pixels, "sentence": batch["sentence"], "label": batch["label"]}

    if train:
        return rows.with_transform(
            transform_with_skipping(ImageRowDecoder(rows, ("left", "right"), skip=skip_bad), build)
        )

    def evaluate(batch: dict[str, list]) -> dict[str, list]:
        images = [open_image(path) for left, right in zip(batch["left"], batch["right"]) for path in (left, right)]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": list(pixels.view(-1, 2, *pixels.shape[1:])),
            "sentence": batch["sentence"],
            "label": batch["label"],
        }

    return rows.with_transform(evaluate)


class PairCollator(ImageTextCollator):
    """Stacks the image pairs (batch, 2, 3, H, W), tokenises the statements, adds the labels when known."""

    text_key = "sentence"

    def add_targets(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        if all(item["label"] >= 0 for item in items):
            batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy: the arg-max class equals the label (the original's NLVR2 metric, as a fraction)."""
    logits = torch.as_tensor(np.asarray(prediction.predictions))
    return {"accuracy": nlvr2_accuracy(logits, torch.as_tensor(np.asarray(prediction.label_ids)))}


def write_predictions(path: Path, examples: Sequence[Nlvr2Example], logits: np.ndarray) -> None:
    """`identifier,prediction` lines ("True" / "False"), the format of the NLVR2 evaluation script."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for example, row in zip(examples, np.asarray(logits).reshape(len(examples), -1)):
            writer.writerow([example.identifier, LABELS[int(row.argmax())]])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns all the metrics."""
    model_args, data_args, training_args, checkpoint = start_run(
        (ModelArguments, DataArguments, Nlvr2TrainingArguments), argv, logger
    )

    # Data first: malformed files and missing (with --check_images, undecodable) images stop the run here.
    needs_eval = training_args.needs_eval_data
    train_examples = eval_examples = test_examples = None
    if training_args.do_train:
        train_examples = load_split(data_args, "train", data_args.train_file, data_args.max_train_samples)
    if needs_eval:
        eval_examples = load_split(data_args, "validation", data_args.validation_file, data_args.max_eval_samples)
    if training_args.do_predict:
        test_examples = load_split(data_args, "test", data_args.test_file, data_args.max_test_samples)
    if training_args.check_images:
        for name, examples in (("training", train_examples), ("evaluation", eval_examples), ("test", test_examples)):
            if examples:
                images = sorted({path for e in examples for path in (e.left_image, e.right_image)})
                check_images(images, source=f"the {name} statements")
    if eval_examples is not None and any(e.label is None for e in eval_examples):
        raise ValueError(f"--validation_file {data_args.validation_file}: every statement needs a label.")

    model = build_model(model_args)
    processor = load_processor(
        model_args, task="nlvr2", image_size=model.config.image_size, max_length=data_args.max_text_length
    )
    fit_text_vocabulary(model, processor.tokenizer)

    transform = data_args.train_transform(model.config.image_size)
    kwargs = {"transform": transform, "image_processor": processor.image_processor}
    skip = training_args.skip_undecodable_images
    train_dataset = pair_dataset(train_examples, train=True, skip_bad=skip, **kwargs) if train_examples else None
    eval_dataset = pair_dataset(eval_examples, train=False, skip_bad=False, **kwargs) if eval_examples else None
    trainer = Beit3Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PairCollator(processor),
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[keep_special_token_ids(processor.tokenizer), *training_args.early_stopping_callbacks()],
        layer_decay=training_args.layer_decay,
    )

    def evaluate(prefix: str) -> dict[str, float]:
        return dict(trainer.evaluate(metric_key_prefix=prefix), **{f"{prefix}_samples": len(eval_dataset)})

    def predict() -> dict[str, float]:
        test_dataset = pair_dataset(test_examples, train=False, skip_bad=False, **kwargs)
        prediction = trainer.predict(test_dataset, metric_key_prefix="test")
        if trainer.is_world_process_zero():
            Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
            path = Path(training_args.output_dir) / f"predictions_{Path(data_args.test_file).stem}.csv"
            write_predictions(path, test_examples, prediction.predictions)
            logger.info("Predictions of %d statements: %s", len(test_examples), path)
        return dict(prediction.metrics, test_samples=len(test_dataset))

    return run_stages(
        trainer,
        training_args,
        checkpoint=checkpoint,
        card={"tags": ["nlvr2", "visual-reasoning"]},
        evaluate=evaluate,
        predict=predict,
    )


if __name__ == "__main__":
    main()
