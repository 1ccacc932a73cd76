#!/usr/bin/env python
"""Fine-tune BEiT-3 for image-text retrieval with `Trainer` (single process, `torchrun` or `accelerate launch`).

    python examples/retrieval/run_retrieval.py \
        --model_name_or_path beit3-base-itc-patch16-224 --karpathy_json dataset_flickr30k.json --image_root flickr30k \
        --output_dir runs/f30k --do_train --do_eval --do_predict \
        --per_device_train_batch_size 32 --learning_rate 1e-4 --layer_decay 0.65 \
        --num_train_epochs 20 --warmup_steps 0.25 --lr_scheduler_type cosine --weight_decay 0.05 --bf16

Data: a Karpathy split file (`dataset_flickr30k.json`, `dataset_coco.json`) plus the image root, or JSON / JSONL
files of `{"image": path, "caption": text}`. The model comes from a folder made by `python -m beit3_hf.convert` (or
any saved BEiT-3 retrieval folder), or from a preset (`--config_name beit3-base-patch16-384`) to train from scratch.

`--do_train` trains on `--train_split` (or `--train_file`), saves the model, its processor and a model card, then
`--do_eval` reports recall on `--eval_split` (`--validation_file`) and `--do_predict` on `--test_split`
(`--test_file`). Metrics go to `train_results.json`, `eval_results.json`, `test_results.json` and
`all_results.json`. Rerunning an interrupted command resumes from the last complete checkpoint of `--output_dir`.

The recipe of the original: AdamW with layer-wise learning-rate decay (`--layer_decay`), warmup then cosine, drop
path (`--drop_path_rate`), no weight decay on norms, biases, tokens and position tables, random resized crop (scale
0.5-1) + horizontal flip (+ `--randaug`), and the contrastive loss over the global batch of all processes.
Evaluation encodes every image and every caption once and reports TR@1/5/10, IR@1/5/10 and their mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoModelForZeroShotImageClassification
from transformers.trainer_utils import PredictionOutput, speed_metrics

from beit3_hf import Beit3ForImageTextRetrieval
from beit3_hf.data.loaders import (
    ImageRowDecoder,
    RetrievalEvalIndex,
    RetrievalRecord,
    check_images,
    load_caption_jsonl,
    load_karpathy_split,
    retrieval_pair_dataset,
    transform_with_skipping,
)
from beit3_hf.evaluation.retrieval import evaluate_retrieval
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


METRICS_NOTE = (
    "Recall metrics (`tr_r1`: text retrieval R@1, `ir_r1`: image retrieval R@1, ...) are fractions of the queries."
)


@dataclass
class DataArguments(ImageTextDataArguments):
    """The image-text pairs: a Karpathy split file, or {image, caption} JSON / JSONL files, and the augmentation."""

    karpathy_json: str | None = field(default=None, metadata={"help": "Karpathy split file (dataset_*.json)."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to."})
    train_file: str | None = field(default=None, metadata={"help": "JSON/JSONL of {image, caption} for training."})
    validation_file: str | None = field(default=None, metadata={"help": "JSON/JSONL of {image, caption} to evaluate."})
    test_file: str | None = field(default=None, metadata={"help": "JSON/JSONL of {image, caption} for --do_predict."})
    train_split: str = field(default="train", metadata={"help": "Karpathy split to train on."})
    eval_split: str = field(default="val", metadata={"help": "Karpathy split of --do_eval (and --eval_strategy)."})
    test_split: str = field(default="test", metadata={"help": "Karpathy split of --do_predict."})
    include_restval: bool = field(default=True, metadata={"help": "Train on Karpathy 'restval' too (COCO)."})
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})
    max_test_images: int | None = field(default=None, metadata={"help": "Predict on the first N images only."})


@dataclass
class RetrievalTrainingArguments(ImageTextTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options) plus the retrieval recipe's."""

    global_contrastive: bool = field(
        default=True, metadata={"help": "Contrast each pair with the batches of all processes."}
    )


def load_records(data: DataArguments, split: str, file: str | None, limit: int | None) -> list[RetrievalRecord]:
    """The first `limit` images of `file` (JSON / JSONL) or of Karpathy split `split`; errors name the file."""
    if file is not None:
        records = load_caption_jsonl(file, image_root=data.image_root)
    elif data.karpathy_json is not None:
        records = load_karpathy_split(
            data.karpathy_json,
            data.image_root or ".",
            split,
            include_restval=data.include_restval and split == data.train_split,
        )
    else:
        raise ValueError("Give --karpathy_json (with --image_root) or --train_file / --validation_file / --test_file.")
    return records[:limit]


def build_model_and_processor(args: ModelArguments, max_text_length: int) -> tuple[Beit3ForImageTextRetrieval, Any]:
    """The retrieval model (pretrained or new) and its processor; the text embeddings fit the tokenizer and the
    special-token ids are the tokenizer's."""
    config = args.load_config()
    if args.model_name_or_path is not None:
        # The task Auto class: a retrieval folder loads whole; a backbone, a pretraining folder (with its contrastive
        # projections, from run_pretraining.py's itc) or another task's folder gives its backbone.
        model = AutoModelForZeroShotImageClassification.from_pretrained(
            args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            trust_remote_code=args.trust_remote_code,
        )
        if type(model).__name__ != "Beit3ForImageTextRetrieval":  # the package's class or the folder's own code
            raise ValueError(f"{args.model_name_or_path} holds a {type(model).__name__}, not a retrieval model.")
    else:
        model = Beit3ForImageTextRetrieval(config)
    processor = load_processor(args, task="retrieval", image_size=model.config.image_size, max_length=max_text_length)
    fit_text_vocabulary(model, processor.tokenizer)
    return model, processor


