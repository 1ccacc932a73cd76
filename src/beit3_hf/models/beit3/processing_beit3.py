"""``Beit3Processor``: BEiT-3's image processor and text tokenizer behind one call.

Text is encoded as the original ``BaseDataset._get_text_segment`` does: ``[bos] + tokens[: max_length - 2] + [eos]``,
padded on the right with the pad id to ``max_length`` (64 by default, as ``--num_max_bpe_tokens``). The original
returned ``padding_mask`` (1 = padding); this processor returns the transformers ``attention_mask`` (1 = attend),
its complement. Any transformers tokenizer can be used: one without bos/eos tokens (a BERT WordPiece vocabulary, as
used for Chinese retrieval) falls back to its cls/sep tokens, with a one-line notice.

This file is remote code: it is copied into checkpoints and imports only torch, numpy, PIL, transformers and
``image_processing_beit3`` (relative import).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging

from .image_processing_beit3 import Beit3ImageProcessor, _describe

logger = logging.get_logger(__name__)

__all__ = ["Beit3Processor"]

DEFAULT_MAX_LENGTH = 64
_PADDING = (True, False, "longest", "max_length", "do_not_pad")


def _is_single_image(value: Any) -> bool:
    if isinstance(value, (Image.Image, str, os.PathLike)):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3


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
            if not _is_single_image(image):
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
            (``beit3_hf.conversion.tokenizer.load_sentencepiece_tokenizer``); any transformers tokenizer works.
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
        if image_processor is None:
            image_processor = Beit3ImageProcessor()
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an integer >= 2 (room for the begin/end tokens), got {max_length!r}."
            )
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    # -- special tokens -----------------------------------------------------------------------------------------

    def _special_ids(self) -> tuple[int, int, int]:
        """(begin, end, pad) ids: bos/eos, or cls/sep for tokenizers that have no bos/eos (BERT WordPiece)."""
        tok = self.tokenizer
        begin, end, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        if begin is None or end is None:
            if tok.cls_token_id is None or tok.sep_token_id is None:
                raise ValueError(
                    f"{type(tok).__name__} has neither bos/eos nor cls/sep tokens; BEiT-3 needs begin and end tokens "
                    "around each text. Set tokenizer.bos_token and tokenizer.eos_token."
                )
            begin, end = tok.cls_token_id, tok.sep_token_id
            logger.warning_once(
                f"Beit3Processor: {type(tok).__name__} has no bos/eos token; using its cls/sep tokens "
                f"({tok.cls_token!r}={begin}, {tok.sep_token!r}={end}) to begin and end each text."
            )
        if pad is None:
            raise ValueError(f"{type(tok).__name__} has no pad token; set tokenizer.pad_token before padding texts.")
        return begin, end, pad

    # -- calls --------------------------------------------------------------------------------------------------

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
            truncation: keep at most ``max_length - 2`` text tokens (the original always truncates).
            max_length: defaults to the processor's ``max_length`` (64).
            return_tensors: ``"pt"`` (default), ``"np"`` or ``None`` (lists).
            **images_kwargs: passed to the image processor (``device``, ``num_threads``, ``size``, ...).
        """
        if images is None and text is None:
            raise ValueError("Beit3Processor needs images=..., text=..., or both.")
        if images is None and images_kwargs:
            raise TypeError(
                f"Unexpected keyword argument(s) {sorted(images_kwargs)}: only image-processor options are accepted "
                "besides padding, truncation, max_length and return_tensors, and no images were given."
            )
        if padding not in _PADDING:
            raise ValueError(f"padding must be one of {_PADDING}, got {padding!r}.")
        data: dict[str, Any] = {}
        if images is not None:
            pairs = _split_pairs(images)
            stacked = "pt" if return_tensors is not None else None
            features = self.image_processor(
                pairs if pairs is not None else images, return_tensors=stacked, **images_kwargs
            )
            pixel_values = features["pixel_values"]
            if not isinstance(pixel_values, torch.Tensor):
                pixel_values = list(pixel_values)
                if pairs is not None:
                    pixel_values = [torch.stack(pixel_values[i : i + 2]) for i in range(0, len(pixel_values), 2)]
            elif pairs is not None:
                pixel_values = pixel_values.reshape(len(pixel_values) // 2, 2, *pixel_values.shape[1:])
            data["pixel_values"] = pixel_values
        if text is not None:
            data.update(self._encode_text(_check_text(text), padding, truncation, max_length))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_text(
        self, texts: list[str], padding: bool | str, truncation: bool, max_length: int | None
    ) -> dict[str, list[list[int]]]:
        max_length = self.max_length if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}.")
        begin, end, pad = self._special_ids()
        pieces = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        ids = [[begin, *(p[: max_length - 2] if truncation else p), end] for p in pieces]
        if padding in (True, "longest"):
            target = max(len(row) for row in ids)
        elif padding == "max_length":
            target = max_length
        else:
            target = 0
        input_ids = [row + [pad] * (target - len(row)) for row in ids]
        attention_mask = [[1] * len(row) + [0] * (target - len(row)) for row in ids]
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list:
        """Save tokenizer, image processor and processor configs plus this code, loadable with ``trust_remote_code``.

        Besides transformers 5's ``processor_config.json`` (image processor nested in it) this also writes the flat
        ``preprocessor_config.json`` that older tools and transformers 4 read for ``AutoImageProcessor``.
        """
        # Saving copies the code only for classes marked as remote code; marking is idempotent and harmless.
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoProcessor")
        if isinstance(self.image_processor, Beit3ImageProcessor) and type(self.image_processor)._auto_class is None:
            type(self.image_processor).register_for_auto_class("AutoImageProcessor")
        os.makedirs(save_directory, exist_ok=True)
        self.image_processor.save_pretrained(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode generated captions (special tokens skipped by default)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one sequence of ids (special tokens skipped by default)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]
