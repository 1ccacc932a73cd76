"""Loaders for the data formats people actually have, returning simple records for a Trainer data pipeline.

Retrieval:

- :func:`load_karpathy_split`: Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``, and the
  built-in ``dataset_synthetic.json``) plus an image root;
- :func:`load_caption_jsonl`: a JSON list or JSON Lines file of ``{"image": path, "caption": text}``;
- :func:`retrieval_pair_dataset`: a Hugging Face ``datasets.Dataset`` with one ``(image, caption)`` row per caption,
  for training (transforms through ``.with_transform``);
- :class:`RetrievalEvalIndex`: the unique images, all captions and the caption -> image map, so that evaluation
  encodes every image once and every caption once (see :mod:`beit3_hf.evaluation.retrieval`); its images are a
  ``datasets.Dataset`` too.

The loaders are the validation layer: they parse and check the files up front themselves, so that every error
names the file and the entry or line (``datasets``' JSON reader names neither), then hand plain records to
``datasets``.

Classification: :func:`load_imagefolder` reads an ImageNet-style ``train/CLASS/*.JPEG`` + ``val/CLASS/*.JPEG`` folder
through Hugging Face ``datasets``, without touching the network.

Images: :func:`open_image` decodes one with an error naming the file (Pillow's "image file is truncated" does not),
:func:`check_images` decodes a whole set up front, and :class:`ImageRowDecoder` / :func:`transform_with_skipping`
replace an undecodable training image by another example and record it, so that a long run neither crashes nor
skips it silently.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "ImageRowDecoder",
    "RetrievalEvalIndex",
    "RetrievalRecord",
    "UndecodableImageError",
    "check_images",
    "check_images_exist",
    "decode_image",
    "find_undecodable_images",
    "gather_skipped",
    "image_name",
    "karpathy_split_entries",
    "list_image_files",
    "load_caption_jsonl",
    "load_imagefolder",
    "load_karpathy_split",
    "open_image",
    "read_json",
    "read_json_items",
    "read_text",
    "retrieval_pair_dataset",
    "transform_with_skipping",
]

#: File extensions (lower case) counted as images in class folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: Folder names accepted for the validation split of an ImageNet-style folder, in order of preference.
VALIDATION_FOLDER_NAMES: tuple[str, ...] = ("val", "validation", "valid")
_MAX_LISTED = 5

logger = logging.getLogger(__name__)


def _first_few(items: Sequence[str]) -> str:
    """The first `_MAX_LISTED` items, one per indented line, and how many more there are."""
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(items[:_MAX_LISTED]) + more


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
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(paths)} image files are missing, e.g.:{_first_few(missing)}"
        )


def read_text(path: Path) -> str:
    """A UTF-8 text file; another encoding is an error naming the file (a bare `UnicodeDecodeError` does not)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-encode it as UTF-8, e.g. with "
            "`iconv -f <its encoding> -t utf-8`."
        ) from err


def read_json_items(path: Path, text: str | None = None) -> list[tuple[str, Any]]:
    """``(location, item)`` of every item of a JSON list (``"file: item i"``) or JSON Lines file (``"file:line"``,
    blank lines skipped); invalid JSON raises a `ValueError` naming the file and line. ``text``: the file's text,
    if already read.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "items.jsonl"
        >>> _ = path.write_text('{"a": 1}\\n\\n"b"\\n')
        >>> [(where.rsplit("/", 1)[-1], item) for where, item in read_json_items(path)]
        [('items.jsonl:1', {'a': 1}), ('items.jsonl:3', 'b')]
    """
    text = read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        return [(f"{path}: item {i}", item) for i, item in enumerate(read_json(path, text))]
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from err
    return items


def read_json(path: Path, text: str | None = None) -> Any:
    """A UTF-8 JSON file (or its ``text``, if already read); invalid JSON raises a `ValueError` naming the file and
    line.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "bad.json"
        >>> read_json(path, '{"a": [1,\\n ]}')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ...bad.json:2: invalid JSON: Expecting value
    """
    try:
        return json.loads(read_text(path) if text is None else text)
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
    return karpathy_split_entries(json_path, image_root, split, include_restval, check_images)[0]


