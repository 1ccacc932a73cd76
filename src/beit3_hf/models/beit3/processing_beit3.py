"""``Beit3Processor``: BEiT-3's image processor and text tokenizer behind one call.

Text goes through the tokenizer with the original's settings: ``tokenizer(text, padding="max_length", truncation=True,
max_length=64)`` is ``[bos] + tokens[: max_length - 2] + [eos]`` padded on the right, as the original
``BaseDataset._get_text_segment`` did with ``--num_max_bpe_tokens 64``. The original returned ``padding_mask``
(1 = padding); this processor returns the transformers ``attention_mask`` (1 = attend), its complement.

This file is remote code: it is copied into checkpoints and imports only torch, transformers and
``image_processing_beit3`` (relative import).
"""

from __future__ import annotations

import os
from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import is_pil_image, is_valid_image
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .image_processing_beit3 import Beit3ImageProcessor, _describe

__all__ = ["Beit3Processor"]

DEFAULT_MAX_LENGTH = 64


def _split_pairs(images: Any) -> list[Any] | None:
    """The flat image list of NLVR2 pairs ``[(left, right), ...]``, or ``None`` when ``images`` holds no pairs."""
    if not isinstance(images, (list, tuple)) or not any(isinstance(item, (list, tuple)) for item in images):
        return None
    flat = []
    for index, pair in enumerate(images):
        if not isinstance(pair, (list, tuple)):
            raise ValueError(
                f"images mixes NLVR2 pairs and single images: images[{index}] is a {_describe(pair)}; pass either a "
                "list of images or a list of (left_image, right_image) pairs."
            )
        if len(pair) != 2:
            raise ValueError(
                f"NLVR2 pair images[{index}] has {len(pair)} element(s); each pair must be exactly "
                "(left_image, right_image)."
            )
        for side, image in enumerate(pair):
            single = isinstance(image, (str, os.PathLike)) or is_pil_image(image)
            if not (single or (is_valid_image(image) and image.ndim == 3)):
                raise ValueError(
                    f"NLVR2 pair images[{index}][{side}] is a {_describe(image)}, not a single image (a PIL image, an "
                    "image path, or an array/tensor of rank 3)."
                )
        flat.extend(pair)
    return flat


def _check_text(text: Any) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)):
        if len(text) == 0:
            raise ValueError("text is an empty list; pass a string or a non-empty list of strings.")
        for index, item in enumerate(text):
            if not isinstance(item, str):
                raise TypeError(f"text[{index}] must be a str, got {type(item).__name__}: {item!r:.80}")
        return list(text)
    raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}: {text!r:.80}")


class Beit3Processor(ProcessorMixin):
    r"""Image processor + tokenizer for BEiT-3, reproducing the original preprocessing.

    Args:
        image_processor ([`Beit3ImageProcessor`] or any image processor): the image side.
        tokenizer ([`PreTrainedTokenizerBase`]): the text side, normally the ``beit3.spm`` conversion
            (``beit3_hf.conversion.tokenizer.load_sentencepiece_tokenizer``); any tokenizer that adds begin and end
            tokens works (a BERT WordPiece one adds ``[CLS]``/``[SEP]``).
        max_length (`int`, defaults to 64): text length after truncation and padding (``--num_max_bpe_tokens``;
            the original captioning recipes used 32). Saved in ``processor_config.json``.

    Calling it returns a [`BatchFeature`] with ``pixel_values`` (batch, 3, H, W) -- or (batch, 2, 3, H, W) for NLVR2
    pairs given as ``images=[(left, right), ...]`` -- and ``input_ids`` / ``attention_mask`` (batch, max_length).

    Example:
        >>> from PIL import Image
        >>> from transformers import AutoProcessor
        >>> processor = AutoProcessor.from_pretrained("path/to/converted", trust_remote_code=True)  # doctest: +SKIP
        >>> batch = processor(images=[Image.new("RGB", (640, 480))], text=["a photo"])  # doctest: +SKIP
        >>> sorted(batch.keys())  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'pixel_values']
        >>> pairs = processor(images=[(Image.new("RGB", (64, 64)), Image.new("L", (80, 60)))], text="Two dogs.")
        ... # doctest: +SKIP
        >>> pairs["pixel_values"].shape  # doctest: +SKIP
        torch.Size([1, 2, 3, 224, 224])
    """

    def __init__(
        self,
        image_processor: BaseImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "Beit3Processor needs a tokenizer, e.g. beit3_hf.conversion.tokenizer.load_sentencepiece_tokenizer("
                "'beit3.spm') or AutoTokenizer.from_pretrained(<converted checkpoint>)."
            )
        self.max_length = max_length
        super().__init__(
            image_processor if image_processor is not None else Beit3ImageProcessor(), tokenizer, **kwargs
        )

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        *,
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        **images_kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images and/or texts.

        Args:
            images: one image, a list or rank-4 batch of images, or for NLVR2 a list of ``(left, right)`` pairs.
                Images are PIL images (any mode), arrays/tensors ((H, W, C) or (C, H, W)) or local file paths.
            text: a string or a list of strings, one per image (or pair) when both are given.
            padding: ``"max_length"`` (default, as the original), ``"longest"``/``True``, or ``False``.
            truncation: keep at most ``max_length`` tokens, the begin and end tokens included (the original always
                truncates).
            max_length: defaults to the processor's ``max_length`` (64).
            return_tensors: ``"pt"`` (default), ``"np"`` or ``None`` (lists).
            **images_kwargs: passed to the image processor (``size``, ``do_center_crop``, ...).
        """
        if images is None and text is None:
            raise ValueError("Beit3Processor needs images=..., text=..., or both.")
        if images is None and images_kwargs:
            raise TypeError(
                f"Unexpected keyword argument(s) {sorted(images_kwargs)}: only image-processor options are accepted "
                "besides padding, truncation, max_length and return_tensors, and no images were given."
            )
        max_length = self.max_length if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an integer >= 2 (room for the begin/end tokens), got {max_length!r}."
            )
        data: dict[str, Any] = {}
        if images is not None:
            pairs = _split_pairs(images)
            stacked = "pt" if return_tensors is not None or pairs is not None else None
            pixel_values = self.image_processor(
                images if pairs is None else pairs, return_tensors=stacked, **images_kwargs
            )["pixel_values"]
            if pairs is not None:
                pixel_values = pixel_values.reshape(-1, 2, *pixel_values.shape[1:])
                pixel_values = list(pixel_values) if return_tensors is None else pixel_values
            data["pixel_values"] = pixel_values
        if text is not None:
            # Padded on the right whatever the tokenizer's `padding_side`: BEiT-3's text positions are absolute, `<s>`
            # at position 0. (transformers' image-text-to-text pipeline sets the tokenizer's side to "left" from 5.25.)
            kwargs = {"padding": padding, "truncation": truncation, "max_length": max_length, "padding_side": "right"}
            data.update(self.tokenizer(_check_text(text), return_token_type_ids=False, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode generated captions (special tokens skipped by default)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one sequence of ids (special tokens skipped by default)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]
