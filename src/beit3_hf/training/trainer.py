"""Training pieces of the original BEiT-3 recipes, for `transformers.Trainer` and `accelerate`.

- `layer_decay_parameter_groups`: AdamW groups with layer-wise learning-rate decay and the original's weight-decay
  exclusions (`beit3/optim_factory.py`).
- `global_contrastive_loss`: the image-text contrastive loss over the global batch of all processes (features
  gathered with gradients), as the original `ClipLoss` with `world_size > 1`.
- `Beit3Trainer`: a `Trainer` that uses both.
- `load_config`: a preset name or a config folder / repo, plus "key=value,..." overrides, for the example scripts.

Not remote code: the model files never import this module.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, Trainer

from ..models.beit3.configuration_beit3 import BEIT3_PRESETS, Beit3Config


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


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Contrastive loss of this process's pairs against the texts and images of all processes.

    `scale` multiplies the cosine similarities (`exp(logit_scale)`). Row i of this process matches global column
    `rank * batch + i`. Averaged over processes (as DDP does with the gradients), it equals the loss of one process
    holding the whole global batch.
    """
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
    logits_per_image = scale * image_embeds.float() @ all_texts.float().t()  # (local, global)
    logits_per_text = scale * text_embeds.float() @ all_images.float().t()
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


class Beit3Trainer(Trainer):
    """`Trainer` with the original recipe's layer-wise learning-rate decay and, for image-text retrieval models,
    the contrastive loss over the global batch of all processes.

    Args:
        layer_decay: the learning rate of layer i is `learning_rate * layer_decay ** (num_layers + 1 - (i + 1))`.
        global_contrastive: for `Beit3ForImageTextRetrieval`, gather the features of every process into the loss.
    """

    def __init__(self, *args: Any, layer_decay: float = 1.0, global_contrastive: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.global_contrastive = global_contrastive

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = layer_decay_parameter_groups(
                model, self.args.learning_rate, self.args.weight_decay, self.layer_decay
            )
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        if not (self.global_contrastive and hasattr(self.accelerator.unwrap_model(model), "logit_scale")):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {key: value for key, value in inputs.items() if key != "return_loss"}
        outputs = model(**inputs)
        # The scale comes out of the (DDP-wrapped) forward, so its gradient is reduced like every other one.
        loss = global_contrastive_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss
