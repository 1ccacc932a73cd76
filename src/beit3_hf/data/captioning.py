"""Captioning data (COCO Karpathy split, NoCaps-style image folders), the original caption masking, and the text and
image inputs that the vision-language example scripts share.

Captioning:

- :func:`load_karpathy_captions`: one split of a Karpathy split file (``dataset_coco.json``) as
  :class:`CaptionRecord` s whose ``image_id`` is the COCO id (``cocoid``), the id of the COCO-format results file;
- :func:`load_caption_references`: reference captions of a COCO-format annotation file (``{"annotations": [{"image_id",
  "caption"}]}``, e.g. the NoCaps validation captions);
- :func:`image_folder_records`: every image of a folder (NoCaps-style prediction), ids from a COCO-style image-info
  file (``{"images": [{"id", "file_name"}]}``) or from the file names;
- :func:`mask_caption`: the original ``CaptioningDataset`` masking: ``max(1, min(round(n * p), n - 1))`` positions in
  ``[1, n - 1]`` (never the first token; possibly ``</s>``), each turned into ``<mask>`` (80%), kept (10%) or
  replaced by a random id (10%), with the same random draws, in the same order, as the original.

Shared by ``examples/{vqa,nlvr2,captioning}`` (and usable by the other scripts):

- :func:`load_processor`: the processor of a run: ``--sentencepiece_model`` (``beit3.spm``), ``--tokenizer_name``
  (any transformers tokenizer, e.g. a Chinese BERT WordPiece one), or the checkpoint folder's own;
- :func:`tokenizer_special_ids` / :func:`set_special_token_ids`: a model's ``bos/eos/pad/mask`` ids from its
  tokenizer, with ``[CLS]`` / ``[SEP]`` standing in for tokenizers without ``<s>`` / ``</s>``;
- :func:`train_image_transform`: the original vision-language training transform (random resized crop, flip,
  optional RandAugment, mean = std = 0.5).

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .loaders import IMAGE_EXTENSIONS, check_images_exist, load_karpathy_split

__all__ = [
    "CaptionRecord",
    "image_folder_records",
    "keep_special_token_ids",
    "load_caption_references",
    "load_karpathy_captions",
    "load_processor",
    "mask_caption",
    "set_special_token_ids",
    "tokenizer_special_ids",
    "train_image_transform",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionRecord:
    """One image, its id in the results file, and its reference captions (empty for unannotated images).

    Example:
        >>> CaptionRecord("val2014/COCO_val2014_000000000042.jpg", 42, ("A dog.",)).image_id
        42
    """

    image_path: str
    image_id: int | str
    captions: tuple[str, ...] = ()


def load_karpathy_captions(
    json_path: str | os.PathLike[str], image_root: str | os.PathLike[str], split: str, *, include_restval: bool = True
) -> list[CaptionRecord]:
    """One split of a Karpathy split file as :class:`CaptionRecord` s, ``image_id`` = ``cocoid`` when the file has it
    (COCO), else the Flickr30k ``imgid`` / the running index. Validation and image checks are
    :func:`beit3_hf.data.load_karpathy_split`'s (errors name the file and entry)."""
    records = load_karpathy_split(json_path, image_root, split, include_restval=include_restval)
    with open(json_path, encoding="utf-8") as f:
        images = json.load(f)["images"]
    wanted = {split, "restval"} if split == "train" and include_restval else {split}
    ids = [entry.get("cocoid", entry.get("imgid")) for entry in images if entry.get("split") in wanted]
    return [
        CaptionRecord(r.image_path, r.image_id if image_id is None else image_id, r.captions)
        for r, image_id in zip(records, ids)
    ]


def load_caption_references(path: str | os.PathLike[str]) -> dict[int | str, list[str]]:
    """``{image_id: [captions]}`` of a COCO-format caption annotation file (``{"annotations": [{"image_id",
    "caption"}, ...]}``, as ``captions_val2014.json`` or NoCaps' ``nocaps_val_4500_captions.json``).

    Example:
        >>> import json, tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "gt.json"
        >>> _ = f.write_text(json.dumps({"annotations": [{"image_id": 3, "caption": "A cat."},
        ...                                              {"image_id": 3, "caption": "A kitten."}]}))
        >>> load_caption_references(f)
        {3: ['A cat.', 'A kitten.']}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise ValueError(f"{path}: expected a COCO caption file, an object with a non-empty 'annotations' list")
    references: dict[int | str, list[str]] = {}
    for index, entry in enumerate(annotations):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{path}: annotations[{index}] needs 'image_id' and a 'caption' string")
        references.setdefault(entry["image_id"], []).append(entry["caption"])
    return references


def _id_from_name(name: str) -> int | str:
    """``COCO_val2014_000000000042.jpg`` -> 42, ``000123.jpg`` -> 123, ``09c863d7.jpg`` -> ``"09c863d7"``."""
    stem = Path(name).stem
    match = re.search(r"(\d+)$", stem)
    if match and (stem.isdigit() or stem.startswith("COCO_")):
        return int(match.group(1))
    return stem


def image_folder_records(
    folder: str | os.PathLike[str], image_info: str | os.PathLike[str] | None = None
) -> list[CaptionRecord]:
    """The images to caption: ``image_info`` (COCO-style ``{"images": [{"id", "file_name"}]}``, e.g.
    ``nocaps_test_image_info.json``) with files in ``folder``, or every image file of ``folder`` (sorted; ids from
    the file names: digits as integers, else the name without extension).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("COCO_val2014_000000000042.jpg", "09c863d7.png"):
        ...     _ = (d / name).write_bytes(b"")
        >>> [(pathlib.Path(r.image_path).name, r.image_id) for r in image_folder_records(d)]
        [('09c863d7.png', '09c863d7'), ('COCO_val2014_000000000042.jpg', 42)]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    if image_info is not None:
        info_path = Path(image_info)
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: no such image-info file")
        data = json.loads(info_path.read_text(encoding="utf-8"))
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list) or not images:
            raise ValueError(
                f"{info_path}: expected an object with a non-empty 'images' list of {{'id', 'file_name'}}"
            )
        records = []
        for index, entry in enumerate(images):
            if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
                raise ValueError(f"{info_path}: images[{index}] needs 'id' and 'file_name'")
            records.append(CaptionRecord(str(folder / entry["file_name"]), entry["id"]))
        check_images_exist((r.image_path for r in records), source=f"{info_path} (images in {folder})")
        return records
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [CaptionRecord(str(p), _id_from_name(p.name)) for p in files]


# ----------------------------------------------------------------------------------------------------------------
# Caption masking
# ----------------------------------------------------------------------------------------------------------------


class _RandomSource(Protocol):
    def random(self) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


def mask_caption(
    token_ids: Sequence[int],
    num_tokens: int,
    mask_prob: float,
    mask_token_id: int,
    vocab_size: int,
    rng: _RandomSource = random,  # type: ignore[assignment]
    first_random_id: int = 3,
) -> tuple[list[int], list[int]]:
    """Mask a caption as the original ``CaptioningDataset._masking_on_text_tokens``.

    Args:
        token_ids: the padded ids ``<s> ... </s> <pad> ...``.
        num_tokens: how many of them are real tokens (``<s>`` and ``</s>`` included).
        mask_prob: ``--mask_prob`` (0.6 by default in the original, 0.7 in its recipes).
        mask_token_id: the tokenizer's ``<mask>`` id.
        vocab_size: random replacements are ``rng.randint(first_random_id, vocab_size - 1)``; the original passes
            the tokenizer's ``vocab_size`` and 3 (the first id after ``<s> <pad> </s>``).
        rng: the random source (``random`` module, as the original, or a seeded ``random.Random``).

    Returns ``(masked_ids, masked_positions)``: a copy with ``max(1, min(int(num_tokens * mask_prob + 0.5),
    num_tokens - 1))`` distinct positions in ``[1, num_tokens - 1]`` changed (80% ``<mask>``, 10% unchanged, 10% a
    random id) and a 0/1 list marking them. The draws are the original's, in its order, so the same seed gives the
    same masks.

    Example:
        >>> masked, positions = mask_caption([0, 11, 12, 13, 2, 1], 5, 0.5, 99, 100, random.Random(0))
        >>> sum(positions), positions[0], positions[5]
        (3, 0, 0)
    """
    if num_tokens < 2:
        raise ValueError(f"a caption needs at least 2 tokens (<s> and </s>) to mask one, got {num_tokens}.")
    masked = list(token_ids)
    positions = [0] * len(masked)
    to_mask = max(1, min(int(num_tokens * mask_prob + 0.5), num_tokens - 1))
    done = 0
    while done < to_mask:
        i = rng.randint(1, num_tokens - 1)
        if positions[i]:
            continue
        positions[i] = 1
        p = rng.random()
        if p < 0.8:
            masked[i] = mask_token_id
        elif p >= 0.9:
            masked[i] = rng.randint(first_random_id, vocab_size - 1)
        done += 1
    return masked, positions


# ----------------------------------------------------------------------------------------------------------------
# Text and image inputs of the vision-language scripts
# ----------------------------------------------------------------------------------------------------------------


