"""Loaders for the data formats people actually have, returning simple records for a Trainer data pipeline.

Retrieval:

- :func:`load_karpathy_split`: Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``, and the
  built-in ``dataset_synthetic.json``) plus an image root;
- :func:`load_caption_jsonl`: a JSON list or JSON Lines file of ``{"image": path, "caption": text}``;
- :class:`RetrievalPairDataset`: a torch ``Dataset`` with one ``(image, caption)`` pair per caption, for training;
- :class:`RetrievalEvalIndex`: the unique images, all captions and the caption -> image map, so that evaluation
  encodes every image once and every caption once (see :mod:`beit3_hf.evaluation.retrieval`).

Classification: :func:`load_imagefolder` reads an ImageNet-style ``train/CLASS/*.JPEG`` + ``val/CLASS/*.JPEG`` folder
through Hugging Face ``datasets``, without touching the network.

Every loader checks its input up front and raises an error that names the offending file (and entry or line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "RetrievalEvalIndex",
    "RetrievalImageDataset",
    "RetrievalPairDataset",
    "RetrievalRecord",
    "check_images_exist",
    "load_caption_jsonl",
    "load_imagefolder",
    "load_karpathy_split",
]

#: File extensions (lower case) counted as images in class folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Folder names accepted for the validation split of an ImageNet-style folder, in order of preference.
VALIDATION_FOLDER_NAMES: tuple[str, ...] = ("val", "validation", "valid")
_MAX_LISTED = 5


@dataclass(frozen=True)
class RetrievalRecord:
    """One image with all of its captions.

    ``image_id`` is the running index of the image within the loaded split (0, 1, 2, ... in file order), as in the
    original BEiT-3 retrieval index; ``image_path`` is a string so that records serialise and pickle trivially.

    Example:
        >>> r = RetrievalRecord("images/0.png", ("a red circle", "a red disc"), 0)
        >>> r.captions[1], r.image_id
        ('a red disc', 0)
    """

    image_path: str
    captions: tuple[str, ...]
    image_id: int


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def check_images_exist(paths: Iterable[str | os.PathLike[str]], *, source: str | os.PathLike[str]) -> None:
    """Raise ``FileNotFoundError`` naming ``source``, the number of missing images and the first few, if any is missing.

    Example:
        >>> check_images_exist([], source="captions.jsonl")  # nothing to check, no error
    """
    paths = list(paths)
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(paths)} image files are missing, e.g.:\n  {listed}{more}"
        )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def _field(entry: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, expected an object")
    if name not in entry:
        raise ValueError(f"{where} has no {name!r} field")
    value = entry[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where} field {name!r} is a {type(value).__name__}, expected {expected}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Karpathy split files
# ----------------------------------------------------------------------------------------------------------------


def load_karpathy_split(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str,
    *,
    include_restval: bool = True,
    check_images: bool = True,
) -> list[RetrievalRecord]:
    """Load one split of a Karpathy split file as one :class:`RetrievalRecord` per image, in file order.

    The image of an entry is ``image_root / filepath / filename`` when the entry has a non-empty ``filepath`` (COCO:
    ``filepath`` is ``train2014`` or ``val2014``, so ``image_root`` is the folder holding those), otherwise
    ``image_root / filename`` (Flickr30k: ``image_root`` is the ``flickr30k-images`` folder). Captions are the
    ``raw`` texts of the entry's ``sentences``, stripped.

    ``split`` is a Karpathy split name: ``train``, ``val``, ``test`` or ``restval``. With ``split="train"`` and
    ``include_restval=True`` (the default) the ``restval`` images are loaded too, in file order, which is the
    Karpathy-style COCO training set (113,287 images) that the original BEiT-3 retrieval index builds
    (``split=("train", "restval")``); Flickr30k has no ``restval``, so the flag changes nothing there.
    ``image_id`` is the running index of the image within what was loaded, as in the original.

    With ``check_images=True`` every image path is checked up front; errors name ``json_path``, and for malformed
    entries the entry index and the missing field.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        ...     {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A dog. "}, {"raw": "A puppy."}]}]}))
        >>> records = load_karpathy_split(d / "dataset_flickr30k.json", d, "test", check_images=False)
        >>> records[0].captions, records[0].image_id, records[0].image_path == str(d / "1.jpg")
        (('A dog.', 'A puppy.'), 0, True)
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    data = _read_json(json_path)
    images = _field(data, "images", list, f"{json_path}: the top-level object")
    wanted = {split, "restval"} if split == "train" and include_restval else {split}

    records: list[RetrievalRecord] = []
    split_names: set[str] = set()
    for index, entry in enumerate(images):
        where = f"{json_path}: images[{index}]"
        entry_split = _field(entry, "split", str, where)
        split_names.add(entry_split)
        if entry_split not in wanted:
            continue
        filename = _field(entry, "filename", str, where)
        if not filename:
            raise ValueError(f"{where} has an empty 'filename'")
        where = f"{where} ({filename!r})"
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise ValueError(f"{where} field 'filepath' is a {type(filepath).__name__}, expected str")
        sentences = _field(entry, "sentences", list, where)
        if not sentences:
            raise ValueError(f"{where} has an empty 'sentences' list")
        captions = []
        for j, sentence in enumerate(sentences):
            raw = _field(sentence, "raw", str, f"{where} sentences[{j}]").strip()
            if not raw:
                raise ValueError(f"{where} sentences[{j}] has an empty 'raw' caption")
            captions.append(raw)
        records.append(RetrievalRecord(str(image_root / filepath / filename), tuple(captions), len(records)))

    if not records:
        requested = " + ".join(sorted(wanted))
        raise ValueError(
            f"{json_path}: no images in split {requested!r}; splits present: {sorted(split_names) or 'none'}"
        )
    if check_images:
        check_images_exist(
            (r.image_path for r in records), source=f"{json_path} (split {split!r}, image root {image_root})"
        )
    return records


# ----------------------------------------------------------------------------------------------------------------
# {"image", "caption"} JSON / JSON Lines
# ----------------------------------------------------------------------------------------------------------------


def _caption_items(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, item)`` for a JSON list or a JSON Lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
        for i, item in enumerate(items):
            yield f"{path}: item {i}", item
        return
    if text.lstrip().startswith("{") and "\n" in text.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines: several objects, one per line
        if isinstance(whole, dict) and "image" in whole:
            yield f"{path}: the object", whole
            return
        if isinstance(whole, dict):
            raise ValueError(
                f"{path}: is one JSON object (keys {sorted(whole)[:5]}), expected a JSON list or JSON Lines of "
                '{"image": path, "caption": text} objects'
            )
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from err
        yield f"{path}:{lineno}", item


def load_caption_jsonl(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = True,
) -> list[RetrievalRecord]:
    """Load ``{"image": path, "caption": text}`` items and group the captions of each image.

    The file is either a JSON list of such objects or JSON Lines (one object per line; blank lines are skipped).
    An item may carry ``"captions": [text, ...]`` instead of one ``"caption"``. Relative image paths are resolved
    against ``image_root``, or against the file's own folder when ``image_root`` is None. Images keep the order of
    their first appearance, which also gives ``image_id``.

    Errors name the file and line (``file:line``) or item index; missing images are checked up front.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "caps.jsonl").write_text('{"image": "a.png", "caption": "x"}\\n{"image": "a.png", "caption": "y"}\\n')
        >>> [(pathlib.Path(r.image_path).name, r.captions) for r in load_caption_jsonl(d / "caps.jsonl", check_images=False)]
        [('a.png', ('x', 'y'))]
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    grouped: dict[str, list[str]] = {}
    for where, item in _caption_items(path):
        image = _field(item, "image", str, where)
        if not image:
            raise ValueError(f"{where} has an empty 'image'")
        if "caption" in item:
            captions = [_field(item, "caption", str, where)]
        elif "captions" in item:
            captions = _field(item, "captions", list, where)
        else:
            raise ValueError(f"{where} has no 'caption' field (expected {{'image': path, 'caption': text}})")
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{where} has an empty or non-string caption")
        grouped.setdefault(str(root / image), []).extend(c.strip() for c in captions)
    if not grouped:
        raise ValueError(f"{path}: no captions in file")
    records = [RetrievalRecord(image, tuple(caps), i) for i, (image, caps) in enumerate(grouped.items())]
    if check_images:
        check_images_exist((r.image_path for r in records), source=f"{path} (image root {root})")
    return records


# ----------------------------------------------------------------------------------------------------------------
# torch datasets for training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class RetrievalPairDataset(torch.utils.data.Dataset):
    """One item per (image, caption) pair, for contrastive retrieval training.

    Items are dicts ``{"image": PIL RGB image (or the path if load_images=False), "caption": str, "image_id": int}``.
    ``transform``, if given, is applied to the item dict and its result is returned (e.g. a processor call that
    returns tensors), so that a plain collator or a ``Trainer`` can stack them.

    Example:
        >>> ds = RetrievalPairDataset([RetrievalRecord("a.png", ("x", "y"), 0)], load_images=False)
        >>> len(ds), ds[1]
        (2, {'image': 'a.png', 'caption': 'y', 'image_id': 0})
    """

    def __init__(
        self,
        records: Sequence[RetrievalRecord],
        *,
        load_images: bool = True,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.records = list(records)
        self.load_images = load_images
        self.transform = transform
        self.pairs: list[tuple[int, int]] = [
            (i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Any:
        record_index, caption_index = self.pairs[index]
        record = self.records[record_index]
        item = {
            "image": _open_rgb(record.image_path) if self.load_images else record.image_path,
            "caption": record.captions[caption_index],
            "image_id": record.image_id,
        }
        return self.transform(item) if self.transform is not None else item


class RetrievalImageDataset(torch.utils.data.Dataset):
    """The unique images of an evaluation set, each once: items ``{"image": PIL RGB image or path, "index": int}``.

    Example:
        >>> ds = RetrievalImageDataset(["a.png", "b.png"], load_images=False)
        >>> len(ds), ds[1]
        (2, {'image': 'b.png', 'index': 1})
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        *,
        load_images: bool = True,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.image_paths = list(image_paths)
        self.load_images = load_images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> Any:
        path = self.image_paths[index]
        item = {"image": _open_rgb(path) if self.load_images else path, "index": index}
        return self.transform(item) if self.transform is not None else item


@dataclass(frozen=True)
class RetrievalEvalIndex:
    """An evaluation set laid out for encoding every image once and every caption once.

    ``text_to_image[t]`` is the position in ``image_paths`` of caption ``t``'s image: exactly the argument that
    :func:`beit3_hf.evaluation.retrieval.retrieval_recall` takes next to the ``(num_images, num_texts)`` similarity.
    ``image_ids`` keeps each image's record ``image_id``.

    Example:
        >>> index = RetrievalEvalIndex.from_records([
        ...     RetrievalRecord("a.png", ("x", "y"), 0), RetrievalRecord("b.png", ("z",), 1)])
        >>> index.captions, index.text_to_image.tolist(), index.num_images
        (['x', 'y', 'z'], [0, 0, 1], 2)
    """

    image_paths: list[str]
    image_ids: list[int]
    captions: list[str]
    text_to_image: torch.Tensor

    @classmethod
    def from_records(cls, records: Sequence[RetrievalRecord]) -> RetrievalEvalIndex:
        """Build the index; records sharing an ``image_path`` are merged (first occurrence kept, as the original)."""
        position: dict[str, int] = {}
        image_paths: list[str] = []
        image_ids: list[int] = []
        captions: list[str] = []
        text_to_image: list[int] = []
        for record in records:
            if record.image_path not in position:
                position[record.image_path] = len(image_paths)
                image_paths.append(record.image_path)
                image_ids.append(record.image_id)
            for caption in record.captions:
                captions.append(caption)
                text_to_image.append(position[record.image_path])
        if not image_paths:
            raise ValueError("no records to index")
        return cls(image_paths, image_ids, captions, torch.tensor(text_to_image, dtype=torch.long))

    @property
    def num_images(self) -> int:
        """Number of unique images."""
        return len(self.image_paths)

    @property
    def num_texts(self) -> int:
        """Number of captions."""
        return len(self.captions)

    def image_dataset(
        self, *, load_images: bool = True, transform: Callable[[dict[str, Any]], Any] | None = None
    ) -> RetrievalImageDataset:
        """A torch ``Dataset`` over the unique images, in index order."""
        return RetrievalImageDataset(self.image_paths, load_images=load_images, transform=transform)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-style folders through Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolderData:
    """What :func:`load_imagefolder` returns: the ``DatasetDict`` (``train``, ``validation``) and the class names.

    Rows are ``{"image": PIL image, "label": int}``; ``class_names[label]`` is the class folder name (sorted order,
    as ``torchvision.datasets.ImageFolder``), also available as ``dataset["train"].features["label"].names``.

    Example:
        >>> data = ImageFolderData(dataset=None, class_names=["cat", "dog"], root=Path("imagenet"))
        >>> data.id2label, data.label2id
        ({0: 'cat', 1: 'dog'}, {'cat': 0, 'dog': 1})
    """

    dataset: Any  # datasets.DatasetDict (not imported at module import time)
    class_names: list[str]
    root: Path

    @property
    def id2label(self) -> dict[int, str]:
        """``{label: class name}`` for a model config."""
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{class name: label}`` for a model config."""
        return {name: i for i, name in enumerate(self.class_names)}


def _scan_split(split_dir: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` of one split folder, with clear errors for what imagefolder would misread."""
    classes: dict[str, list[Path]] = {}
    stray = []
    for child in sorted(split_dir.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            files = sorted(p for p in child.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(
                    f"{child}: class folder has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            classes[child.name] = files
        elif child.suffix.lower() in IMAGE_EXTENSIONS:
            stray.append(child)
    if stray:
        raise ValueError(
            f"{split_dir}: {len(stray)} image files lie directly in the split folder (e.g. {stray[0].name}); "
            "every image must be inside a class folder (split/CLASS/image)"
        )
    if not classes:
        raise ValueError(f"{split_dir}: no class folders (expected {split_dir}/CLASS/*.JPEG)")
    return classes


def load_imagefolder(
    root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    keep_in_memory: bool | None = None,
) -> ImageFolderData:
    """Load an ImageNet-style folder (``root/train/CLASS/*``, ``root/val/CLASS/*``) with Hugging Face ``datasets``.

    The validation folder may be named ``val``, ``validation`` or ``valid``. Classes are the folder names, sorted;
    the validation classes must be a subset of the training classes. The folders are scanned first, so a missing
    split folder, a class folder with no images or a validation class unknown to training raises a ``ValueError``
    or ``FileNotFoundError`` naming the folder. Loading goes through the packaged ``imagefolder`` builder with
    explicit per-split file lists, which never touches the network (the packaged builder needs no download);
    ``cache_dir`` is where ``datasets`` keeps its Arrow cache.

    Example:
        >>> import tempfile
        >>> from beit3_hf.testing.synthetic_data import write_synthetic_dataset
        >>> d = tempfile.mkdtemp()
        >>> paths = write_synthetic_dataset(d, num_train=1, num_val=0, num_test=0, classification_train_per_class=2,
        ...                                 classification_val_per_class=1, num_colours=2, num_shapes=2)
        >>> data = load_imagefolder(paths.imagenet, cache_dir=f"{d}/cache")
        >>> data.class_names, data.dataset["train"].num_rows, data.dataset["validation"].num_rows
        (['green_circle', 'green_square', 'red_circle', 'red_square'], 8, 4)
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected {root}/train/CLASS/* and {root}/val/CLASS/*)")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: missing split folder 'train' (expected {train_dir}/CLASS/*.JPEG)")
    val_dir = next((root / name for name in VALIDATION_FOLDER_NAMES if (root / name).is_dir()), None)
    if val_dir is None:
        raise FileNotFoundError(
            f"{root / 'val'}: missing validation split folder (looked for {', '.join(VALIDATION_FOLDER_NAMES)} "
            f"under {root})"
        )
    train_classes = _scan_split(train_dir)
    val_classes = _scan_split(val_dir)
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise ValueError(
            f"{val_dir}: {len(unknown)} class folders do not exist in {train_dir}, e.g. {val_dir / unknown[0]}"
        )
    class_names = sorted(train_classes)

    import datasets  # Hugging Face datasets; imported here so that importing this module stays light

    data_files = {
        "train": [str(p) for files in train_classes.values() for p in files],
        "validation": [str(p) for files in val_classes.values() for p in files],
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    dataset = datasets.load_dataset(
        "imagefolder",
        data_files=data_files,
        features=features,
        drop_labels=False,
        drop_metadata=True,
        cache_dir=None if cache_dir is None else str(cache_dir),
        keep_in_memory=keep_in_memory,
    )
    names = dataset["train"].features["label"].names
    if names != class_names:  # the builder derives labels from folder names; make sure they agree with the scan
        raise RuntimeError(f"{root}: datasets inferred classes {names[:5]}..., expected {class_names[:5]}...")
    return ImageFolderData(dataset=dataset, class_names=class_names, root=root)