def karpathy_split_entries(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str,
    include_restval: bool,
    check_images: bool,
) -> tuple[list[RetrievalRecord], list[dict]]:
    """:func:`load_karpathy_split`'s records and, in the same order, the file's entries they come from (for fields
    such as ``cocoid``), from one read of the file.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "dataset_coco.json").write_text(json.dumps({"images": [
        ...     {"filename": "1.jpg", "split": "val", "cocoid": 42, "sentences": [{"raw": "A dog."}]}]}))
        >>> records, entries = karpathy_split_entries(d / "dataset_coco.json", d, "val", True, False)
        >>> records[0].image_id, entries[0]["cocoid"]
        (0, 42)
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    data = read_json(json_path)
    images = _field(data, "images", list, f"{json_path}: the top-level object")
    wanted = {split, "restval"} if split == "train" and include_restval else {split}

    records: list[RetrievalRecord] = []
    entries: list[dict] = []
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
        entries.append(entry)

    if not records:
        requested = " + ".join(sorted(wanted))
        raise ValueError(
            f"{json_path}: no images in split {requested!r}; splits present: {sorted(split_names) or 'none'}"
        )
    if check_images:
        check_images_exist(
            (r.image_path for r in records), source=f"{json_path} (split {split!r}, image root {image_root})"
        )
    return records, entries


# ----------------------------------------------------------------------------------------------------------------
# {"image", "caption"} JSON / JSON Lines
# ----------------------------------------------------------------------------------------------------------------


def _caption_items(path: Path) -> list[tuple[str, Any]]:
    """``(location, item)`` of a JSON list, a JSON Lines file or one pretty-printed ``{"image", ...}`` object."""
    text = read_text(path)
    if text.lstrip().startswith("{") and "\n" in text.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines: several objects, one per line
        if isinstance(whole, dict) and "image" in whole:
            return [(f"{path}: the object", whole)]
        if isinstance(whole, dict):
            raise ValueError(
                f"{path}: is one JSON object (keys {sorted(whole)[:5]}), expected a JSON list or JSON Lines of "
                '{"image": path, "caption": text} objects'
            )
    return read_json_items(path, text)


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
# Images: decoding with the file's name, up-front checks, skipping during training
# ----------------------------------------------------------------------------------------------------------------


class UndecodableImageError(OSError):
    """An image file that Pillow cannot read; the message starts with the file's path."""


def image_name(value: Any) -> str:
    """The file name of an image value (path, `datasets.Image(decode=False)` dict), for messages and reports."""
    if isinstance(value, Image.Image):
        return getattr(value, "filename", "") or "<PIL image>"
    if isinstance(value, dict):  # {"path": ..., "bytes": ...} from datasets.Image(decode=False)
        path = value.get("path")
        if value.get("bytes") is not None:
            return str(path or "<image bytes>")
        if path is None:
            raise UndecodableImageError("<image>: the row has neither a path nor bytes")
        return str(path)
    return str(value)


def decode_image(
    source: bytes | bytearray | memoryview | str | os.PathLike[str] | Mapping[str, Any] | Image.Image,
) -> Image.Image:
    """Decode an image fully and convert it to RGB; raise Pillow's own error on any corruption (truncation included).

    ``source`` is encoded bytes, a file path, a ``datasets`` ``Image(decode=False)`` value (``{"bytes", "path"}``)
    or a PIL image. The whole image is decoded here (``Image.load()``), so a truncated file fails now rather than
    later in a transform (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on globally).
    :func:`open_image` is the same with an error that names the file.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("L", (4, 3)).save(buffer, format="PNG")
        >>> decode_image(buffer.getvalue()).mode, decode_image(buffer.getvalue()).size
        ('RGB', (4, 3))
    """
    if isinstance(source, Mapping):
        source = source["bytes"] if source.get("bytes") is not None else source["path"]
    if isinstance(source, Image.Image):
        image = source
        image.load()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(source)))
        image.load()
    else:
        with open(os.fspath(source), "rb") as file:  # closed even when decoding fails
            image = Image.open(file)
            image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(value: Any) -> Image.Image:
    """Decode an image fully and convert it to RGB; any failure raises `UndecodableImageError` naming the file.

    `value` is a path, a `datasets.Image(decode=False)` dict (`{"path", "bytes"}`) or a PIL image (returned as it
    is when already RGB, not copied). Pillow's own errors for truncated files ("image file is truncated") do not
    name the file; this one does: it is :func:`decode_image` with errors that name the file.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "bad.png"
        >>> _ = bad.write_bytes(b"not a png")
        >>> try:
        ...     open_image(bad)
        ... except UndecodableImageError as error:
        ...     print(str(error).startswith(str(bad)))
        True
    """
    name = image_name(value)
    try:
        return decode_image(value)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, FileNotFoundError):
            raise UndecodableImageError(f"{name}: no such file") from error
        raise UndecodableImageError(f"{name}: cannot decode the image ({type(error).__name__}: {error})") from error


