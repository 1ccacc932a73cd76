#!/usr/bin/env python
"""Fine-tune BEiT-3 for visual question answering on VQAv2 with `Trainer` (one process, `torchrun` or
`accelerate launch`).

    python examples/vqa/run_vqa.py \
        --model_name_or_path beit3-base-patch16-480 --data_dir vqav2 \
        --train_splits train2014 val2014 --eval_split val2014 --num_eval_images 1000 --test_split test-dev2015 \
        --output_dir runs/vqa --do_train --do_eval --do_predict \
        --per_device_train_batch_size 16 --learning_rate 3e-5 --task_head_lr_weight 20 --num_train_epochs 10 --bf16

Data: VQAv2 as released (`--data_dir` holding `train2014/`, `val2014/`, `test2015/` and `vqa/` with the question and
annotation JSON files). Training questions get the original's soft targets (0.3 / 0.6 / 0.9 / 1.0 for answers given
by 1 / 2 / 3 / 4+ of the 10 annotators) over an answer list built from the training majority answers (normalised,
seen at least `--min_answer_count` times), read from `--answer_list` (the original's `answer2label.txt`) or taken
from a fine-tuned checkpoint's `id2label`. The loss is the original's binary cross-entropy times the number of
answers; the optimizer AdamW with betas (0.9, 0.98) and the classifier head's learning rate multiplied by
`--task_head_lr_weight`.

`--do_eval` reports the VQA score (the target score of the predicted answer, averaged: the original's metric) on
`--eval_split`; `--do_predict` answers `--test_split` and writes `predictions_<split>.json`, the
`[{"question_id", "answer"}]` file of the VQAv2 evaluation server. Rerunning an interrupted command resumes from the
last complete checkpoint of `--output_dir`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForVisualQuestionAnswering, EvalPrediction

import beit3_hf  # noqa: F401  (registers the BEiT-3 classes with the Auto classes in this process)
from beit3_hf.data.loaders import ImageRowDecoder, check_images, open_image, transform_with_skipping
from beit3_hf.data.vqa import (
    VqaQuestion,
    answer_vocabulary,
    hold_out_images,
    load_vqa_split,
    read_answer_list,
    vqa_dataset,
    vqa_split_files,
    with_targets,
)
from beit3_hf.evaluation.vqa import target_score_of_prediction
from beit3_hf.training.scripts import (
    ImageTextCollator,
    ImageTextDataArguments,
    ImageTextTrainingArguments,
    ModelArguments,
    fit_text_vocabulary,
    keep_special_token_ids,
    load_config,
    load_processor,
    run_stages,
    start_run,
    write_json,
)
from beit3_hf.training.trainer import Beit3Trainer

logger = logging.getLogger(__name__)

METRICS_NOTE = (
    "`vqa_accuracy` (the VQA score) is the original BEiT-3 metric: the soft target (0, 0.3, 0.6, 0.9 or 1 from the "
    "annotators' answers) of the predicted answer, averaged over the questions."
)


@dataclass
class DataArguments(ImageTextDataArguments):
    """VQAv2 files, the answer list and the augmentation."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "VQAv2 folder: train2014/, val2014/, test2015/ (COCO images) and vqa/ (JSON files)."},
    )
    annotation_dir: str | None = field(
        default=None, metadata={"help": "Folder of the question / annotation JSON files (default DATA_DIR/vqa)."}
    )
    train_splits: list[str] = field(
        default_factory=lambda: ["train2014"],
        metadata={"help": "Annotated splits to train on; the recipe: train2014 val2014 (minus --num_eval_images)."},
    )
    eval_split: str = field(default="val2014", metadata={"help": "Annotated split of --do_eval."})
    num_eval_images: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on this many random images of --eval_split (the recipe: 1000); when --eval_split is also "
            "a training split, those images are left out of training. Default: the whole split."
        },
    )
    test_split: str = field(
        default="test-dev2015", metadata={"help": "Split of --do_predict (test-dev2015, test2015)."}
    )
    answer_list: str | None = field(
        default=None,
        metadata={"help": "The answers (the original's answer2label.txt, a JSON list, or one per line)."},
    )
    min_answer_count: int = field(
        default=9, metadata={"help": "Building the answer list: keep majority answers seen this often (original: 9)."}
    )
    max_train_questions: int | None = field(default=None, metadata={"help": "Train on the first N questions."})
    max_eval_questions: int | None = field(default=None, metadata={"help": "Evaluate on the first N questions."})
    max_test_questions: int | None = field(default=None, metadata={"help": "Predict the first N questions."})

    def __post_init__(self) -> None:
        if self.data_dir is None:
            raise ValueError("Pass --data_dir, the VQAv2 folder (train2014/, val2014/, test2015/, vqa/).")


