"""Time a Flickr30k-sized image-text retrieval evaluation: ours next to the original's scheme, in one process.

    python benchmarks/retrieval_eval.py                    # base, 1,000 images at 384x384, 5 captions each
    python benchmarks/retrieval_eval.py --num-images 64 --config-overrides "hidden_size=64,num_hidden_layers=2"

Ours (`beit3_hf.evaluation.evaluate_retrieval`) decodes and encodes every image once and every caption once, in
batches. The original walks the evaluation set as (image, caption) pairs, so it decodes and encodes each image once
per caption (5 times on Flickr30k / COCO); that scheme is timed with the original model (when `beit3-gml` is
installed) and with ours. Images are random JPEGs written beforehand (not timed), captions are tokenised by
`--sentencepiece` (the golden fixture's tiny model by default; the text length is what costs). bf16 autocast on a
GPU. Prints seconds and the speed-up over the original. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3_hf import Beit3ForImageTextRetrieval
from beit3_hf.conversion import original
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer, processor_for_task
from beit3_hf.data import RetrievalEvalIndex, RetrievalRecord, open_image
from beit3_hf.evaluation import evaluate_retrieval
from beit3_hf.training.scripts import load_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "man", "woman", "dog", "cat", "red", "blue", "small", "photo", "of", "on", "with", "the", "street"]


def write_images(folder: Path, num_images: int, size: int, captions_per_image: int) -> list[RetrievalRecord]:
    """Random JPEGs a little larger than `size` (the processor resizes them, as with real photos)."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(num_images):
        path = folder / f"{index:05d}.jpg"
        pixels = rng.integers(0, 256, (size * 5 // 4, size * 5 // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        captions = tuple(" ".join(rng.choice(WORDS, 12)) for _ in range(captions_per_image))
        records.append(RetrievalRecord(str(path), captions, index))
    return records


def timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def pairwise_scheme(model: torch.nn.Module, kind: str, processor, index: RetrievalEvalIndex, batch_size: int):
    """The original's evaluation loop: batches of (image, caption) pairs, both sides encoded for every pair."""
    device = next(model.parameters()).device
    pairs = [(index.image_paths[int(image)], caption) for caption, image in zip(index.captions, index.text_to_image)]
    for start in range(0, len(pairs), batch_size):
        paths, captions = zip(*pairs[start : start + batch_size])
        batch = processor(images=[open_image(path) for path in paths], text=list(captions), return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items()}
        if kind == "ours":
            model.get_image_features(batch["pixel_values"])
            model.get_text_features(batch["input_ids"], batch["attention_mask"])
        else:
            model(image=batch["pixel_values"], only_infer=True)
            model(text_description=batch["input_ids"], padding_mask=1 - batch["attention_mask"], only_infer=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("base", "large"), default="base")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sentencepiece", type=Path, default=ROOT / "tests" / "fixtures" / "golden" / "tokenizer.spm")
    parser.add_argument("--config-overrides", help='config changes, e.g. "hidden_size=64,num_hidden_layers=2"')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if on_gpu else 8)
    overrides = ",".join(filter(None, [f"image_size={args.image_size}", args.config_overrides]))
    config = load_config(f"beit3-{args.size}-patch16-224", overrides)
    processor = processor_for_task(
        load_sentencepiece_tokenizer(args.sentencepiece), task="retrieval", image_size=config.image_size
    )
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext

    ours = Beit3ForImageTextRetrieval(config).to(device).eval()
    runs: list[tuple[str, int, Callable[[RetrievalEvalIndex], object]]] = []
    with tempfile.TemporaryDirectory() as folder:
        records = write_images(Path(folder), args.num_images, config.image_size, args.captions_per_image)
        index = RetrievalEvalIndex.from_records(records)
        warmup = RetrievalEvalIndex.from_records(records[: max(1, batch_size // args.captions_per_image)])
        num_texts = len(index.captions)
        runs.append(("ours: each image once", index.num_images,
                     lambda index: evaluate_retrieval(ours, processor, index, batch_size=batch_size)))  # fmt: skip
        runs.append(("ours, the original's pairwise scheme", num_texts,
                     lambda index: pairwise_scheme(ours, "ours", processor, index, batch_size)))  # fmt: skip
        if original.is_available():
            theirs = original.build_original_model("retrieval", config).to(device).eval()
            runs.append(("original model and scheme", num_texts,
                         lambda index: pairwise_scheme(theirs, "original", processor, index, batch_size)))  # fmt: skip
        where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
        print(f"Retrieval evaluation, BEiT-3 {args.size}, {index.num_images} images at {config.image_size}x"
              f"{config.image_size}, {num_texts} captions, batch {batch_size}, {'bf16' if on_gpu else 'fp32'}, "
              f"{where}\n")  # fmt: skip
        seconds = {}
        for name, _, run in runs:
            with autocast():
                run(warmup)  # one batch: lazy initialisation, kernel selection
                seconds[name] = timed(functools.partial(run, index), device)
        reference = runs[-1][0]  # the original's scheme, with the original model when it is installed
        print(f"| evaluation | images encoded | captions encoded | seconds | speed-up over {reference} |")
        print("|---|---|---|---|---|")
        for name, images_encoded, _ in runs:
            print(f"| {name} | {images_encoded:,} | {num_texts:,} | {seconds[name]:.2f} | "
                  f"{seconds[reference] / seconds[name]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
