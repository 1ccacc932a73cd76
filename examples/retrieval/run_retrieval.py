"""Fine-tune BEiT-3 for image-text retrieval with `Trainer` (single process, `torchrun` or `accelerate launch`).

    python examples/retrieval/run_retrieval.py \
        --model_name_or_path beit3-base-itc-patch16-224 --karpathy_json dataset_flickr30k.json --image_root flickr30k \
        --output_dir runs/f30k --per_device_train_batch_size 32 --learning_rate 1e-4 --layer_decay 0.65 \
        --num_train_epochs 20 --warmup_steps 0.25 --lr_scheduler_type cosine --weight_decay 0.05 --bf16

Data: a Karpathy split file (`dataset_flickr30k.json`, `dataset_coco.json`) plus the image root, or JSON / JSONL
files of `{"image": path, "caption": text}`. The model comes from a folder made by `python -m beit3_hf.convert` (or
any saved BEiT-3 retrieval folder), or from a preset (`--config_name beit3-base-patch16-384`) to train from scratch.

The recipe of the original: AdamW with layer-wise learning-rate decay (`--layer_decay`), warmup then cosine, drop
path (`--drop_path_rate`), no weight decay on norms, biases, tokens and position tables, random resized crop (scale
0.5-1) + horizontal flip (+ `--randaug`), and the contrastive loss over the global batch of all processes.
Evaluation encodes every image and every caption once and reports TR@1/5/10, IR@1/5/10 and their mean.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torchvision import transforms
from transformers import AutoModel, AutoProcessor, HfArgumentParser, TrainingArguments, set_seed

from beit3_hf import Beit3ForImageTextRetrieval
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer, processor_for_task
from beit3_hf.data import RetrievalEvalIndex, RetrievalPairDataset, load_caption_jsonl, load_karpathy_split
from beit3_hf.evaluation.retrieval import evaluate_retrieval
from beit3_hf.training import Beit3Trainer, load_config

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
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
    karpathy_json: str | None = field(default=None, metadata={"help": "Karpathy split file (dataset_*.json)."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to."})
    train_file: str | None = field(default=None, metadata={"help": "JSON/JSONL of {image, caption} for training."})
    validation_file: str | None = field(default=None, metadata={"help": "JSON/JSONL of {image, caption} to evaluate."})
    train_split: str = field(default="train", metadata={"help": "Karpathy split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Karpathy split to evaluate on."})
    include_restval: bool = field(default=True, metadata={"help": "Train on Karpathy 'restval' too (COCO)."})
    max_text_length: int = field(default=64, metadata={"help": "Text tokens, <s> and </s> included."})
    min_crop_scale: float = field(
        default=0.5, metadata={"help": "Smallest area of the random resized crop; 1.0 only resizes (no crop)."}
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips (the original applies them)."})
    randaug: bool = field(default=False, metadata={"help": "RandAugment (2 ops, magnitude 7) on training images."})
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})


@dataclass
class RetrievalTrainingArguments(TrainingArguments):
    layer_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (0.65 for base)."})
    global_contrastive: bool = field(
        default=True, metadata={"help": "Contrast each pair with the batches of all processes."}
    )
    eval_before_training: bool = field(default=False, metadata={"help": "Evaluate once before training."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the raw image/caption fields."})


def load_records(data: DataArguments, split: str, jsonl: str | None) -> list:
    if jsonl is not None:
        return load_caption_jsonl(jsonl, image_root=data.image_root)
    if data.karpathy_json is None:
        raise ValueError("Give --karpathy_json (with --image_root) or --train_file / --validation_file.")
    return load_karpathy_split(
        data.karpathy_json, data.image_root or ".", split, include_restval=data.include_restval and split == "train"
    )


def build_model_and_processor(args: ModelArguments, max_text_length: int) -> tuple[Beit3ForImageTextRetrieval, Any]:
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
        if not hasattr(model, "get_text_features"):
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


class PairCollator:
    """Stacks training pairs: transformed images, tokenised captions, and `return_loss=True`."""

    def __init__(self, processor: Any, image_transform: transforms.Compose) -> None:
        self.processor = processor
        self.image_transform = image_transform

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        text = self.processor(text=[item["caption"] for item in items], return_tensors="pt")
        return {
            "pixel_values": torch.stack([self.image_transform(item["image"]) for item in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "return_loss": True,
        }


class RetrievalTrainer(Beit3Trainer):
    """`Beit3Trainer` whose `evaluate` reports retrieval recall on an evaluation index."""

    def __init__(self, *args: Any, eval_index: RetrievalEvalIndex | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_index = eval_index

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.eval_index is None:
            raise ValueError("No evaluation data: give --karpathy_json with --eval_split, or --validation_file.")
        model = self.accelerator.unwrap_model(self.model)
        training = model.training
        metrics = evaluate_retrieval(
            model,
            self.processing_class,
            self.eval_index,
            batch_size=self.args.per_device_eval_batch_size,
            accelerator=self.accelerator,
        )
        model.train(training)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(metrics)
        return metrics


def write_model_card(output_dir: Path, model: Beit3ForImageTextRetrieval, metrics: dict[str, Any]) -> None:
    """A Hub model card (README.md) with the evaluation results and how to load the folder."""
    config = model.config
    rows = "\n".join(
        f"| {name} | {metrics.get(f'before_{name}', float('nan')):.3f} | {metrics[f'after_{name}']:.3f} |"
        for name in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
        if f"after_{name}" in metrics
    )
    card = f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [beit3, image-text-retrieval, beit3-hf]
license: mit
---

# BEiT-3 image-text retrieval ({config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.image_size}px)

Fine-tuned with `examples/retrieval/run_retrieval.py` of beit3-hf. The folder carries its code: load it with
`trust_remote_code=True`, no extra package needed.

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{output_dir.name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{output_dir.name}", trust_remote_code=True)
inputs = processor(images=images, text=captions, return_tensors="pt")
similarity = model(**inputs).logits_per_image
```

## Evaluation (recall, fraction of queries)

| metric | before training | after training |
|---|---|---|
{rows}
"""
    (output_dir / "README.md").write_text(card)


