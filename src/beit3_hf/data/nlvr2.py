"""NLVR2 as released: JSON Lines statement files (``nlvr2/data/{train,dev,test1}.json``) and image-pair folders.

Each line holds ``identifier`` (``"train-10171-0-0"``: set, pair, image set, sentence), ``sentence``, ``label``
(``"True"`` / ``"False"``) and, for training, ``directory``. The pair's images are
``IMAGE_DIR/[directory/]{set}-{pair}-{image set}-img0.png`` (left) and ``-img1.png`` (right), as the original index
builder reads them, in the layout of the original BEiT-3 recipe (``get_started_for_nlvr2.md``)::

    DATA_DIR/images/train/0/train-11670-0-img0.png
    DATA_DIR/dev/dev-269-0-img0.png
    DATA_DIR/test1/test1-261-0-img0.png

:func:`load_nlvr2` reads one file, :func:`nlvr2_dataset` turns its examples into a ``datasets.Dataset`` for a
``Trainer`` pipeline and :func:`nlvr2_accuracy` is the original's accuracy.

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .loaders import check_images_exist, read_json_items

__all__ = [
    "DEFAULT_IMAGE_DIRS",
    "Nlvr2Example",
    "load_nlvr2",
    "nlvr2_accuracy",
    "nlvr2_dataset",
]

#: Image folder of each NLVR2 split relative to the data folder, as the original recipe lays them out.
DEFAULT_IMAGE_DIRS = {"train": "images/train", "dev": "dev", "test1": "test1"}


@dataclass(frozen=True)
class Nlvr2Example:
    """One statement about a pair of images; ``label`` is 1 for ``"True"``, 0 for ``"False"``, None if unlabelled.

    Example:
        >>> Nlvr2Example("dev-1-0-0", "One image has a dog.", 1, "dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png").label
        1
    """

    identifier: str
    sentence: str
    label: int | None
    left_image: str
    right_image: str


def _label(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise ValueError(f'{where}: \'label\' must be "True" or "False", got {value!r}')


def load_nlvr2(
    path: str | os.PathLike[str], image_dir: str | os.PathLike[str], *, check_images: bool = True
) -> list[Nlvr2Example]:
    """Read an NLVR2 statement file (JSON Lines; a JSON list is accepted too) and locate each pair's images (see the
    module docstring). A missing ``label`` gives unlabelled examples (prediction only). Errors name the file and
    line; missing images are listed up front.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "dev.json").write_text(json.dumps(
        ...     {"identifier": "dev-7-1-0", "sentence": "There are two dogs.", "label": "False"}) + "\\n")
        >>> ex = load_nlvr2(d / "dev.json", d / "dev", check_images=False)[0]
        >>> ex.label, pathlib.Path(ex.left_image).name, pathlib.Path(ex.right_image).name
        (0, 'dev-7-1-img0.png', 'dev-7-1-img1.png')
    """
    path, image_dir = Path(path), Path(image_dir)
    examples = []
    for where, item in read_json_items(path):  # a missing file, bad JSON: errors name the file (and line)
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        identifier, sentence = item.get("identifier"), item.get("sentence")
        if not isinstance(identifier, str) or identifier.count("-") < 3:
            raise ValueError(f"{where}: 'identifier' must look like 'train-10171-0-0', got {identifier!r}")
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"{where} ({identifier}): no 'sentence' text")
        folder = image_dir / str(item["directory"]) if "directory" in item else image_dir
        stem = folder / "-".join(identifier.split("-")[:-1])
        label = _label(item.get("label"), f"{where} ({identifier})")
        examples.append(Nlvr2Example(identifier, sentence.strip(), label, f"{stem}-img0.png", f"{stem}-img1.png"))
    if not examples:
        raise ValueError(f"{path}: no statements")
    if check_images:
        images = sorted({p for e in examples for p in (e.left_image, e.right_image)})
        check_images_exist(images, source=f"{path} (images in {image_dir})")
    return examples


def nlvr2_dataset(examples: Sequence[Nlvr2Example]) -> Any:
    """A ``datasets.Dataset``: ``identifier``, ``sentence``, ``label`` (-1 when unlabelled), ``left`` and ``right``
    (image paths). Transform it lazily with ``.with_transform``."""
    import datasets

    if not examples:
        raise ValueError("no NLVR2 examples")
    return datasets.Dataset.from_dict(
        {
            "identifier": [e.identifier for e in examples],
            "sentence": [e.sentence for e in examples],
            "label": [-1 if e.label is None else e.label for e in examples],
            "left": [e.left_image for e in examples],
            "right": [e.right_image for e in examples],
        }
    )


def nlvr2_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The original's NLVR2 accuracy as a fraction: arg-max class equals the label.

    Example:
        >>> round(nlvr2_accuracy(torch.tensor([[0.2, 0.9], [1.0, -1.0], [0.0, 2.0]]), torch.tensor([1, 1, 1])), 4)
        0.6667
    """
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need as many labels as logits rows (> 0); got {logits.shape[0]} and {labels.shape[0]}.")
    return int((logits.argmax(dim=-1) == labels.view(-1)).sum()) / labels.numel()
