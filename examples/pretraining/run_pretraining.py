#!/usr/bin/env python
"""Multimodal and continual pretraining of BEiT-3 with `Trainer`: text MLM, image-text MLM, MIM, contrastive, LoRA.

Objectives, alone or mixed with weights (`--objectives text_mlm:1,pair_mlm:1,image_mim:1,itc:1`): masked language
modelling on texts (`text_mlm`) and on the text of image-text pairs (`pair_mlm`, 50% masked by default), BEiT's
masked image modelling (`image_mim`: a visual tokenizer's codes, or normalised pixels) and image-text contrastive
learning over the global batch (`itc`). Every step runs one objective, the same on every process; each objective's
loss and accuracy are logged.

Data: `--text_file` (caption JSON / JSON Lines), `--image_dir` (ImageNet-style folder), `--pair_file` with
`--image_root` (Karpathy split file or `{image, caption}` JSON Lines) and `--webdataset` (img2dataset shards,
streamed). Undecodable images and empty captions are skipped and counted (`skipped_images`, `skipped_texts` in the
logs).

LoRA through PEFT: `--lora_rank 8 --lora_target text` adapts only the text experts' projections (everything else
frozen), `--reg_loss_weight` adds the self-regularisation term; the adapter is saved in PEFT's format, and
`beit3-merge-lora OUTPUT_DIR --output MERGED` writes a plain BEiT-3 folder.

    python examples/pretraining/run_pretraining.py --model_name_or_path beit3-base-pt \
        --pair_file cc3m.jsonl --image_root cc3m --objectives pair_mlm:1,itc:1 \
        --output_dir beit3-cpt --do_train --max_steps 100000
    accelerate launch --num_processes 8 examples/pretraining/run_pretraining.py ...

The run length is `--max_steps` (the stream is endless); rerunning the command resumes from the last checkpoint, at
the same step with the same data. See `README.md` next to this file for recipes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import set_seed

import beit3_hf  # noqa: F401  (registers the BEiT-3 and visual tokenizer classes with the Auto classes)
from beit3_hf import Beit3ForPreTraining
from beit3_hf.data.loaders import list_image_files
from beit3_hf.data.mixture import PretrainingCollator, PretrainingMixture, load_caption_texts, load_pairs
from beit3_hf.data.pretraining import DecodeFailures, TwoViewTransform
from beit3_hf.training.lora import add_lora
from beit3_hf.training.masking import BEIT_MASK_RATIO, BlockMaskingGenerator
from beit3_hf.training.objectives import (
    ObjectiveSchedule,
    PretrainingTrainer,
    load_visual_tokenizer,
    parse_objectives,
    visual_vocab_size,
)
from beit3_hf.training.scripts import (
    ModelArguments,
    ScriptTrainingArguments,
    check_distributed_launch,
    fit_text_vocabulary,
    load_processor,
    parse_script_args,
    report_training,
    resolve_checkpoint,
    save_final_model,
    setup_logging,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainingModelArguments(ModelArguments):
    """The model to pretrain (`--model_name_or_path`: a converted pretrained or task checkpoint; or `--config_name`
    from scratch), its tokenizer, and the MIM targets."""

    visual_tokenizer: str | None = field(
        default=None, metadata={"help": "A converted VQ-KD or DALL-E folder: its codes are the image_mim targets."}
    )
    mim_target: str = field(
        default="tokens",
        metadata={
            "help": "image_mim targets: tokens (--visual_tokenizer) or pixels.",
            "choices": ["tokens", "pixels"],
        },
    )
    layer_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (1.0: none)."})


@dataclass
class PretrainingDataArguments:
    """Where the data comes from, the objectives, and the masking."""

    objectives: str = field(
        default="text_mlm:1,pair_mlm:1,image_mim:1,itc:1",
        metadata={"help": "Objectives and weights, e.g. 'pair_mlm:1,itc:1' (text_mlm, pair_mlm, image_mim, itc)."},
    )
    text_file: str | None = field(default=None, metadata={"help": "Caption JSON / JSON Lines: texts for text_mlm."})
    image_dir: str | None = field(default=None, metadata={"help": "An ImageNet-style folder: images for image_mim."})
    pair_file: str | None = field(
        default=None, metadata={"help": "Image-text pairs: a Karpathy split file or {image, caption} JSON Lines."}
    )
    image_root: str | None = field(default=None, metadata={"help": "The folder --pair_file's image paths start in."})
    webdataset: str | None = field(
        default=None,
        metadata={"help": "Image-text shards as img2dataset writes them, e.g. 'cc3m/{00000..00331}.tar'."},
    )
    max_text_length: int = field(default=64, metadata={"help": "Text tokens, <s> and </s> included."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of text tokens masked for text_mlm."})
    pair_mlm_probability: float = field(default=0.5, metadata={"help": "Share of text tokens masked for pair_mlm."})
    whole_word_masking: bool = field(default=False, metadata={"help": "Mask whole words (all their pieces)."})
    num_masking_patches: int | None = field(
        default=None, metadata={"help": "Patches masked per image for image_mim (default: BEiT's 75/196)."}
    )
    min_crop_scale: float = field(default=0.5, metadata={"help": "Smallest crop area of the pair images."})
    hflip: bool = field(
        default=True,
        metadata={"help": "Flip pair images (off when captions say left / right, as the synthetic ones)."},
    )
    mim_min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest crop area for image_mim (v2: 0.2)."})


@dataclass
class LoraArguments:
    """LoRA continual pretraining through PEFT (off unless --lora_rank > 0)."""

    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the whole model instead."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha / rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="text",
        metadata={"help": "text / vision / all (every projection of those experts) or a regex over module names."},
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated modules trained in full besides the adapters, e.g. text_embeddings,mlm_head."
        },
    )
    reg_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the self-regularisation term sum ||W * (B A)||^2 (needs LoRA)."}
    )


def choose_visual_tokenizer(
    model_args: PretrainingModelArguments, objectives: dict[str, float]
) -> tuple[Any, str | None]:
    """(tokenizer model, its view preset) for image_mim with token targets, else (None, None)."""
    if "image_mim" not in objectives or model_args.mim_target == "pixels":
        if model_args.visual_tokenizer is not None:
            raise ValueError("--visual_tokenizer is only used by image_mim with --mim_target tokens.")
        return None, None
    if model_args.visual_tokenizer is None:
        raise ValueError(
            "image_mim with --mim_target tokens needs --visual_tokenizer FOLDER (or --mim_target pixels)."
        )
    return load_visual_tokenizer(model_args.visual_tokenizer, model_args.trust_remote_code)


def build_model(
    model_args: PretrainingModelArguments, objectives: dict[str, float], visual_tokenizer: Any
) -> Beit3ForPreTraining:
    """`Beit3ForPreTraining` from a checkpoint (its backbone, and the heads it has) or from a config, with the
    contrastive projections when `itc` is on and a `mim_head` as wide as the MIM targets."""
    config = model_args.load_config()
    if "itc" in objectives:
        config.contrastive_head = True
    if "image_mim" in objectives:
        config.visual_vocab_size = visual_vocab_size(visual_tokenizer, config)
    if model_args.model_name_or_path is None:
        return Beit3ForPreTraining(config)
    # Heads of another width (a mim_head for other targets) start afresh; missing heads (a task checkpoint) too.
    return Beit3ForPreTraining.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True
    )


def build_dataset(
    data_args: PretrainingDataArguments,
    training_args: ScriptTrainingArguments,
    schedule: ObjectiveSchedule,
    tokenizer: Any,
    config: Any,
    view: str | None,
) -> PretrainingMixture:
    grid = config.image_size // config.patch_size
    num_masking_patches = data_args.num_masking_patches or round(BEIT_MASK_RATIO * grid * grid)
    if not 0 < num_masking_patches < grid * grid:
        raise ValueError(f"--num_masking_patches must be in [1, {grid * grid - 1}], got {num_masking_patches}.")
    common = {"patch_size": config.patch_size, "seed": training_args.seed, "color_jitter": None}
    pair_transform = TwoViewTransform(
        config.image_size,
        visual_tokenizer=None,
        mask_generator=None,
        scale=(data_args.min_crop_scale, 1.0),
        hflip_prob=0.5 if data_args.hflip else 0.0,
        **common,
    )
    mim_transform = TwoViewTransform(
        config.image_size,
        visual_tokenizer=view,
        mask_generator=BlockMaskingGenerator.for_grid(grid, mask_ratio=num_masking_patches / (grid * grid)),
        scale=(data_args.mim_min_crop_scale, 1.0),
        **common,
    )
    skipped_texts = DecodeFailures(what="an empty caption")
    texts = load_caption_texts(data_args.text_file, skipped_texts) if data_args.text_file else None
    if skipped_texts.count:
        logger.warning("%s: %d empty captions skipped.", data_args.text_file, skipped_texts.count)
    if data_args.pair_file and data_args.webdataset:
        raise ValueError("Pass --pair_file or --webdataset for the image-text pairs, not both.")
    return PretrainingMixture(
        schedule,
        batch_size=training_args.per_device_train_batch_size,
        batches_per_step=training_args.world_size,
        tokenizer=tokenizer,
        max_length=data_args.max_text_length,
        mlm_probability=data_args.mlm_probability,
        pair_mlm_probability=data_args.pair_mlm_probability,
        whole_word_masking=data_args.whole_word_masking,
        pair_transform=pair_transform,
        mim_transform=mim_transform,
        texts=texts,
        images=list_image_files(data_args.image_dir) if data_args.image_dir else None,
        pairs=load_pairs(data_args.pair_file, data_args.image_root) if data_args.pair_file else None,
        webdataset=data_args.webdataset,
        seed=training_args.seed,
        skipped_texts=skipped_texts,
    )


def apply_lora(model: Beit3ForPreTraining, lora_args: LoraArguments, model_args: PretrainingModelArguments) -> Any:
    if lora_args.lora_rank <= 0:
        if lora_args.reg_loss_weight:
            raise ValueError("--reg_loss_weight regularises LoRA updates: it needs --lora_rank > 0.")
        return model
    if model_args.model_name_or_path is None:
        raise ValueError("LoRA adapts a pretrained model: pass --model_name_or_path (not --config_name).")
    modules_to_save = [m.strip() for m in (lora_args.lora_modules_to_save or "").split(",") if m.strip()]
    peft_model = add_lora(
        model,
        lora_args.lora_rank,
        lora_args.lora_alpha,
        lora_args.lora_dropout,
        lora_args.lora_target,
        modules_to_save,
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA (target %s): %d of %d parameters trainable.", lora_args.lora_target, trainable, total)
    return peft_model


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    model_args, data_args, lora_args, training_args = parse_script_args(
        (PretrainingModelArguments, PretrainingDataArguments, LoraArguments, ScriptTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    check_distributed_launch(training_args)
    if not training_args.do_train or training_args.do_eval or training_args.do_predict:
        raise ValueError(
            "run_pretraining.py pretrains and has no evaluation data: pass --do_train, without --do_eval / "
            "--do_predict (evaluate the saved model with a fine-tuning script, e.g. zero-shot retrieval)."
        )
    if training_args.max_steps <= 0:
        raise ValueError("The pretraining stream is endless: pass --max_steps.")
    if training_args.ddp_find_unused_parameters is None:  # a step of one objective leaves the other heads unused
        training_args.ddp_find_unused_parameters = True
    objectives = parse_objectives(data_args.objectives)
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    visual_tokenizer, view = choose_visual_tokenizer(model_args, objectives)
    model = build_model(model_args, objectives, visual_tokenizer)
    processor = load_processor(
        model_args, task="retrieval", image_size=model.config.image_size, max_length=data_args.max_text_length
    )
    fit_text_vocabulary(model, processor.tokenizer, need_mask=bool({"text_mlm", "pair_mlm"} & set(objectives)))
    schedule = ObjectiveSchedule(objectives, seed=training_args.seed)
    train_dataset = build_dataset(data_args, training_args, schedule, processor.tokenizer, model.config, view)
    model = apply_lora(model, lora_args, model_args)
    logger.info(
        "Objectives %s; steps of %d samples.", objectives, training_args.train_batch_size * training_args.world_size
    )

    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=PretrainingCollator(),
        processing_class=processor,
        visual_tokenizer=visual_tokenizer,
        reg_loss_weight=lora_args.reg_loss_weight,
        layer_decay=model_args.layer_decay,
        data_counters={
            "skipped_images": lambda: train_dataset.skipped_images.count,
            "skipped_texts": lambda: train_dataset.skipped_texts.count,
        },
        callbacks=training_args.early_stopping_callbacks(),
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    metrics["train_skipped_images"] = train_dataset.skipped_images.count
    metrics["train_skipped_texts"] = train_dataset.skipped_texts.count
    if lora_args.lora_rank > 0:
        trainer.save_model()  # the adapter (adapter_config.json, adapter_model.safetensors) and the processor
    else:
        save_final_model(
            trainer,
            description=f"BEiT-3 pretrained with {data_args.objectives}; its backbone (and contrastive projections) "
            "start any BEiT-3 task model.",
            tags=["beit3", "pretraining"],
        )
    return report_training(trainer, metrics)


if __name__ == "__main__":
    main()
