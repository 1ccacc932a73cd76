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

import torch
from torchvision import transforms
from transformers import AutoModel, AutoProcessor, set_seed
from transformers.trainer_utils import PredictionOutput, speed_metrics

from beit3_hf import Beit3ForImageTextRetrieval
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer, processor_for_task
from beit3_hf.data.loaders import (
    ImageRowDecoder,
    RetrievalEvalIndex,
    RetrievalRecord,
    check_images,
    gather_skipped,
    load_caption_jsonl,
    load_karpathy_split,
    retrieval_pair_dataset,
    transform_with_skipping,
)
from beit3_hf.evaluation.retrieval import evaluate_retrieval
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


METRICS_NOTE = (
    "Recall metrics (`tr_r1`: text retrieval R@1, `ir_r1`: image retrieval R@1, ...) are fractions of the queries."
)


def model_card(results: dict[str, float] | None = None) -> dict[str, Any]:
    """`write_model_card` arguments (the card's usage snippet comes from `beit3_hf.model_card`)."""
    return {"description": METRICS_NOTE, "results": results, "tags": ["image-text-retrieval"], "license": "mit"}


@dataclass
class ModelArguments:
    """Which model to fine-tune, or which configuration to train from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A converted / saved BEiT-3 folder (or Hub repo) to fine-tune."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: a preset such as beit3-base-patch16-384, or a config folder."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated config changes, e.g. 'hidden_size=128,num_hidden_layers=4'."}
    )
    sentencepiece_model: str | None = field(
        default=None, metadata={"help": "beit3.spm (or another sentencepiece model) when the model folder has none."}
    )
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth of the last layer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model folder / repo."})


@dataclass
class DataArguments:
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
    max_text_length: int = field(default=64, metadata={"help": "Text tokens, <s> and </s> included."})
    min_crop_scale: float = field(
        default=0.5, metadata={"help": "Smallest area of the random resized crop; 1.0 only resizes (no crop)."}
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips (the original applies them)."})
    randaug: bool = field(default=False, metadata={"help": "RandAugment (2 ops, magnitude 7) on training images."})
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})
    max_test_images: int | None = field(default=None, metadata={"help": "Predict on the first N images only."})


@dataclass
class RetrievalTrainingArguments(ScriptTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options) plus the retrieval recipe's."""

    layer_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (0.65 for base)."})
    global_contrastive: bool = field(
        default=True, metadata={"help": "Contrast each pair with the batches of all processes."}
    )
    eval_before_training: bool = field(
        default=False, metadata={"help": "Evaluate once before training (metrics before_*, before_results.json)."}
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
    """The retrieval model (pretrained or new) and its processor, with the tokenizer's special ids checked."""
    source = args.model_name_or_path or args.config_name
    if source is None:
        raise ValueError("Give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    config = load_config(source, args.config_overrides, trust_remote_code=args.trust_remote_code)
    if args.drop_path_rate is not None:
        config.drop_path_rate = args.drop_path_rate  # the layers take their rates from it when the model is built
    if args.model_name_or_path is not None:
        model = AutoModel.from_pretrained(
            args.model_name_or_path, config=config, trust_remote_code=args.trust_remote_code
        )
        if type(model).__name__ != "Beit3ForImageTextRetrieval":  # the package's class or the folder's own code
            raise ValueError(f"{args.model_name_or_path} holds a {type(model).__name__}, not a retrieval model.")
    else:
        model = Beit3ForImageTextRetrieval(config)

    if args.sentencepiece_model is not None:
        tokenizer = load_sentencepiece_tokenizer(args.sentencepiece_model, max_length=max_text_length)
        processor = processor_for_task(
            tokenizer, task="retrieval", image_size=model.config.image_size, max_length=max_text_length
        )
    elif args.model_name_or_path is not None:
        processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        processor.max_length = max_text_length
    else:
        raise ValueError("Training from a config needs a tokenizer: pass --sentencepiece_model.")
    if args.model_name_or_path is None:  # a new model takes its special token ids from the tokenizer
        tokenizer = processor.tokenizer
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
            setattr(model.config, name, getattr(tokenizer, name))
    if len(processor.tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(processor.tokenizer)} ids but the model's vocabulary only "
            f"{model.config.vocab_size}: set vocab_size (e.g. --config_overrides vocab_size={len(processor.tokenizer)})."
        )
    return model, processor


def train_image_transform(image_size: int, data: DataArguments) -> transforms.Compose:
    """The original's training transform: random resized crop (bicubic), flip, optional RandAugment, 0.5/0.5."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if data.min_crop_scale < 1.0:
        steps: list[Any] = [
            transforms.RandomResizedCrop(image_size, scale=(data.min_crop_scale, 1.0), interpolation=bicubic)
        ]
    else:
        steps = [transforms.Resize((image_size, image_size), interpolation=bicubic)]
    if data.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if data.randaug:
        steps.append(transforms.RandAugment(num_ops=2, magnitude=7))
    steps += [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return transforms.Compose(steps)


def training_pairs(records: list[RetrievalRecord], image_transform: transforms.Compose, skip_bad: bool) -> Any:
    """One row per (image, caption) pair (`datasets.Dataset`), decoded and transformed lazily; an undecodable
    image is replaced by another pair and recorded (`skip_bad`), or stops the run naming the file."""
    pairs = retrieval_pair_dataset(records)
    decoder = ImageRowDecoder(pairs, "image", skip=skip_bad)

    def build(batch: dict[str, list], images: list) -> dict[str, list]:
        return {"pixel_values": [image_transform(image) for image in images], "caption": batch["caption"]}

    return pairs.with_transform(transform_with_skipping(decoder, build))


class PairCollator:
    """Stacks training pairs: transformed images, tokenised captions, `return_loss=True`, and the records of the
    images that were skipped (taken out again by `Beit3Trainer`)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        text = self.processor(text=[item["caption"] for item in items], return_tensors="pt")
        batch = {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "return_loss": True,
        }
        if "skipped_images" in items[0]:
            batch["skipped_images"] = gather_skipped(items)
        return batch


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
    model_args, data_args, training_args = parse_script_args(
        (ModelArguments, DataArguments, RetrievalTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    check_distributed_launch(training_args)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        logger.warning("None of --do_train, --do_eval, --do_predict was given: nothing to do.")
    # Before anything else: refuse an output folder this run would clobber, find the checkpoint to resume.
    checkpoint = resolve_checkpoint(training_args) if training_args.do_train else None
    set_seed(training_args.seed)

    # Data first: malformed files, missing (and with --check_images, undecodable) images stop the run here.
    train_records = eval_records = test_records = None
    if training_args.do_train:
        train_records = load_records(
            data_args, data_args.train_split, data_args.train_file, data_args.max_train_images
        )
    if training_args.do_eval or training_args.eval_before_training:
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
    if training_args.ddp_find_unused_parameters is None:
        # Some parameters get no gradient in a retrieval step (the mask token); non-reentrant checkpointing allows it.
        training_args.ddp_find_unused_parameters = True

    train_dataset = None
    if train_records:
        image_transform = train_image_transform(model.config.image_size, data_args)
        train_dataset = training_pairs(train_records, image_transform, training_args.skip_undecodable_images)
    eval_index = RetrievalEvalIndex.from_records(eval_records) if eval_records else None
    trainer = RetrievalTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_index,
        data_collator=PairCollator(processor),
        processing_class=processor,
        callbacks=training_args.early_stopping_callbacks(),
        layer_decay=training_args.layer_decay,
        global_contrastive=training_args.global_contrastive,
    )

    results: dict[str, float] = {}

    def report(split: str, metrics: dict[str, float]) -> None:
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        results.update(metrics)

    if training_args.eval_before_training:
        report("before", {**trainer.evaluate(metric_key_prefix="before"), **index_metrics("before", eval_index)})
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        # The model, processor and card are saved before any evaluation: a failing evaluation never costs them.
        save_final_model(trainer, **model_card())
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        metrics["train_skipped_images"] = len(trainer.skipped_images)
        report("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        report("eval", {**trainer.evaluate(), **index_metrics("eval", eval_index)})
    if training_args.do_predict:
        test_index = RetrievalEvalIndex.from_records(test_records)
        report("test", {**trainer.predict(test_index).metrics, **index_metrics("test", test_index)})
    if training_args.do_train and (training_args.do_eval or training_args.do_predict):
        write_model_card(trainer, **model_card(results))  # again, with the evaluation
    return results


if __name__ == "__main__":
    main()
