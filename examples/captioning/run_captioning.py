#!/usr/bin/env python
"""Fine-tune BEiT-3 for image captioning on COCO (Karpathy split) with `Trainer`, evaluate by generation with CIDEr /
BLEU-4, and caption NoCaps-style image folders (one process, `torchrun` or `accelerate launch`).

    python examples/captioning/run_captioning.py \
        --model_name_or_path beit3-base-patch16-480 --karpathy_json dataset_coco.json --image_root coco \
        --output_dir runs/captioning --do_train --do_eval --do_predict \
        --per_device_train_batch_size 32 --learning_rate 4e-5 --num_train_epochs 10 --randaug --bf16

Training is the original's: each caption (`--max_text_length` 32 tokens) gets `round(n * --mask_prob)` of its tokens
masked (80% `<mask>`, 10% kept, 10% random), the model predicts them under the causal text mask, with the
label-smoothed loss of the model (`config.label_smoothing`, 0.1) and, after `--drop_worst_after` steps, only the
`1 - --drop_worst_ratio` smallest token losses kept.

Evaluation captions every image of `--eval_split` / `--test_split` with the model's `generate` (the original beam
search: `--num_beams 3`, `--length_penalty 0.6`), reports CIDEr and BLEU-1..4 against the references (the Karpathy
captions, or a COCO-format `--eval_annotation_file` / `--test_annotation_file`), and writes the COCO results file
`captions_<split>.json` (`[{"image_id", "caption"}]`). `--test_image_dir` captions a folder instead (NoCaps:
with `--test_image_info nocaps_test_image_info.json` for the image ids), for an evaluation server. Rerunning an
interrupted command resumes from the last complete checkpoint of `--output_dir`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PredictionOutput, speed_metrics

import beit3_hf  # noqa: F401  (registers the BEiT-3 classes with the Auto classes in this process)
from beit3_hf.data.captioning import (
    CaptionRecord,
    image_folder_records,
    load_caption_references,
    load_karpathy_captions,
    mask_caption,
)
from beit3_hf.data.loaders import (
    ImageRowDecoder,
    check_images,
    open_image,
    transform_with_skipping,
)
from beit3_hf.evaluation.captioning import caption_metrics, captioning_loss
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
    write_json,
)
from beit3_hf.training.trainer import Beit3Trainer

logger = logging.getLogger(__name__)

METRICS_NOTE = "CIDEr (CIDEr-D) and BLEU are computed as pycocoevalcap does, on its 0-10 / 0-1 scales."


@dataclass
class CaptioningModelArguments(ModelArguments):
    """The shared model options (a tokenizer needs a mask token here) and the loss's label smoothing."""

    label_smoothing: float | None = field(
        default=None, metadata={"help": "Label smoothing of the loss (default: the config's, 0.1 as the original)."}
    )


@dataclass
class DataArguments(ImageTextDataArguments):
    """Karpathy split file, references, image folders, masking and augmentation."""

    karpathy_json: str | None = field(default=None, metadata={"help": "Karpathy split file (dataset_coco.json)."})
    image_root: str | None = field(default=None, metadata={"help": "Folder holding train2014/ and val2014/."})
    train_split: str = field(default="train", metadata={"help": "Karpathy split to train on."})
    include_restval: bool = field(default=True, metadata={"help": "Train on Karpathy 'restval' too (COCO)."})
    eval_split: str = field(default="val", metadata={"help": "Karpathy split of --do_eval."})
    test_split: str = field(default="test", metadata={"help": "Karpathy split of --do_predict."})
    eval_annotation_file: str | None = field(
        default=None, metadata={"help": "COCO-format references of --do_eval, instead of the Karpathy captions."}
    )
    test_annotation_file: str | None = field(
        default=None, metadata={"help": "COCO-format references of --do_predict (e.g. NoCaps validation captions)."}
    )
    test_image_dir: str | None = field(
        default=None, metadata={"help": "--do_predict captions this folder instead of --test_split (NoCaps-style)."}
    )
    test_image_info: str | None = field(
        default=None, metadata={"help": "COCO-style {'images': [{'id', 'file_name'}]} for --test_image_dir ids."}
    )
    max_text_length: int = field(default=32, metadata={"help": "Caption tokens, <s> and </s> included (recipe: 32)."})
    randaug: bool = field(default=False, metadata={"help": "RandAugment (2 ops, magnitude 7); the recipe uses it."})
    mask_prob: float = field(
        default=0.7, metadata={"help": "Fraction of caption tokens masked (recipe: 0.7; original default 0.6)."}
    )
    max_train_images: int | None = field(default=None, metadata={"help": "Train on the first N images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Evaluate on the first N images."})
    max_test_images: int | None = field(default=None, metadata={"help": "Caption the first N test images."})

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"--mask_prob must be in (0, 1], got {self.mask_prob}.")


