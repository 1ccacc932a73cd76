"""Training pieces on top of `transformers.Trainer`: layer-decay parameter groups, losses, the trainer.

Library code (installed, never shipped in a checkpoint folder): the model files never import this package.
"""

from .masking import BEIT_MASK_RATIO, BlockMaskingGenerator
from .trainer import (
    Beit3Trainer,
    gather_with_grad,
    global_contrastive_loss,
    layer_decay_parameter_groups,
    load_config,
    parameter_layer_id,
)

__all__ = [
    "BEIT_MASK_RATIO",
    "Beit3Trainer",
    "BlockMaskingGenerator",
    "gather_with_grad",
    "global_contrastive_loss",
    "layer_decay_parameter_groups",
    "load_config",
    "parameter_layer_id",
]
