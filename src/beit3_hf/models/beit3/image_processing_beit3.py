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

The processor is transformers' ``PilBackend`` (Pillow resize) with the presets as class attributes, and equals the
original bit for bit: torchvision resizes PIL images with Pillow too. Its overrides keep it so: ``process_image``
converts with ``convert("RGB")``, which drops alpha (transformers 5.24 composites it onto white) and clips 16-bit
values as the original did (with a warning); ``center_crop`` rounds the offset half to even as torchvision does
(transformers floors it); ``rescale`` and ``normalize`` are ``ToTensor``'s and ``Normalize``'s float32 arithmetic, in
torch (numpy's float64 path gives the same values, 1.6x slower per image). There is no torchvision-backend variant on
purpose: ``AutoImageProcessor`` picks the class registered as ``"torchvision"`` by default whenever torchvision is
installed, and a torchvision resize only approximates Pillow's.

This file is remote code: it is copied into checkpoints and imports only torch and transformers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    is_pil_image,
    is_valid_image,
    load_image,
    to_numpy_array,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["Beit3ImageProcessor"]

TASKS = ("vision-language", "image-classification")
DEFAULT_IMAGE_SIZE = 224


def task_defaults(task: str, image_size: int) -> dict[str, Any]:
    """The config fields of the original eval transform of ``task`` at resolution ``image_size``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if task == "vision-language":
        square = {"height": image_size, "width": image_size}
        return {"size": square, "do_center_crop": False, "crop_size": None}
    return {
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": IMAGENET_DEFAULT_MEAN,
        "image_std": IMAGENET_DEFAULT_STD,
    }


def _describe(value: Any) -> str:
    """How an input is named in error messages (also used by `processing_beit3`)."""
    if hasattr(value, "shape"):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _channel_axis(shape: tuple[int, ...], input_data_format: Any, channels_last_if_ambiguous: bool) -> int:
    """0 or 2: the channel axis of a rank-3 image (C in 1-4; arrays default to HWC, tensors to CHW if ambiguous)."""
    if input_data_format is not None:
        return 0 if ChannelDimension(input_data_format) == ChannelDimension.FIRST else 2
    first, last = shape[0] in (1, 2, 3, 4), shape[-1] in (1, 2, 3, 4)
    if first and last:
        return 2 if channels_last_if_ambiguous else 0
    if first or last:
        return 0 if first else 2
    raise ValueError(
        f"Cannot find the channel axis of an image of shape {shape}: expected (H, W, C) or (C, H, W) with C = 1 (L), "
        "2 (LA), 3 (RGB) or 4 (RGBA)."
    )


def _check_images(images: Any, where: str, input_data_format: Any, do_rescale: bool) -> None:
    """Errors that name the bad entry, for inputs transformers would reject vaguely or convert wrongly."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{where} is empty; pass at least one image.")
        for index, item in enumerate(images):
            _check_images(item, f"{where}[{index}]", input_data_format, do_rescale)
    elif is_pil_image(images):
        if images.width == 0 or images.height == 0:
            raise ValueError(f"{where} is an empty image ({images.width}x{images.height} pixels).")
    elif is_valid_image(images):  # a numpy array or a torch tensor
        shape = tuple(images.shape)
        if len(shape) not in (3, 4):
            hint = "; add a channel axis ((H, W, 1)) or pass a PIL image" if len(shape) == 2 else ""
            raise ValueError(
                f"{where} has rank {len(shape)} (shape {shape}); expected one image of rank 3 ((H, W, C) or "
                f"(C, H, W)) or a batch of rank 4{hint}."
            )
        _channel_axis(shape[-3:], input_data_format, not isinstance(images, torch.Tensor))
        if 0 in shape:
            raise ValueError(f"{where} is empty (shape {shape}); pass images of at least 1x1 pixels.")
        dtype = str(images.dtype).removeprefix("torch.")
        if dtype == "bool" or dtype.startswith("complex"):
            raise TypeError(f"{where} has dtype {dtype}; expected uint8 (0-255) or another integer or float type.")
        low, high = (0.0, 0.0) if dtype == "uint8" else (float(images.min()), float(images.max()))
        if low < 0 or high > 255:
            raise ValueError(
                f"{where} ({dtype}) has values in [{low:g}, {high:g}]; images are read on the 0-255 scale of 8-bit "
                "images, as the original's: scale them first (16-bit data: divide by 257 and round)."
            )
        if do_rescale and dtype.startswith("float") and high <= 1:
            logger.warning_once(
                "Beit3ImageProcessor got float images with values in [0, 1] and do_rescale=True; arrays are read "
                "on the 0-255 scale. Pass do_rescale=False if they are already rescaled."
            )
    elif not isinstance(images, (str, os.PathLike)):
        raise TypeError(
            f"{where} is a {_describe(images)}; expected a PIL image, a numpy array, a torch tensor, the path of a "
            "local image file, or a list of those."
        )


