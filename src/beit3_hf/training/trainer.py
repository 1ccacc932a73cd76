"""Training pieces of the original BEiT-3 recipes for `transformers.Trainer`: layer-wise learning-rate decay groups
with the original's weight-decay exclusions (`beit3/optim_factory.py`), the image-text contrastive loss over the
global batch of all processes (the original `ClipLoss` with `world_size > 1`), and `Beit3Trainer`, which uses both,
honours `--optim` and reports the training images it had to skip. `load_config` is re-exported from
`beit3_hf.training.scripts`, with the rest of what the example scripts share.

Not remote code: the model files never import this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from .scripts import load_config, write_json

__all__ = [
    "SKIPPED_IMAGES_NAME",
    "Beit3Trainer",
    "gather_with_grad",
    "global_contrastive_logits",
    "global_contrastive_loss",
    "layer_decay_parameter_groups",
    "load_config",
    "parameter_layer_id",
]

logger = logging.getLogger(__name__)

#: The report of undecodable training images that were replaced, written into `output_dir`.
SKIPPED_IMAGES_NAME = "skipped_images.json"


# Parameters without weight decay besides every 1-D tensor (biases, norms): tokens and position tables.
_NO_WEIGHT_DECAY = re.compile(r"(cls_token|mask_token|position_embedding\.weight|logit_scale)$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def parameter_layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 for embeddings, i + 1 for encoder layer i, num_layers + 1 else.

    The original assigns 0 to every name containing "embed", i + 1 to `layers.i.`, and num_layers + 1 to the rest
    (final norm, heads, logit scale).
    """
    if "embed" in name:
        return 0
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def layer_decay_parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups: learning rate `learning_rate * layer_decay ** (num_layers + 1 - layer_id)`, and no
    weight decay for 1-D parameters, CLS / mask tokens, position tables and the logit scale."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = parameter_layer_id(name, num_layers)
        decay = param.ndim > 1 and not _NO_WEIGHT_DECAY.search(name)
        group = groups.setdefault(
            (layer_id, decay),
            {
                "params": [],
                "lr": learning_rate * layer_decay ** (num_layers + 1 - layer_id),
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": layer_id,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, keeping the gradient path to each process's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def global_contrastive_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logits_per_image, logits_per_text, targets)` of this process's pairs against the texts and images of all
    processes: (local, global) float32 scores, and the global column of each local row (`rank * batch + i`)."""
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
    logits_per_image = scale * image_embeds.float() @ all_texts.float().t()  # (local, global)
    logits_per_text = scale * text_embeds.float() @ all_images.float().t()
    return logits_per_image, logits_per_text, targets


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Contrastive loss of this process's pairs against the texts and images of all processes.

    `scale` multiplies the cosine similarities (`exp(logit_scale)`). Row i of this process matches global column
    `rank * batch + i`. Averaged over processes (as DDP does with the gradients), it equals the loss of one process
    holding the whole global batch.
    """
    logits_per_image, logits_per_text, targets = global_contrastive_logits(image_embeds, text_embeds, scale)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


class _SkippedImagesReport(TrainerCallback):
    """Writes `Beit3Trainer`'s record of skipped training images at each checkpoint and at the end of training."""

    def __init__(self, trainer: Beit3Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._start_skipped_images_record(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.write_skipped_images_report()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        records = self.trainer.write_skipped_images_report()
        if records:
            logger.warning(
                "%d undecodable training images were replaced by other examples; the list is in %s.",
                len(records),
                os.path.join(args.output_dir, SKIPPED_IMAGES_NAME),
            )


class Beit3Trainer(Trainer):
    """`Trainer` with the original recipe's layer-wise learning-rate decay, the image-text contrastive loss over the
    global batch of all processes, and a report of the training images that could not be decoded.

    Args:
        layer_decay: the learning rate of layer i is `learning_rate * layer_decay ** (num_layers + 1 - (i + 1))`.
            The groups go to the optimizer `--optim` names (AdamW by default, Adafactor, SGD, ...).
        global_contrastive: the model is an image-text contrastive model (its output has `image_embeds`,
            `text_embeds` and `logit_scale`, as `Beit3ForImageTextRetrieval`'s): gather the features of every
            process into the loss. False: the model's own loss.

    Training batches may carry a `skipped_images` list (see `beit3_hf.data.ImageRowDecoder`): it is
    taken out before the forward pass, logged, and written to `OUTPUT_DIR/skipped_images.json` at every checkpoint
    and at the end of training (`skipped_images` holds the records of all processes).
    """

    def __init__(self, *args: Any, layer_decay: float = 1.0, global_contrastive: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.global_contrastive = global_contrastive
        self._skipped_before: list[dict[str, Any]] = []  # from the report of the run this one resumes
        self._skipped_local: list[dict[str, Any]] = []  # this process, this run
        self.add_callback(_SkippedImagesReport(self))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The `--optim` optimizer (`Trainer.get_optimizer_cls_and_kwargs`) over the layer-decay groups of
        `layer_decay_parameter_groups`; each group keeps its own learning rate and weight decay."""
        from transformers.trainer_optimizer import is_optimizer_factory

        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        # GaLore, LOMO, layer-wise and factory optimizers make their own parameter groups.
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            if self.layer_decay != 1.0:
                raise ValueError(
                    f"--optim {self.args.optim} builds its own parameter groups and cannot apply the layer-wise "
                    f"learning-rate decay (--layer_decay {self.layer_decay}): pass --layer_decay 1.0 or another --optim."
                )
            logger.warning(
                "--optim %s builds its own parameter groups: Trainer's weight-decay rules apply.", self.args.optim
            )
            return super().create_optimizer(model)
        groups = layer_decay_parameter_groups(
            opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        if not self.global_contrastive:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {key: value for key, value in inputs.items() if key != "return_loss"}
        outputs = model(**inputs)
        missing = [name for name in ("image_embeds", "text_embeds", "logit_scale") if outputs.get(name) is None]
        if missing:
            raise ValueError(
                f"global_contrastive=True needs an image-text contrastive model whose output has image_embeds, "
                f"text_embeds and logit_scale; {type(self.accelerator.unwrap_model(model)).__name__} gave no {missing}."
            )
        # The scale comes out of the (DDP-wrapped) forward, so its gradient is reduced like every other one.
        loss = global_contrastive_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        for record in inputs.pop("skipped_images", None) or []:
            self._skipped_local.append(
                {**record, "step": self.state.global_step + 1, "process": self.args.process_index}
            )
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- skipped images ------------------------------------------------------------------------------------------

    def _start_skipped_images_record(self, global_step: int) -> None:
        """Start this run's record; a resumed run keeps the records of the steps its checkpoint covers (the later
        ones will be met again)."""
        self._skipped_local = []
        self._skipped_before = []
        report = os.path.join(self.args.output_dir, SKIPPED_IMAGES_NAME)
        if global_step > 0 and os.path.isfile(report):
            with open(report, encoding="utf-8") as f:
                records = json.load(f).get("images", [])
            self._skipped_before = [r for r in records if int(r.get("step", 0)) <= global_step]

    @property
    def skipped_images(self) -> list[dict[str, Any]]:
        """Every skipped training image so far, of all processes (call it on every process: it gathers)."""
        from accelerate.utils import gather_object

        gathered = gather_object(self._skipped_local) if self.args.world_size > 1 else list(self._skipped_local)
        return self._skipped_before + sorted(gathered, key=lambda r: (r["step"], r["process"]))

    def write_skipped_images_report(self) -> list[dict[str, Any]]:
        """Write `OUTPUT_DIR/skipped_images.json` when an image was skipped; returns the records (every process)."""
        records = self.skipped_images
        if records and self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json(
                os.path.join(self.args.output_dir, SKIPPED_IMAGES_NAME),
                {"count": len(records), "files": sorted({r["file"] for r in records}), "images": records},
            )
        return records
