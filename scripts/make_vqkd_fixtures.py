"""Generate the golden VQ-KD fixtures of `tests/test_visual_tokenizers.py` from the original unilm beit2 code.

```bash
python scripts/make_vqkd_fixtures.py --unilm /path/to/unilm --output tests/fixtures/vqkd
```

`--unilm` is a local checkout of https://github.com/microsoft/unilm (only its `beit2/` folder is used). The script
imports the original `modeling_vqkd.VQKD` from it (it needs `timm` and `einops`, for generation only), builds a tiny
VQ-KD with random weights (layer norms, biases and the codebook included), and writes:

- `vqkd_tiny_original.safetensors`: the original `VQKD.state_dict()`, keys exactly as in the released `.pth` files
  (encoder, decoder, task layers, codebook and its training statistics);
- `vqkd_tiny_expected.safetensors`: the input images in [0, 1] and the original's outputs for them: the codebook
  indices (`get_codebook_indices`), the encoder patch features, the task-layer output before quantisation and the
  distances the quantizer takes the argmin of;
- `fixture.json`: the architecture, the seed, the versions and the sha256 of the original files used.

The test converts the checkpoint with the project's converter and compares, with no unilm code at test time. Nothing
of unilm is copied into this repository.

The original `modeling_vqkd` also imports `utils` (needs tensorboardX and the removed `torch._six`) and
`vqkd_teacher` (CLIP/DINO teachers, needs ftfy and regex) at module level; the tokenizer path uses neither (the
teacher is disabled, as the original's own tokenizer loader does), so they are replaced by empty modules here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHITECTURE = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=4,
    mlp_ratio=4.0,
    n_code=16,
    code_dim=8,
    decoder_depth=1,
)
SEED = 1234
NUM_IMAGES = 4


def import_original(unilm: Path) -> types.ModuleType:
    beit2 = unilm / "beit2"
    if not (beit2 / "modeling_vqkd.py").is_file():
        raise SystemExit(f"{beit2}/modeling_vqkd.py not found: --unilm must be a checkout of microsoft/unilm")
    sys.modules.setdefault("utils", types.ModuleType("utils"))
    teacher = types.ModuleType("vqkd_teacher")
    teacher.clip, teacher.get_dino_vit_base = None, None
    sys.modules.setdefault("vqkd_teacher", teacher)
    sys.path.insert(0, str(beit2))
    import modeling_vqkd

    return modeling_vqkd


def build_model(modeling_vqkd: types.ModuleType) -> torch.nn.Module:
    a = ARCHITECTURE
    encoder_config = modeling_vqkd.get_model_default_params()
    encoder_config.update(
        img_size=a["img_size"],
        patch_size=a["patch_size"],
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
        mlp_ratio=a["mlp_ratio"],
        num_classes=0,
    )
    decoder_config = modeling_vqkd.get_model_default_params()
    decoder_config.update(
        img_size=a["img_size"] // a["patch_size"],
        patch_size=1,
        in_chans=a["code_dim"],
        embed_dim=a["embed_dim"],
        depth=a["decoder_depth"],
        num_heads=a["num_heads"],
        mlp_ratio=a["mlp_ratio"],
        num_classes=0,
    )
    # teacher_model_type="None" is what the original's tokenizer factories pass with as_tokenzer=True.
    return modeling_vqkd.VQKD(
        encoder_config,
        decoder_config,
        n_embed=a["n_code"],
        embed_dim=a["code_dim"],
        quantize_kmeans_init=False,
        teacher_model_type="None",
        decoder_out_dim=a["embed_dim"],
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial values everywhere: layer norms away from (1, 0), biases non-zero, a random unit codebook."""
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name == "quantize.embedding.weight":
            param.copy_(torch.nn.functional.normalize(noise, dim=-1))
        elif name.startswith("quantize."):
            continue  # training statistics, unused by the tokenizer; keep them as built
        elif name.endswith(("cls_token", "pos_embed")):
            param.copy_(0.5 * noise)
        elif param.ndim == 1 and "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        else:
            param.copy_(noise / math.sqrt(param[0].numel()))


def run_original(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original's outputs; the distances are captured at the quantizer's own `torch.argmin` call."""
    captured = {}
    argmin = torch.argmin

    def capturing_argmin(input, *args, **kwargs):
        captured.setdefault("distances", input.detach().clone())
        return argmin(input, *args, **kwargs)

    with torch.no_grad():
        data = model.pre_process(images)
        encoder_features = model.encoder(data, return_patch_tokens=True)
        task_features = model.encode_task_layer(encoder_features.type_as(model.encode_task_layer[-1].weight))
        torch.argmin = capturing_argmin
        try:
            ids = model.get_codebook_indices(images)
        finally:
            torch.argmin = argmin
    return {
        "codebook_indices": ids.contiguous(),
        "encoder_features": encoder_features.contiguous(),
        "projected_features": task_features.contiguous(),
        "distances": captured["distances"].contiguous(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unilm", required=True, type=Path, help="local checkout of microsoft/unilm")
    parser.add_argument("--output", required=True, type=Path, help="fixture folder, e.g. tests/fixtures/vqkd")
    args = parser.parse_args()

    modeling_vqkd = import_original(args.unilm)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = build_model(modeling_vqkd)
    randomize_(model, generator)
    model.eval()
    state_dict = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}

    images = torch.rand(NUM_IMAGES, 3, ARCHITECTURE["img_size"], ARCHITECTURE["img_size"], generator=generator)
    images[-1] = images[-1] * 0.1 + 0.45  # a low-contrast image next to the noisy ones
    expected = run_original(model, images)
    distances = expected["distances"]
    top2 = distances.topk(2, dim=1, largest=False).values
    margin = (top2[:, 1] - top2[:, 0]).min().item()
    if margin < 1e-4:
        raise SystemExit(f"the nearest codes are nearly tied (margin {margin:.2e}); choose another SEED")
    distinct = expected["codebook_indices"].unique().numel()

    args.output.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, args.output / "vqkd_tiny_original.safetensors")
    save_file({"pixel_values": images.contiguous(), **expected}, args.output / "vqkd_tiny_expected.safetensors")
    beit2 = args.unilm / "beit2"
    sources = ("modeling_vqkd.py", "norm_ema_quantizer.py", "modeling_finetune.py")
    metadata = {
        "description": "Tiny random-weight BEiT v2 VQ-KD (unilm beit2) and its outputs; see scripts/make_vqkd_fixtures.py",
        "architecture": ARCHITECTURE,
        "seed": SEED,
        "num_attention_heads": ARCHITECTURE["num_heads"],
        "input": "pixel_values in [0, 1], shape (4, 3, 32, 32)",
        "distinct_codes": distinct,
        "min_top2_distance_margin": margin,
        "torch": torch.__version__,
        "original_sha256": {name: hashlib.sha256((beit2 / name).read_bytes()).hexdigest() for name in sources},
    }
    (args.output / "fixture.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"wrote {args.output}: {len(state_dict)} original keys, {distinct} distinct codes, margin {margin:.2e}")


if __name__ == "__main__":
    main()
