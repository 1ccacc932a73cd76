"""Eval image preprocessing throughput: Beit3ImageProcessor next to the original torchvision pipeline.

    python benchmarks/preprocessing.py                    # 256 JPEGs, 384x384 (vision-language eval transform)
    python benchmarks/preprocessing.py --num-images 512 --size 480 --repeats 5 --workers 8

Writes COCO-like JPEGs (sizes around 640x480 / 500x375, both orientations) into a temporary folder, then times

* the original: ``pil_loader`` (open + ``convert("RGB")``), ``Resize((S, S), interpolation=3)``, ``ToTensor``,
  ``Normalize(0.5, 0.5)`` image by image, then ``torch.stack`` -- what one ``DataLoader`` worker does;
* ``Beit3ImageProcessor`` on the whole list in one call, and the same in batches of 32 in ``DataLoader`` workers
  (``--workers``, default one per CPU), which is how to use several cores;

from files (decode included) and from already-decoded PIL images, and prints images/s. It also checks that they all
give the same ``pixel_values``. A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms
from torchvision.datasets.folder import pil_loader

from beit3_hf.models.beit3.image_processing_beit3 import Beit3ImageProcessor

COCO_LIKE_SIZES = [(640, 480), (640, 427), (500, 375), (480, 640), (427, 640), (500, 333), (612, 612), (640, 360)]


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (gradients, noise, shapes) of COCO-like sizes."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = COCO_LIKE_SIZES[index % len(COCO_LIKE_SIZES)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 6.28)
        pixels = np.stack(
            [128 + 100 * np.sin(x / 37 + phase), 255 * y / height, 128 + 90 * np.cos((x + y) / 53)], axis=-1
        )
        pixels += rng.normal(0, 8, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def run(processor: Beit3ImageProcessor, images: list[Any]) -> torch.Tensor:
    return processor(images, return_tensors="pt").pixel_values


def run_in_workers(processor: Beit3ImageProcessor, images: list[Any], workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(
        images, batch_size=32, num_workers=workers, collate_fn=partial(run, processor)
    )
    return torch.cat(list(loader))


def best_of(step: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest wall time of ``repeats`` runs (after one warm-up) and the last output."""
    output = step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = step()
        times.append(time.perf_counter() - start)
    return min(times), output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=256, help="batch size (number of JPEGs)")
    parser.add_argument("--size", type=int, default=384, help="output resolution S (S x S)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is reported")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (default: CPUs)")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.size < 1 or args.repeats < 1 or args.workers < 1:
        parser.error("--num-images, --size, --repeats and --workers must be positive")

    original = transforms.Compose(
        [
            transforms.Resize((args.size, args.size), interpolation=3),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    processor = Beit3ImageProcessor(task="vision-language", image_size=args.size)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.num_images)
        decoded = [pil_loader(path) for path in paths]
        workers = f"{args.workers} DataLoader workers"
        rows = [
            ("original torchvision, from JPEG files", lambda: torch.stack([original(pil_loader(p)) for p in paths])),
            ("Beit3ImageProcessor, files", partial(run, processor, paths)),
            (f"Beit3ImageProcessor, {workers}, files", partial(run_in_workers, processor, paths, args.workers)),
            ("original torchvision, decoded PIL", lambda: torch.stack([original(image) for image in decoded])),
            ("Beit3ImageProcessor, decoded PIL", partial(run, processor, decoded)),
        ]
        results = []
        for name, step in rows:
            seconds, output = best_of(step, args.repeats)
            results.append((name, seconds, output))

    reference = results[0][2]
    print(
        f"Eval preprocessing of {args.num_images} COCO-like JPEGs to {args.size}x{args.size} "
        f"(torch threads: {torch.get_num_threads()}, best of {args.repeats})"
    )
    print(f"{'pipeline':<48} {'images/s':>10} {'ms/image':>9} {'max |diff|':>11}")
    for name, seconds, output in results:
        diff = (output - reference).abs().max().item()
        print(f"{name:<48} {args.num_images / seconds:>10.1f} {1000 * seconds / args.num_images:>9.2f} {diff:>11.2e}")
    for name, seconds, _ in results:
        if name.startswith("Beit3ImageProcessor") and name.endswith("files"):
            print(f"speed-up of '{name}' over the original from files: {results[0][1] / seconds:.2f}x")


if __name__ == "__main__":
    main()
