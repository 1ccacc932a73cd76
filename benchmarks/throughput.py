"""Throughput of BEiT-3 (ours) next to the original implementation (unilm/torchscale), in one process.

    python benchmarks/throughput.py                      # base size; bf16 + batch 256 on a GPU, fp32 + batch 8 on CPU
    python benchmarks/throughput.py --size large --batch-size 128 --compile

Prints items/s for a vision-only forward (224x224), a text-only forward (64 tokens), a fused image+text forward and
one training step (forward, backward, AdamW) of the image classifier. Issue targets on one H100, batch 256, bf16:
image forward >= 11,000 img/s, image+text >= 6,000 pairs/s, training >= 2,600 img/s. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from beit3_hf import Beit3Config, Beit3ForImageClassification
from beit3_hf.conversion import original


def make_inputs(config: Beit3Config, batch_size: int, text_len: int, device: torch.device, dtype: torch.dtype):
    pixel_values = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    input_ids = torch.randint(3, config.vocab_size, (batch_size, text_len), device=device)
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long, device=device)
    attention_mask[batch_size // 2 :, text_len // 2 :] = 0  # half the batch padded to half length
    labels = torch.randint(0, config.num_labels, (batch_size,), device=device)
    return pixel_values, input_ids, attention_mask, labels


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def workloads(model, kind: str, inputs, autocast) -> dict[str, Callable[[], None]]:
    """Forward passes and a training step, written against our API (`kind="ours"`) or the original's."""
    pixel_values, input_ids, attention_mask, labels = inputs
    padding_mask = 1 - attention_mask
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward(**kwargs):
        with torch.no_grad(), autocast():
            if kind == "ours":
                model.beit3(**kwargs)
            else:
                model.beit3(
                    visual_tokens=kwargs.get("pixel_values"),
                    textual_tokens=kwargs.get("input_ids"),
                    text_padding_position=None if "input_ids" not in kwargs else padding_mask,
                )

    def train_step():
        with autocast():
            logits = model(pixel_values=pixel_values).logits if kind == "ours" else model(image=pixel_values)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "image forward (img/s)": lambda: forward(pixel_values=pixel_values),
        "text forward (texts/s)": lambda: forward(input_ids=input_ids, attention_mask=attention_mask),
        "image+text forward (pairs/s)": lambda: forward(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask
        ),
        "train step, image classifier (img/s)": train_step,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("base", "large"), default="base")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if on_gpu else 8)
    iters = args.iters or (20 if on_gpu else 3)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()

    config = Beit3Config.from_preset(f"beit3-{args.size}-patch16-224", num_labels=1000, use_final_layernorm=False)
    inputs = make_inputs(config, batch_size, args.text_len, device, torch.float32)
    contenders = {"ours (sdpa)": ("ours", Beit3ForImageClassification(config).to(device))}
    if args.compile:
        compiled = Beit3ForImageClassification(config).to(device)
        compiled.beit3 = torch.compile(compiled.beit3)
        contenders["ours (sdpa, compiled)"] = ("ours", compiled)
    if original.is_available():
        contenders["original (torchscale)"] = (
            "original",
            original.build_original_model("image-classification", config).to(device),
        )

    results: dict[str, dict[str, float]] = {}
    for name, (kind, model) in contenders.items():
        model.train()  # dropout and drop path are 0: train mode only matters for the training step
        for workload, step in workloads(model, kind, inputs, autocast).items():
            results.setdefault(workload, {})[name] = batch_size / timed(step, device, args.warmup, iters)
        del model
        if on_gpu:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if on_gpu else "fp32"
    print(f"BEiT-3 {args.size}, 224x224, text {args.text_len} tokens, batch {batch_size}, {precision}, {where}\n")
    names = list(contenders)
    print("| workload | " + " | ".join(names) + (" | speedup |" if "original (torchscale)" in names else " |"))
    print("|---" * (len(names) + 1 + ("original (torchscale)" in names)) + "|")
    for workload, row in results.items():
        cells = [f"{row[name]:,.1f}" for name in names]
        if "original (torchscale)" in row:
            cells.append(f"{row['ours (sdpa)'] / row['original (torchscale)']:.2f}x")
        print(f"| {workload} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
