"""Captioning data (COCO Karpathy split, NoCaps-style image folders) and the original caption masking.

Captioning:

- :func:`load_karpathy_captions`: one split of a Karpathy split file (``dataset_coco.json``) as
  :class:`CaptionRecord` s whose ``image_id`` is the COCO id (``cocoid``), the id of the COCO-format results file;
- :func:`load_caption_references`: reference captions of a COCO-format annotation file (``{"annotations": [{"image_id",
  "caption"}]}``, e.g. the NoCaps validation captions);
- :func:`image_folder_records`: every image of a folder (NoCaps-style prediction), ids from a COCO-style image-info
  file (``{"images": [{"id", "file_name"}]}``) or from the file names;
- :func:`mask_caption`: the original ``CaptioningDataset`` masking, with the same random draws in the same order.

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .loaders import IMAGE_EXTENSIONS, check_images_exist, karpathy_split_entries, read_json

__all__ = [
    "CaptionRecord",
    "image_folder_records",
    "load_caption_references",
    "load_karpathy_captions",
    "mask_caption",
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
    records, entries = karpathy_split_entries(json_path, image_root, split, include_restval, check_images=True)
    ids = [entry.get("cocoid", entry.get("imgid")) for entry in entries]
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
    data = read_json(path)
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
        data = read_json(info_path)  # a missing file: FileNotFoundError naming it
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
