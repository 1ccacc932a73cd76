"""`make demo`: an original BEiT-3 checkpoint in, a Hugging Face folder out, loaded back through AutoModel.

1. Builds a small original (unilm/torchscale) retrieval model with random weights and saves it exactly as unilm
   saves its checkpoints (`{"model": state_dict}`, fp16).
2. Converts it with `python -m beit3_hf.convert --verify`, which also compares against the original code.
3. Loads the folder with `AutoModel.from_pretrained(folder, trust_remote_code=True)` in a fresh Python process in
   which `beit3_hf` cannot be imported, and prints what it computes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from . import convert, original
from .configuration_beit3 import Beit3Config

DEMO_CONFIG = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=16
)

_FRESH_PROCESS = textwrap.dedent(
    """
    import sys

    class HideBeit3Hf:  # the folder must be enough: make `import beit3_hf` fail in this process
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "beit3_hf":
                raise ImportError(name)

    sys.meta_path.insert(0, HideBeit3Hf())

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    print(f"AutoModel.from_pretrained(..., trust_remote_code=True) -> {type(model).__name__} "
          f"(code from {type(model).__module__.split('.')[0]})")
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=generator)
    input_ids = torch.tensor([[0, 41, 42, 43, 2], [0, 44, 45, 2, 1], [0, 46, 2, 1, 1]])
    attention_mask = (input_ids != model.config.pad_token_id).long()
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    print("image-text similarities (logits_per_image):")
    print(out.logits_per_image.round(decimals=3))
    print(f"contrastive loss: {out.loss.item():.4f}")
    """
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", type=Path)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    config = Beit3Config(**DEMO_CONFIG)
    reference = original.build_original_model("retrieval", config)
    checkpoint = args.output_dir / "beit3_demo_patch16_64_retrieval.pth"
    torch.save({"model": {k: v.half() for k, v in reference.state_dict().items()}}, checkpoint)
    print(f"[1/3] wrote an original-format checkpoint: {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB)")

    folder = args.output_dir / "beit3-demo-retrieval"
    print(f"[2/3] python -m beit3_hf.convert --checkpoint {checkpoint} --task retrieval --output {folder} --verify")
    status = convert.main(
        ["--checkpoint", str(checkpoint), "--task", "retrieval", "--output", str(folder), "--verify"]
    )
    if status != 0:
        return status
    print(f"      folder: {sorted(p.name for p in folder.iterdir())}")

    print("[3/3] loading the folder in a fresh Python without beit3_hf:")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(folder)], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
