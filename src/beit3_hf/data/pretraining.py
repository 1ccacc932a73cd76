"""Masked-image-modelling data: BEiT's two views of one crop, block masks, image folders and webdataset shards.

BEiT pretraining (unilm ``beit/datasets.py`` and ``beit2/datasets.py``, ``DataAugmentationForBEiT``) shows the model
one view of an image and a visual tokenizer another view *of the same crop*, and masks blocks of patches:

1. colour jitter (brightness, contrast, saturation 0.4, in random order) of the whole image, a horizontal flip with
   probability 0.5, and one random resized crop box (scale 0.08-1, aspect 3/4-4/3), shared by both views;
2. the model view (``pixel_values``): the box resized to the model's image size, bicubic, normalised with the
   model's mean/std (BEiT-3: 0.5/0.5, the default here);
3. the tokenizer view (``tokenizer_pixel_values``): the same box resized for the visual tokenizer, in **[0, 1]**
   (``ToTensor()`` output). Presets (``visual_tokenizer=``):

   - ``"vqkd"`` (BEiT v2 VQ-KD, the default): the model's image size, bicubic, [0, 1]; the released VQ-KD rescales
     [0, 1] to [-1, 1] itself (unilm ``beit2/modeling_vqkd.py`` ``VQKD.pre_process``, ``process_type='default'``:
     ``x * 255 / 127.5 - 1``), and BEiT v2 feeds it plain ``ToTensor()`` output (``beit2/datasets.py``), as does
     :class:`beit3_hf.models.vqkd.VqkdModel`, which refuses inputs above 1;
   - ``"dall-e"`` (BEiT v1 dVAE): half the image size (112 for 224), Lanczos, [0, 1]; the dVAE applies DALL-E's
     ``map_pixels`` ([0, 1] -> [0.1, 0.9]) itself (:mod:`beit3_hf.models.dall_e`), so it is *not* applied here.

   ``tokenizer_mean``/``tokenizer_std`` normalise the tokenizer view for a tokenizer that wants it;
4. ``bool_masked_pos``: a (grid_h * grid_w,) bool block mask, True = masked, flattened row-major from
   :class:`beit3_hf.training.masking.BlockMaskingGenerator` (BEiT: 75 of 14x14).

Randomness is per sample: with a ``seed``, the crop, flip, jitter and mask of a sample depend only on
``(seed, epoch, key)``, where the key is the sample's index (image folders) or its shard and ``__key__`` (webdataset),
so the views do not depend on data-loader workers or on the order samples are read in.

Sources: :class:`PretrainingImageFolder` (an image folder through Hugging Face ``datasets``' ``imagefolder`` builder,
labels ignored; map-style) and :class:`PretrainingWebDataset` (``img2dataset``-style tar shards streamed with the
``webdataset`` package; iterable). :meth:`TwoViewTransform.apply_to_batch` plugs the transform into any ``datasets``
dataset with ``with_transform``. Images that cannot be decoded are skipped, counted in a :class:`DecodeFailures`
shared with the data-loader workers, and the first few are logged with their names.
:class:`MaskedImageModelingCollator` stacks a batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..training.masking import BlockMaskingGenerator
from .loaders import decode_image, list_image_files

__all__ = [
    "BEIT3_IMAGE_MEAN",
    "BEIT3_IMAGE_STD",
    "VISUAL_TOKENIZER_VIEWS",
    "WEBDATASET_IMAGE_EXTENSIONS",
    "CropParams",
    "DecodeFailures",
    "MaskedImageModelingCollator",
    "PretrainingImageFolder",
    "PretrainingWebDataset",
    "TwoViewTransform",
    "decode_image",
    "sample_crop_params",
]

logger = logging.getLogger(__name__)

#: BEiT-3's image normalisation (``Beit3Processor``; timm's IMAGENET_INCEPTION_MEAN/STD, BEiT v1's default).
BEIT3_IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
BEIT3_IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: The tokenizer view of each visual tokenizer: its size relative to the model view and its interpolation.
VISUAL_TOKENIZER_VIEWS: dict[str, dict[str, Any]] = {
    "vqkd": {"size_factor": 1.0, "interpolation": "bicubic"},
    "dall-e": {"size_factor": 0.5, "interpolation": "lanczos"},
}

#: File extensions (lower case, without the dot) read as images from webdataset samples, in order of preference.
WEBDATASET_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = (int(v) for v in size)
    return height, width


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; known: {[m.value for m in InterpolationMode]}") from None


# ----------------------------------------------------------------------------------------------------------------
# Decoding and the failure log
# ----------------------------------------------------------------------------------------------------------------


class DecodeFailures:
    """The number of images that could not be decoded, and the first few names, shared with data-loader workers.

    Workers record into shared memory, so the main process reads the total of all workers: log
    ``failures.count`` and ``failures.examples`` (``(name, error)`` pairs) now and then. The first
    ``max_examples`` failures are also logged as warnings (by the process that met them). The counter is shared with
    workers started by fork, spawn or forkserver; ``copy.deepcopy`` returns the same counter, while pickling it
    anywhere else (e.g. for a cache fingerprint) gives an independent, empty one.

    Example:
        >>> failures = DecodeFailures()
        >>> failures.record("000000007.jpg", OSError("image file is truncated"))
        >>> failures.count, failures.names
        (1, ['000000007.jpg'])
    """

    def __init__(
        self, max_examples: int = 10, max_chars: int = 300, what: str = "an image that cannot be decoded"
    ) -> None:
        self.max_examples = max_examples
        self.max_chars = max_chars
        self.what = what  # for the log: "skipping {what}: {name} ({error})"
        context = multiprocessing.get_context("spawn")  # spawn-context locks also work in forked workers
        self._count = context.Value("q", 0)
        self._text = context.Array("c", max(1, max_examples * max_chars), lock=False)  # guarded by _count's lock

    def __reduce__(self) -> tuple[Any, ...]:
        if get_spawning_popen() is not None:  # starting a worker: share the memory (the state holds it)
            return object.__new__, (type(self),), self.__dict__
        return DecodeFailures, (self.max_examples, self.max_chars, self.what)

    def __deepcopy__(self, memo: dict[int, Any]) -> DecodeFailures:
        return self

    def record(self, name: str, error: BaseException | str) -> None:
        """Count one failure; keep and log it if it is among the first ``max_examples``."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._count.get_lock():
            index = self._count.value
            self._count.value = index + 1
            if index < self.max_examples:
                entry = f"{name}\t{message}".encode("utf-8", "replace")[: self.max_chars - 1]
                start = index * self.max_chars
                self._text[start : start + self.max_chars] = entry.ljust(self.max_chars, b"\0")
        if index < self.max_examples:
            logger.warning("skipping %s: %s (%s)", self.what, name, message)
        elif index == self.max_examples:
            logger.warning("skipping more (%s); they are counted without a message each", self.what)

    def decode(self, source: Any, name: str) -> Image.Image | None:
        """:func:`decode_image` of ``source``, or None once the failure is recorded under ``name``."""
        try:
            return decode_image(source)
        except Exception as error:  # any corruption: PIL raises OSError, SyntaxError, ValueError, ...
            self.record(name, error)
            return None

    @property
    def count(self) -> int:
        """Failures so far, in this process and its data-loader workers."""
        return int(self._count.value)

    @property
    def examples(self) -> list[tuple[str, str]]:
        """``(name, error)`` of the first ``max_examples`` failures."""
        with self._count.get_lock():
            stored = min(self._count.value, self.max_examples)
            raw = [bytes(self._text[i * self.max_chars : (i + 1) * self.max_chars]) for i in range(stored)]
        entries = (entry.rstrip(b"\0").decode("utf-8", "ignore").partition("\t") for entry in raw)
        return [(name, message) for name, _, message in entries]

    @property
    def names(self) -> list[str]:
        """The names (file paths or webdataset keys) of the first ``max_examples`` failures."""
        return [name for name, _ in self.examples]

    def reset(self) -> None:
        """Forget every failure."""
        with self._count.get_lock():
            self._count.value = 0

    def __repr__(self) -> str:
        return f"DecodeFailures(count={self.count}, names={self.names})"


