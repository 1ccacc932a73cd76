"""The objectives of BEiT-3 multimodal (continual) pretraining, their schedule, and a `Trainer` that mixes them.

Objectives (`OBJECTIVES`), each computed by `Beit3ForPreTraining`:

- ``text_mlm``: masked language modelling on texts (BERT's 15%, 80% `<mask>` / 10% random / 10% kept);
- ``pair_mlm``: masked language modelling on the text of an image-text pair, which attends to the unmasked image
  (the text masked at a higher rate, 50% by default);
- ``image_mim``: BEiT's masked image modelling (block masks; a visual tokenizer's codes or normalised pixels);
- ``itc``: image-text contrastive learning over the global batch of every process.

A mixture (``"text_mlm:1,itc:2"``) gives each objective a weight; :class:`ObjectiveSchedule` draws the objective of
every step from ``(seed, step)`` alone, so every process runs the same objective at the same step (a process that
chose on its own would wait forever in another objective's collective). One step is one objective.

Losses are normalised by the **global** number of targets (all processes), so that two processes and one process
with the same global batch give the same loss and the same gradient (DDP averages the processes' gradients).

Library code, never shipped in a checkpoint folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lora import self_regularization_loss
from .trainer import Beit3Trainer, global_contrastive_logits

__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_INPUTS",
    "TOKENIZER_VIEWS",
    "ObjectiveSchedule",
    "PretrainingTrainer",
    "batch_objective",
    "load_visual_tokenizer",
    "mask_tokens",
    "mim_targets",
    "normalized_patches",
    "parse_objectives",
    "patch_pixels",
    "visual_vocab_size",
    "word_starts",
]

logger = logging.getLogger(__name__)

#: The objectives, in the order of their ids in a batch's ``objective`` tensor.
OBJECTIVES: tuple[str, ...] = ("text_mlm", "pair_mlm", "image_mim", "itc")


#: The inputs of each objective's `PretrainingCollator` batches (besides ``objective``), which tell them apart.
OBJECTIVE_INPUTS: dict[str, frozenset[str]] = {
    "text_mlm": frozenset({"input_ids", "attention_mask", "mlm_labels"}),
    "pair_mlm": frozenset({"pixel_values", "input_ids", "attention_mask", "mlm_labels"}),
    "image_mim": frozenset({"pixel_values", "bool_masked_pos"}),  # and tokenizer_pixel_values for token targets
    "itc": frozenset({"pixel_values", "input_ids", "attention_mask"}),
}


def batch_objective(batch: Mapping[str, Any]) -> str:
    """The objective of a `PretrainingCollator` batch, told by its inputs (`OBJECTIVE_INPUTS`): no read of its
    ``objective`` tensor, which is on the GPU once the batch is (a read would stall the host every step).

    Example:
        >>> batch_objective({"input_ids": 0, "attention_mask": 0, "mlm_labels": 0})
        'text_mlm'
    """
    inputs = set(batch) - {"objective", "tokenizer_pixel_values"}
    for name, expected in OBJECTIVE_INPUTS.items():
        if inputs == expected:
            return name
    known = "; ".join(f"{name}: {sorted(keys)}" for name, keys in OBJECTIVE_INPUTS.items())
    raise ValueError(f"A pretraining batch with inputs {sorted(batch)} is none of the objectives' batches ({known}).")


def parse_objectives(spec: str) -> dict[str, float]:
    """``"text_mlm:1,itc:2"`` (or ``"itc"``: weight 1) -> ``{"text_mlm": 1.0, "itc": 2.0}``, checked.

    Example:
        >>> parse_objectives("pair_mlm:1, itc:0.5,image_mim")
        {'pair_mlm': 1.0, 'itc': 0.5, 'image_mim': 1.0}
    """
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in OBJECTIVES:
            raise ValueError(f"--objectives: unknown objective {name!r} in {spec!r}; choose from {list(OBJECTIVES)}.")
        if name in weights:
            raise ValueError(f"--objectives: {name!r} is given twice in {spec!r}.")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"--objectives: the weight of {name!r} is not a number: {weight!r}.") from None
        if not value > 0:
            raise ValueError(f"--objectives: the weight of {name!r} must be positive, got {value}.")
        weights[name] = value
    if not weights:
        raise ValueError(f"--objectives {spec!r} names no objective; e.g. 'text_mlm:1,pair_mlm:1,image_mim:1,itc:1'.")
    return weights


class ObjectiveSchedule:
    """The objective of each step, drawn with probabilities proportional to the weights from ``(seed, step)`` only.

    Every process computes the same sequence, whatever the number of processes or data-loader workers, and a
    resumed run continues it.

    Example:
        >>> schedule = ObjectiveSchedule({"text_mlm": 1.0, "itc": 1.0}, seed=0)
        >>> [schedule(step) for step in range(4)] == [schedule(step) for step in range(4)]
        True
        >>> ObjectiveSchedule({"itc": 1.0})(12345)
        'itc'
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0) -> None:
        self.names = [name for name in OBJECTIVES if name in weights]
        total = sum(weights[name] for name in self.names)
        self.cumulative = np.cumsum([weights[name] / total for name in self.names])
        self.seed = seed

    def __call__(self, step: int) -> str:
        draw = np.random.default_rng([self.seed, 0x0B7EC7, step]).random()
        return self.names[min(int(np.searchsorted(self.cumulative, draw, side="right")), len(self.names) - 1)]