def _decode_error(value: Any) -> str | None:
    try:
        open_image(value)
    except UndecodableImageError as error:
        return str(error)
    return None


def find_undecodable_images(values: Iterable[Any], num_threads: int | None = None) -> list[str]:
    """Decode every image (in threads: Pillow releases the GIL) and return one message per undecodable file."""
    values = list(values)
    num_threads = num_threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return [error for error in pool.map(_decode_error, values, chunksize=64) if error is not None]


def check_images(values: Iterable[Any], *, source: str, num_threads: int | None = None) -> None:
    """`--check_images`: raise `UndecodableImageError` listing the undecodable images of `source` (a description
    such as "dataset_coco.json split 'train'"), if any.

    Example:
        >>> check_images([], source="an empty set")  # nothing to decode, no error
    """
    values = list(values)
    errors = find_undecodable_images(values, num_threads)
    if errors:
        raise UndecodableImageError(
            f"{source}: {len(errors)} of {len(values)} images cannot be decoded:{_first_few(errors)}\n"
            "Remove or replace them."
        )
    logger.info("%s: all %d images decode.", source, len(values))


class ImageRowDecoder:
    """Decode the image column(s) of a batch of dataset rows; during training, replace a row with an undecodable image.

    `rows` is the untransformed dataset (anything with `len()` and `rows[i] -> dict`, e.g. a `datasets.Dataset`);
    `image_column` names the image column, or several (NLVR2's `("left", "right")`: each decoded entry is then a
    tuple of images, one per column). `__call__(batch)` takes a `with_transform` batch (a dict of columns) and
    returns `(batch, images, skipped)`: the batch with every row holding an undecodable image replaced by another
    row of `rows` (drawn deterministically from the row's first file name), its decoded RGB images, and one
    `{"file", "error"}` record per undecodable image. A file found undecodable is not tried again for the same
    example. With `skip=False` (evaluation) the first undecodable image raises `UndecodableImageError`. When
    `max_attempts` replacement draws give no decodable row it raises as well: the data is broken, not an odd file.
    """

    def __init__(
        self, rows: Any, image_column: str | Sequence[str], *, skip: bool = True, max_attempts: int = 16
    ) -> None:
        self.rows = rows
        self.image_column = image_column
        self.image_columns = (image_column,) if isinstance(image_column, str) else tuple(image_column)
        self.skip = skip
        self.max_attempts = max_attempts

    def __call__(self, batch: dict[str, list]) -> tuple[dict[str, list], list[Any], list[dict[str, str]]]:
        columns = list(batch)
        batch = {key: list(values) for key, values in batch.items()}
        images: list[Any] = []
        skipped: list[dict[str, str]] = []
        for i in range(len(batch[columns[0]])):
            first = image_name(batch[self.image_columns[0]][i])
            failed: dict[str, str] = {}  # file -> error, for this example
            draws = 0
            while (decoded := self._decode([batch[c][i] for c in self.image_columns], failed, skipped)) is None:
                if draws >= self.max_attempts:
                    raise UndecodableImageError(
                        f"{draws} replacement draws found no decodable image; undecodable: "
                        + "; ".join(failed.values())
                    )
                draws += 1
                row = self.rows[random.Random(f"{first}:{draws}").randrange(len(self.rows))]
                for key in columns:
                    batch[key][i] = row[key]
            images.append(decoded[0] if isinstance(self.image_column, str) else decoded)
        return batch, images, skipped

    def _decode(self, values: list[Any], failed: dict[str, str], skipped: list[dict[str, str]]) -> tuple | None:
        """The images of one row, or None when one of them cannot be decoded (recorded in `failed` and `skipped`)."""
        decoded = []
        for value in values:
            name = image_name(value)
            if name in failed:
                return None
            try:
                decoded.append(open_image(value))
            except UndecodableImageError as error:
                if not self.skip:
                    raise
                failed[name] = str(error)
                skipped.append({"file": name, "error": str(error)})
                logger.warning("Skipping an undecodable training image: %s", error)
                return None
        return tuple(decoded)


