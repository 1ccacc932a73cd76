"""Image processor reproducing the evaluation transforms of the original BEiT-3 code (``unilm/beit3/datasets.py``).

Two tasks, two transforms (``task=`` picks the preset; every field stays overridable and is saved in the config):

* ``"vision-language"`` (retrieval, VQA, NLVR2, captioning, the bare backbone)::

      transforms.Resize((S, S), interpolation=3)  # bicubic, squashes: no aspect-ratio preservation, no crop
      transforms.ToTensor()
      transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

* ``"image-classification"`` (ImageNet: timm's eval transform with ``crop_pct=1.0``)::

      transforms.Resize(S, interpolation=3)  # short side to S
      transforms.CenterCrop(S)
      transforms.ToTensor()
      transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

after ``PIL.Image.convert("RGB")``, as the original's ``torchvision.datasets.folder.pil_loader`` does.

Exactness: 8-bit images on the CPU (PIL images of any mode, uint8 arrays and tensors) are resized and cropped with
Pillow, which is what ``torchvision.transforms`` does on PIL images, and converted with ``ToTensor``'s and
``Normalize``'s float32 arithmetic, so ``pixel_values`` equal the original's bit for bit. Tensors already on a GPU and
float arrays are resized with torchvision's antialiased bicubic tensor kernel instead: close to Pillow on average
(under one grey level) but not identical (Pillow rounds and clips between its two passes, whose order it picks
itself; up to ~20 grey levels apart at hard edges).

Speed: the images of one call are decoded, converted and resized in a thread pool (Pillow releases the GIL), with
``torch.get_num_threads()`` threads by default, which is 1 inside ``DataLoader`` workers.

This file is remote code: it is copied into checkpoints and imports only torch, torchvision, PIL, numpy and
transformers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType, logging

try:
    from transformers.image_processing_backends import TorchvisionBackend
except ImportError:  # older transformers 5 releases name the torchvision backend only by its legacy alias
    from transformers.image_processing_utils_fast import BaseImageProcessorFast as TorchvisionBackend

logger = logging.get_logger(__name__)

__all__ = ["Beit3ImageProcessor"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

TASKS = ("vision-language", "image-classification")
DEFAULT_IMAGE_SIZE = 224

_TV_INTERPOLATION = {
    PILImageResampling.NEAREST: tvF.InterpolationMode.NEAREST,
    PILImageResampling.BILINEAR: tvF.InterpolationMode.BILINEAR,
    PILImageResampling.BICUBIC: tvF.InterpolationMode.BICUBIC,
    PILImageResampling.LANCZOS: tvF.InterpolationMode.LANCZOS,
    PILImageResampling.BOX: tvF.InterpolationMode.BOX,
    PILImageResampling.HAMMING: tvF.InterpolationMode.HAMMING,
}
_PIL_8BIT_MODES = ("RGB", "L")


def task_defaults(task: str, image_size: int) -> dict[str, Any]:
    """The config fields of the original eval transform of ``task`` at resolution ``image_size``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if task == "vision-language":
        return {
            "size": {"height": image_size, "width": image_size},
            "do_center_crop": False,
            "crop_size": None,
            "image_mean": list(IMAGENET_INCEPTION_MEAN),
            "image_std": list(IMAGENET_INCEPTION_STD),
        }
    return {
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(IMAGENET_DEFAULT_MEAN),
        "image_std": list(IMAGENET_DEFAULT_STD),
    }


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode a local image file; failures raise an error that names the file.

    Like the original ``pil_loader``, no EXIF rotation is applied, and a truncated file is an error unless
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set.
    """
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"Image {path!r} looks like a URL; Beit3ImageProcessor reads local files only.")
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path!r}.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image file {path!r}: {error}") from None
    return image


def _describe(value: Any) -> str:
    """How an input is named in error messages (also used by `processing_beit3`)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def flatten_images(images: Any, where: str = "images") -> list[Any]:
    """A flat list of single images (PIL images, paths, 3-D arrays or tensors); errors name the bad entry.

    Accepts one image, a rank-4 batch, or (nested) lists of those. Paths are checked later, when they are read.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError(f"{where} is an empty batch of shape {tuple(images.shape)}.")
            return list(images)
        hint = "; add a channel axis ((H, W, 1)) or pass a PIL image" if images.ndim == 2 else ""
        raise ValueError(
            f"{where} has rank {images.ndim} (shape {tuple(images.shape)}); expected one image of rank 3 "
            f"((H, W, C) or (C, H, W)) or a batch of rank 4{hint}."
        )
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{where} is empty; pass at least one image.")
        flat = []
        for index, item in enumerate(images):
            flat.extend(flatten_images(item, f"{where}[{index}]"))
        return flat
    raise TypeError(
        f"{where} is a {_describe(images)}; expected a PIL image, a numpy array, a torch tensor, the path of a local "
        "image file, or a list of those."
    )


def _channel_axis(image: torch.Tensor, input_data_format: Any, from_numpy: bool) -> int:
    if input_data_format is not None:
        return 0 if ChannelDimension(input_data_format) == ChannelDimension.FIRST else 2
    first, last = image.shape[0] in (1, 2, 3, 4), image.shape[-1] in (1, 2, 3, 4)
    if first and last:  # tiny ambiguous image: arrays are HWC by convention (as from PIL), tensors CHW
        return 2 if from_numpy else 0
    if first or last:
        return 0 if first else 2
    raise ValueError(
        f"Cannot find the channel axis of an image of shape {tuple(image.shape)}: expected (H, W, C) or (C, H, W) "
        "with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)."
    )


def _array_to_chw(image: np.ndarray | torch.Tensor, input_data_format: Any, do_convert_rgb: bool) -> torch.Tensor:
    """An array image as a (C, H, W) tensor; with ``do_convert_rgb``, 1, 2 and 4 channels become RGB like PIL's
    ``convert("RGB")`` of an L, LA or RGBA image (grey replicated, alpha dropped)."""
    from_numpy = isinstance(image, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if from_numpy else image
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"Unsupported image dtype {tensor.dtype}; expected uint8 (0-255) or a float or integer type.")
    if _channel_axis(tensor, input_data_format, from_numpy) == 2:
        tensor = tensor.permute(2, 0, 1)
    if do_convert_rgb:
        if tensor.shape[0] in (1, 2):
            tensor = tensor[:1].expand(3, -1, -1)
        elif tensor.shape[0] == 4:
            tensor = tensor[:3]
    return tensor


def resize_output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """(height, width) produced by ``torchvision.transforms.Resize`` with an ``(h, w)`` or a short-side size."""
    if size.height and size.width:
        return size.height, size.width
    if size.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        if size.longest_edge and new_long > size.longest_edge:
            new_short, new_long = int(size.longest_edge * new_short / new_long), size.longest_edge
        return (new_long, new_short) if width <= height else (new_short, new_long)
    raise ValueError(f"size must have 'height' and 'width', or 'shortest_edge'; got {dict(size)}.")


def _pil_center_crop(image: Image.Image, crop: SizeDict) -> Image.Image:
    """``torchvision.transforms.functional.center_crop`` on a PIL image (zero padding, round-half-even anchor)."""
    if crop.height > image.height or crop.width > image.width:
        pad_w, pad_h = max(crop.width - image.width, 0), max(crop.height - image.height, 0)
        canvas = Image.new(image.mode, (image.width + pad_w, image.height + pad_h), 0)
        canvas.paste(image, (pad_w // 2, pad_h // 2))
        image = canvas
    top = round((image.height - crop.height) / 2.0)
    left = round((image.width - crop.width) / 2.0)
    return image.crop((left, top, left + crop.width, top + crop.height))


class Beit3ImagesKwargs(ImagesKwargs, total=False):
    """Per-call options of :class:`Beit3ImageProcessor` beyond the standard image-processor ones.

    num_threads (`int`, *optional*): threads that decode, convert and resize the images of one call; defaults to
        ``torch.get_num_threads()``.
    """

    num_threads: int | None


# ----------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------


class Beit3ImageProcessor(TorchvisionBackend):
    r"""BEiT-3 image processor: the original evaluation transforms, exactly.

    Args:
        task (`str`, defaults to `"vision-language"`): ``"vision-language"`` (squash-resize to ``(S, S)``, bicubic,
            mean = std = 0.5; retrieval, VQA, NLVR2, captioning) or ``"image-classification"`` (short side to ``S``,
            bicubic, center crop ``S``, ImageNet default mean/std).
        image_size (`int`, *optional*, defaults to 224): ``S``. Not stored itself: it sets ``size`` (and
            ``crop_size``).
        **kwargs: standard image-processor fields (``size``, ``crop_size``, ``do_center_crop``, ``resample``,
            ``image_mean``, ``image_std``, ``do_rescale``, ``do_normalize``, ``do_convert_rgb``) overriding the preset.

    Accepts PIL images of any mode (converted with ``Image.convert("RGB")`` like the original loader), numpy arrays
    and torch tensors ((H, W, C) or (C, H, W) with C in 1-4, or rank-4 batches), paths of local image files, and lists
    of those. Arrays are read on the 0-255 scale whatever their dtype (pass ``do_rescale=False`` for 0-1 floats).
    Per call: the standard options, ``device`` (normalize there) and ``num_threads``.

    Example:
        >>> from PIL import Image
        >>> processor = Beit3ImageProcessor(task="vision-language", image_size=384)
        >>> processor(Image.new("RGBA", (500, 375)), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 384, 384])
        >>> classifier = Beit3ImageProcessor(task="image-classification", image_size=224)
        >>> classifier([Image.new("L", (333, 517))] * 2, return_tensors="pt").pixel_values.shape
        torch.Size([2, 3, 224, 224])
    """

    valid_kwargs = Beit3ImagesKwargs
    resample = PILImageResampling.BICUBIC
    size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}
    do_resize = True
    do_center_crop = False
    crop_size = None
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_INCEPTION_MEAN
    image_std = IMAGENET_INCEPTION_STD
    do_convert_rgb = True
    num_threads = None
    model_input_names = ["pixel_values"]

    def __init__(self, task: str = "vision-language", image_size: int | None = None, **kwargs: Any) -> None:
        if image_size is not None and ("size" in kwargs or "crop_size" in kwargs):
            raise ValueError("Pass either image_size (task preset) or explicit size/crop_size, not both.")
        for key, value in task_defaults(task, DEFAULT_IMAGE_SIZE if image_size is None else image_size).items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.task = task

    # -- input structure ----------------------------------------------------------------------------------------

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Read local image paths (possibly nested in lists); other inputs pass through."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image(image_url_or_urls)
        return image_url_or_urls

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        return flatten_images(images)

    def _prepare_image_like_inputs(
        self, images: Any, *args: Any, expected_ndims: int = 3, **kwargs: Any
    ) -> list[torch.Tensor]:
        """Read, convert, resize and crop every image (in a thread pool): a list of (C, H, W) tensors."""
        images = self._prepare_images_structure(images, expected_ndims=expected_ndims)
        # Each distinct input is processed once, by one thread (a PIL image is not safe to decode from two threads).
        keys = [("path", os.fspath(im)) if isinstance(im, (str, os.PathLike)) else id(im) for im in images]
        unique = list(dict(zip(keys, images)).items())
        work = partial(self._resize_and_crop, **kwargs)
        threads = kwargs.get("num_threads") or torch.get_num_threads()
        threads = max(1, min(int(threads), len(unique), 32))
        if threads == 1:
            results = [work(image) for _, image in unique]
        else:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="beit3-image") as pool:
                results = list(pool.map(work, [image for _, image in unique]))
        done = {key: result for (key, _), result in zip(unique, results)}
        return [done[key] for key in keys]

    # -- one image ----------------------------------------------------------------------------------------------

    def _resize_and_crop(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        do_resize: bool | None = None,
        size: SizeDict | None = None,
        resample: Any = None,
        do_center_crop: bool | None = None,
        crop_size: SizeDict | None = None,
        do_rescale: bool | None = None,
        input_data_format: Any = None,
        device: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            tensor = _array_to_chw(image, input_data_format, bool(do_convert_rgb))
            if tensor.dtype != torch.uint8 or tensor.device.type != "cpu" or tensor.shape[0] not in (1, 3):
                return self._resize_and_crop_tensor(
                    tensor, do_resize, size, resample, do_center_crop, crop_size, do_rescale
                )
            array = tensor.permute(1, 2, 0).numpy()
            image = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array))
        if do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if image.mode not in _PIL_8BIT_MODES:  # do_convert_rgb=False on a 16-bit, float or alpha image
            array = np.array(image)
            tensor = torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)
            return self._resize_and_crop_tensor(
                tensor, do_resize, size, resample, do_center_crop, crop_size, do_rescale
            )
        if do_resize:
            height, width = resize_output_size(image.height, image.width, size)
            image = image.resize((width, height), PILImageResampling(resample))
        if do_center_crop:
            image = _pil_center_crop(image, crop_size)
        array = np.array(image)
        return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)

    def _resize_and_crop_tensor(
        self,
        tensor: torch.Tensor,
        do_resize: bool | None,
        size: SizeDict | None,
        resample: Any,
        do_center_crop: bool | None,
        crop_size: SizeDict | None,
        do_rescale: bool | None,
    ) -> torch.Tensor:
        """torchvision tensor path: GPU tensors and non-8-bit data (antialiased, close to but not exactly Pillow)."""
        if tensor.dtype != torch.uint8:
            tensor = tensor.float()
            if do_rescale and tensor.numel() and float(tensor.max()) <= 1.0:
                logger.warning_once(
                    "Beit3ImageProcessor got float images with values in [0, 1] and do_rescale=True; arrays are read "
                    "on the 0-255 scale. Pass do_rescale=False if they are already rescaled."
                )
        if do_resize:
            new_size = list(resize_output_size(tensor.shape[-2], tensor.shape[-1], size))
            interpolation = _TV_INTERPOLATION[PILImageResampling(resample)]
            tensor = tvF.resize(tensor, new_size, interpolation=interpolation, antialias=True)
        if do_center_crop:
            tensor = tvF.center_crop(tensor, [crop_size.height, crop_size.width])
        return tensor

    # -- the batch ----------------------------------------------------------------------------------------------

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | TensorType | None,
        device: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """``ToTensor`` + ``Normalize`` arithmetic (divide by 255, subtract mean, divide by std, in float32)."""
        same_shape = len({(tuple(image.shape), image.device) for image in images}) == 1
        if not same_shape and return_tensors is not None:
            shapes = sorted({tuple(image.shape) for image in images})
            raise ValueError(
                f"The processed images have different shapes {shapes[:4]}; they cannot be stacked into one tensor. "
                "Resize to a fixed size (the task presets do), or pass return_tensors=None."
            )
        batches = [torch.stack(images)] if same_shape else [image[None] for image in images]
        processed = []
        for batch in batches:
            if device is not None:
                batch = batch.to(device)
            batch = batch.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            if do_rescale:
                divisor = 1.0 / rescale_factor
                batch = batch.div_(round(divisor) if abs(divisor - round(divisor)) < 1e-6 else divisor)
            if do_normalize:
                channels = batch.shape[1]
                mean = torch.as_tensor(image_mean, dtype=torch.float32, device=batch.device).reshape(-1)
                std = torch.as_tensor(image_std, dtype=torch.float32, device=batch.device).reshape(-1)
                batch = batch.sub_(mean.expand(channels)[:, None, None]).div_(std.expand(channels)[:, None, None])
            processed.append(batch)
        if same_shape and return_tensors in ("pt", TensorType.PYTORCH):
            return BatchFeature(data={"pixel_values": processed[0]}, tensor_type=return_tensors)
        pixel_values = [image for batch in processed for image in batch]
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)
