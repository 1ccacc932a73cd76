"""Record the statistics of the original BEiT block-masking generators, for `tests/test_masking.py`.

```bash
python scripts/make_masking_fixture.py --unilm /path/to/unilm --output tests/fixtures/masking/beit_masking_stats.json
```

`--unilm` is a local checkout of https://github.com/microsoft/unilm; only `beit/masking_generator.py` (BEiT v1) and
`beit2/masking_generator.py` (BEiT v2, exact count) are imported from it, at generation time. BEiT v1's file uses
`np.int`, removed in numpy 1.24, so the script restores that alias (as the builtin `int`) before importing it.

For every configuration the script seeds Python's `random` and numpy's global generator (the originals draw from
both) once, makes `--draws` masks and records the statistics computed by :func:`mask_statistics`; for single blocks
it calls the original's `_mask` on an empty grid and records the block's size and aspect ratio
(:func:`block_statistics`). The test computes the same statistics on the project's `BlockMaskingGenerator` with the
same functions (it imports this file) and compares. Nothing of unilm is copied into this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

SEED = 0
DRAWS = 2000
#: (name, unilm file, constructor keyword arguments). 24x24 is a 384-pixel image with 16-pixel patches, with BEiT's
#: proportions kept (`BlockMaskingGenerator.for_grid(24)`: 220 of 576 patches, blocks of at least 47).
CONFIGS = [
    ("v1_14x14", "beit/masking_generator.py", dict(input_size=14, num_masking_patches=75, min_num_patches=16)),
    ("v2_14x14", "beit2/masking_generator.py", dict(input_size=14, num_masking_patches=75, min_num_patches=16)),
    ("v1_24x24", "beit/masking_generator.py", dict(input_size=24, num_masking_patches=220, min_num_patches=47)),
]
#: One block on an empty 14x14 grid with a budget of 75 (the first block of every BEiT mask).
BLOCK_CONFIG = dict(input_size=14, num_masking_patches=75, min_num_patches=16)


def mask_statistics(masks: Iterable[np.ndarray]) -> dict[str, float]:
    """Summary statistics of (grid_h, grid_w) masks (nonzero = masked).

    - ``mean_count``, ``std_count``, ``min_count``, ``max_count``: masked patches per mask;
    - ``mean_neighbour_fraction``: per mask, the fraction of masked patches with at least one masked 4-neighbour,
      averaged over masks (1.0 for solid blocks, about the masking ratio for independent patches);
    - ``mean_components``: 4-connected masked regions per mask;
    - ``border_rate`` / ``interior_rate``: the masked fraction of the outer ring of patches and of the rest.
    """
    stack = np.stack([np.asarray(mask).astype(bool) for mask in masks])  # (draws, grid_h, grid_w)
    counts = stack.sum(axis=(1, 2)).astype(np.float64)  # (draws,)
    padded = np.pad(stack, ((0, 0), (1, 1), (1, 1)))
    has_neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    neighbour_fractions = (stack & has_neighbour).sum(axis=(1, 2)) / np.maximum(counts, 1)
    ring = np.ones(stack.shape[1:], dtype=bool)
    ring[1:-1, 1:-1] = False
    return {
        "mean_count": float(counts.mean()),
        "std_count": float(counts.std()),
        "min_count": int(counts.min()),
        "max_count": int(counts.max()),
        "mean_neighbour_fraction": float(neighbour_fractions.mean()),
        "mean_components": float(_count_components(stack).mean()),
        "border_rate": float(stack[:, ring].mean()),
        "interior_rate": float(stack[:, ~ring].mean()),
    }


def block_statistics(blocks: Iterable[np.ndarray]) -> dict[str, float]:
    """Height, width, area and log(height / width) of single blocks, each given as a mask holding one rectangle."""
    heights, widths = [], []
    for block in blocks:
        rows, cols = np.nonzero(np.asarray(block))
        heights.append(int(rows.max() - rows.min() + 1))
        widths.append(int(cols.max() - cols.min() + 1))
    h, w = np.asarray(heights, dtype=np.float64), np.asarray(widths, dtype=np.float64)
    return {
        "mean_height": float(h.mean()),
        "mean_width": float(w.mean()),
        "mean_area": float((h * w).mean()),
        "mean_log_aspect": float(np.log(h / w).mean()),
        "std_log_aspect": float(np.log(h / w).std()),
    }


def _count_components(stack: np.ndarray) -> np.ndarray:
    """4-connected masked regions of each (grid_h, grid_w) mask of a stack: every masked cell takes the smallest cell
    number of its region (repeated min over neighbours, with pointer jumping, until nothing changes); regions = cells
    keeping their own number."""
    _, height, width = stack.shape
    own = np.broadcast_to(np.arange(height * width, dtype=np.int32).reshape(height, width), stack.shape)
    outside = height * width
    labels = np.where(stack, own, np.int32(outside))
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
        neighbours = np.minimum(labels, padded[:, :-2, 1:-1])
        for shifted in (padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
            np.minimum(neighbours, shifted, out=neighbours)
        updated = np.where(stack, neighbours, np.int32(outside)).reshape(len(stack), -1)
        # Pointer jumping: take the label of the cell one's label names (the extra column keeps `outside` fixed).
        extended = np.concatenate([updated, np.full((len(stack), 1), outside, dtype=np.int32)], axis=1)
        updated = np.take_along_axis(extended, updated, axis=1).reshape(stack.shape)
        if np.array_equal(updated, labels):
            return (stack & (labels == own)).sum(axis=(1, 2))
        labels = updated


def _import_file(path: Path, name: str) -> types.ModuleType:
    if not path.is_file():
        raise SystemExit(f"{path} not found: --unilm must be a checkout of microsoft/unilm")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seeded_draws(make: Callable[[], np.ndarray], draws: int) -> list[np.ndarray]:
    random.seed(SEED)
    np.random.seed(SEED)
    return [make() for _ in range(draws)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unilm", type=Path, required=True, help="a checkout of microsoft/unilm")
    parser.add_argument("--output", type=Path, default=Path("tests/fixtures/masking/beit_masking_stats.json"))
    parser.add_argument("--draws", type=int, default=DRAWS)
    args = parser.parse_args(argv)

    if not hasattr(np, "int"):
        np.int = int  # BEiT v1 builds its mask with dtype=np.int, an alias removed in numpy 1.24
    modules, sources = {}, {}
    for _, relative, _ in CONFIGS:
        if relative not in modules:
            path = args.unilm / relative
            modules[relative] = _import_file(path, f"unilm_{relative.split('/')[0]}_masking_generator")
            sources[relative] = hashlib.sha256(path.read_bytes()).hexdigest()

    configs = {}
    for name, relative, kwargs in CONFIGS:
        generator = modules[relative].MaskingGenerator(**kwargs)
        configs[name] = {
            "source": relative,
            "kwargs": kwargs,
            **mask_statistics(_seeded_draws(generator, args.draws)),
        }
        print(name, configs[name], file=sys.stderr)

    v1 = modules["beit/masking_generator.py"].MaskingGenerator(**BLOCK_CONFIG)
    height, width = v1.get_shape()

    def one_block() -> np.ndarray:
        mask = np.zeros((height, width), dtype=np.int64)
        while v1._mask(mask, BLOCK_CONFIG["num_masking_patches"]) == 0:  # 10 proposals may all fail; retry
            pass
        return mask

    block = {"source": "beit/masking_generator.py", "kwargs": BLOCK_CONFIG}
    block.update(block_statistics(_seeded_draws(one_block, args.draws)))
    print("single_block", block, file=sys.stderr)

    fixture = {
        "description": (
            "Statistics of the original unilm BEiT masking generators (see scripts/make_masking_fixture.py): "
            f"{args.draws} masks per configuration after random.seed({SEED}) and np.random.seed({SEED})."
        ),
        "seed": SEED,
        "draws": args.draws,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "sha256": sources,
        "configs": configs,
        "single_block": block,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(fixture, indent=2, sort_keys=False) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