def parse_args(argv: Sequence[str] | None) -> tuple[ModelArguments, DataArguments, RetrievalTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RetrievalTrainingArguments))
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(args[0])
    return parser.parse_args_into_dataclasses(args)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    logger.info("process %d, world size: %d", training_args.process_index, training_args.world_size)

    train_records = load_records(data_args, data_args.train_split, data_args.train_file)[: data_args.max_train_images]
    eval_records = None
    if data_args.validation_file is not None or data_args.karpathy_json is not None:
        eval_records = load_records(data_args, data_args.eval_split, data_args.validation_file)
        eval_records = eval_records[: data_args.max_eval_images]
    model, processor = build_model_and_processor(model_args, data_args.max_text_length)
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # works under DDP
    if training_args.ddp_find_unused_parameters is None:
        # Some parameters get no gradient in a retrieval step (the mask token); non-reentrant checkpointing allows it.
        training_args.ddp_find_unused_parameters = True

    trainer = RetrievalTrainer(
        model=model,
        args=training_args,
        train_dataset=RetrievalPairDataset(train_records),
        data_collator=PairCollator(processor, train_image_transform(model.config.image_size, data_args)),
        processing_class=processor,
        layer_decay=training_args.layer_decay,
        global_contrastive=training_args.global_contrastive,
        eval_index=RetrievalEvalIndex.from_records(eval_records) if eval_records else None,
    )
    results: dict[str, float] = {}
    if training_args.eval_before_training and eval_records:
        results.update({f"before_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results["train_loss"] = train_result.training_loss
    if eval_records:
        results.update({f"after_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    trainer.save_model()
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        processor.save_pretrained(output_dir)
        write_model_card(output_dir, trainer.accelerator.unwrap_model(trainer.model), results)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        logger.info("results: %s", json.dumps({k: round(v, 4) for k, v in results.items() if math.isfinite(v)}))
    return results


if __name__ == "__main__":
    main()