class Beit3ImageProcessor(PilBackend):
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
    and torch tensors on any device ((H, W, C) or (C, H, W) with C in 1-4, or rank-4 batches), paths of local image
    files (read with transformers' ``load_image``, which also applies the EXIF orientation, unlike the original's
    loader), and lists of those. Arrays hold values on the 0-255 scale whatever their dtype (pass ``do_rescale=False``
    for 0-1 floats); like the original's, the resize runs in Pillow on 8-bit images. ``pixel_values`` are on the CPU.

    Example:
        >>> from PIL import Image
        >>> processor = Beit3ImageProcessor(task="vision-language", image_size=384)
        >>> processor(Image.new("RGBA", (500, 375)), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 384, 384])
        >>> classifier = Beit3ImageProcessor(task="image-classification", image_size=224)
        >>> classifier([Image.new("L", (333, 517))] * 2, return_tensors="pt").pixel_values.shape
        torch.Size([2, 3, 224, 224])
    """

    resample = PILImageResampling.BICUBIC
    size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_convert_rgb = True

    def __init__(self, task: str = "vision-language", image_size: int | None = None, **kwargs: Any) -> None:
        if image_size is not None and ("size" in kwargs or "crop_size" in kwargs):
            raise ValueError("Pass either image_size (task preset) or explicit size/crop_size, not both.")
        for key, value in task_defaults(task, DEFAULT_IMAGE_SIZE if image_size is None else image_size).items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.task = task

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        """Check the inputs (errors name the bad entry), then run transformers' pipeline."""
        do_rescale = kwargs.get("do_rescale", self.do_rescale)
        _check_images(images, "images", kwargs.get("input_data_format"), do_rescale)
        return super().preprocess(images, *args, **kwargs)

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Read local image files (paths, possibly nested in lists); failures raise an error that names the file."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if not isinstance(image_url_or_urls, (str, os.PathLike)):
            return image_url_or_urls
        path = os.fspath(image_url_or_urls)
        if "://" in path:
            raise ValueError(f"Image {path!r} looks like a URL; Beit3ImageProcessor reads local files only.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file not found: {path!r}.")
        try:
            return load_image(path)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError or DecompressionBombError
            raise ValueError(f"Cannot read image file {path!r}: {error}") from error

    def process_image(
        self, image: Any, do_convert_rgb: bool | None = None, input_data_format: Any = None, **kwargs: Any
    ) -> Any:
        """One image as a (C, H, W) numpy array, RGB as the original's ``convert("RGB")`` makes it.

        1 and 2 channels (L, LA) become grey RGB and a 4th channel (alpha) is dropped, as ``convert("RGB")`` does.
        """
        if is_pil_image(image):
            if do_convert_rgb and image.mode != "RGB":
                if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                    low, high = image.getextrema()
                    if low < 0 or high > 255:
                        logger.warning_once(
                            f"A {image.mode!r} PIL image with values outside 0-255 is clipped by convert('RGB'), as "
                            "in the original BEiT-3 loader; scale it to 8 bits first to keep its contrast."
                        )
                image = image.convert("RGB")
            array = to_numpy_array(image)
            return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        array = to_numpy_array(image)  # tensors: moved to the CPU
        if _channel_axis(array.shape, input_data_format, not isinstance(image, torch.Tensor)) == 2:
            array = array.transpose(2, 0, 1)
        if do_convert_rgb and array.shape[0] != 3:
            array = array[:3] if array.shape[0] == 4 else array[:1].repeat(3, axis=0)
        if array.dtype.kind == "f" and kwargs.get("do_rescale") and kwargs.get("do_resize"):
            array = array.round().astype("uint8")  # Pillow resizes 8-bit images (transformers would reject 0.5)
        return array

    def rescale(self, image: Any, scale: float, **kwargs: Any) -> Any:
        """``ToTensor``'s float32 ``x / 255`` (``1 / scale``), in torch: the original's values, faster than numpy."""
        image = torch.from_numpy(image).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return image.div_(1 / scale).numpy()

    def normalize(self, image: Any, mean: Any, std: Any, **kwargs: Any) -> Any:
        """``Normalize``'s float32 ``(x - mean) / std`` per channel, in torch."""
        image = torch.from_numpy(image).to(torch.float32, memory_format=torch.contiguous_format)
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))
        return image.sub(mean).div_(std).numpy()

    def center_crop(self, image: Any, size: SizeDict, **kwargs: Any) -> Any:
        """torchvision's ``center_crop``: zero padding split floor/ceil, then the offset rounded half to even."""
        pad_h, pad_w = max(size.height - image.shape[-2], 0), max(size.width - image.shape[-1], 0)
        if pad_h or pad_w:
            padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            image = torch.nn.functional.pad(torch.from_numpy(image), padding).numpy()
        top, left = round((image.shape[-2] - size.height) / 2), round((image.shape[-1] - size.width) / 2)
        return image[..., top : top + size.height, left : left + size.width]
