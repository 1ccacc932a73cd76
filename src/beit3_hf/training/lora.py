"""LoRA continual pretraining of BEiT-3 through PEFT: expert-aware targets, self-regularisation, merging.

BEiT-3's multiway layers keep one `nn.Linear` per expert (`...self_attn.q_proj.text`, `...ffn.vision.fc1`), so PEFT
can adapt one modality alone: LoRA on the text experts changes nothing the vision tokens pass through, and the
vision-only outputs stay bit-identical to the starting checkpoint.

The self-regularisation term is the one of the ContinualTransformer recipe: the sum over every LoRA layer of
`||W * (B @ A)||_F^2`, with `W` the frozen base weight, `*` the element-wise product and `B @ A` the unscaled LoRA
update. It does not depend on the input, so it is computed once per optimisation step.

Library code (the `train` extra), never shipped in a checkpoint folder. Command line::

    beit3-merge-lora ADAPTER_DIR --output MERGED_DIR
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LORA_TARGETS",
    "add_lora",
    "lora_target_regex",
    "merge_lora_folder",
    "self_regularization_loss",
]

_PROJECTIONS = r"(?:self_attn\.(?:q|k|v|out)_proj\.{expert}|ffn\.{expert}\.fc[12])"
#: The `--lora_target` shortcuts: every projection (attention q/k/v/out and both feed-forward layers) of the text
#: experts, of the vision experts, or of both. Any other value is used as a regular expression over module names.
LORA_TARGETS: dict[str, str] = {
    "text": r".*\.layers\.\d+\." + _PROJECTIONS.format(expert="text"),
    "vision": r".*\.layers\.\d+\." + _PROJECTIONS.format(expert="vision"),
    "all": r".*\.layers\.\d+\." + _PROJECTIONS.format(expert="(?:vision|text)"),
}
# The files of a model folder besides its weights, carried over to a merged folder (processor, tokenizer, code).
_CARRIED_SUFFIXES = {".py", ".json", ".model", ".spm", ".txt", ".md"}


def lora_target_regex(target: str) -> str:
    """The PEFT `target_modules` regex for a `--lora_target` value (a shortcut of `LORA_TARGETS` or a regex)."""
    regex = LORA_TARGETS.get(target, target)
    try:
        re.compile(regex)
    except re.error as error:
        raise ValueError(
            f"--lora_target {target!r} is neither one of {sorted(LORA_TARGETS)} nor a regex: {error}"
        ) from None
    return regex


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target: str = "text",
    modules_to_save: Sequence[str] | None = None,
):
    """Wrap `model` in a PEFT model with LoRA adapters on the modules `target` selects; everything else is frozen
    (except `modules_to_save`, e.g. new text embeddings for a new tokenizer).

    Raises:
        ValueError: the target matches no `nn.Linear` of the model.

    Example:

    ```python
    >>> from beit3_hf import Beit3Config, Beit3Model
    >>> from beit3_hf.training.lora import add_lora
    >>> config = Beit3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                      image_size=32, patch_size=16, vocab_size=50)
    >>> peft_model = add_lora(Beit3Model(config), rank=4, alpha=4, target="text")
    >>> sorted(peft_model.targeted_module_names)[:2]
    ['encoder.layers.0.ffn.text.fc1', 'encoder.layers.0.ffn.text.fc2']

    ```
    """
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ValueError(f"--lora_rank must be positive, got {rank}.")
    regex = lora_target_regex(target)
    matched = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and re.fullmatch(regex, name)
    ]
    if not matched:
        raise ValueError(f"--lora_target {target!r} ({regex}) matches no linear layer of {type(model).__name__}.")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=regex,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(model, config)


def self_regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the LoRA layers of `||W * (B @ A)||_F^2` (float32), `W` the frozen base weight; 0 without LoRA."""
    from peft.tuners.lora import LoraLayer

    total = torch.zeros((), device=next(model.parameters()).device)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                update = module.lora_B[adapter].weight @ module.lora_A[adapter].weight  # (out, in), unscaled
                total = total + (weight.float() * update.float()).pow(2).sum()
    return total


def merge_lora_folder(adapter_dir: str | Path, output: str | Path, base_model: str | Path | None = None) -> Path:
    """Merge the LoRA adapter saved in `adapter_dir` into its base model and save a plain BEiT-3 folder at `output`.

    The base model is `base_model`, or the `base_model_name_or_path` the adapter records. The merged folder holds no
    `lora_` key, loads with `AutoModel.from_pretrained(output, trust_remote_code=True)` like any converted
    checkpoint, and carries the base folder's processor and tokenizer files.
    """
    from peft import PeftModel
    from transformers import AutoModel

    adapter_dir, output = Path(adapter_dir), Path(output)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: it is not a PEFT adapter folder.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not an empty folder.")
    base = Path(base_model or json.loads(config_file.read_text())["base_model_name_or_path"] or "")
    if not base.is_dir():
        raise FileNotFoundError(
            f"The adapter's base model {str(base)!r} is not a local folder; pass --base-model FOLDER."
        )
    model = AutoModel.from_pretrained(base, trust_remote_code=True)
    PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(output)
    for path in base.iterdir():  # processor, tokenizer and model card of the base folder
        if path.is_file() and path.suffix in _CARRIED_SUFFIXES and not (output / path.name).exists():
            shutil.copy2(path, output / path.name)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """`beit3-merge-lora ADAPTER_DIR --output MERGED_DIR [--base-model FOLDER]`."""
    parser = argparse.ArgumentParser(prog="beit3-merge-lora", description=merge_lora_folder.__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--output", required=True, help="the merged model folder to write")
    parser.add_argument("--base-model", help="the base model folder (default: the one the adapter records)")
    args = parser.parse_args(argv)
    try:
        output = merge_lora_folder(args.adapter_dir, args.output, args.base_model)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Saved the merged model to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
