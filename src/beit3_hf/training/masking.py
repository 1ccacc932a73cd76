"""Block-wise masking for masked image modelling (BEiT v1's algorithm, with BEiT v2's exact-count option).

BEiT masks whole rectangles of patches rather than independent patches (Bao et al., 2021, section 2.5; unilm
``beit/masking_generator.py``). One mask is built by repeatedly proposing a rectangle and keeping it when it adds at
least one new patch without exceeding the remaining budget:

1. the block area is drawn uniformly between ``min_num_patches`` and the remaining budget (capped at
   ``max_num_patches``), its aspect ratio (height / width) log-uniformly in ``[min_aspect, max_aspect]``;
2. height and width are ``round(sqrt(area * aspect))`` and ``round(sqrt(area / aspect))``; a block must be strictly
   smaller than the grid on both sides;
3. its top-left corner is uniform over the positions where it fits;
4. it is accepted when it masks between 1 and ``budget`` patches that were not masked yet.

Up to 10 proposals are made per block; when all 10 fail, BEiT v1 stops, so a mask may hold *fewer* patches than
asked (74.5 on average instead of 75 at 14x14, measured on the original). With ``exact=True`` the shortfall is then
topped up with patches drawn uniformly among the unmasked ones, as in BEiT v2 (unilm ``beit2/masking_generator.py``),
so every mask holds exactly ``num_masking_patches``. No block can overshoot the budget, so nothing ever has to be
unmasked.

Randomness is per sample: :meth:`BlockMaskingGenerator.__call__` takes the sample's index (or any tuple of integers,
e.g. ``(epoch, index)``) and derives a fresh ``numpy.random.Generator`` from ``(seed, *index)``, so the mask of a
sample does not depend on which data-loader worker builds it or on what was drawn before: resuming the data order
reproduces the masks. A caller that manages its own randomness passes ``rng=`` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from torch.utils.data import get_worker_info

__all__ = ["BEIT_MASK_RATIO", "BlockMaskingGenerator"]

#: BEiT's masking ratio: 75 of the 14x14 = 196 patches of a 224-pixel image with 16-pixel patches (about 40 %).
BEIT_MASK_RATIO: float = 75 / 196
#: BEiT's smallest block, relative to the 14x14 grid: 16 of 196 patches.
_BEIT_MIN_BLOCK_RATIO = 16 / 196
#: Proposals per block before giving up (the original's constant).
_ATTEMPTS_PER_BLOCK = 10


def _as_grid(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = map(int, input_size)
    return height, width


class BlockMaskingGenerator:
    """BEiT block-wise mask generator: a (grid_h, grid_w) **numpy bool array, True = masked** per call.

    The result is a numpy array (cheap to build in data-loader workers, no torch tensor per sample); flatten it
    row-major into ``bool_masked_pos`` of shape (grid_h * grid_w,), the order of the model's patch sequence, e.g.
    ``torch.from_numpy(mask.reshape(-1))``.

    Args:
        input_size: the patch grid, ``(grid_h, grid_w)`` or one int for a square grid; for a 224-pixel image and
            16-pixel patches, 14.
        num_masking_patches: the target number of masked patches (BEiT: 75 of 196).
        min_num_patches: the smallest block, in patches (BEiT: 16).
        max_num_patches: the largest block; ``None`` means ``num_masking_patches``.
        min_aspect: the smallest block aspect ratio (height / width); ``max_aspect`` defaults to ``1 / min_aspect``.
        max_aspect: the largest block aspect ratio.
        exact: top up to exactly ``num_masking_patches`` with uniformly drawn patches (BEiT v2) instead of stopping
            short when no further block fits (BEiT v1).
        seed: the base seed of per-sample generators; needed to call the generator with an ``index``.

    Example:
        >>> generator = BlockMaskingGenerator(14, num_masking_patches=75, exact=True, seed=0)
        >>> mask = generator(3)  # the mask of sample 3: the same on every call, in every process
        >>> mask.shape, mask.dtype, int(mask.sum())
        ((14, 14), dtype('bool'), 75)
        >>> bool((generator(3) == mask).all()), bool((generator(4) == mask).all())
        (True, False)
        >>> BlockMaskingGenerator.for_grid(24).num_masking_patches  # 384-pixel images: the same ratio, 220 of 576
        220
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = False,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = _as_grid(input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input_size must be positive, got {input_size!r}")
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a {self.height}x{self.width} grid, "
                f"got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.exact = exact
        self.seed = seed
        self._stream: np.random.Generator | None = None
        self._stream_pid: int | None = None

    @classmethod
    def for_grid(
        cls,
        grid: int | Sequence[int],
        mask_ratio: float = BEIT_MASK_RATIO,
        min_num_patches: int | None = None,
        **kwargs,
    ) -> BlockMaskingGenerator:
        """A generator for another grid that keeps BEiT's proportions (75/196 masked, blocks of >= 16/196).

        ``num_masking_patches = round(mask_ratio * grid_h * grid_w)``; ``min_num_patches`` defaults to
        ``max(1, round(16 / 196 * grid_h * grid_w))``. Other keyword arguments go to the constructor.

        Example:
            >>> g = BlockMaskingGenerator.for_grid((2, 2), mask_ratio=0.5, exact=True, seed=0)
            >>> g.num_masking_patches, g.min_num_patches, int(g(0).sum())
            (2, 1, 2)
        """
        height, width = _as_grid(grid)
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        num_patches = height * width
        if min_num_patches is None:
            min_num_patches = max(1, round(_BEIT_MIN_BLOCK_RATIO * num_patches))
        return cls((height, width), round(mask_ratio * num_patches), min_num_patches=min_num_patches, **kwargs)

    @property
    def num_patches(self) -> int:
        """grid_h * grid_w."""
        return self.height * self.width

    @property
    def shape(self) -> tuple[int, int]:
        """(grid_h, grid_w), the shape of every mask."""
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect:.4g}, "
            f"max_aspect={self.max_aspect:.4g}, exact={self.exact}, seed={self.seed})"
        )

    def rng_for(self, index: int | Sequence[int]) -> np.random.Generator:
        """The generator of sample ``index``: a ``numpy.random.Generator`` seeded from ``(seed, *index)``."""
        if self.seed is None:
            raise ValueError(
                f"{type(self).__name__} was built without a seed, so a per-sample mask cannot be reproduced; "
                "pass seed=... to the constructor, or call without an index for fresh randomness"
            )
        key = [index] if isinstance(index, (int, np.integer)) else list(index)
        if any(int(k) < 0 for k in key):
            raise ValueError(f"index must be made of non-negative integers, got {index!r}")
        return np.random.default_rng([self.seed, *(int(k) for k in key)])

    def _default_stream(self) -> np.random.Generator:
        # One stream per process: a forked data-loader worker must not replay its parent's (or a sibling's) draws.
        pid = os.getpid()
        if self._stream is None or self._stream_pid != pid:
            if self.seed is None:
                self._stream = np.random.default_rng()
            else:
                info = get_worker_info()  # the data-loader worker's, None in the main process
                self._stream = np.random.default_rng([self.seed] if info is None else [self.seed, 1 << 32, info.id])
            self._stream_pid = pid
        return self._stream

    def __call__(
        self, index: int | Sequence[int] | None = None, *, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """One mask, (grid_h, grid_w) bool, True = masked.

        Args:
            index: the sample's index (or a tuple of integers such as ``(epoch, index)``); the mask then depends
                only on ``(seed, *index)``.
            rng: a generator to draw from instead (exclusive with ``index``).

        Without either, masks come from one stream per process, seeded from ``seed`` (and the data-loader worker
        id) or from fresh OS entropy when ``seed`` is ``None``.
        """
        if index is not None and rng is not None:
            raise ValueError("pass either index or rng, not both")
        if rng is None:
            rng = self.rng_for(index) if index is not None else self._default_stream()
        mask = np.zeros(self.shape, dtype=bool)  # (grid_h, grid_w)
        count = 0
        while count < self.num_masking_patches:
            added = self._add_block(mask, min(self.num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if self.exact and count < self.num_masking_patches:
            free = np.flatnonzero(~mask)
            chosen = rng.choice(free.size, size=self.num_masking_patches - count, replace=False)
            mask.reshape(-1)[free[chosen]] = True
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one rectangle adding 1..budget new patches; the number added, 0 after 10 failed proposals."""
        low, high = sorted((self.min_num_patches, budget))
        log_low, log_high = self._log_aspect
        for _ in range(_ATTEMPTS_PER_BLOCK):
            # One call per proposal (scalar draws dominate the cost): area, log aspect, top and left from U[0, 1).
            u_area, u_aspect, u_top, u_left = rng.random(4).tolist()
            area = low + (high - low) * u_area
            aspect = math.exp(log_low + (log_high - log_low) * u_aspect)
            block_h = round(math.sqrt(area * aspect))
            block_w = round(math.sqrt(area / aspect))
            if block_h >= self.height or block_w >= self.width:
                continue
            top = int(u_top * (self.height - block_h + 1))  # uniform over the height - block_h + 1 positions
            left = int(u_left * (self.width - block_w + 1))
            block = mask[top : top + block_h, left : left + block_w]  # a view: assigning to it masks the grid
            added = block_h * block_w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0
