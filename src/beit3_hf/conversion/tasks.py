"""The one task table of the converter: what each original checkpoint kind becomes, and how its keys map.

Every consumer reads this table: the converter (`checkpoint.py`: key mapping, task detection, labels), the processor
presets (`tokenizer.processor_for_task`), `--verify` and the oracle adapter (`original.py`), and the tests. Adding a
task is one `TaskSpec` row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.beit3.modeling_beit3 import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForPreTraining,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
    Beit3PreTrainedModel,
)

# The original position tables start with two rows that are never read: torchscale follows fairseq, whose positions
# start at 2. They are dropped here, once, so that our models index positions from 0.
FAIRSEQ_POSITION_OFFSET = 2


def _drop_fairseq_rows(table: torch.Tensor) -> torch.Tensor:
    return table[FAIRSEQ_POSITION_OFFSET:]


# Expert letters of torchscale's MultiwayNetwork: A is the vision expert, B the text expert.
_EXPERT = {"A": "vision", "B": "text"}
LAYER_PATTERN = r"beit3\.encoder\.layers\.(\d+)\."


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message says why."""


@dataclass(frozen=True)
class KeyRule:
    """One row of the mapping table: an original key pattern, our key template, and an optional tensor transform."""

    pattern: str
    target: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, key: str) -> str | None:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return None
        groups = {f"g{i}": _EXPERT.get(value, value) for i, value in enumerate(match.groups(), start=1)}
        return self.target.format(**groups)


#: Backbone keys, shared by every task. `{gN}` is the N-th group of the pattern, with A/B read as vision/text.
BACKBONE_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"beit3\.text_embed\.weight", "beit3.text_embeddings.token_embedding.weight"),
    KeyRule(r"beit3\.vision_embed\.proj\.(weight|bias)", "beit3.vision_embeddings.patch_embedding.{g1}"),
    KeyRule(r"beit3\.vision_embed\.(cls_token|mask_token)", "beit3.vision_embeddings.{g1}"),
    KeyRule(r"beit3\.encoder\.embed_positions\.(A|B)\.weight", "beit3.{g1}_embeddings.position_embedding.weight", _drop_fairseq_rows),
    KeyRule(LAYER_PATTERN + r"self_attn\.(q|k|v|out)_proj\.(A|B)\.(weight|bias)", "beit3.encoder.layers.{g1}.self_attn.{g2}_proj.{g3}.{g4}"),
    KeyRule(LAYER_PATTERN + r"self_attn\.inner_attn_ln\.(A|B)\.(weight|bias)", "beit3.encoder.layers.{g1}.self_attn.sub_layernorm.{g2}.{g3}"),
    KeyRule(LAYER_PATTERN + r"self_attn_layer_norm\.(A|B)\.(weight|bias)", "beit3.encoder.layers.{g1}.layernorm_before.{g2}.{g3}"),
    KeyRule(LAYER_PATTERN + r"final_layer_norm\.(A|B)\.(weight|bias)", "beit3.encoder.layers.{g1}.layernorm_after.{g2}.{g3}"),
    KeyRule(LAYER_PATTERN + r"ffn\.(A|B)\.(fc1|fc2)\.(weight|bias)", "beit3.encoder.layers.{g1}.ffn.{g2}.{g3}.{g4}"),
    KeyRule(LAYER_PATTERN + r"ffn\.(A|B)\.ffn_layernorm\.(weight|bias)", "beit3.encoder.layers.{g1}.ffn.{g2}.sub_layernorm.{g3}"),
    KeyRule(r"beit3\.encoder\.layer_norm\.(A|B)\.(weight|bias)", "beit3.encoder.layernorm.{g1}.{g2}"),
)  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """One converter task: an original checkpoint kind and what it becomes.

    Attributes:
        name: the `--task` name.
        model_class: our model class.
        head_rules: the key rules of its head (the backbone's `BACKBONE_RULES` apply to every task).
        signature_key: a head key whose presence identifies a checkpoint of this task (None: no head).
        num_labels_key: the head weight whose first dimension is the number of labels (None: no labels).
        image_processor: the eval image preprocessing preset: "vision-language" (bicubic squash, mean = std = 0.5)
            or "image-classification" (timm's resize + center crop, ImageNet mean / std).
        max_text_length: text length of the original fine-tuning recipe (`--num_max_bpe_tokens`).
        original_class: the class of unilm `beit3/modeling_finetune.py` (None: the torchscale backbone alone).
        dropped_keys: a regular expression of checkpoint keys that this task drops (and lists) instead of mapping.
        vision_only: the converted model has no text side (`Beit3Config.vision_only`); the checkpoint's text keys
            and mask token are dropped and listed.
    """

    name: str
    model_class: type[Beit3PreTrainedModel]
    head_rules: tuple[KeyRule, ...]
    signature_key: str | None = None
    num_labels_key: str | None = None
    image_processor: str = "vision-language"
    max_text_length: int = 64
    original_class: str | None = None
    dropped_keys: str | None = None
    vision_only: bool = False


