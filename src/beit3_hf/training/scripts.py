"""What the example scripts share, so that no run loses its model or its progress and no bad image goes unnoticed.

- `ScriptTrainingArguments`: `TrainingArguments` plus `--overwrite_output_dir`, `--ignore_missing_optimizer_state`,
  `--check_images`, `--skip_undecodable_images` and `--early_stopping_patience`.
- `resolve_checkpoint`: transformers' `get_last_checkpoint` behaviour made strict: resume from the last *complete*
  checkpoint of `output_dir`, refuse a non-empty `output_dir` without checkpoints, `--resume_from_checkpoint last`,
  and refuse checkpoints without optimizer / scheduler state unless asked.
- Images: `beit3_hf.data.loaders` decodes them (`open_image`, `check_images`, `ImageRowDecoder`) with errors that
  name the file; `Beit3Trainer` writes the report of the training images it had to skip.
- `load_config`, `parse_script_args`, `setup_logging`, `check_distributed_launch`, `save_final_model`: the scripts'
  common set-up and the save that happens before any evaluation.

Library code for the example scripts (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, HfArgumentParser, PretrainedConfig, TrainingArguments

from ..model_card import card_task, write_model_card_file
from ..models.beit3.configuration_beit3 import BEIT3_PRESETS, Beit3Config

logger = logging.getLogger(__name__)

__all__ = [
    "ScriptTrainingArguments",
    "check_distributed_launch",
    "last_complete_checkpoint",
    "load_config",
    "parse_script_args",
    "resolve_checkpoint",
    "save_final_model",
    "setup_logging",
    "write_json",
    "write_model_card",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TRAINER_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


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
    if training_args.world_size > 1:
        # A process group still alive while the interpreter shuts down can abort a finished run ("terminate called
        # without an active exception", seen with gloo): tear it down first.
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    problems = []
    if not (folder / _TRAINER_STATE).is_file():
        problems.append(f"no {_TRAINER_STATE}")
    deepspeed_or_fsdp = any(p.name.startswith(("global_step", "pytorch_model_fsdp")) for p in folder.iterdir())
    if not deepspeed_or_fsdp and not any((folder / name).is_file() for name in _WEIGHTS):
        problems.append("no model weights")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    problems.extend(problem for problem in map(_damage, files) if problem is not None)
    return problems


def _missing_optimizer_state(folder: Path) -> list[str]:
    """`optimizer.pt` / `scheduler.pt` when absent (DeepSpeed / FSDP keep the optimizer in their own files)."""
    names = {p.name for p in folder.iterdir()}
    if any(name.startswith("global_step") for name in names):  # DeepSpeed: optimizer state in global_stepN/
        return []
    missing = []
    if not any(name.startswith("optimizer") for name in names):  # optimizer.pt, or FSDP's optimizer_0
        missing.append("optimizer.pt")
    if "scheduler.pt" not in names:
        missing.append("scheduler.pt")
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
        problems = _checkpoint_problems(path)
        if not problems:
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
        problems = _checkpoint_problems(path)
        if problems:
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
    missing = _missing_optimizer_state(Path(checkpoint))
    if missing:
        message = (
            f"The checkpoint {checkpoint} has no {' / '.join(missing)} (saved with --save_only_model?): resuming "
            "from it restores the weights and the step but restarts the optimizer and the learning-rate schedule."
        )
        if not training_args.ignore_missing_optimizer_state:
            raise ValueError(f"{message} Pass --ignore_missing_optimizer_state to accept that.")
        logger.warning(message)
    if not (Path(checkpoint) / "rng_state.pth").is_file() and not any(Path(checkpoint).glob("rng_state_*.pth")):
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
    **unused: Any,
) -> None:
    """Write `--output_dir/README.md` with `beit3_hf.model_card` (Hub metadata, the task's usage snippet, the base
    model, `results` as a table, `description`, the training hyperparameters); on the main process only.

    The task (pipeline tag, snippet) follows the trained model's class (`card_task`). `unused` takes the
    `Trainer.create_model_card` arguments the scripts used to pass (`tasks`, ...)."""
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


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON (through a temporary file, so that a kill never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
