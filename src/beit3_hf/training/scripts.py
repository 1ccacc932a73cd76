"""What the example scripts share, so that no run loses its model or its progress and no bad image goes unnoticed:
`ScriptTrainingArguments` (the options every script adds to `TrainingArguments`), `start_run` (arguments, logging,
launch checks, strict resumption with `resolve_checkpoint`), `run_stages` (train, evaluate, predict; the model is
saved before any evaluation), and for the vision-language scripts (retrieval, VQA, NLVR2, captioning) their
arguments, `ImageTextCollator`, `load_processor` (any tokenizer), `fit_text_vocabulary` and `train_image_transform`.

Library code for the example scripts (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, HfArgumentParser, PretrainedConfig, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..model_card import card_task, write_model_card_file
from ..models.beit3.configuration_beit3 import BEIT3_PRESETS, Beit3Config

logger = logging.getLogger(__name__)

__all__ = [
    "ImageTextCollator",
    "ImageTextDataArguments",
    "ImageTextTrainingArguments",
    "ModelArguments",
    "ScriptTrainingArguments",
    "check_distributed_launch",
    "fit_text_vocabulary",
    "keep_special_token_ids",
    "last_complete_checkpoint",
    "load_config",
    "load_processor",
    "parse_script_args",
    "report_training",
    "resolve_checkpoint",
    "run_stages",
    "save_final_model",
    "set_special_token_ids",
    "setup_logging",
    "start_run",
    "tokenizer_special_ids",
    "train_image_transform",
    "write_json",
    "write_model_card",
]

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# A PEFT (LoRA) run saves its adapter only.
_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "adapter_model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Arguments, logging, launch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScriptTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the options every example script adds (see each field's help)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch in a non-empty --output_dir, ignoring its checkpoints. Without it, a run "
            "resumes from the last complete checkpoint-N of --output_dir, and refuses a non-empty folder that has "
            "none."
        },
    )
    ignore_missing_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without optimizer.pt / scheduler.pt (e.g. saved with "
            "--save_only_model): the weights and step are restored, the optimizer and schedule restart. Without "
            "it such a checkpoint is refused."
        },
    )
    check_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image of the train / eval / test sets before building the model, and stop with "
            "the list of undecodable files."
        },
    )
    skip_undecodable_images: bool = field(
        default=True,
        metadata={
            "help": "During training, replace an image that cannot be decoded by another example, log it and list "
            "it in OUTPUT_DIR/skipped_images.json. False: stop at the first one. Evaluation always stops."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of --metric_for_best_model "
            "(transformers' EarlyStoppingCallback; needs --eval_strategy steps or epoch)."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of the metric that counts as an improvement."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: the transforms read raw columns (images, captions) the model never sees."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}.")
            if self.metric_for_best_model is None:
                raise ValueError("--early_stopping_patience needs --metric_for_best_model (e.g. r_mean or top1).")
            if self.eval_strategy == "no":
                raise ValueError("--early_stopping_patience needs --eval_strategy steps or epoch.")

    def early_stopping_callbacks(self) -> list[transformers.TrainerCallback]:
        """`[EarlyStoppingCallback]` when `--early_stopping_patience` is set, else `[]`."""
        if self.early_stopping_patience is None:
            return []
        return [transformers.EarlyStoppingCallback(self.early_stopping_patience, self.early_stopping_threshold)]


def parse_script_args(dataclass_types: Sequence[type], argv: Sequence[str] | None) -> tuple[Any, ...]:
    """`HfArgumentParser` over `dataclass_types`: a single `.json` argument is a file of arguments, as in
    transformers' examples; otherwise `argv` (default `sys.argv[1:]`) are command-line flags."""
    parser = HfArgumentParser(tuple(dataclass_types))
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """transformers' example logging: one stdout handler, the process's log level, a line per process."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default log level is "passive": on the main process that means info, as in transformers' examples.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (script_logger.name, __name__, "beit3_hf"):
        logging.getLogger(name).setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    script_logger.warning(
        "Process rank: %d, world size: %d, device: %s, distributed training: %s, mixed precision: %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        training_args.parallel_mode.value == "distributed",
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no",
    )


def check_distributed_launch(training_args: TrainingArguments) -> None:
    """Refuse processes that were launched together but do not form a distributed group (they would each train
    alone and overwrite each other's output)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training_args.world_size == 1:
        raise RuntimeError(
            f"{os.environ['WORLD_SIZE']} processes were launched but they do not form a distributed group. On a "
            "machine without GPUs pass --use_cpu, e.g. `accelerate launch --multi_gpu --num_processes 2 "
            "script.py ... --use_cpu` (gloo)."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and training_args.use_cpu:
        # accelerate (1.15) turns FSDP on for GPU-like devices only and would quietly train with plain DDP here.
        raise RuntimeError(
            "An FSDP launch (accelerate config distributed_type: FSDP) with --use_cpu: accelerate runs FSDP on GPUs "
            "only and would silently fall back to DDP. Use --multi_gpu on CPUs, or GPUs for FSDP."
        )
    if training_args.world_size > 1:
        # A process group still alive while the interpreter shuts down can abort a finished run ("terminate called
        # without an active exception", seen with gloo): tear it down first.
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    # Free the run's objects first, while the interpreter is fully alive: cyclic garbage (the trainer, DDP's reducer
    # and the gloo work it holds) otherwise dies during interpreter finalization, where a gloo work's tensors
    # cannot take the GIL and the process aborts.
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def start_run(
    dataclass_types: Sequence[type], argv: Sequence[str] | None, script_logger: logging.Logger
) -> tuple[Any, ...]:
    """The start every script shares: parse `argv` into `dataclass_types` (training arguments last), set up logging,
    refuse processes that do not form a distributed group, find the checkpoint to resume from (before anything else:
    an output folder this run would clobber is refused here), seed, and let DDP find parameters without a gradient
    (some get none in a step, e.g. the vision mask token; non-reentrant gradient checkpointing allows it).

    Returns the parsed dataclasses followed by the checkpoint (None: start from scratch).
    """
    *parsed, training_args = parse_script_args(dataclass_types, argv)
    setup_logging(training_args, script_logger)
    check_distributed_launch(training_args)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        script_logger.warning("None of --do_train, --do_eval, --do_predict was given: nothing to do.")
    checkpoint = resolve_checkpoint(training_args) if training_args.do_train else None
    transformers.set_seed(training_args.seed)
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    return (*parsed, training_args, checkpoint)


def load_config(name_or_path: str, overrides: str | None = None, **from_pretrained_kwargs: Any) -> PretrainedConfig:
    """A preset (`"beit3-base-patch16-224"`, see `BEIT3_PRESETS`) or a config folder / Hub repo, then `overrides`.

    `overrides` is `config.update_from_string`'s "hidden_size=128,num_hidden_layers=4" form; the result is validated
    again. `from_pretrained_kwargs` go to `AutoConfig.from_pretrained` (`trust_remote_code`, `revision`, ...).
    """
    if name_or_path in BEIT3_PRESETS:
        config = Beit3Config.from_preset(name_or_path)
    else:
        config = AutoConfig.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if overrides:
        config.update_from_string(overrides)
        if hasattr(config, "validate_architecture"):  # a Beit3Config, from this package or from a folder's code
            config.validate_architecture()
    return config


# ----------------------------------------------------------------------------------------------------------------
# Output folder and checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _damage(path: Path) -> str | None:
    """Why a file of a checkpoint cannot be read back (a run killed while saving truncates it), or None."""
    try:
        if path.name.endswith(".json"):
            json.loads(path.read_bytes().decode("utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):  # checks the header against the file size
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):  # torch.save's zip format: a truncated file has no central directory
                pass
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as error:
        return f"{path.name} is truncated or corrupt ({type(error).__name__}: {error})"
    return None


def _checkpoint_problems(folder: Path) -> list[str]:
    """Why a checkpoint folder cannot be resumed from: missing trainer state or weights, truncated files."""
    entries = list(folder.iterdir())
    problems = [] if (folder / TRAINER_STATE_NAME).is_file() else [f"no {TRAINER_STATE_NAME}"]
    deepspeed_or_fsdp = any(p.name.startswith(("global_step", "pytorch_model_fsdp")) for p in entries)
    if not deepspeed_or_fsdp and not any((folder / name).is_file() for name in _WEIGHTS):
        problems.append("no model weights")
    problems.extend(filter(None, map(_damage, sorted(p for p in entries if p.is_file()))))
    return problems


def _missing_optimizer_state(folder: Path) -> list[str]:
    """`optimizer.pt` / `scheduler.pt` when absent (DeepSpeed / FSDP keep the optimizer in their own files)."""
    names = {p.name for p in folder.iterdir()}
    if any(name.startswith("global_step") for name in names):  # DeepSpeed: optimizer state in global_stepN/
        return []
    missing = []
    if not any(name.startswith("optimizer") for name in names):  # optimizer.pt, or FSDP's optimizer_0
        missing.append(OPTIMIZER_NAME)
    if SCHEDULER_NAME not in names:
        missing.append(SCHEDULER_NAME)
    return missing


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the highest N that holds a trainer state and weights.

    A checkpoint that a killed run left half-written is skipped with a warning, so that resuming falls back to the
    one before it (transformers' `get_last_checkpoint` would return it, and resuming would fail or restart).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.match(path.name))
    )
    for _, path in reversed(checkpoints):
        if not (problems := _checkpoint_problems(path)):
            return str(path)
        logger.warning(
            "Skipping the incomplete checkpoint %s (%s): a run stopped while saving it.", path, "; ".join(problems)
        )
    return None


def resolve_checkpoint(training_args: ScriptTrainingArguments) -> str | None:
    """The checkpoint to resume training from, or None to start from scratch; raises when the run would lose work.

    - `--resume_from_checkpoint PATH`: that checkpoint; `last` (or `true`): the last complete checkpoint of
      `--output_dir`, which must exist.
    - Neither, with `--do_train`: the last complete checkpoint of `--output_dir` if there is one (rerunning the same
      command continues an interrupted run); a non-empty `--output_dir` without checkpoints is refused unless
      `--overwrite_output_dir`, which also ignores existing checkpoints.
    - A checkpoint without `optimizer.pt` / `scheduler.pt` (`--save_only_model`) is refused unless
      `--ignore_missing_optimizer_state`: resuming from it would silently restart the optimizer and the schedule.
    """
    requested = training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    checkpoint: str | None = None
    if requested is not None and str(requested).lower() in ("last", "true"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {requested}: {output_dir} holds no complete checkpoint-N folder."
            )
    elif requested is not None:
        path = Path(requested)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such folder.")
        if problems := _checkpoint_problems(path):
            raise ValueError(
                f"--resume_from_checkpoint {requested}: not a complete Trainer checkpoint ({'; '.join(problems)})."
            )
        checkpoint = str(path)
    elif training_args.do_train and output_dir.is_dir() and not training_args.overwrite_output_dir:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None and any(output_dir.iterdir()):
            raise FileExistsError(
                f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from: pass "
                "--overwrite_output_dir to train into it anyway, or choose another folder."
            )
        if checkpoint is not None:
            logger.info("Resuming from the last checkpoint of --output_dir: %s", checkpoint)
    if checkpoint is None:
        return None
    if missing := _missing_optimizer_state(Path(checkpoint)):
        message = (
            f"The checkpoint {checkpoint} has no {' / '.join(missing)} (saved with --save_only_model?): resuming "
            "from it restores the weights and the step but restarts the optimizer and the learning-rate schedule."
        )
        if not training_args.ignore_missing_optimizer_state:
            raise ValueError(f"{message} Pass --ignore_missing_optimizer_state to accept that.")
        logger.warning(message)
    if not any(Path(checkpoint).glob("rng_state*.pth")):  # rng_state.pth, or rng_state_{rank}.pth
        logger.warning(
            "The checkpoint %s has no RNG state: the resumed run will not repeat the original exactly.", checkpoint
        )
    return checkpoint


def write_model_card(
    trainer: transformers.Trainer,
    *,
    description: str | None = None,
    results: dict[str, float] | None = None,
    tags: Sequence[str] = (),
    license: str = "mit",
    dataset: str | Sequence[str] | None = None,
) -> None:
    """Write `--output_dir/README.md` with `beit3_hf.model_card` (Hub metadata, the task's usage snippet, the base
    model, `results` as a table, `description`, the training hyperparameters); on the main process only.

    The task (pipeline tag, snippet) follows the trained model's class (`card_task`)."""
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    task = card_task(model)
    base_model = model.config._name_or_path or None
    origin = f"fine-tuned from `{base_model}`" if base_model else "trained from scratch"
    args = trainer.args
    hyperparameters = {
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": args.world_size,
        "max_steps": trainer.state.global_step or args.max_steps,
        "optimizer": args.optim,
        "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    training = "## Training\n\n" + "".join(f"- {name}: {value}\n" for name, value in hyperparameters.items())
    versions = f"\nFramework versions: transformers {transformers.__version__}, torch {torch.__version__}.\n"
    results = {
        name: value
        for name, value in (results or {}).items()
        if not name.endswith(("_runtime", "_per_second")) and name != "epoch"
    }
    write_model_card_file(
        args.output_dir,
        task,
        summary=f"`{type(model).__name__}` {origin} with beit3-hf's example scripts.",
        base_model=base_model,
        datasets=[dataset] if isinstance(dataset, str) else dataset,
        results=results,
        details="\n\n".join(part for part in (description, training + versions) if part),
        tags=tags,
        license=license,
    )


def save_final_model(trainer: transformers.Trainer, **model_card_kwargs: Any) -> None:
    """Save the model (weights, config, code files), the processor and a model card into `--output_dir`.

    Called right after training and before any evaluation, so that a failing evaluation never costs the model.
    `model_card_kwargs` go to `write_model_card` (`description`, `tags`, `dataset`, ...).
    """
    trainer.save_model()  # model.save_pretrained (with its code files) and processing_class.save_pretrained
    write_model_card(trainer, **model_card_kwargs)


def report_training(trainer: transformers.Trainer, metrics: dict[str, float]) -> dict[str, float]:
    """Log and save the training metrics (`train_results.json`) and the trainer state; a non-finite training loss
    is an error (after the model was saved). Returns `metrics`."""
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if not math.isfinite(metrics.get("train_loss", 0.0)):
        raise RuntimeError(f"the training loss is not finite: {metrics['train_loss']}")
    return metrics


def run_stages(
    trainer: transformers.Trainer,
    training_args: ScriptTrainingArguments,
    *,
    checkpoint: str | None,
    card: dict[str, Any],
    evaluate: Callable[[str], dict[str, float]] | None = None,
    predict: Callable[[], dict[str, float]] | None = None,
    train_metrics: dict[str, float] | None = None,
) -> dict[str, float]:
    """What every script does once its trainer is built, in this order, each metric set logged and saved as
    transformers' examples do (`<split>_results.json` and `all_results.json`):

    1. `--eval_before_training`: `evaluate("before")`;
    2. `--do_train`: train (from `checkpoint`), then save the model, its processor and a model card (`card`: the
       keywords of `write_model_card`) before any evaluation can fail; the train metrics get `train_samples`,
       `train_skipped_images` and `train_metrics`; a non-finite training loss raises after the save;
    3. `--do_eval`: `evaluate("eval")`; 4. `--do_predict`: `predict()`;
    5. after training and an evaluation, the model card again, with the results.

    Returns every metric.
    """
    results: dict[str, float] = {}

    def report(split: str, metrics: dict[str, float]) -> None:
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        results.update(metrics)

    def need(stage: Callable | None, flag: str) -> Callable:
        if stage is None:
            raise ValueError(f"{flag}: this script has nothing to evaluate there.")
        return stage

    if getattr(training_args, "eval_before_training", False):
        report("before", need(evaluate, "--eval_before_training")("before"))
    if training_args.do_train:
        if trainer.train_dataset is None:
            raise ValueError("--do_train: no training data.")
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        save_final_model(trainer, **card)
        metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset), **(train_metrics or {}))
        metrics["train_skipped_images"] = len(getattr(trainer, "skipped_images", ()))
        results.update(report_training(trainer, metrics))  # a non-finite loss stops the run before evaluation
    if training_args.do_eval:
        report("eval", need(evaluate, "--do_eval")("eval"))
    if training_args.do_predict:
        report("test", need(predict, "--do_predict")())
    if training_args.do_train and (training_args.do_eval or training_args.do_predict):
        write_model_card(trainer, results=results, **card)
    return results


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON (through a temporary file, so that a kill never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Arguments and inputs of the vision-language scripts (retrieval, VQA, NLVR2, captioning)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to fine-tune, or which configuration to train from scratch, and its tokenizer."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A converted / saved BEiT-3 folder (or Hub repo) to fine-tune: a backbone or a task model."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: a preset such as beit3-base-patch16-224, or a config folder."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated config changes, e.g. 'hidden_size=128,num_hidden_layers=4'."}
    )
    sentencepiece_model: str | None = field(
        default=None,
        metadata={"help": "beit3.spm (or another sentencepiece model), instead of the model folder's tokenizer."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Any transformers tokenizer (folder or Hub id, e.g. a Chinese BERT WordPiece one) instead of the "
            "model folder's. Without <s> / </s> its [CLS] / [SEP] are used; a vocabulary larger than the model's "
            "grows the text embeddings."
        },
    )
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth of the last layer."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise checkpoint weights whose shape differs (e.g. a VQA classifier made for another "
            "answer list) instead of stopping."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model folder / repo."})

    def __post_init__(self) -> None:
        if self.sentencepiece_model is not None and self.tokenizer_name_or_path is not None:
            raise ValueError("Pass --sentencepiece_model or --tokenizer_name_or_path, not both.")

    def load_config(self) -> PretrainedConfig:
        """The config of `--model_name_or_path` or `--config_name`, with `--config_overrides` and
        `--drop_path_rate` applied."""
        source = self.model_name_or_path or self.config_name
        if source is None:
            raise ValueError("Give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
        config = load_config(source, self.config_overrides, trust_remote_code=self.trust_remote_code)
        if self.drop_path_rate is not None:
            config.drop_path_rate = self.drop_path_rate  # the layers take their rates from it when the model is built
        return config


@dataclass
class ImageTextDataArguments:
    """The text length and the training augmentation every vision-language script takes."""

    max_text_length: int = field(default=64, metadata={"help": "Text tokens, <s> and </s> included."})
    min_crop_scale: float = field(
        default=0.5, metadata={"help": "Smallest area of the random resized crop; 1.0 only resizes (no crop)."}
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips (the original applies them)."})
    randaug: bool = field(default=False, metadata={"help": "RandAugment (2 ops, magnitude 7) on training images."})

    def train_transform(self, image_size: int) -> Any:
        """:func:`train_image_transform` with these options."""
        return train_image_transform(
            image_size, min_crop_scale=self.min_crop_scale, hflip=self.hflip, randaug=self.randaug
        )


@dataclass
class ImageTextTrainingArguments(ScriptTrainingArguments):
    """`ScriptTrainingArguments` plus the options of every vision-language recipe."""

    layer_decay: float = field(default=1.0, metadata={"help": "Layer-wise learning-rate decay (1.0: none)."})
    eval_before_training: bool = field(
        default=False, metadata={"help": "Evaluate once before training (metrics before_*, before_results.json)."}
    )

    @property
    def needs_eval_data(self) -> bool:
        """Whether the run evaluates: `--do_eval`, `--eval_before_training`, or during training."""
        return self.do_eval or self.eval_before_training or (self.do_train and self.eval_strategy != "no")


class ImageTextCollator:
    """Batches items of `{"pixel_values": tensor, text_key: str, ...}`: the stacked pixels, the tokenised texts
    (`input_ids`, `attention_mask`) and, when the training transform skipped undecodable images, their records
    (`skipped_images`, taken out again by `Beit3Trainer`). Subclasses add their targets in `add_targets`."""

    text_key = "text"

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        from ..data.loaders import gather_skipped

        text = self.processor(text=[item[self.text_key] for item in items], return_tensors="pt")
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        self.add_targets(batch, items)
        if "skipped_images" in items[0]:
            batch["skipped_images"] = gather_skipped(items)
        return batch

    def add_targets(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        """Add the training targets of `items` to `batch` (in place); none by default."""


def tokenizer_special_ids(tokenizer: Any, *, need_mask: bool = False, source: str = "the tokenizer") -> dict[str, int]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"}`` of a tokenizer for a BEiT-3 config.

    A tokenizer without ``<s>`` / ``</s>`` (BERT WordPiece: ``[CLS]`` ... ``[SEP]``) gives its cls / sep ids, which
    it puts around every text. ``mask_token_id`` is left out when the tokenizer has none, unless ``need_mask``
    (captioning decodes at the ``<mask>`` slot), which raises naming ``source``.

    Example:
        >>> from types import SimpleNamespace
        >>> bert = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=101, sep_token_id=102,
        ...                        pad_token_id=0, mask_token_id=103)
        >>> tokenizer_special_ids(bert)
        {'bos_token_id': 101, 'eos_token_id': 102, 'pad_token_id': 0, 'mask_token_id': 103}
    """
    name = type(tokenizer).__name__
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if bos is None or eos is None:
        raise ValueError(
            f"{source} ({name}) has neither bos/eos nor cls/sep tokens: BEiT-3 needs begin and end tokens."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{source} ({name}) has no pad token: set one (e.g. tokenizer.pad_token = ...) and save it.")
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is not None:
        ids["mask_token_id"] = mask
    elif need_mask:
        raise ValueError(f"{source} ({name}) has no mask token: captioning predicts at a <mask> slot; add one.")
    return ids


def set_special_token_ids(
    config: Any, tokenizer: Any, *, need_mask: bool = False, source: str = "the tokenizer"
) -> None:
    """Write :func:`tokenizer_special_ids` into ``config``, logging each id that changes.

    Example:
        >>> from types import SimpleNamespace
        >>> config = SimpleNamespace(bos_token_id=0, eos_token_id=2, pad_token_id=1)
        >>> bert = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=101, sep_token_id=102,
        ...                        pad_token_id=0, mask_token_id=103)
        >>> set_special_token_ids(config, bert)
        >>> config.bos_token_id, config.eos_token_id, config.pad_token_id, config.mask_token_id
        (101, 102, 0, 103)
    """
    for name, value in tokenizer_special_ids(tokenizer, need_mask=need_mask, source=source).items():
        if getattr(config, name, None) != value:
            logger.info("config.%s: %s -> %s (from %s)", name, getattr(config, name, None), value, source)
            setattr(config, name, value)


def keep_special_token_ids(tokenizer: Any, *, need_mask: bool = False) -> transformers.TrainerCallback:
    """A ``TrainerCallback`` that writes :func:`tokenizer_special_ids` into the model's config when training starts.

    Some transformers versions (5.13) make ``Trainer.train`` align the config's ``bos`` / ``eos`` ids with the
    tokenizer's ``bos_token_id`` / ``eos_token_id``, which are None for BERT-style tokenizers; BEiT-3 uses their
    ``[CLS]`` / ``[SEP]`` there (captioning's ``generate`` starts from ``bos_token_id``).
    """

    class KeepSpecialTokenIds(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is not None:
                set_special_token_ids(model.config, tokenizer, need_mask=need_mask)

    return KeepSpecialTokenIds()


def load_processor(model_args: ModelArguments, *, task: str, image_size: int, max_length: int) -> Any:
    """The ``Beit3Processor`` of a run, from the first of:

    1. ``--sentencepiece_model``: ``beit3.spm`` (or another sentencepiece model), converted with the original ids;
    2. ``--tokenizer_name_or_path``: any tokenizer ``AutoTokenizer`` loads (a folder or Hub id), e.g. a BERT
       WordPiece one; one without ``<s>`` / ``</s>`` uses its ``[CLS]`` / ``[SEP]`` (a one-line notice says so);
    3. ``--model_name_or_path``: the checkpoint folder's own processor (``AutoProcessor``).

    In cases 1 and 2 the image side is the vision-language eval transform of ``task`` at ``image_size``; in every
    case texts are padded / truncated to ``max_length`` tokens.
    """
    from ..conversion.tokenizer import load_sentencepiece_tokenizer, processor_for_task

    if model_args.sentencepiece_model is not None:
        tokenizer = load_sentencepiece_tokenizer(model_args.sentencepiece_model, max_length=max_length)
    elif model_args.tokenizer_name_or_path is not None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                model_args.tokenizer_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path}: no tokenizer there ({error})."
            ) from error
        tokenizer.model_max_length = max_length
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            ids = tokenizer_special_ids(
                tokenizer, source=f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path}"
            )
            logger.warning(
                "The tokenizer has no <s> / </s>: BEiT-3 uses its %s / %s (ids %d / %d) as begin / end tokens.",
                tokenizer.cls_token, tokenizer.sep_token, ids["bos_token_id"], ids["eos_token_id"],
            )  # fmt: skip
    elif model_args.model_name_or_path is not None:
        try:
            processor = transformers.AutoProcessor.from_pretrained(
                model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{model_args.model_name_or_path} has no processor ({error}); pass --sentencepiece_model beit3.spm or "
                "--tokenizer_name_or_path."
            ) from error
        if not hasattr(processor, "tokenizer"):
            raise ValueError(
                f"{model_args.model_name_or_path} holds an image processor only; pass --sentencepiece_model or "
                "--tokenizer_name_or_path."
            )
        processor.max_length = max_length
        return processor
    else:
        raise ValueError(
            "No tokenizer: pass --sentencepiece_model (beit3.spm), --tokenizer_name_or_path, or a checkpoint folder."
        )
    return processor_for_task(tokenizer, task=task, image_size=image_size, max_length=max_length)


def fit_text_vocabulary(model: Any, tokenizer: Any, *, need_mask: bool = False) -> None:
    """Make `model` take every id of `tokenizer`, and take its special-token ids from it.

    A tokenizer with more ids than the model's text embeddings (a Chinese WordPiece vocabulary on an English
    checkpoint, ...) grows them with `resize_token_embeddings` (new rows drawn around the mean of the old ones, as
    transformers does; a captioning head grows with them), and the mismatch is logged: no id can index past the
    table. A smaller vocabulary keeps the table (unused rows, as `beit3.spm`'s 64002 ids in 64010 rows).

    Example:
        >>> from beit3_hf import Beit3Config, Beit3ForImageTextRetrieval
        >>> from transformers import BertTokenizer
        >>> import tempfile, pathlib
        >>> vocab = pathlib.Path(tempfile.mkdtemp()) / "vocab.txt"
        >>> _ = vocab.write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一只猫坐在窗台上"]))
        >>> model = Beit3ForImageTextRetrieval(Beit3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=64, image_size=32, patch_size=16, vocab_size=8, max_position_embeddings=16))
        >>> fit_text_vocabulary(model, BertTokenizer(str(vocab)))
        >>> model.config.vocab_size, model.get_input_embeddings().num_embeddings, model.config.bos_token_id
        (13, 13, 2)
    """
    size = len(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if size > rows:
        logger.warning(
            "The tokenizer has %d ids but the model's text embeddings only %d rows: resizing them to %d (new rows "
            "start around the mean of the others).",
            size, rows, size,
        )  # fmt: skip
        model.resize_token_embeddings(size, mean_resizing=rows > 1)
    elif size < rows:
        logger.info(
            "The tokenizer has %d ids, the model's text embeddings %d rows: %d rows unused.", size, rows, rows - size
        )
    set_special_token_ids(model.config, tokenizer, need_mask=need_mask)


def train_image_transform(
    image_size: int, *, min_crop_scale: float = 0.5, hflip: bool = True, randaug: bool = False
) -> Any:
    """The original vision-language training transform: random resized crop (scale ``min_crop_scale``-1, bicubic;
    1.0 only resizes), horizontal flip, optional RandAugment (torchvision's, 2 ops at magnitude 7, standing in for
    the original's BLIP RandomAugment), then mean = std = 0.5.

    The original flips VQA and NLVR2 images too, although "left" / "right" in a question then change meaning.

    Example:
        >>> from PIL import Image
        >>> train_image_transform(32, min_crop_scale=1.0, hflip=False)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    from torchvision import transforms

    bicubic = transforms.InterpolationMode.BICUBIC
    if not 0.0 < min_crop_scale <= 1.0:
        raise ValueError(f"--min_crop_scale must be in (0, 1], got {min_crop_scale}.")
    if min_crop_scale < 1.0:
        steps: list[Any] = [
            transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=bicubic)
        ]
    else:
        steps = [transforms.Resize((image_size, image_size), interpolation=bicubic)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if randaug:
        steps.append(transforms.RandAugment(num_ops=2, magnitude=7))
    steps += [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return transforms.Compose(steps)