def tokenizer_special_ids(tokenizer: Any, *, need_mask: bool = False, source: str = "the tokenizer") -> dict[str, int]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"}`` of a tokenizer for a BEiT-3 config.

    A tokenizer without ``<s>`` / ``</s>`` (BERT WordPiece: ``[CLS]`` ... ``[SEP]``) gives its cls / sep ids, which
    it puts around every text. ``mask_token_id`` is left out when the tokenizer has none, unless ``need_mask``
    (captioning decodes at the ``<mask>`` slot), which raises naming ``source``.

    Example:
        >>> from types import SimpleNamespace
        >>> bert = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=101, sep_token_id=102,
        ...                        pad_token_id=0, mask_token_id=103)
        >>> tokenizer_special_ids(bert)
        {'bos_token_id': 101, 'eos_token_id': 102, 'pad_token_id': 0, 'mask_token_id': 103}
    """
    name = type(tokenizer).__name__
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if bos is None or eos is None:
        raise ValueError(
            f"{source} ({name}) has neither bos/eos nor cls/sep tokens: BEiT-3 needs begin and end tokens."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{source} ({name}) has no pad token: set one (e.g. tokenizer.pad_token = ...) and save it.")
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is not None:
        ids["mask_token_id"] = mask
    elif need_mask:
        raise ValueError(f"{source} ({name}) has no mask token: captioning predicts at a <mask> slot; add one.")
    return ids


def set_special_token_ids(
    config: Any, tokenizer: Any, *, need_mask: bool = False, source: str = "the tokenizer"
) -> None:
    """Write :func:`tokenizer_special_ids` into ``config``, logging each id that changes, and check that every id of
    the tokenizer fits the model's vocabulary (``config.vocab_size``)."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ValueError(
            f"{source} has {size} ids but the model's vocabulary only {config.vocab_size}: use a model with a larger "
            f"vocabulary (from scratch: --config_overrides vocab_size={size})."
        )
    for name, value in tokenizer_special_ids(tokenizer, need_mask=need_mask, source=source).items():
        if getattr(config, name, None) != value:
            logger.info("config.%s: %s -> %s (from %s)", name, getattr(config, name, None), value, source)
            setattr(config, name, value)


def keep_special_token_ids(tokenizer: Any, *, need_mask: bool = False) -> Any:
    """A ``TrainerCallback`` that writes :func:`tokenizer_special_ids` into the model's config when training starts.

    Some transformers versions (5.13) make ``Trainer.train`` align the config's ``bos`` / ``eos`` ids with the
    tokenizer's ``bos_token_id`` / ``eos_token_id``, which are None for BERT-style tokenizers; BEiT-3 uses their
    ``[CLS]`` / ``[SEP]`` there (captioning's ``generate`` starts from ``bos_token_id``).
    """
    from transformers import TrainerCallback

    class KeepSpecialTokenIds(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is not None:
                set_special_token_ids(model.config, tokenizer, need_mask=need_mask)

    return KeepSpecialTokenIds()


def load_processor(
    *,
    task: str,
    image_size: int,
    max_length: int,
    model_name_or_path: str | None = None,
    tokenizer_name: str | None = None,
    sentencepiece_model: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The ``Beit3Processor`` of a run, from the first of:

    1. ``sentencepiece_model``: ``beit3.spm`` (or another sentencepiece model), converted with the original ids;
    2. ``tokenizer_name``: any tokenizer ``AutoTokenizer`` loads (a folder or Hub id), e.g. a BERT WordPiece one;
    3. ``model_name_or_path``: the checkpoint folder's own processor (``AutoProcessor``).

    In cases 1 and 2 the image side is the vision-language eval transform of ``task`` at ``image_size``; in every
    case texts are padded / truncated to ``max_length`` tokens.
    """
    from ..conversion.tokenizer import load_sentencepiece_tokenizer, processor_for_task

    if sentencepiece_model is not None:
        tokenizer = load_sentencepiece_tokenizer(sentencepiece_model, max_length=max_length)
    elif tokenizer_name is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=trust_remote_code)
        tokenizer.model_max_length = max_length
    elif model_name_or_path is not None:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{model_name_or_path} has no processor ({error}); pass --sentencepiece_model beit3.spm or "
                "--tokenizer_name."
            ) from error
        if not hasattr(processor, "tokenizer"):
            raise ValueError(
                f"{model_name_or_path} holds an image processor only; pass --sentencepiece_model or --tokenizer_name."
            )
        processor.max_length = max_length
        return processor
    else:
        raise ValueError(
            "No tokenizer: pass --sentencepiece_model (beit3.spm), --tokenizer_name, or a checkpoint folder."
        )
    return processor_for_task(tokenizer, task=task, image_size=image_size, max_length=max_length)


def train_image_transform(
    image_size: int, *, min_crop_scale: float = 0.5, hflip: bool = True, randaug: bool = False
) -> Any:
    """The original vision-language training transform: random resized crop (scale ``min_crop_scale``-1, bicubic;
    1.0 only resizes), horizontal flip, optional RandAugment (torchvision's, 2 ops at magnitude 7, standing in for
    the original's BLIP RandomAugment), then mean = std = 0.5.

    The original flips VQA and NLVR2 images too, although "left" / "right" in a question then change meaning.

    Example:
        >>> from PIL import Image
        >>> train_image_transform(32, min_crop_scale=1.0, hflip=False)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    from torchvision import transforms

    bicubic = transforms.InterpolationMode.BICUBIC
    if not 0.0 < min_crop_scale <= 1.0:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}.")
    if min_crop_scale < 1.0:
        steps: list[Any] = [
            transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=bicubic)
        ]
    else:
        steps = [transforms.Resize((image_size, image_size), interpolation=bicubic)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if randaug:
        steps.append(transforms.RandAugment(num_ops=2, magnitude=7))
    steps += [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return transforms.Compose(steps)
