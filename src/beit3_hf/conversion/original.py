"""Adapter around the original BEiT-3 implementation (unilm `beit3` on torchscale), used as the numerical oracle.

Needs the optional packages `beit3-gml`, `torchscale==0.3.0`, `fairscale==0.4.0` and `timm` (see the Makefile's
`ORACLE`). Used by the parity tests and by `python -m beit3_hf.convert --verify`; never imported by the model files.

The original takes `padding_mask` with 1 = pad, our models `attention_mask` with 1 = attend; `run_original`
converts at this one boundary.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn

from ..models.beit3.configuration_beit3 import Beit3Config
from .tasks import get_task


def is_available() -> bool:
    try:
        import_original()
    except ImportError:
        return False
    return True


def import_original() -> tuple[Any, Any]:
    """Return (`beit3.modeling_finetune`, `torchscale.architecture.config.EncoderConfig`); ImportError if absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths used by the original
        from beit3 import modeling_finetune
        from torchscale.architecture.config import EncoderConfig
    return modeling_finetune, EncoderConfig


def encoder_config(config: Beit3Config) -> Any:
    """The torchscale `EncoderConfig` of the original model with our config's architecture."""
    _, EncoderConfig = import_original()
    return EncoderConfig(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        vocab_size=config.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=config.use_final_layernorm,
        no_output_layer=True,
        drop_path_rate=0.0,
        encoder_embed_dim=config.hidden_size,
        encoder_attention_heads=config.num_attention_heads,
        encoder_ffn_embed_dim=config.intermediate_size,
        encoder_layers=config.num_hidden_layers,
        max_source_positions=config.max_position_embeddings + 2,  # + the two unused fairseq rows
        layernorm_eps=config.layer_norm_eps,
    )


class _OriginalBackbone(nn.Module):
    """The original backbone under the `beit3.` prefix its checkpoints use; given `visual_vocab_size`, with the two
    linear heads of the released pretrained checkpoints (`mlm_head`, `mim_head`, read from their state dicts: unilm
    released no pretraining code)."""

    def __init__(self, args: Any, visual_vocab_size: int | None = None) -> None:
        super().__init__()
        from torchscale.model.BEiT3 import BEiT3

        self.beit3 = BEiT3(args)
        if visual_vocab_size is not None:
            self.mlm_head = nn.Linear(args.encoder_embed_dim, args.vocab_size)
            self.mim_head = nn.Linear(args.encoder_embed_dim, visual_vocab_size)


def build_original_model(task: str, config: Beit3Config) -> nn.Module:
    """An original (unilm) model for `task` with the architecture of `config`, in eval mode."""
    spec = get_task(task)
    modeling_finetune, _ = import_original()
    args = encoder_config(config)
    if spec.original_class is None:  # backbone, pretraining
        return _OriginalBackbone(args, config.visual_vocab_size if task == "pretraining" else None).eval()
    model_class = getattr(modeling_finetune, spec.original_class)
    model = model_class(args, num_classes=config.num_labels) if spec.num_labels_key else model_class(args)
    return model.eval()


@torch.no_grad()
def run_original(
    model: nn.Module,
    task: str,
    pixel_values: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    bool_masked_pos: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run an original model with our input conventions; returns the outputs named as our models name them."""
    # ours: 1 = attend; original: 1 = pad
    padding_mask = None if attention_mask is None else (1 - attention_mask).long()
    if padding_mask is None and task in ("nlvr2", "captioning"):  # these two originals need a mask
        padding_mask = torch.zeros_like(input_ids)
    if task in ("backbone", "pretraining"):  # torchscale's masked-image input; the heads as pretraining used them
        hidden = model.beit3(
            textual_tokens=input_ids,
            visual_tokens=pixel_values,
            text_padding_position=padding_mask,
            vision_masked_position=bool_masked_pos,
        )["encoder_out"]
        if task == "backbone":
            return {"last_hidden_state": hidden}
        split = hidden.shape[1] if input_ids is None else hidden.shape[1] - input_ids.shape[1]
        outputs = {}
        if pixel_values is not None:
            outputs["mim_logits"] = model.mim_head(hidden[:, 1:split])  # patches, CLS excluded
        if input_ids is not None:
            outputs["mlm_logits"] = model.mlm_head(hidden[:, split:])
        return outputs
    if task == "image-classification":
        return {"logits": model(image=pixel_values)}
    if task == "retrieval":
        image_embeds, text_embeds = model(
            image=pixel_values, text_description=input_ids, padding_mask=padding_mask, only_infer=True
        )
        return {"image_embeds": image_embeds, "text_embeds": text_embeds}
    if task == "vqa":
        return {"logits": model(image=pixel_values, question=input_ids, padding_mask=padding_mask)}
    if task == "nlvr2":
        logits = model(
            image_a=pixel_values[:, 0],
            image_b=pixel_values[:, 1],
            text_description=input_ids,
            padding_mask=padding_mask,
        )
        return {"logits": logits}
    if task == "captioning":  # the training forward: causal text over the image, logits of every text position
        logits, _ = model(image=pixel_values, text_ids=input_ids, padding_mask=padding_mask, language_masked_pos=None)
        return {"logits": logits}
    raise ValueError(f"The oracle adapter does not run task {task!r}.")


def captioning_handler_class() -> type:
    """The original `CaptioningHandler` (unilm `beit3/engine_for_finetuning.py`), whose `eval_batch` is the
    reference beam search.

    That module cannot be imported as installed (it does `import utils` and `from datasets import ...` as a script
    would), so the class is compiled from its source with the names it uses bound to the original modules.
    """
    import ast
    import importlib.util
    from pathlib import Path

    import torch.nn.functional as F
    from beit3 import utils

    source = Path(importlib.util.find_spec("beit3.engine_for_finetuning").origin).read_text()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CaptioningHandler")
    namespace = {
        "torch": torch,
        "F": F,
        "utils": utils,
        "TaskHandler": object,
        "get_sentencepiece_model_for_beit3": None,
    }
    exec(compile(ast.Module(body=[node], type_ignores=[]), "beit3/engine_for_finetuning.py", "exec"), namespace)
    return namespace["CaptioningHandler"]


@torch.no_grad()
def original_beam_search(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    num_beams: int,
    max_length: int,
    length_penalty: float,
    vocab_size: int,
    bos_token_id: int = 0,
    pad_token_id: int = 1,
    eos_token_id: int = 2,
    mask_token_id: int,
) -> torch.Tensor:
    """Run the original `CaptioningHandler.eval_batch` and return the (batch, max_length) ids it decodes."""
    captured = {}

    def batch_decode(ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        captured["ids"] = ids.clone()  # eval_batch hands the decoded ids to the tokenizer: keep them
        return ["" for _ in ids]

    tokenizer = types.SimpleNamespace(
        cls_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        sep_token_id=eos_token_id,
        mask_token_id=mask_token_id,
        batch_decode=batch_decode,
    )
    handler_class = captioning_handler_class()
    handler = handler_class.__new__(handler_class)  # skip __init__: it loads a sentencepiece file
    handler.predictions, handler.tokenizer = [], tokenizer
    handler.num_beams, handler.max_len, handler.length_penalty = num_beams, max_length, length_penalty
    handler.vocab_size = vocab_size
    handler.eval_batch(model, pixel_values, image_id=torch.arange(pixel_values.shape[0]))
    return captured["ids"]
