"""Throughput of BEiT-3 (ours) next to the original implementation (unilm/torchscale), in one process.

    python benchmarks/throughput.py                      # base size; bf16 + batch 256 on a GPU, fp32 + batch 8 on CPU
    python benchmarks/throughput.py --image-sizes 224 384 --compile --peak-tflops 989

Prints, for each image size, items/s of a vision-only forward, a text-only forward (64 tokens), a fused image+text
forward and one training step (forward, backward, AdamW) of the image classifier: ours and the original, eager and
(`--compile`) under `torch.compile`, the ratio ours / original, the model FLOPs utilisation (FLOPs counted by
`torch.utils.flop_counter` on our eager model, against `--peak-tflops`, the accelerator's dense bf16 peak) and the
peak memory of our eager run. Issue targets on one H100, batch 256, bf16, 224x224: image forward >= 4x the original
and >= 50% of the bf16 peak, image+text >= 3.5x, text >= 2.5x, training >= 2.7x. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from beit3_hf import Beit3Config, Beit3ForImageClassification
from beit3_hf.conversion import original
from beit3_hf.training.scripts import load_config

# Dense bf16 tensor-core peaks (TFLOP/s) of the accelerators this benchmark is meant for, by device name.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_inputs(config: Beit3Config, batch_size: int, text_len: int, device: torch.device):
    pixel_values = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)
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


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call (matrix products and attention, as `torch.utils.flop_counter` counts them)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def contenders(config: Beit3Config, device: torch.device, compile_too: bool) -> dict[str, tuple[str, torch.nn.Module]]:
    models = {"ours": ("ours", Beit3ForImageClassification(config).to(device))}
    if original.is_available():
        models["original"] = ("original", original.build_original_model("image-classification", config).to(device))
    if compile_too:
        for name, (kind, _) in list(models.items()):
            model = (
                Beit3ForImageClassification(config)
                if kind == "ours"
                else original.build_original_model("image-classification", config)
            ).to(device)
            model.beit3 = torch.compile(model.beit3)
            models[f"{name} compiled"] = (kind, model)
    return models


def benchmark(args: argparse.Namespace, image_size: int, device: torch.device, peak_tflops: float | None) -> None:
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if on_gpu else 8)
    iters = args.iters or (20 if on_gpu else 3)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()

    overrides = [f"image_size={image_size}", "use_final_layernorm=False", args.config_overrides]
    config = load_config(f"beit3-{args.size}-patch16-224", ",".join(filter(None, overrides)))
    config.num_labels = 1000
    inputs = make_inputs(config, batch_size, args.text_len, device)
    items_per_s: dict[str, dict[str, float]] = {}
    flops_per_item: dict[str, float] = {}
    peak_memory: dict[str, float] = {}
    models = contenders(config, device, args.compile)
    for name, (kind, model) in models.items():
        model.train()  # dropout and drop path are 0: train mode only matters for the training step
        for workload, step in workloads(model, kind, inputs, autocast).items():
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            items_per_s.setdefault(workload, {})[name] = batch_size / timed(step, device, args.warmup, iters)
            if name == "ours":
                if on_gpu:
                    peak_memory[workload] = torch.cuda.max_memory_allocated(device) / 2**30
                flops_per_item[workload] = counted_flops(step) / batch_size
        models[name] = (kind, None)
        del model
        if on_gpu:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if on_gpu else "fp32"
    print(f"\nBEiT-3 {args.size}, {image_size}x{image_size}, text {args.text_len} tokens, batch {batch_size}, "
          f"{precision}, {where}\n")  # fmt: skip
    names = list(models)
    ratios = [(f"{name} / {name.replace('ours', 'original')}", name) for name in names if name.startswith("ours")]
    ratios = [(label, name) for label, name in ratios if name.replace("ours", "original") in names]
    header = [*names, *(label for label, _ in ratios), "GFLOPs/item", "MFU (best ours)", "peak GiB (ours)"]
    print("| workload | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for workload, row in items_per_s.items():
        cells = [f"{row[name]:,.1f}" for name in names]
        cells += [f"{row[name] / row[name.replace('ours', 'original')]:.2f}x" for _, name in ratios]
        cells.append(f"{flops_per_item[workload] / 1e9:.3g}")
        best = max(value for name, value in row.items() if name.startswith("ours"))
        mfu = flops_per_item[workload] * best / (peak_tflops * 1e12) if peak_tflops else None
        cells.append("n/a" if mfu is None else f"{100 * mfu:.1f}%")
        cells.append(f"{peak_memory[workload]:.1f}" if workload in peak_memory else "n/a")
        print(f"| {workload} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("base", "large"), default="base")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time ours and the original under torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for the MFU column (default: by GPU name)")
    parser.add_argument("--config-overrides", help='config changes, e.g. "hidden_size=64,num_hidden_layers=2"')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    peak = args.peak_tflops
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        peak = peak or next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)
    for image_size in args.image_sizes:
        benchmark(args, image_size, device, peak)


if __name__ == "__main__":
    main()