@dataclass
class CaptioningTrainingArguments(ImageTextTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options), the loss schedule and the decoding."""

    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (the recipe: 0.05)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: a step count (>= 1) or a ratio of the training steps (< 1)."}
    )
    drop_worst_ratio: float = field(
        default=0.2, metadata={"help": "Fraction of the largest token losses dropped after --drop_worst_after."}
    )
    drop_worst_after: int = field(
        default=12000, metadata={"help": "Optimizer step after which the worst token losses are dropped."}
    )
    num_beams: int = field(default=3, metadata={"help": "Beams of the evaluation's beam search (original: 3)."})
    length_penalty: float = field(default=0.6, metadata={"help": "Length penalty of the beam search (original: 0.6)."})
    max_caption_length: int | None = field(
        default=None,
        metadata={"help": "Longest generated caption, <s> and </s> included (default --max_text_length)."},
    )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def karpathy_records(
    data: DataArguments, split: str, limit: int | None, *, train: bool = False
) -> list[CaptionRecord]:
    """The images (with references) of a Karpathy split; errors name the file."""
    if data.karpathy_json is None:
        raise ValueError("Pass --karpathy_json (dataset_coco.json) and --image_root.")
    records = load_karpathy_captions(
        data.karpathy_json, data.image_root or ".", split, include_restval=train and data.include_restval
    )
    return records[:limit]


def with_references(records: list[CaptionRecord], annotation_file: str | None) -> list[CaptionRecord]:
    """Replace the references by those of a COCO-format annotation file, when given (every image needs some)."""
    if annotation_file is None:
        return records
    references = load_caption_references(annotation_file)
    missing = [r.image_id for r in records if r.image_id not in references]
    if missing:
        raise ValueError(f"{annotation_file}: no captions for {len(missing)} images, e.g. image_id {missing[:5]}")
    return [CaptionRecord(r.image_path, r.image_id, tuple(references[r.image_id])) for r in records]


def caption_pairs(records: Sequence[CaptionRecord]) -> Any:
    """One `datasets.Dataset` row per (image, caption) pair: `image` (path) and `caption`."""
    import datasets

    pairs = [(r.image_path, caption) for r in records for caption in r.captions]
    if not pairs:
        raise ValueError("No training captions.")
    return datasets.Dataset.from_dict({"image": [p for p, _ in pairs], "caption": [c for _, c in pairs]})


def image_rows(records: Sequence[CaptionRecord]) -> Any:
    """One `datasets.Dataset` row per image to caption: `image` (path) and `index` (into `records`)."""
    import datasets

    return datasets.Dataset.from_dict({"image": [r.image_path for r in records], "index": list(range(len(records)))})


class MaskedCaptionCollator(ImageTextCollator):
    """Tokenises the captions of a batch and masks them as the original `CaptioningDataset` does: `input_ids` with
    the masked tokens, `labels` with the original token at each masked position and -100 elsewhere.

    The draws come from Python's `random` module, as the original's; `PerProcessSeed` seeds it per process."""

    text_key = "caption"

    def __init__(self, processor: Any, mask_prob: float, mask_token_id: int) -> None:
        super().__init__(processor)
        self.mask_prob = mask_prob
        self.mask_token_id = mask_token_id
        self.vocab_size = len(processor.tokenizer)

    def add_targets(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        masked = input_ids.clone()
        labels = torch.full_like(input_ids, -100)
        for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
            ids, positions = mask_caption(
                input_ids[row].tolist(), length, self.mask_prob, self.mask_token_id, self.vocab_size
            )
            positions = torch.tensor(positions, dtype=torch.bool)
            masked[row] = torch.tensor(ids)
            labels[row, positions] = input_ids[row, positions]
        batch["input_ids"], batch["labels"] = masked, labels


class PerProcessSeed(TrainerCallback):
    """Seed Python's `random` with `seed + process index` when training starts, as the original seeds each process,
    so that processes draw different caption masks (data-loader workers are seeded per worker by PyTorch)."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        random.seed(args.seed + args.process_index)