def word_starts(tokens: Sequence[str]) -> list[bool]:
    """Whether each token begins a word: sentencepiece pieces (`beit3.spm`, XLM-R) start one with ``▁``; WordPiece
    continues one with ``##`` (used when no token of the text has ``▁``).

    Example:
        >>> word_starts(["<s>", "▁a", "▁red", "dish", "</s>"]), word_starts(["[CLS]", "红", "##色", "[SEP]"])
        ([True, True, True, False, True], [True, True, False, True])
    """
    if any(token.startswith("▁") for token in tokens):
        return [token.startswith("▁") or not re.match(r"\w", token) for token in tokens]
    return [not token.startswith("##") for token in tokens]


def mask_tokens(
    input_ids: Sequence[int],
    *,
    special: Sequence[bool],
    probability: float,
    mask_token_id: int,
    vocab_size: int,
    rng: np.random.Generator,
    starts: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """BERT masking of one text: ``(masked ids, labels)``, labels -100 where nothing is predicted.

    Each non-special token (each word when ``starts`` marks word beginnings: whole-word masking) is chosen with
    ``probability``; a chosen token becomes ``<mask>`` with probability 0.8, a random id below ``vocab_size`` with
    0.1, and stays with 0.1. Everything is drawn from ``rng``, so a sample's masking is a function of its seed.

    Example:
        >>> ids, labels = mask_tokens([0, 5, 6, 7, 2], special=[True, False, False, False, True], probability=1.0,
        ...                           mask_token_id=9, vocab_size=10, rng=np.random.default_rng(0))
        >>> labels
        [-100, 5, 6, 7, -100]
    """
    ids = list(input_ids)
    labels = [-100] * len(ids)
    units: list[list[int]] = []  # tokens, or with `starts` words: a start token and the non-start tokens after it
    for i in range(len(ids)):
        if special[i]:
            continue
        if starts is None or starts[i] or not units or units[-1][-1] != i - 1:
            units.append([i])
        else:
            units[-1].append(i)
    chosen = rng.random(len(units)) < probability
    actions = rng.random(len(units))
    random_ids = rng.integers(0, vocab_size, len(units))
    for unit, pick, action, random_id in zip(units, chosen, actions, random_ids):
        if not pick:
            continue
        for i in unit:
            labels[i] = ids[i]
            if action < 0.8:
                ids[i] = mask_token_id
            elif action < 0.9:
                ids[i] = int(random_id)
    return ids, labels


def patch_pixels(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, num_patches, patch_size**2 * channels) pixels of each patch (MAE's `patchify`): row-major patch
    order and (row, column, channel) order inside a patch.

    Example:
        >>> patch_pixels(torch.arange(16.0).reshape(1, 1, 4, 4), 2)[0, 1]  # the top-right 2 x 2 patch
        tensor([2., 3., 6., 7.])
    """
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, -1)  # (batch, patches, p*p*c)


def normalized_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`patch_pixels` normalised to zero mean and unit variance per patch (MAE's `norm_pix_loss`).

    Example:
        >>> normalized_patches(torch.randn(2, 3, 32, 32), 16).shape
        torch.Size([2, 4, 768])
    """
    patches = patch_pixels(pixel_values, patch_size)
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()


#: The visual tokenizer model types and the tokenizer view each needs (`beit3_hf.data.pretraining.TwoViewTransform`).
TOKENIZER_VIEWS: dict[str, str] = {"beit2_vqkd": "vqkd", "dall_e_dvae": "dall-e"}


def load_visual_tokenizer(path: str, trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """A converted VQ-KD or DALL-E folder (`beit3-convert-visual-tokenizer`) and its `TwoViewTransform` view preset.

    Raises:
        ValueError: the folder holds another kind of model.
    """
    from transformers import AutoModel

    tokenizer = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    view = TOKENIZER_VIEWS.get(tokenizer.config.model_type)
    if view is None:
        raise ValueError(
            f"--visual_tokenizer {path} is a {tokenizer.config.model_type!r} model, not one of "
            f"{sorted(TOKENIZER_VIEWS)}."
        )
    return tokenizer, view


def visual_vocab_size(visual_tokenizer: nn.Module | None, config: Any) -> int:
    """The width of `mim_head` for these targets: the tokenizer's codebook, or a patch's pixels."""
    if visual_tokenizer is None:
        return config.patch_size**2 * config.num_channels
    tokenizer_config = visual_tokenizer.config  # VQ-KD names its codebook size `codebook_size`, the dVAE `vocab_size`
    return getattr(tokenizer_config, "codebook_size", None) or tokenizer_config.vocab_size


def mim_targets(
    visual_tokenizer: nn.Module | None,
    inputs: Mapping[str, torch.Tensor],
    patch_size: int,
    normalize_pixels: bool = True,
) -> torch.Tensor:
    """The MIM targets of a batch: the visual tokenizer's codes of the tokenizer view (`tokenizer_pixel_values`,
    computed under `no_grad`), or, without a tokenizer, the model view's patches, normalised per patch unless
    `normalize_pixels` is False."""
    if visual_tokenizer is None:
        patches = normalized_patches if normalize_pixels else patch_pixels
        return patches(inputs["pixel_values"], patch_size)
    pixels = inputs["tokenizer_pixel_values"]
    if next(visual_tokenizer.parameters()).device != pixels.device:
        visual_tokenizer.to(pixels.device)
    with torch.no_grad():
        return visual_tokenizer.get_codebook_indices(pixels)  # (batch, num_patches)


class PretrainingTrainer(Beit3Trainer):
    """`Beit3Trainer` for a mixture of objectives over `Beit3ForPreTraining` (or a PEFT model around one).

    Each batch carries an ``objective`` tensor (ids of `OBJECTIVES`, one value per batch) and that objective's
    inputs (see `beit3_hf.data.mixture.PretrainingCollator`). The loss of every objective is normalised by the
    number of targets of the global batch; the image-text contrastive loss uses the features of every process.
    Each objective's loss and accuracy (`{objective}_loss`, `{objective}_accuracy`: masked tokens / patches
    predicted, or images whose best text is their own) are logged with the training loss, averaged over the steps
    since the previous log and over processes; `reg_loss` is the self-regularisation term when it is on.

    Args:
        visual_tokenizer: a VQ-KD / dVAE model whose codes are the ``image_mim`` targets; None: normalised pixels.
        reg_loss_weight: weight of `self_regularization_loss` (LoRA's self-regularisation); 0: off.
        data_counters: callables returning counts to log (skipped images, skipped texts) with every training log.
    """

    def __init__(
        self,
        *args: Any,
        visual_tokenizer: nn.Module | None = None,
        reg_loss_weight: float = 0.0,
        data_counters: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.visual_tokenizer = visual_tokenizer.eval().requires_grad_(False) if visual_tokenizer else None
        self.reg_loss_weight = reg_loss_weight
        self.data_counters = dict(data_counters or {})
        # Per objective: [sum of losses, steps, correct predictions, predictions] since the last log, this process.
        self._stats = torch.zeros(len(OBJECTIVES) + 1, 4)

    def _global_share(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """This process's share of the global-batch mean: `loss * count / global count * processes`, so that the
        mean over processes (logged, and what DDP's gradient averaging differentiates) is the global-batch mean."""
        world = self.args.world_size
        if world == 1:
            return loss
        total = self.accelerator.reduce(count.to(loss.device, torch.float32), reduction="sum")
        return loss * count.to(loss.dtype) / total.clamp(min=1) * world

    # ---- the step --------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("objective")  # a device tensor by now: reading it would stall the host on every step
        objective = batch_objective(inputs)
        config = self.accelerator.unwrap_model(model).config
        if objective == "itc":
            outputs = model(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                image_text_contrastive=True,
            )
            logits_per_image, logits_per_text, targets = global_contrastive_logits(
                outputs.image_embeds, outputs.text_embeds, outputs.logit_scale
            )  # as global_contrastive_loss, whose gathered texts also give the accuracy
            loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
            correct = (logits_per_image.argmax(-1) == targets).sum()
            count = torch.full((), len(targets), device=targets.device)  # made on the device: no host copy
        elif objective == "image_mim":
            labels = mim_targets(self.visual_tokenizer, inputs, config.patch_size)
            masked = inputs["bool_masked_pos"]
            outputs = model(pixel_values=inputs["pixel_values"], bool_masked_pos=masked, mim_labels=labels)
            count = masked.sum()
            loss = self._global_share(outputs.mim_loss, count)
            correct = torch.zeros_like(count)  # pixel targets (floating point) have no accuracy
            if not labels.is_floating_point():
                correct = ((outputs.mim_logits.argmax(-1) == labels) & masked).sum()  # a mask, not an index: no sync
        else:  # text_mlm, pair_mlm
            labels = inputs["mlm_labels"]
            outputs = model(
                pixel_values=inputs.get("pixel_values"),
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                mlm_labels=labels,
            )
            valid = labels != -100
            count = valid.sum()
            loss = self._global_share(outputs.mlm_loss, count)
            correct = ((outputs.mlm_logits.argmax(-1) == labels) & valid).sum()  # a mask, not an index: no sync
        self._record(OBJECTIVES.index(objective), loss, correct, count)
        if self.reg_loss_weight:
            reg = self_regularization_loss(model)
            self._record(-1, reg, torch.zeros((), device=reg.device), torch.zeros((), device=reg.device))
            loss = loss + self.reg_loss_weight * reg
        return (loss, outputs) if return_outputs else loss

    def _record(self, row: int, loss: torch.Tensor, correct: torch.Tensor, count: torch.Tensor) -> None:
        """Add a step to the statistics, on the loss's device: no host sync until the next log."""
        if self._stats.device != loss.device:
            self._stats = self._stats.to(loss.device)
        one = torch.ones((), device=loss.device)
        self._stats[row] += torch.stack([value.to(self._stats) for value in (loss.detach(), one, correct, count)])

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # the training log, on every process at the same step: reduce the statistics
            stats = self._stats.to(self.args.device)
            if self.args.world_size > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            stats = stats.cpu()
            for index, name in enumerate(OBJECTIVES):
                loss_sum, steps, correct, count = stats[index].tolist()
                if steps:
                    logs[f"{name}_loss"] = round(loss_sum / steps, 6)
                    if count and not (name == "image_mim" and self.visual_tokenizer is None):
                        logs[f"{name}_accuracy"] = round(correct / count, 4)
            if stats[-1, 1]:
                logs["reg_loss"] = float(stats[-1, 0] / stats[-1, 1])
            for name, counter in self.data_counters.items():
                logs[name] = int(counter())
            self._stats.zero_()
        super().log(logs, *args, **kwargs)