# ----------------------------------------------------------------------------------------------------------------
# The two-view transform
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropParams:
    """The random choices behind one sample's views: the crop box (pixels of the source image), the flip and the
    colour jitter (``(name, factor)`` in the order applied; empty without jitter)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    jitter: tuple[tuple[str, float], ...] = ()


def sample_crop_params(
    image_size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A random resized crop box ``(top, left, height, width)`` for an image of ``(height, width)`` pixels.

    The usual Inception-style sampling: up to 10 proposals with an area fraction uniform in ``scale`` and an aspect
    ratio (width / height) log-uniform in ``ratio``, the first that fits placed uniformly; otherwise the largest
    central box with the aspect ratio clamped to ``ratio``.

    Example:
        >>> sample_crop_params((100, 200), scale=(1.0, 1.0), ratio=(2.0, 2.0), rng=np.random.default_rng(0))
        (0, 0, 100, 200)
    """
    rng = np.random.default_rng() if rng is None else rng
    height, width = image_size
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio, u_top, u_left = rng.random(4).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(u_top * (height - crop_h + 1)), int(u_left * (width - crop_w + 1)), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, round(height * ratio[1])
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _key_entropy(key: int | str | Sequence[int | str]) -> list[int]:
    parts = [key] if isinstance(key, (int, np.integer, str, bytes)) else list(key)
    words = []
    for part in parts:
        if isinstance(part, (int, np.integer)):
            if part < 0:
                raise ValueError(f"integer keys must be non-negative, got {part}")
            words += [0, int(part)]
        else:
            data = part if isinstance(part, bytes) else str(part).encode("utf-8")
            words += [1, int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")]
    return words


class TwoViewTransform:
    """BEiT's pretraining views of one image: the model view, the tokenizer view of the same crop, and a block mask.

    ``transform(image, key)`` returns ``pixel_values`` (3, H, W) float32, normalised with ``mean``/``std``;
    ``tokenizer_pixel_values`` (3, h, w) float32 in [0, 1] (unless ``tokenizer_mean``/``tokenizer_std``), absent when
    ``visual_tokenizer`` is None; ``bool_masked_pos`` (grid_h * grid_w,) bool, True = masked, absent when
    ``mask_generator`` is None.

    Args:
        image_size: the model's image size (BEiT-3: 224).
        patch_size: the model's patch size; the mask grid is ``image_size // patch_size``.
        visual_tokenizer: ``"vqkd"`` (same size, bicubic), ``"dall-e"`` (half size, Lanczos) or None (no second view).
        tokenizer_image_size: overrides the preset's size of the tokenizer view.
        tokenizer_interpolation: overrides the preset's interpolation (``"bicubic"``, ``"lanczos"``, ...).
        tokenizer_mean: mean to normalise the tokenizer view with (default: none, [0, 1]).
        tokenizer_std: std to normalise the tokenizer view with.
        mean: the model view's normalisation mean (BEiT-3: 0.5; BEiT v2 on ImageNet: timm's IMAGENET_DEFAULT_MEAN).
        std: the model view's normalisation std.
        interpolation: the model view's interpolation (BEiT: bicubic).
        scale: the crop's area fraction range (BEiT v1: 0.08-1; BEiT v2's recipe: 0.2-1).
        ratio: the crop's aspect ratio (width / height) range.
        hflip_prob: the probability of a horizontal flip.
        color_jitter: brightness/contrast/saturation strength, one float for all three or a triple; None or 0: off.
        mask_generator: a :class:`BlockMaskingGenerator` for the ``image_size // patch_size`` grid; ``"beit"``
            (default) builds BEiT's (75/196 of the grid, blocks of >= 16/196, v1 stopping rule); None: no mask.
        seed: makes every sample's random choices a function of ``(seed, epoch, key)``; None: fresh randomness.

    Example:
        >>> transform = TwoViewTransform(image_size=32, patch_size=16, visual_tokenizer="dall-e", seed=0)
        >>> out = transform(Image.new("RGB", (40, 30), "red"), key=7)
        >>> {name: tuple(value.shape) for name, value in out.items()}
        {'pixel_values': (3, 32, 32), 'tokenizer_pixel_values': (3, 16, 16), 'bool_masked_pos': (4,)}
        >>> out["pixel_values"][0, 0, 0].item(), out["tokenizer_pixel_values"][1, 0, 0].item()  # red, normalised
        (1.0, 0.0)
        >>> torch.equal(transform(Image.new("RGB", (40, 30)), key=7)["bool_masked_pos"], out["bool_masked_pos"])
        True
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        *,
        patch_size: int | Sequence[int] = 16,
        visual_tokenizer: Literal["vqkd", "dall-e"] | None = "vqkd",
        tokenizer_image_size: int | Sequence[int] | None = None,
        tokenizer_interpolation: str | None = None,
        tokenizer_mean: Sequence[float] | None = None,
        tokenizer_std: Sequence[float] | None = None,
        mean: Sequence[float] = BEIT3_IMAGE_MEAN,
        std: Sequence[float] = BEIT3_IMAGE_STD,
        interpolation: str = "bicubic",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        color_jitter: float | Sequence[float] | None = 0.4,
        mask_generator: BlockMaskingGenerator | Literal["beit"] | None = "beit",
        seed: int | None = None,
    ) -> None:
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        if min(grid) < 1:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        self.interpolation = _interpolation(interpolation)
        self.mean, self.std = list(mean), list(std)

        self.visual_tokenizer = visual_tokenizer
        if visual_tokenizer is None:
            if tokenizer_image_size is not None or tokenizer_interpolation is not None:
                raise ValueError("tokenizer_image_size/tokenizer_interpolation need a visual_tokenizer")
            self.tokenizer_image_size = None
            self.tokenizer_interpolation = None
        else:
            if visual_tokenizer not in VISUAL_TOKENIZER_VIEWS:
                raise ValueError(
                    f"unknown visual_tokenizer {visual_tokenizer!r}; known: {list(VISUAL_TOKENIZER_VIEWS)}"
                )
            preset = VISUAL_TOKENIZER_VIEWS[visual_tokenizer]
            if tokenizer_image_size is None:
                tokenizer_image_size = tuple(round(s * preset["size_factor"]) for s in self.image_size)
            self.tokenizer_image_size = _pair(tokenizer_image_size)
            self.tokenizer_interpolation = _interpolation(tokenizer_interpolation or preset["interpolation"])
        if (tokenizer_mean is None) != (tokenizer_std is None):
            raise ValueError("give both tokenizer_mean and tokenizer_std, or neither")
        self.tokenizer_mean = None if tokenizer_mean is None else list(tokenizer_mean)
        self.tokenizer_std = None if tokenizer_std is None else list(tokenizer_std)

        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.hflip_prob = float(hflip_prob)
        if color_jitter is None:
            color_jitter = 0.0
        strengths = (color_jitter,) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(strengths) != 3 or min(strengths) < 0:
            raise ValueError(f"color_jitter must be a non-negative float or a triple, got {color_jitter!r}")
        self.color_jitter = tuple(float(s) for s in strengths)

        if isinstance(mask_generator, str):
            if mask_generator != "beit":
                raise ValueError(
                    f"mask_generator must be a BlockMaskingGenerator, 'beit' or None, got {mask_generator!r}"
                )
            mask_generator = BlockMaskingGenerator.for_grid(grid)
        if mask_generator is not None and mask_generator.shape != grid:
            raise ValueError(
                f"mask_generator makes {mask_generator.shape} masks, but {self.image_size} images with "
                f"{self.patch_size} patches have a {grid} patch grid"
            )
        self.mask_generator = mask_generator
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.seed = seed
        self.epoch = 0
        #: Images that :meth:`apply_to_batch` could not decode.
        self.failures = DecodeFailures()

    def set_epoch(self, epoch: int) -> None:
        """Part of every sample's seed, so that each epoch sees new crops and masks (reproducibly)."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, visual_tokenizer={self.visual_tokenizer!r}, "
            f"tokenizer_image_size={self.tokenizer_image_size}, interpolation={self.interpolation.value}, "
            f"tokenizer_interpolation={getattr(self.tokenizer_interpolation, 'value', None)}, mean={self.mean}, "
            f"std={self.std}, scale={self.scale}, ratio={self.ratio}, hflip_prob={self.hflip_prob}, "
            f"color_jitter={self.color_jitter}, mask_generator={self.mask_generator!r}, seed={self.seed})"
        )

    def rngs_for(self, key: int | str | Sequence[int | str] | None) -> tuple[np.random.Generator, np.random.Generator]:
        """Independent generators for the augmentation and the mask of sample ``key`` (fresh ones without a seed)."""
        if self.seed is None or key is None:
            sequence = np.random.SeedSequence()
        else:
            sequence = np.random.SeedSequence([self.seed, self.epoch, *_key_entropy(key)])
        augment, mask = sequence.spawn(2)
        return np.random.default_rng(augment), np.random.default_rng(mask)

    def sample_params(self, image_size: tuple[int, int], rng: np.random.Generator) -> CropParams:
        """Draw the jitter, flip and crop box for an image of ``(height, width)`` pixels."""
        jitter = []
        for index in rng.permutation(3).tolist():
            strength = self.color_jitter[index]
            if strength > 0:
                name = ("brightness", "contrast", "saturation")[index]
                jitter.append((name, float(rng.uniform(max(0.0, 1 - strength), 1 + strength))))
        flip = bool(rng.random() < self.hflip_prob)
        top, left, height, width = sample_crop_params(image_size, self.scale, self.ratio, rng)
        return CropParams(top, left, height, width, flip, tuple(jitter))

    def apply_params(self, image: Image.Image, params: CropParams) -> dict[str, torch.Tensor]:
        """The views of ``image`` for given random choices (no mask)."""
        for name, factor in params.jitter:
            image = getattr(F, f"adjust_{name}")(image, factor)
        box = (params.top, params.left, params.height, params.width)
        views = {"pixel_values": self._view(image, box, self.image_size, self.interpolation, params.flip)}
        views["pixel_values"] = F.normalize(views["pixel_values"], self.mean, self.std)
        if self.tokenizer_image_size is not None:
            view = self._view(image, box, self.tokenizer_image_size, self.tokenizer_interpolation, params.flip)
            if self.tokenizer_mean is not None:
                view = F.normalize(view, self.tokenizer_mean, self.tokenizer_std)
            views["tokenizer_pixel_values"] = view
        return views

    @staticmethod
    def _view(
        image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], mode: InterpolationMode, flip: bool
    ) -> torch.Tensor:
        view = F.resized_crop(image, *box, size=list(size), interpolation=mode)  # PIL, antialiased
        if flip:  # flipping the resized crop = cropping the mirrored box of the flipped image
            view = F.horizontal_flip(view)
        return F.to_dtype(F.pil_to_tensor(view), torch.float32, scale=True)  # (3, h, w) in [0, 1]

    def __call__(
        self,
        image: Image.Image,
        key: int | str | Sequence[int | str] | None = None,
        *,
        rng: np.random.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The views and mask of one RGB PIL image.

        Args:
            image: an RGB PIL image (see :func:`decode_image`).
            key: identifies the sample (an index, a name or a tuple of them): with a ``seed``, the result depends
                only on ``(seed, epoch, key)``.
            rng: draw everything from this generator instead (exclusive with ``key``).
        """
        if rng is not None and key is not None:
            raise ValueError("pass either key or rng, not both")
        if image.mode != "RGB":
            image = image.convert("RGB")
        augment_rng, mask_rng = (rng, rng) if rng is not None else self.rngs_for(key)
        params = self.sample_params((image.height, image.width), augment_rng)
        out = self.apply_params(image, params)
        if self.mask_generator is not None:  # (grid_h * grid_w,)
            out["bool_masked_pos"] = torch.from_numpy(self.mask_generator(rng=mask_rng).reshape(-1))
        return out

    def apply_to_batch(self, batch: Mapping[str, Sequence[Any]], image_column: str = "image") -> dict[str, list[Any]]:
        """The transform for ``datasets.Dataset.with_transform``: a batch of rows in, a batch of views out.

        ``batch[image_column]`` holds PIL images or undecoded ``Image(decode=False)`` values. The sample key is the
        image's path when known (so the views follow the file, not its position). An image that cannot be decoded
        is recorded in :attr:`failures` and gives ``None`` in every output column;
        :class:`MaskedImageModelingCollator` drops such rows.

        Example:
            >>> import datasets
            >>> ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (20, 20))]})
            >>> ds = ds.cast_column("image", datasets.Image())
            >>> ds = ds.with_transform(TwoViewTransform(image_size=16, patch_size=8, seed=0).apply_to_batch)
            >>> sorted(ds[0]), tuple(ds[0]["bool_masked_pos"].shape)
            (['bool_masked_pos', 'pixel_values', 'tokenizer_pixel_values'], (4,))
        """
        outputs: list[dict[str, torch.Tensor] | None] = []
        for position, source in enumerate(batch[image_column]):
            path = source.get("path") if isinstance(source, Mapping) else getattr(source, "filename", None) or None
            image = self.failures.decode(source, str(path or f"row {position} of a batch"))
            outputs.append(None if image is None else self(image, key=path))
        return {name: [None if out is None else out[name] for out in outputs] for name in self.output_names}

    @property
    def output_names(self) -> tuple[str, ...]:
        """``pixel_values``, then ``tokenizer_pixel_values`` and ``bool_masked_pos`` if this transform makes them."""
        names = ["pixel_values"]
        if self.tokenizer_image_size is not None:
            names.append("tokenizer_pixel_values")
        if self.mask_generator is not None:
            names.append("bool_masked_pos")
        return tuple(names)


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


class PretrainingImageFolder(torch.utils.data.Dataset):
    """The images of a folder, through ``datasets``' ``imagefolder`` builder, as two-view MIM samples; labels ignored.

    ``data_dir`` is an ImageNet-style ``CLASS/*.JPEG`` tree or a flat folder of images (or a root with ``train/``,
    ``val/`` sub-folders, of which ``split`` is taken). Images are decoded here, not by ``datasets``, so that one
    that cannot be decoded is skipped: it is recorded in :attr:`failures` and the next image (index + 1, wrapping)
    takes its place, so every index still gives a sample. ``set_epoch`` (called by ``accelerate`` and the
    ``Trainer`` each epoch) changes every sample's crops and mask; with workers re-started each epoch (the default,
    ``persistent_workers=False``) the workers see it. A missing or image-less folder is an error that names
    ``argument`` (a script passes the option that gave the folder, e.g. ``--train_dir``).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> for i in range(3):
        ...     Image.new("RGB", (24, 24), (80 * i, 0, 0)).save(f"{folder}/{i}.png")
        >>> transform = TwoViewTransform(32, visual_tokenizer=None, seed=0)
        >>> ds = PretrainingImageFolder(folder, transform, cache_dir=f"{folder}/.cache")
        >>> len(ds), tuple(ds[2]["pixel_values"].shape), tuple(ds[2]["bool_masked_pos"].shape), ds.failures.count
        (3, (3, 32, 32), (4,), 0)
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        transform: TwoViewTransform,
        *,
        split: str = "train",
        cache_dir: str | os.PathLike[str] | None = None,
        max_consecutive_failures: int = 32,
        failures: DecodeFailures | None = None,
        argument: str = "data_dir",
    ) -> None:
        import datasets  # Hugging Face datasets; imported here so that importing this module stays light

        root = Path(data_dir)
        if (root / split).is_dir():  # a root with train/, val/ sub-folders
            root = root / split
        # An explicit file list: datasets' own data-dir inference drops the images whose names lack "train" when
        # other names contain it (see list_image_files).
        files = list_image_files(root, argument=argument)  # errors name `argument`, e.g. a script's --train_dir
        features = datasets.Features({"image": datasets.Image(decode=False)})
        self.dataset = datasets.load_dataset(
            "imagefolder",
            data_files={"train": files},
            split="train",
            features=features,
            drop_labels=True,
            drop_metadata=True,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        self.failures = DecodeFailures() if failures is None else failures

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the transform: new crops and masks each epoch."""
        self.transform.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        size = len(self.dataset)
        for offset in range(min(self.max_consecutive_failures, size)):
            source = self.dataset[(index + offset) % size]["image"]  # {"bytes": None, "path": ...}
            image = self.failures.decode(source, str(source.get("path") or f"row {(index + offset) % size}"))
            if image is not None:
                return self.transform(image, key=index)
        raise RuntimeError(
            f"{self.max_consecutive_failures} consecutive images from index {index} cannot be decoded "
            f"({self.failures.count} failures so far, e.g. {self.failures.examples[:3]}); is the folder readable?"
        )


class PretrainingWebDataset(torch.utils.data.IterableDataset):
    """Two-view MIM samples streamed from webdataset tar shards (the layout ``img2dataset`` writes).

    ``urls`` is a brace pattern (``"shards/{00000..00099}.tar"``) or a list of shard paths/URLs. A sample is the
    files sharing a ``__key__`` (``000000001.jpg``, ``.txt``, ``.json``); the first of ``image_extensions`` present
    is decoded, the rest ignored. A sample whose image is missing or cannot be decoded, and a shard that cannot be
    read, are skipped and recorded in :attr:`failures` (named ``shard:key``, or ``shard`` for a shard).

    **Several processes.** Which process reads what depends on who shards the stream; choose with ``split_by_node``
    (checked with 2 CPU processes under ``accelerate launch``):

    - ``split_by_node=False`` (default) **with accelerate or the Trainer**, which shard an ``IterableDataset``
      themselves. With their default ``dispatch_batches=True``, only rank 0 iterates (so it must read every shard)
      and sends each rank its slice of every batch; with ``dispatch_batches=False`` every rank iterates the whole
      stream and keeps its own slice (correct too, but every rank decodes every image). ``split_by_node=True``
      there would lose data: rank 0 alone would read only its share of the shards (dispatch), or the stream would be
      split twice (no dispatch).
    - ``split_by_node=True`` **with one plain ``DataLoader`` per process** (``torchrun`` and a hand-written loop, or
      a Trainer whose data loader is not prepared by accelerate): rank ``r`` of ``world_size`` (from
      ``RANK``/``WORLD_SIZE`` or ``torch.distributed``) reads shards ``r, r + world_size, ...`` of the shard list,
      shuffled per epoch identically on every rank (webdataset's ``split_by_node``). Without it every rank would
      read the very same samples (with the same crops and masks, the transforms sharing a seed).

    Within a process, each data-loader worker reads every ``num_workers``-th of its shards (webdataset's
    ``split_by_worker``), so a pass reads each sample once. That needs at least ``num_workers`` shards per reading
    process, and with ``split_by_node=True`` ranks stay in step only if their shards hold about as many samples: cap
    a pass with ``samples_per_worker`` (every worker then yields exactly that many, if its shards hold enough), or
    use ``resampled=True`` (each worker draws shards at random with replacement, forever: no epochs and no uneven
    ends; set the run's length with ``max_steps``, and a pass's with ``samples_per_worker``). The first iteration in
    a process of several logs which choice is in effect.

    ``with_keys=True`` adds each sample's ``"shard:key"`` name as ``"__key__"`` (the collator leaves it out).

    Randomness: ``seed`` orders the shards (per epoch) and seeds the shuffle buffer; the views and masks come from
    the transform's seed and each sample's ``(shard name, __key__)``, so they do not depend on the read order.

    Example:
        >>> import io, tempfile, webdataset
        >>> shard = f"{tempfile.mkdtemp()}/00000.tar"
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (24, 24), "blue").save(buffer, format="JPEG")
        >>> with webdataset.TarWriter(shard) as sink:
        ...     _ = sink.write({"__key__": "000000000", "jpg": buffer.getvalue(), "txt": b"a blue square"})
        ...     _ = sink.write({"__key__": "000000001", "jpg": buffer.getvalue()[:100], "txt": b"truncated"})
        >>> ds = PretrainingWebDataset(shard, TwoViewTransform(32, visual_tokenizer="dall-e", seed=0))
        >>> [tuple(sample["tokenizer_pixel_values"].shape) for sample in ds], ds.failures.names
        ([(3, 16, 16)], ['00000.tar:000000001'])
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: TwoViewTransform,
        *,
        image_extensions: Sequence[str] = WEBDATASET_IMAGE_EXTENSIONS,
        split_by_node: bool = False,
        resampled: bool = False,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        samples_per_worker: int | None = None,
        seed: int = 0,
        with_keys: bool = False,
        failures: DecodeFailures | None = None,
    ) -> None:
        try:
            import webdataset as wds  # optional dependency (the `train` extra)
        except ImportError as error:
            raise ImportError(
                "PretrainingWebDataset needs the webdataset package: pip install webdataset (or beit3-hf[train])"
            ) from error

        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [os.fspath(u) for u in urls]
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.transform = transform
        self.image_extensions = tuple(ext.lower().lstrip(".") for ext in image_extensions)
        self.split_by_node = split_by_node
        self.resampled = resampled
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_worker = samples_per_worker
        self.seed = seed
        self.with_keys = with_keys
        self.epoch = 0
        self._logged_split = False
        self.failures = DecodeFailures() if failures is None else failures

    def set_epoch(self, epoch: int) -> None:
        """Reorders the shards and changes every sample's crops and mask (called by accelerate and the Trainer)."""
        self.epoch = int(epoch)
        self.transform.set_epoch(epoch)

    def _shard_list(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards and not self.resampled:  # the same permutation on every rank: split_by_node needs it
            np.random.default_rng([self.seed, self.epoch]).shuffle(urls)
        return urls

    def _handler(self, error: Exception) -> bool:
        """webdataset's error handler: record, then carry on with the next sample or shard."""
        url = next((a for a in getattr(error, "args", ()) if isinstance(a, str) and a in self.urls), None)
        self.failures.record(os.path.basename(url) if url else "<a shard>", error)  # a whole shard, or its rest
        return True

    def _pipeline(self):
        import webdataset as wds

        rank, world_size, worker, _ = wds.utils.pytorch_worker_info()
        if world_size > 1 and worker == 0 and not self._logged_split:
            self._logged_split = True
            logger.info(
                "rank %d of %d reads %s (split_by_node=%s)",
                rank,
                world_size,
                f"shards {rank}, {rank} + {world_size}, ..." if self.split_by_node else "every shard",
                self.split_by_node,
            )
        pipeline = wds.WebDataset(
            self._shard_list(),
            resampled=self.resampled,
            shardshuffle=False,
            nodesplitter=wds.split_by_node if self.split_by_node else None,
            workersplitter=wds.split_by_worker,
            handler=self._handler,
            empty_check=False,
            seed=self.seed,
        )
        if self.shuffle_buffer > 0:
            shuffle_seed = int(np.random.SeedSequence([self.seed, self.epoch, rank, worker]).generate_state(1)[0])
            pipeline = pipeline.shuffle(self.shuffle_buffer, seed=shuffle_seed)
        return pipeline

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        samples = self._samples()
        return samples if self.samples_per_worker is None else islice(samples, self.samples_per_worker)

    def _samples(self) -> Iterator[dict[str, torch.Tensor]]:
        for sample in self._pipeline():
            shard = os.path.basename(str(sample.get("__url__", "")))
            name = f"{shard}:{sample.get('__key__')}"
            data = next((sample[ext] for ext in self.image_extensions if ext in sample), None)
            if data is None:
                found = sorted(k for k in sample if not k.startswith("__"))
                self.failures.record(name, f"no image file (looked for {self.image_extensions}, found {found})")
                continue
            image = self.failures.decode(data, name)
            if image is None:
                continue
            out = self.transform(image, key=(shard, str(sample.get("__key__"))))
            if self.with_keys:
                out["__key__"] = name
            yield out


# ----------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------


class MaskedImageModelingCollator:
    """Stacks :class:`TwoViewTransform` samples into a batch; drops samples that failed to decode.

    Returns ``pixel_values`` (batch, 3, H, W) float32, ``tokenizer_pixel_values`` (batch, 3, h, w) float32 when the
    samples have it, and ``bool_masked_pos`` (batch, grid_h * grid_w) bool (True = masked, the convention of
    ``BeitForMaskedImageModeling``) when they have it. ``None`` samples, and samples whose ``pixel_values`` is None
    (what :meth:`TwoViewTransform.apply_to_batch` gives for an undecodable image) are left out; a batch with no
    sample left raises.

    Example:
        >>> transform = TwoViewTransform(32, visual_tokenizer="vqkd", seed=0)
        >>> samples = [transform(Image.new("RGB", (40, 40)), key=i) for i in range(2)] + [None]
        >>> batch = MaskedImageModelingCollator()(samples)
        >>> {name: tuple(value.shape) for name, value in batch.items()}
        {'pixel_values': (2, 3, 32, 32), 'tokenizer_pixel_values': (2, 3, 32, 32), 'bool_masked_pos': (2, 4)}
    """

    keys: tuple[str, ...] = ("pixel_values", "tokenizer_pixel_values", "bool_masked_pos")

    def __call__(self, examples: Sequence[Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
        kept = [e for e in examples if e is not None and e.get("pixel_values") is not None]
        if not kept:
            raise ValueError(f"no decodable image in this batch of {len(examples)}")
        stack = [name for name in self.keys if name in kept[0]]
        return {name: torch.stack([torch.as_tensor(example[name]) for example in kept]) for name in stack}