class CaptioningTrainer(Beit3Trainer):
    """`Beit3Trainer` with the original captioning loss (label smoothing and the drop-worst schedule) and an
    evaluation that captions images with the model's beam search and scores CIDEr / BLEU.

    `evaluate` / `predict` take a list of `CaptionRecord` s; they log the metrics and run the callbacks'
    `on_evaluate` / `on_predict` as `Trainer` does (so `--metric_for_best_model cider` and early stopping work), and
    write the COCO results file `captions_<prefix>.json` into `--output_dir`.
    """

    def __init__(
        self,
        *args: Any,
        drop_worst_ratio: float = 0.0,
        drop_worst_after: int = 0,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.generation = dict(generation or {})

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        config = self.accelerator.unwrap_model(model).config
        loss = captioning_loss(
            outputs.logits,
            labels,
            label_smoothing=config.label_smoothing,
            drop_worst_ratio=self.drop_worst_ratio,
            drop_worst_after=self.drop_worst_after,
            step=self.state.global_step,
        )
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def generate_captions(self, records: Sequence[CaptionRecord]) -> list[str]:
        """Caption every record's image (each process a share, gathered), in record order."""
        model = self.accelerator.unwrap_model(self.model)
        processor = self.processing_class
        rows = image_rows(records)

        def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            images = [open_image(item["image"]) for item in items]  # an undecodable image stops, naming its file
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "index": torch.tensor([item["index"] for item in items])}

        loader = torch.utils.data.DataLoader(
            rows,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare_data_loader(loader)
        max_length = self.generation["max_length"]
        captions: dict[int, list[int]] = {}
        training = model.training
        model.eval()
        try:
            for batch in loader:
                ids = model.generate(batch["pixel_values"], **self.generation)
                padded = torch.full((ids.shape[0], max_length), model.config.pad_token_id, device=ids.device)
                padded[:, : ids.shape[1]] = ids
                padded, index = self.accelerator.gather_for_metrics((padded, batch["index"]))
                for i, row in zip(index.tolist(), padded.tolist()):
                    captions[i] = row
        finally:
            model.train(training)
        return [caption.strip() for caption in processor.batch_decode([captions[i] for i in range(len(records))])]

    def _caption_and_score(self, records: Any, metric_key_prefix: str) -> dict[str, float]:
        if not isinstance(records, list) or not records or not isinstance(records[0], CaptionRecord):
            raise ValueError(f"{metric_key_prefix}: nothing to caption (expected a list of CaptionRecord).")
        start = time.time()
        captions = self.generate_captions(records)
        metrics: dict[str, float] = {}
        if all(r.captions for r in records):
            references = {r.image_id: list(r.captions) for r in records}
            metrics = {
                f"{metric_key_prefix}_{k}": v
                for k, v in caption_metrics(references, dict(zip(references, captions))).items()
            }
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(records)))
        metrics[f"{metric_key_prefix}_images"] = len(records)
        if self.is_world_process_zero():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            results = [{"image_id": r.image_id, "caption": c} for r, c in zip(records, captions)]
            write_json(Path(self.args.output_dir) / f"captions_{metric_key_prefix}.json", results)
        return metrics

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """CIDEr and BLEU-1..4 of the generated captions of `eval_dataset` (default: the trainer's)."""
        metrics = self._caption_and_score(
            self.eval_dataset if eval_dataset is None else eval_dataset, metric_key_prefix
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Caption `test_dataset` (scored when every image has references); the output carries metrics only."""
        metrics = self._caption_and_score(test_dataset, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=None, label_ids=None, metrics=metrics)


def build_model(model_args: CaptioningModelArguments) -> torch.nn.Module:
    """The captioning model: pretrained (a backbone gets a new language-model head) or new from a config."""
    config = model_args.load_config()
    if model_args.label_smoothing is not None:
        config.label_smoothing = model_args.label_smoothing
    if model_args.model_name_or_path is None:
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=model_args.trust_remote_code)
    return AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
    )


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns all the metrics."""
    model_args, data_args, training_args, checkpoint = start_run(
        (CaptioningModelArguments, DataArguments, CaptioningTrainingArguments), argv, logger
    )

    # Data first: malformed files and missing (with --check_images, undecodable) images stop the run here.
    needs_eval = training_args.needs_eval_data
    train_records = eval_records = test_records = None
    if training_args.do_train:
        train_records = karpathy_records(data_args, data_args.train_split, data_args.max_train_images, train=True)
    if needs_eval:
        eval_records = karpathy_records(data_args, data_args.eval_split, data_args.max_eval_images)
        eval_records = with_references(eval_records, data_args.eval_annotation_file)
    if training_args.do_predict:
        if data_args.test_image_dir is not None:
            test_records = image_folder_records(data_args.test_image_dir, data_args.test_image_info)
        else:
            test_records = karpathy_records(data_args, data_args.test_split, None)
        test_records = with_references(test_records[: data_args.max_test_images], data_args.test_annotation_file)
    if training_args.check_images:
        for name, records in (("training", train_records), ("evaluation", eval_records), ("test", test_records)):
            if records:
                check_images(sorted({r.image_path for r in records}), source=f"the {name} images")

    model = build_model(model_args)
    processor = load_processor(
        model_args, task="captioning", image_size=model.config.image_size, max_length=data_args.max_text_length
    )
    fit_text_vocabulary(model, processor.tokenizer, need_mask=True)
    max_caption_length = training_args.max_caption_length or data_args.max_text_length

    train_dataset = None
    if train_records:
        transform = data_args.train_transform(model.config.image_size)
        pairs = caption_pairs(train_records)

        def build(batch: dict[str, list], images: list) -> dict[str, list]:
            return {"pixel_values": [transform(image) for image in images], "caption": batch["caption"]}

        decoder = ImageRowDecoder(pairs, "image", skip=training_args.skip_undecodable_images)
        train_dataset = pairs.with_transform(transform_with_skipping(decoder, build))

    trainer = CaptioningTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_records,
        data_collator=MaskedCaptionCollator(processor, data_args.mask_prob, model.config.mask_token_id),
        processing_class=processor,
        callbacks=[
            PerProcessSeed(),
            keep_special_token_ids(processor.tokenizer, need_mask=True),
            *training_args.early_stopping_callbacks(),
        ],
        layer_decay=training_args.layer_decay,
        drop_worst_ratio=training_args.drop_worst_ratio,
        drop_worst_after=training_args.drop_worst_after,
        generation={
            "num_beams": training_args.num_beams,
            "max_length": max_caption_length,
            "length_penalty": training_args.length_penalty,
        },
    )

    return run_stages(
        trainer,
        training_args,
        checkpoint=checkpoint,
        card={"description": METRICS_NOTE, "tags": ["image-captioning"]},
        evaluate=lambda prefix: trainer.evaluate(metric_key_prefix=prefix),
        predict=lambda: trainer.predict(test_records).metrics,
    )


if __name__ == "__main__":
    main()
