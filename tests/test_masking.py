"""BEiT block masking: statistics against the original generators, exact counts, aspect ratios, seeding.

The original's statistics are a golden fixture, `tests/fixtures/masking/beit_masking_stats.json`, written by
`scripts/make_masking_fixture.py --unilm PATH` from unilm's `beit/masking_generator.py` (v1) and
`beit2/masking_generator.py` (v2): 2,000 masks per configuration. The same statistics functions (imported from that
script) run here on 2,000 masks of `BlockMaskingGenerator` (seed 0, indices 0..1999), so the comparisons are
deterministic; the tolerances are about three standard errors of the difference of two 2,000-draw means.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import beit3_hf.training.masking
from beit3_hf.training.masking import BEIT_MASK_RATIO, BlockMaskingGenerator

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "masking" / "beit_masking_stats.json"
DRAWS = 2000


def _load_statistics_module():
    spec = importlib.util.spec_from_file_location("make_masking_fixture", ROOT / "scripts" / "make_masking_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stats = _load_statistics_module()


@pytest.fixture(scope="module")
def original() -> dict:
    return json.loads(FIXTURE.read_text())


# name in the fixture -> our generator with the same settings
OURS = {
    "v1_14x14": lambda: BlockMaskingGenerator(14, 75, min_num_patches=16, exact=False, seed=0),
    "v2_14x14": lambda: BlockMaskingGenerator(14, 75, min_num_patches=16, exact=True, seed=0),
    "v1_24x24": lambda: BlockMaskingGenerator.for_grid(24, seed=0),
}


@pytest.mark.parametrize("name", sorted(OURS))
def test_statistics_match_the_original(name, original):
    reference = original["configs"][name]
    generator = OURS[name]()
    kwargs = reference["kwargs"]
    assert (generator.height, generator.num_masking_patches, generator.min_num_patches) == (
        kwargs["input_size"],
        kwargs["num_masking_patches"],
        kwargs["min_num_patches"],
    )
    ours = stats.mask_statistics(generator(i) for i in range(DRAWS))

    # The mean masked count within 2 %, and the v1 shortfall (how often and how far it stops short) much tighter.
    assert ours["mean_count"] == pytest.approx(reference["mean_count"], rel=0.02)
    target = kwargs["num_masking_patches"]
    shortfall_se = max(reference["std_count"], 0.5) / math.sqrt(DRAWS) * math.sqrt(2)
    assert abs((target - ours["mean_count"]) - (target - reference["mean_count"])) < 4 * shortfall_se
    assert ours["max_count"] <= target
    if generator.exact:
        assert ours["min_count"] == ours["max_count"] == target
    # Blocks, not scattered patches: nearly every masked patch touches another one, as in the original.
    assert ours["mean_neighbour_fraction"] == pytest.approx(reference["mean_neighbour_fraction"], abs=0.002)
    assert ours["mean_components"] == pytest.approx(reference["mean_components"], abs=0.1)
    # Placement: blocks fit inside the grid, so the border is masked less often than the interior, by as much.
    assert ours["border_rate"] == pytest.approx(reference["border_rate"], abs=0.01)
    assert ours["interior_rate"] == pytest.approx(reference["interior_rate"], abs=0.01)


def test_single_block_size_and_aspect_match_the_original(original):
    reference = original["single_block"]
    kwargs = reference["kwargs"]
    generator = BlockMaskingGenerator(kwargs["input_size"], kwargs["num_masking_patches"], kwargs["min_num_patches"])

    def one_block(index: int) -> np.ndarray:
        rng = np.random.default_rng([0, index])
        mask = np.zeros(generator.shape, dtype=bool)
        while generator._add_block(mask, kwargs["num_masking_patches"], rng) == 0:
            pass
        return mask

    ours = stats.block_statistics(one_block(i) for i in range(DRAWS))
    assert ours["mean_area"] == pytest.approx(reference["mean_area"], abs=1.5)
    assert ours["mean_log_aspect"] == pytest.approx(reference["mean_log_aspect"], abs=0.07)
    assert ours["std_log_aspect"] == pytest.approx(reference["std_log_aspect"], abs=0.05)


def test_aspect_ratio_bounds_are_respected():
    # Tall blocks only: aspect (height / width) in [2, 4]; rounding to whole patches blurs single blocks a little.
    generator = BlockMaskingGenerator(40, 200, min_num_patches=100, min_aspect=2.0, max_aspect=4.0)
    ratios = []
    for index in range(500):
        mask = np.zeros(generator.shape, dtype=bool)
        assert generator._add_block(mask, 200, np.random.default_rng(index)) > 0
        rows, cols = np.nonzero(mask)
        ratios.append((rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1))
    log_ratios = np.log(ratios)
    assert (log_ratios > math.log(1.5)).all() and (log_ratios < math.log(5.5)).all()
    assert math.log(2.0) < log_ratios.mean() < math.log(4.0)
    assert log_ratios.mean() == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, abs=0.1)
    # The default range is symmetric: as many wide blocks as tall ones.
    default = BlockMaskingGenerator(14, 75)
    assert (default.min_aspect, default.max_aspect) == pytest.approx((0.3, 1 / 0.3))


@pytest.mark.parametrize(
    ("grid", "count", "min_patches"),
    [((14, 14), 75, 16), ((14, 14), 196, 16), ((7, 9), 30, 4), ((2, 2), 2, 1), ((1, 1), 1, 1), ((14, 14), 0, 16)],
)
def test_exact_mode_is_always_exact(grid, count, min_patches):
    generator = BlockMaskingGenerator(grid, count, min_num_patches=min_patches, exact=True, seed=3)
    counts = {int(generator(i).sum()) for i in range(300)}
    assert counts == {count}


def test_shape_dtype_and_grid_forms():
    mask = BlockMaskingGenerator()()
    assert mask.shape == (14, 14) and mask.dtype == np.bool_
    assert BlockMaskingGenerator(14).shape == (14, 14)
    rectangular = BlockMaskingGenerator((10, 12), 40, min_num_patches=8, exact=True, seed=0)
    assert rectangular(0).shape == (10, 12) and rectangular.num_patches == 120
    flat = torch.from_numpy(rectangular(0).reshape(-1))  # bool_masked_pos, row-major like the patch sequence
    assert flat.dtype == torch.bool and flat.shape == (120,) and int(flat.sum()) == 40


def test_for_grid_keeps_beit_proportions():
    beit = BlockMaskingGenerator.for_grid(14)
    assert (beit.num_masking_patches, beit.min_num_patches) == (75, 16)
    large = BlockMaskingGenerator.for_grid((24, 24))
    assert (large.num_masking_patches, large.min_num_patches) == (220, 47)
    assert large.num_masking_patches / large.num_patches == pytest.approx(BEIT_MASK_RATIO, abs=0.002)
    tiny = BlockMaskingGenerator.for_grid(2, mask_ratio=0.5, seed=0)
    assert (tiny.num_masking_patches, tiny.min_num_patches) == (2, 1)
    assert BlockMaskingGenerator.for_grid(14, mask_ratio=0.6, exact=True).num_masking_patches == 118


def test_seeds_are_reproducible_per_sample():
    generator = BlockMaskingGenerator(14, 75, 16, seed=7)
    again = BlockMaskingGenerator(14, 75, 16, seed=7)
    other_seed = BlockMaskingGenerator(14, 75, 16, seed=8)
    # The mask of a sample depends only on (seed, index): not on the call order nor on the generator object.
    forward = [generator(i) for i in range(20)]
    backward = [again(i) for i in reversed(range(20))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    assert sum(np.array_equal(forward[i], forward[i + 1]) for i in range(19)) == 0
    assert sum(np.array_equal(forward[i], other_seed(i)) for i in range(20)) == 0
    # A tuple index, e.g. (epoch, index), and an explicit generator.
    assert np.array_equal(generator((1, 5)), again((1, 5))) and not np.array_equal(generator((1, 5)), generator(5))
    assert np.array_equal(generator(rng=np.random.default_rng(1)), again(rng=np.random.default_rng(1)))
    # Without an index: one reproducible stream per seed, fresh entropy without a seed.
    assert np.array_equal(BlockMaskingGenerator(seed=3)(), BlockMaskingGenerator(seed=3)())
    unseeded = BlockMaskingGenerator()
    assert not all(np.array_equal(unseeded(), unseeded()) for _ in range(3))


def test_seeding_errors():
    with pytest.raises(ValueError, match="without a seed"):
        BlockMaskingGenerator()(0)
    with pytest.raises(ValueError, match="either index or rng"):
        BlockMaskingGenerator(seed=0)(0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-negative"):
        BlockMaskingGenerator(seed=0)(-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_size=14, num_masking_patches=197),
        dict(input_size=0),
        dict(min_num_patches=0),
        dict(min_aspect=0.0),
        dict(min_aspect=2.0, max_aspect=1.0),
        dict(seed=-1),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        BlockMaskingGenerator(**kwargs)


class _Masks(torch.utils.data.Dataset):
    def __init__(self, generator: BlockMaskingGenerator) -> None:
        self.generator = generator

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.generator().reshape(-1))  # no index: the per-process stream


@pytest.mark.parametrize("seed", [None, 5])
def test_data_loader_workers_do_not_repeat_each_other(seed):
    generator = BlockMaskingGenerator(14, 75, 16, seed=seed)
    generator()  # the parent's stream exists before the workers fork
    loader = torch.utils.data.DataLoader(_Masks(generator), batch_size=2, num_workers=2)
    first, second = list(loader)  # one batch per worker
    assert not torch.equal(first, second)


def test_docstring_examples():
    result = doctest.testmod(beit3_hf.training.masking, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