def training_pairs(records: list[RetrievalRecord], image_transform: Any, skip_bad: bool) -> Any:
    """One row per (image, caption) pair (`datasets.Dataset`), decoded and transformed lazily; an undecodable
    image is replaced by another pair and recorded (`skip_bad`), or stops the run naming the file."""
    pairs = retrieval_pair_dataset(records)
    decoder = ImageRowDecoder(pairs, "image", skip=skip_bad)

    def build(batch: dict[str, list], images: list) -> dict[str, list]:
        return {"pixel_values": [image_transform(image) for image in images], "caption": batch["caption"]}

    return pairs.with_transform(transform_with_skipping(decoder, build))


class PairCollator(ImageTextCollator):
    """Stacks training pairs: transformed images, tokenised captions, `return_loss=True`, and the records of the
    images that were skipped (taken out again by `Beit3Trainer`)."""

    text_key = "caption"

    def add_targets(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        batch["return_loss"] = True


class RetrievalTrainer(Beit3Trainer):
    """`Beit3Trainer` whose evaluation and prediction report retrieval recall on a `RetrievalEvalIndex`.

    `evaluate` logs the metrics and runs the callbacks' `on_evaluate`, as `Trainer.evaluate` does (so that
    `EarlyStoppingCallback` and `--load_best_model_at_end` work); `predict` runs `on_predict`.
    """

    def _recall(self, index: Any, metric_key_prefix: str) -> dict[str, float]:
        if not isinstance(index, RetrievalEvalIndex):
            raise ValueError(
                f"No retrieval evaluation set (got {type(index).__name__}): give --karpathy_json with "
                "--eval_split / --test_split, or --validation_file / --test_file."
            )
        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        training = model.training
        try:
            metrics = evaluate_retrieval(
                model,
                self.processing_class,
                index,
                batch_size=self.args.per_device_eval_batch_size,
                accelerator=self.accelerator,
                num_workers=self.args.dataloader_num_workers,
            )
        finally:
            model.train(training)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=index.num_images + index.num_texts))
        return metrics

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Recall on `eval_dataset` (default: the trainer's), as `eval_tr_r1`, ..., `eval_r_mean`."""
        metrics = self._recall(self.eval_dataset if eval_dataset is None else eval_dataset, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Recall on `test_dataset`, as `test_tr_r1`, ...; the output carries metrics only."""
        metrics = self._recall(test_dataset, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=None, label_ids=None, metrics=metrics)


def index_metrics(prefix: str, index: RetrievalEvalIndex) -> dict[str, int]:
    """The size of an evaluation set, for the results files."""
    return {f"{prefix}_images": index.num_images, f"{prefix}_texts": index.num_texts}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns all the metrics."""
    model_args, data_args, training_args, checkpoint = start_run(
        (ModelArguments, DataArguments, RetrievalTrainingArguments), argv, logger
    )

    # Data first: malformed files, missing (and with --check_images, undecodable) images stop the run here.
    train_records = eval_records = test_records = None
    if training_args.do_train:
        train_records = load_records(
            data_args, data_args.train_split, data_args.train_file, data_args.max_train_images
        )
    if training_args.needs_eval_data:
        eval_records = load_records(
            data_args, data_args.eval_split, data_args.validation_file, data_args.max_eval_images
        )
    if training_args.do_predict:
        test_records = load_records(data_args, data_args.test_split, data_args.test_file, data_args.max_test_images)
    if training_args.check_images:
        for name, records in (("training", train_records), ("evaluation", eval_records), ("test", test_records)):
            if records:
                check_images(dict.fromkeys(r.image_path for r in records), source=f"the {name} set")

    model, processor = build_model_and_processor(model_args, data_args.max_text_length)

    train_dataset = None
    if train_records:
        image_transform = data_args.train_transform(model.config.image_size)
        train_dataset = training_pairs(train_records, image_transform, training_args.skip_undecodable_images)
    eval_index = RetrievalEvalIndex.from_records(eval_records) if eval_records else None
    trainer = RetrievalTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_index,
        data_collator=PairCollator(processor),
        processing_class=processor,
        callbacks=[keep_special_token_ids(processor.tokenizer), *training_args.early_stopping_callbacks()],
        layer_decay=training_args.layer_decay,
        global_contrastive=training_args.global_contrastive,
    )

    def evaluate(prefix: str) -> dict[str, float]:
        return {**trainer.evaluate(metric_key_prefix=prefix), **index_metrics(prefix, eval_index)}

    def predict() -> dict[str, float]:
        test_index = RetrievalEvalIndex.from_records(test_records)
        return {**trainer.predict(test_index).metrics, **index_metrics("test", test_index)}

    return run_stages(
        trainer,
        training_args,
        checkpoint=checkpoint,
        card={"description": METRICS_NOTE, "tags": ["image-text-retrieval"]},
        evaluate=evaluate,
        predict=predict,
    )


if __name__ == "__main__":
    main()