# Keys that pretrained (not fine-tuned) checkpoints carry besides the backbone: the pretraining heads and, in the
# `*_itc_*` checkpoints, the contrastive heads. `--task backbone` drops and lists them; any other key stays an error.
PRETRAINING_HEAD_KEYS = r"(mlm_head|mim_head|vision_head|language_head)\.(weight|bias)|logit_scale"
# The text side of a checkpoint (text embedding and positions, every text expert) and the masked-image-modelling
# mask token: what an image-only model does not have.
TEXT_SIDE_KEYS = r"beit3\.text_embed\.weight|beit3\.vision_embed\.mask_token|beit3\.encoder\..*\.B\..+"

_TASK_LIST = (
    TaskSpec("backbone", Beit3Model, (), dropped_keys=PRETRAINING_HEAD_KEYS),
    TaskSpec(
        "image-classification",
        Beit3ForImageClassification,
        (
            KeyRule(r"fc_norm\.(weight|bias)", "fc_norm.{g1}"),
            KeyRule(r"head\.(weight|bias)", "classifier.{g1}"),
        ),
        signature_key="fc_norm.weight",
        num_labels_key="head.weight",
        image_processor="image-classification",
        original_class="BEiT3ForImageClassification",
        dropped_keys=TEXT_SIDE_KEYS,
        vision_only=True,  # 87M / 305M parameters as the original README says, and plain DDP works
    ),
    TaskSpec(
        "retrieval",
        Beit3ForImageTextRetrieval,
        (
            KeyRule(r"logit_scale", "logit_scale"),
            KeyRule(r"vision_head\.weight", "vision_projection.weight"),
            KeyRule(r"language_head\.weight", "text_projection.weight"),
        ),
        signature_key="logit_scale",
        original_class="BEiT3ForRetrieval",
    ),
    TaskSpec(
        "vqa",
        Beit3ForVisualQuestionAnswering,
        (
            KeyRule(r"pooler\.norm\.(weight|bias)", "pooler.layernorm.{g1}"),
            KeyRule(r"pooler\.dense\.(weight|bias)", "pooler.dense.{g1}"),
            KeyRule(r"head\.0\.(weight|bias)", "classifier.dense.{g1}"),  # head = Linear, LayerNorm, GELU, Linear
            KeyRule(r"head\.1\.(weight|bias)", "classifier.layernorm.{g1}"),
            KeyRule(r"head\.3\.(weight|bias)", "classifier.out_proj.{g1}"),
        ),
        signature_key="pooler.dense.weight",
        num_labels_key="head.3.weight",
        original_class="BEiT3ForVisualQuestionAnswering",
    ),
    TaskSpec(
        "nlvr2",
        Beit3ForVisualReasoning,
        (
            KeyRule(r"head\.norm1\.(weight|bias)", "classifier.input_layernorm.{g1}"),
            KeyRule(r"head\.dense1\.(weight|bias)", "classifier.dense.{g1}"),
            KeyRule(r"head\.norm2\.(weight|bias)", "classifier.layernorm.{g1}"),
            KeyRule(r"head\.dense2\.(weight|bias)", "classifier.out_proj.{g1}"),
        ),
        signature_key="head.dense1.weight",
        num_labels_key="head.dense2.weight",
        original_class="BEiT3ForVisualReasoning",
    ),
    # The released pretrained checkpoints (`beit3_{base,large}_patch16_224.pth`) carry the two pretraining heads;
    # listed before captioning, whose signature `mlm_head` they share.
    TaskSpec(
        "pretraining",
        Beit3ForPreTraining,
        (
            KeyRule(r"mlm_head\.(weight|bias)", "mlm_head.{g1}"),
            KeyRule(r"mim_head\.(weight|bias)", "mim_head.{g1}"),
        ),
        signature_key="mim_head.weight",
    ),
    TaskSpec(
        "captioning",
        Beit3ForCaptioning,
        (KeyRule(r"mlm_head\.(weight|bias)", "lm_head.{g1}"),),
        signature_key="mlm_head.weight",
        max_text_length=32,  # the original captioning recipe's `--num_max_bpe_tokens 32`
        original_class="BEiT3ForCaptioning",
    ),
)
#: `--task` name -> its spec, in the order above.
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _TASK_LIST}


def get_task(name: str) -> TaskSpec:
    """The spec of `--task name`; a clear error for an unknown name."""
    if name not in TASKS:
        raise ConversionError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]