@dataclass
class VqaTrainingArguments(ImageTextTrainingArguments):
    """`TrainingArguments` (with the scripts' resume and image options) and the VQA recipe's defaults."""

    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (the VQA recipe's --opt_betas 0.9 0.98)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (the VQA recipe: 0.01)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: a step count (>= 1) or a ratio of the training steps (< 1)."}
    )
    task_head_lr_weight: float = field(
        default=1.0,
        metadata={"help": "Learning-rate multiplier of the answer classifier (the original's `head`; recipe: 20)."},
    )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_split(data: DataArguments, split: str) -> list[VqaQuestion]:
    """The questions (and annotations) of a VQAv2 split under `--data_dir`; errors name the files."""
    files = vqa_split_files(data.data_dir, split, data.annotation_dir)
    return load_vqa_split(files["questions"], files["image_dir"], files["annotations"])


def load_questions(
    data: DataArguments, do_train: bool, do_eval: bool, do_predict: bool, seed: int
) -> tuple[list[VqaQuestion], list[VqaQuestion], list[VqaQuestion]]:
    """Training, evaluation and test questions (unlimited, targets not attached yet)."""
    train: list[VqaQuestion] = []
    evaluation: list[VqaQuestion] = []
    if do_train:
        for split in data.train_splits:
            questions = load_split(data, split)
            if split == data.eval_split and data.num_eval_images is not None:
                questions, evaluation = hold_out_images(questions, data.num_eval_images, seed)
            train.extend(questions)
    if do_eval and not evaluation:
        evaluation = load_split(data, data.eval_split)
        if data.num_eval_images is not None:
            evaluation = hold_out_images(evaluation, data.num_eval_images, seed)[1]
    if not do_eval:
        evaluation = []
    test = load_split(data, data.test_split) if do_predict else []
    return train, evaluation, test


def choose_answers(
    data: DataArguments, config: Any, train_questions: Sequence[VqaQuestion], finetuned: bool
) -> list[str]:
    """`--answer_list`, else a fine-tuned checkpoint's `id2label`, else the list built from the training answers."""
    if data.answer_list is not None:
        return read_answer_list(data.answer_list)
    labels = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else []
    if finetuned and labels and not all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        return labels
    if not train_questions:
        raise ValueError(
            "No answer list: pass --answer_list (the original's answer2label.txt) or train (--do_train) to build one "
            "from the training answers."
        )
    answers = answer_vocabulary(train_questions, data.min_answer_count)
    if not answers:
        raise ValueError(
            f"No training majority answer is seen {data.min_answer_count} times: lower --min_answer_count."
        )
    return answers


def build_model(model_args: ModelArguments, answers: list[str]) -> torch.nn.Module:
    """The VQA model for `answers`: pretrained (a backbone gets a new classifier) or new from a config."""
    config = model_args.load_config()
    config.id2label = dict(enumerate(answers))
    config.label2id = {answer: label for label, answer in enumerate(answers)}
    config.use_final_layernorm = False  # the original VQA model has no final encoder norm
    if model_args.model_name_or_path is None:
        return AutoModelForVisualQuestionAnswering.from_config(config, trust_remote_code=model_args.trust_remote_code)
    return AutoModelForVisualQuestionAnswering.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
    )