def transform_with_skipping(
    decoder: ImageRowDecoder, build: Callable[[dict[str, list], list[Any]], dict[str, list]]
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A `with_transform` function: decode with `decoder`, then `build(batch, images)`; the records of skipped
    images ride along in a `skipped_images` column (the first row of the batch carries them), which the collators
    gather and `Beit3Trainer` consumes."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        batch, images, skipped = decoder(batch)
        out = build(batch, images)
        out["skipped_images"] = [skipped if i == 0 else [] for i in range(len(images))]
        return out

    return transform


def gather_skipped(items: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The skipped-image records carried by a list of transformed items (see `transform_with_skipping`)."""
    return [record for item in items for record in item.get("skipped_images") or []]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets for training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def retrieval_pair_dataset(records: Sequence[RetrievalRecord]) -> Any:
    """A ``datasets.Dataset`` with one row per (image, caption) pair, for contrastive retrieval training.

    Columns: ``image`` (the image file's path, decoded by the training transform, so that a file that cannot be
    decoded is named and can be skipped), ``caption`` and ``image_id``. Apply the image transform lazily with
    ``.with_transform``.

    Example:
        >>> records = [RetrievalRecord("a.png", ("x", "y"), 0), RetrievalRecord("b.png", ("z",), 1)]
        >>> pairs = retrieval_pair_dataset(records)
        >>> pairs.num_rows, pairs[1]
        (3, {'image': 'a.png', 'caption': 'y', 'image_id': 0})
    """
    import datasets

    if not records:
        raise ValueError("no records: the training set is empty")
    return datasets.Dataset.from_dict(
        {
            "image": [r.image_path for r in records for _ in r.captions],
            "caption": [caption for r in records for caption in r.captions],
            "image_id": [r.image_id for r in records for _ in r.captions],
        }
    )


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

    def image_dataset(self) -> Any:
        """A ``datasets.Dataset`` over the unique images, in index order: columns ``image`` (path) and ``index``.

        Example:
            >>> RetrievalEvalIndex.from_records([RetrievalRecord("a.png", ("x",), 0)]).image_dataset()[0]
            {'image': 'a.png', 'index': 0}
        """
        import datasets

        return datasets.Dataset.from_dict({"image": self.image_paths, "index": list(range(self.num_images))})


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


def list_image_files(image_dir: str | os.PathLike[str], argument: str = "--image_dir") -> list[str]:
    """Every image file under a folder (``CLASS/*.JPEG``, flat, any depth), sorted; labels are ignored.

    Listed here rather than by ``datasets``' ``imagefolder`` data-dir inference, which splits a folder by file
    names: in a folder where some names contain ``train`` (``red_circle_train_00001.JPEG``) it keeps only those as
    the train split and silently drops every other image. Errors name ``argument``, the option that gave the folder.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> for name in ("a/x_train_1.JPEG", "a/scene.png", "b/notes.txt"):
        ...     os.makedirs(os.path.dirname(f"{folder}/{name}"), exist_ok=True)
        ...     open(f"{folder}/{name}", "wb").close()
        >>> [os.path.relpath(f, folder) for f in list_image_files(folder)]
        ['a/scene.png', 'a/x_train_1.JPEG']
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{argument} {root} is not a folder.")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{argument} {root} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return files


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
    decode_images: bool = True,
) -> ImageFolderData:
    """Load an ImageNet-style folder (``root/train/CLASS/*``, ``root/val/CLASS/*``) with Hugging Face ``datasets``.

    The validation folder may be named ``val``, ``validation`` or ``valid``. Classes are the folder names, sorted;
    the validation classes must be a subset of the training classes. The folders are scanned first, so a missing
    split folder, a class folder with no images or a validation class unknown to training raises a ``ValueError``
    or ``FileNotFoundError`` naming the folder. Loading goes through the packaged ``imagefolder`` builder with
    explicit per-split file lists, which never touches the network (the packaged builder needs no download);
    ``cache_dir`` is where ``datasets`` keeps its Arrow cache. With ``decode_images=False`` the ``image`` column
    holds ``{"path", "bytes"}`` (``datasets.Image(decode=False)``), for :func:`open_image` / :class:`ImageRowDecoder`.

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
    features = datasets.Features(
        {"image": datasets.Image(decode=decode_images), "label": datasets.ClassLabel(names=class_names)}
    )
    dataset = datasets.load_dataset(
        "imagefolder",
        data_files=data_files,
        features=features,
        drop_labels=False,
        drop_metadata=True,
        cache_dir=None if cache_dir is None else str(cache_dir),
        keep_in_memory=keep_in_memory,
    )
    return ImageFolderData(dataset=dataset, class_names=class_names, root=root)