def source_config(model_args: ModelArguments) -> Any:
    """The configuration the run starts from (checkpoint or preset), to read a fine-tuned answer list."""
    source = model_args.model_name_or_path or model_args.config_name
    if source is None:
        raise ValueError("Give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    return load_config(source, None, trust_remote_code=model_args.trust_remote_code)


class VqaCollator(ImageTextCollator):
    """Tokenises the questions and builds the dense soft targets (batch, num_answers) from `labels` / `scores`."""

    text_key = "question"

    def __init__(self, processor: Any, num_answers: int) -> None:
        super().__init__(processor)
        self.num_answers = num_answers

    def add_targets(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        if any(item["labels"] for item in items):
            targets = torch.zeros(len(items), self.num_answers)
            for row, item in enumerate(items):
                targets[row, list(item["labels"])] = torch.tensor(list(item["scores"]), dtype=torch.float)
            batch["labels"] = targets


class VqaTrainer(Beit3Trainer):
    """`Beit3Trainer` with the original's learning-rate multiplier of the answer classifier, whose evaluation
    keeps, per question, the predicted answer and its target score instead of all the logits."""

    def __init__(self, *args: Any, task_head_lr_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_head_lr_weight = task_head_lr_weight

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """`Beit3Trainer`'s optimizer, with every parameter of the classifier moved to a group of its own at
        `task_head_lr_weight` times the learning rate of its group (the original's `head`; the pooler is not part
        of it, as in the original)."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        if self.task_head_lr_weight == 1.0:
            return optimizer
        opt_model = self.model if model is None else model
        head = {id(p) for name, p in opt_model.named_parameters() if name.startswith("classifier.")}
        groups = []
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in head]
            moved = [p for p in group["params"] if id(p) in head]
            settings = {key: value for key, value in group.items() if key != "params"}
            if rest:
                groups.append({**settings, "params": rest})
            if moved:
                groups.append({**settings, "params": moved, "lr": group["lr"] * self.task_head_lr_weight})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(loss, predicted answer index, target score of that answer or None): what the VQA score needs."""
        loss, logits, targets = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is None:
            return loss, None, None
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.argmax(dim=-1)
        scores = None if targets is None else target_score_of_prediction(logits, targets)
        return loss, predictions, scores


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """The VQA score: the mean target score of the predicted answers (`VqaTrainer.prediction_step`)."""
    return {"vqa_accuracy": float(np.asarray(prediction.label_ids, dtype=np.float64).mean())}


def image_datasets(
    questions: list[VqaQuestion], transform: Any, *, train: bool, skip_bad: bool, image_processor: Any
) -> Any:
    """The questions as a `datasets.Dataset` whose rows decode and transform their image lazily: training images
    through `transform` (an undecodable one replaced and recorded when `skip_bad`), others through the processor's
    eval transform (an undecodable one stops, naming the file)."""
    rows = vqa_dataset(questions)

    def build(batch: dict[str, list], images: list) -> dict[str, list]:
        pixels = [transform(image) for image in images]
        return {
            "pixel_values": pixels,
            "question": batch["question"],
            "labels": batch["labels"],
            "scores": batch["scores"],
        }

    if train:
        return rows.with_transform(transform_with_skipping(ImageRowDecoder(rows, "image", skip=skip_bad), build))

    def evaluate(batch: dict[str, list]) -> dict[str, list]:
        images = [open_image(path) for path in batch["image"]]
        pixels = list(image_processor(images, return_tensors="pt")["pixel_values"])
        return {
            "pixel_values": pixels,
            "question": batch["question"],
            "labels": batch["labels"],
            "scores": batch["scores"],
        }

    return rows.with_transform(evaluate)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with command-line arguments `argv` (default: `sys.argv[1:]`); returns all the metrics."""
    model_args, data_args, training_args, checkpoint = start_run(
        (ModelArguments, DataArguments, VqaTrainingArguments), argv, logger
    )

    # Data first: malformed files and missing (with --check_images, undecodable) images stop the run here.
    needs_eval = training_args.needs_eval_data
    train_q, eval_q, test_q = load_questions(
        data_args, training_args.do_train, needs_eval, training_args.do_predict, training_args.seed
    )
    if training_args.check_images:
        for name, questions in (("training", train_q), ("evaluation", eval_q), ("test", test_q)):
            if questions:
                check_images(sorted({q.image_path for q in questions}), source=f"the {name} questions")

    start = source_config(model_args)
    finetuned = model_args.model_name_or_path is not None and "VisualQuestionAnswering" in str(start.architectures)
    answers = choose_answers(data_args, start, train_q, finetuned)
    logger.info("%d answers: %s ...", len(answers), answers[:10])
    train_q, train_dropped = with_targets(train_q, answers)
    eval_q, eval_dropped = with_targets(eval_q, answers)
    if train_dropped or eval_dropped:  # as the original: questions none of whose answers is in the list
        logger.info(
            "Left out %d training and %d evaluation questions with no answer in the list.", train_dropped, eval_dropped
        )
    train_q = train_q[: data_args.max_train_questions]
    eval_q = eval_q[: data_args.max_eval_questions]
    test_q = test_q[: data_args.max_test_questions]

    model = build_model(model_args, answers)
    processor = load_processor(
        model_args, task="vqa", image_size=model.config.image_size, max_length=data_args.max_text_length
    )
    fit_text_vocabulary(model, processor.tokenizer)

    datasets_kwargs = {
        "transform": data_args.train_transform(model.config.image_size),
        "skip_bad": training_args.skip_undecodable_images,
    }
    datasets_kwargs["image_processor"] = processor.image_processor
    train_dataset = image_datasets(train_q, train=True, **datasets_kwargs) if train_q else None
    eval_dataset = image_datasets(eval_q, train=False, **datasets_kwargs) if eval_q else None
    trainer = VqaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=VqaCollator(processor, len(answers)),
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[keep_special_token_ids(processor.tokenizer), *training_args.early_stopping_callbacks()],
        layer_decay=training_args.layer_decay,
        task_head_lr_weight=training_args.task_head_lr_weight,
    )

    if training_args.do_train and train_dataset is None:
        raise ValueError(f"No training question has an answer in the answer list ({len(answers)} answers).")

    def evaluate(prefix: str) -> dict[str, float]:
        if eval_dataset is None:
            raise ValueError(f"--eval_split {data_args.eval_split}: no question with an answer in the answer list.")
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        return {**metrics, f"{prefix}_samples": len(eval_dataset), f"{prefix}_questions_without_target": eval_dropped}

    def predict() -> dict[str, float]:
        test_dataset = image_datasets(test_q, train=False, **datasets_kwargs)
        prediction = trainer.predict(test_dataset, metric_key_prefix="test")
        if trainer.is_world_process_zero():
            Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
            path = Path(training_args.output_dir) / f"predictions_{data_args.test_split}.json"
            indices = np.asarray(prediction.predictions).reshape(-1)
            write_json(
                path, [{"question_id": q.question_id, "answer": answers[int(i)]} for q, i in zip(test_q, indices)]
            )
            logger.info("Answers to %d questions (the evaluation server's format): %s", len(test_q), path)
        return dict(prediction.metrics, test_samples=len(test_dataset))

    return run_stages(
        trainer,
        training_args,
        checkpoint=checkpoint,
        card={"description": METRICS_NOTE, "tags": ["visual-question-answering"]},
        evaluate=evaluate,
        predict=predict,
        train_metrics={"num_answers": len(answers), "train_questions_without_target": train_dropped},
    )


if __name__ == "__main__":
    main()
