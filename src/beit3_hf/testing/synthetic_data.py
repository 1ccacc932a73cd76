"""A built-in, deterministic, synthetic image-text dataset written to disk in the formats real data comes in.

Each retrieval image shows one or more coloured shapes, each in one cell of a 2x2 grid (top left, top right, bottom
left, bottom right), and has several paraphrased, compositional captions such as
``"a red circle in the top left and a blue square in the bottom right"`` or
``"the lower right has a blue box and the upper left has a red disc"``.
Every caption names every object of its image (colour, shape and cell), so a caption describes the scene exactly;
within the ``val`` split and within the ``test`` split no two images show the same scene, so each caption of an
evaluation image identifies that image and no other (the generator checks this by parsing every caption back, see
:func:`parse_caption`).

:func:`write_synthetic_dataset` writes, under one root folder:

- ``images/synthetic_XXXXXX.png``: the retrieval images (``.jpg`` with ``image_format="jpg"``);
- ``dataset_synthetic.json``: a Karpathy-split file in exactly the format of ``dataset_coco.json``
  (``filepath`` = ``"images"``, so the image root is the dataset root);
- ``captions_{split}.jsonl``: one ``{"image": "images/...", "caption": "..."}`` line per caption;
- ``imagenet/{train,val}/{colour}_{shape}/*.JPEG``: an ImageNet-style classification folder of single-object
  images, labelled by the colour and shape of their object;
- ``synthetic_manifest.json``: the configuration and file list, which makes re-running cheap.

The same seed gives the same bytes on every run (with the same Pillow build). Command line::

    python -m beit3_hf.testing.synthetic_data --output data/synthetic
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from math import comb
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SceneObject",
    "SyntheticDatasetPaths",
    "SyntheticNlvr2Paths",
    "SyntheticSample",
    "SyntheticVqaPaths",
    "caption_vocabulary",
    "describe_scene",
    "generate_captions",
    "generate_synthetic_samples",
    "main",
    "nlvr2_statement",
    "parse_caption",
    "render_scene",
    "train_text_tokenizer",
    "vqa_questions_for_scene",
    "write_synthetic_dataset",
    "write_synthetic_nlvr2",
    "write_synthetic_vqa",
]

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_manifest.json"
KARPATHY_NAME = "dataset_synthetic.json"

#: Colour name -> RGB, in the order ``num_colours`` takes them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
#: Shape names, in the order ``num_shapes`` takes them.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Grid cells as ``(vertical, horizontal)``, in reading order.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

# Paraphrases. Colours have none; shapes and positions have synonyms that the parser maps back.
_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
_POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
}
# Chinese captions (``language="zh"``): the same scenes in Chinese, with their own paraphrases.
_COLOUR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
_SHAPE_ZH: dict[str, tuple[str, ...]] = {
    "circle": ("圆形", "圆"),
    "square": ("正方形", "方块"),
    "triangle": ("三角形",),
    "cross": ("十字", "加号"),
}
_POSITION_ZH: dict[str, tuple[str, ...]] = {
    "top left": ("左上角", "左上方"),
    "top right": ("右上角", "右上方"),
    "bottom left": ("左下角", "左下方"),
    "bottom right": ("右下角", "右下方"),
}
LANGUAGES = ("en", "zh")
_VERTICAL_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL_WORDS = ("left", "right")
_SPLITS = ("train", "restval", "val", "test")


class SceneObject(NamedTuple):
    """One shape in one grid cell.

    Example:
        >>> SceneObject("red", "circle", "top left")
        SceneObject(colour='red', shape='circle', position='top left')
    """

    colour: str
    shape: str
    position: str


#: A scene is the set of its objects (at most one per cell), as a frozenset so that it can be compared and hashed.
Scene = frozenset[SceneObject]


@dataclass(frozen=True)
class SyntheticSample:
    """One generated retrieval image: its split, file name, scene and captions.

    Example:
        >>> s = generate_synthetic_samples(num_train=1, num_val=0, num_test=0)[0]
        >>> s.split, s.filename, len(s.captions)
        ('train', 'synthetic_000000.png', 5)
    """

    split: str
    filename: str
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]
    render_seed: str

    @property
    def scene(self) -> Scene:
        """The objects as a frozenset (what a caption describes)."""
        return frozenset(self.objects)


@dataclass(frozen=True)
class SyntheticDatasetPaths:
    """Where :func:`write_synthetic_dataset` put things.

    ``image_root`` is what to pass to :func:`beit3_hf.data.load_karpathy_split` together with ``karpathy_json``;
    ``caption_jsonl`` maps each written Karpathy split name to its ``captions_{split}.jsonl``; ``imagenet`` holds
    ``train/`` and ``val/`` class folders for :func:`beit3_hf.data.load_imagefolder`.

    Example:
        >>> import tempfile
        >>> p = write_synthetic_dataset(tempfile.mkdtemp(), num_train=4, num_val=2, num_test=2,
        ...                             classification_train_per_class=1, classification_val_per_class=1)
        >>> p.karpathy_json.name, sorted(p.caption_jsonl), len(p.class_names)
        ('dataset_synthetic.json', ['test', 'train', 'val'], 12)
    """

    root: Path
    karpathy_json: Path
    image_root: Path
    images_dir: Path
    caption_jsonl: dict[str, Path]
    imagenet: Path
    manifest: Path
    class_names: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: SceneObject, rng: random.Random) -> str:
    shape_word = rng.choice(_SHAPE_WORDS[obj.shape])
    return f"{_article(obj.colour)} {obj.colour} {shape_word}"


def _located(obj: SceneObject, rng: random.Random) -> str:
    pos = rng.choice(_POSITION_WORDS[obj.position])
    template = rng.choice(("{np} in the {pos}", "{np} at the {pos}", "{np} in the {pos} corner"))
    return template.format(np=_noun_phrase(obj, rng), pos=pos)


def _position_first(obj: SceneObject, rng: random.Random) -> str:
    pos = rng.choice(_POSITION_WORDS[obj.position])
    return f"the {pos} has {_noun_phrase(obj, rng)}"


def _one_caption(objects: Sequence[SceneObject], rng: random.Random) -> str:
    objs = list(objects)
    rng.shuffle(objs)  # word-order variation: objects are mentioned in any order
    style = rng.randrange(5)
    if style < 3:
        return ("", "there is ", "an image of ")[style] + " and ".join(_located(o, rng) for o in objs)
    if style == 3:
        return " and ".join(_position_first(o, rng) for o in objs)
    # style 4: "X with Y [and Z]"
    head, *rest = (_located(o, rng) for o in objs)
    return head if not rest else head + " with " + " and ".join(rest)


def _one_caption_zh(objects: Sequence[SceneObject], rng: random.Random) -> str:
    objs = list(objects)
    rng.shuffle(objs)
    clauses = []
    for o in objs:
        pos, colour, shape = rng.choice(_POSITION_ZH[o.position]), _COLOUR_ZH[o.colour], rng.choice(_SHAPE_ZH[o.shape])
        template = rng.choice(
            ("{pos}有一个{colour}的{shape}", "一个{colour}的{shape}在{pos}", "{pos}是{colour}{shape}")
        )
        clauses.append(template.format(pos=pos, colour=colour, shape=shape))
    return rng.choice(("", "图中", "这张图片里")) + rng.choice(("\uff0c", "\uff0c还有", "\uff1b")).join(clauses)


def generate_captions(
    objects: Sequence[SceneObject], count: int, rng: random.Random, language: str = "en"
) -> tuple[str, ...]:
    """``count`` distinct paraphrases, each naming every object of the scene with its colour, shape and cell.

    ``language="zh"`` writes Chinese captions (``"左上角有一个红色的圆形"`` ...), for tokenizers other
    than ``beit3.spm``; only English captions can be read back by :func:`parse_caption`.

    Example:
        >>> import random
        >>> caps = generate_captions([SceneObject("red", "circle", "top left")], 3, random.Random(0))
        >>> len(set(caps)), all(parse_caption(c) == {SceneObject("red", "circle", "top left")} for c in caps)
        (3, True)
        >>> "红色" in generate_captions([SceneObject("red", "circle", "top left")], 1, random.Random(0), "zh")[0]
        True
    """
    if not objects:
        raise ValueError("a scene needs at least one object")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    one_caption = _one_caption if language == "en" else _one_caption_zh
    captions: list[str] = []
    for _ in range(200 * count):
        caption = one_caption(objects, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return tuple(captions)
    raise ValueError(f"could not find {count} distinct captions for {list(objects)}")


def _in_reading_order(objects: Iterable[SceneObject]) -> tuple[SceneObject, ...]:
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def describe_scene(objects: Iterable[SceneObject]) -> str:
    """The canonical caption of a scene (objects in reading order, first synonyms).

    Example:
        >>> describe_scene([SceneObject("blue", "square", "bottom right"), SceneObject("red", "circle", "top left")])
        'a red circle in the top left and a blue square in the bottom right'
    """
    ordered = _in_reading_order(objects)
    return " and ".join(f"{_article(o.colour)} {o.colour} {o.shape} in the {o.position}" for o in ordered)


_CLAUSE_SPLIT = re.compile(r"\b(?:and|with)\b")


def parse_caption(caption: str) -> Scene:
    """Read a generated caption back into its scene; raises ``ValueError`` on a caption it cannot read.

    This is an independent check of the caption templates: the generator asserts that every caption of every
    image parses back to exactly that image's scene.

    Example:
        >>> sorted(parse_caption("the lower right has a blue box and there is a red disc at the upper left"))
        [SceneObject(colour='blue', shape='square', position='bottom right'), \
SceneObject(colour='red', shape='circle', position='top left')]
    """
    synonyms = {word: shape for shape, words in _SHAPE_WORDS.items() for word in words}
    objects: list[SceneObject] = []
    for clause in _CLAUSE_SPLIT.split(caption.lower()):
        words = re.findall(r"[a-z]+", clause)
        colours = [w for w in words if w in COLOURS]
        if not colours:
            continue  # e.g. the "an image" part of "an image with ..."
        text = " ".join(words)
        shapes = [shape for word, shape in synonyms.items() if re.search(rf"\b{word}\b", text)]
        verticals = [_VERTICAL_WORDS[w] for w in words if w in _VERTICAL_WORDS]
        horizontals = [w for w in words if w in _HORIZONTAL_WORDS]
        if not (len(colours) == len(shapes) == len(verticals) == len(horizontals) == 1):
            raise ValueError(f"cannot parse clause {clause!r} of caption {caption!r}")
        objects.append(SceneObject(colours[0], shapes[0], f"{verticals[0]} {horizontals[0]}"))
    scene = frozenset(objects)
    if not objects or len(scene) != len(objects) or len({o.position for o in objects}) != len(objects):
        raise ValueError(f"caption {caption!r} does not describe a valid scene")
    return scene


def caption_vocabulary(num_colours: int = len(COLOURS), num_shapes: int = len(SHAPES)) -> tuple[str, ...]:
    """Every word the captions can use (sorted), e.g. to build a word-level tokenizer for a from-scratch model.

    Example:
        >>> {"red", "circle", "disc", "upper", "left"} <= set(caption_vocabulary())
        True
    """
    words = {"a", "an", "and", "at", "corner", "has", "image", "in", "is", "of", "the", "there", "with"}
    words.update(list(COLOURS)[:num_colours])
    phrases = itertools.chain(*(_SHAPE_WORDS[shape] for shape in SHAPES[:num_shapes]), *_POSITION_WORDS.values())
    words.update(word for phrase in phrases for word in phrase.split())
    return tuple(sorted(words))


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def render_scene(objects: Iterable[SceneObject], image_size: int = 64, seed: int | str = 0) -> Image.Image:
    """Draw a scene: a light background and each object roughly centred in its grid cell.

    Size, offset, background shade and colour shade vary slightly with ``seed``, so two renderings of the same scene
    differ while staying unambiguous.

    Example:
        >>> render_scene([SceneObject("red", "circle", "top left")], 64, seed=1).size
        (64, 64)
    """
    rng = random.Random(seed)
    grey = rng.randint(225, 250)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cell = image_size / 2
    for obj in objects:
        row = 0 if obj.position.startswith("top") else 1
        col = 0 if obj.position.endswith("left") else 1
        r = cell * rng.uniform(0.30, 0.40)
        slack = cell / 2 - r - 1
        cx = col * cell + cell / 2 + rng.uniform(-slack, slack) * 0.6
        cy = row * cell + cell / 2 + rng.uniform(-slack, slack) * 0.6
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[obj.colour])
        _draw_shape(draw, obj.shape, cx, cy, r, fill)  # type: ignore[arg-type]
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def _random_scene(rng: random.Random, colours: Sequence[str], shapes: Sequence[str], max_objects: int) -> Scene:
    n = rng.randint(1, max_objects)
    cells = rng.sample(POSITIONS, n)
    return frozenset(SceneObject(rng.choice(colours), rng.choice(shapes), cell) for cell in cells)


def _num_scenes(num_attributes: int, max_objects: int) -> int:
    return sum(comb(len(POSITIONS), n) * num_attributes**n for n in range(1, max_objects + 1))


def _check_options(num_colours: int, num_shapes: int, max_objects: int, captions_per_image: int, image_size: int):
    if not 1 <= num_colours <= len(COLOURS):
        raise ValueError(f"num_colours must be in [1, {len(COLOURS)}], got {num_colours}")
    if not 1 <= num_shapes <= len(SHAPES):
        raise ValueError(f"num_shapes must be in [1, {len(SHAPES)}], got {num_shapes}")
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")


def generate_synthetic_samples(
    *,
    num_train: int = 2000,
    num_val: int = 100,
    num_test: int = 100,
    num_restval: int = 0,
    captions_per_image: int = 5,
    max_objects: int = 2,
    num_colours: int = 4,
    num_shapes: int = 3,
    holdout_eval_scenes: bool = False,
    image_format: str = "png",
    seed: int = 0,
    language: str = "en",
) -> list[SyntheticSample]:
    """The retrieval samples (scenes and captions, no pixels), in Karpathy order: train, restval, val, test.

    ``val`` and ``test`` scenes are each unique within their split and the two splits share none, so every caption
    of an evaluation image describes that image only. With ``holdout_eval_scenes=True`` no train/restval image
    shows a val or test scene either (a compositional-generalisation setting); by default train scenes are drawn
    freely, so an evaluation scene may also appear, rendered differently, in training.

    Each split draws from its own seeded stream, so e.g. changing ``num_train`` does not change the test images.
    ``language="zh"`` gives the same scenes with Chinese captions.

    Example:
        >>> samples = generate_synthetic_samples(num_train=3, num_val=2, num_test=2)
        >>> [s.split for s in samples]
        ['train', 'train', 'train', 'val', 'val', 'test', 'test']
        >>> samples == generate_synthetic_samples(num_train=3, num_val=2, num_test=2)
        True
    """
    _check_options(num_colours, num_shapes, max_objects, captions_per_image, 16)
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    counts = {"train": num_train, "restval": num_restval, "val": num_val, "test": num_test}
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"num_{name} must be >= 0, got {n}")
    colours = list(COLOURS)[:num_colours]
    shapes = list(SHAPES)[:num_shapes]
    available = _num_scenes(num_colours * num_shapes, max_objects)
    if num_val + num_test > available:
        raise ValueError(
            f"num_val + num_test = {num_val + num_test} unique scenes requested, but only {available} exist with "
            f"num_colours={num_colours}, num_shapes={num_shapes}, max_objects={max_objects}"
        )
    if holdout_eval_scenes and num_train + num_restval > 0 and num_val + num_test == available:
        raise ValueError("holdout_eval_scenes=True leaves no scenes for training")

    scenes: dict[str, list[Scene]] = {}
    taken: set[Scene] = set()  # the val and test scenes
    # Evaluation scenes are unique; test first so that it does not depend on num_val.
    for split in ("test", "val", "train", "restval"):
        rng = random.Random(f"beit3-synthetic:{seed}:scenes:{split}")
        evaluation = split in ("test", "val")
        scenes[split] = []
        while len(scenes[split]) < counts[split]:
            scene = _random_scene(rng, colours, shapes, max_objects)
            if scene in taken and (evaluation or holdout_eval_scenes):
                continue
            if evaluation:
                taken.add(scene)
            scenes[split].append(scene)

    samples: list[SyntheticSample] = []
    for split in _SPLITS:
        rng = random.Random(f"beit3-synthetic:{seed}:captions:{split}")
        for i, scene in enumerate(scenes[split]):
            objects = _in_reading_order(scene)
            captions = generate_captions(objects, captions_per_image, rng, language)
            filename = f"synthetic_{len(samples):06d}.{image_format}"
            samples.append(SyntheticSample(split, filename, objects, captions, f"beit3-synthetic:{seed}:{split}:{i}"))
    _assert_unambiguous(samples, parse=language == "en")
    return samples


def _assert_unambiguous(samples: Sequence[SyntheticSample], parse: bool = True) -> None:
    """Every caption parses back to its own scene (English captions), and val/test scenes are unique within and
    across the two splits."""
    seen: dict[Scene, str] = {}
    for s in samples:
        for caption in s.captions if parse else ():
            if parse_caption(caption) != s.scene:
                raise AssertionError(f"caption {caption!r} of {s.filename} does not describe its scene {s.objects}")
        if s.split in ("val", "test"):
            if s.scene in seen:
                raise AssertionError(
                    f"{s.filename} and {seen[s.scene]} show the same scene; captions would be ambiguous"
                )
            seen[s.scene] = s.filename


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[\u4e00-\u9fff]", raw.lower())  # words; one token per Chinese character


def _karpathy_json(samples: Sequence[SyntheticSample]) -> dict:
    images = []
    sentids = itertools.count()
    for imgid, s in enumerate(samples):
        sentences = [{"tokens": _tokens(c), "raw": c, "imgid": imgid, "sentid": next(sentids)} for c in s.captions]
        ids = [x["sentid"] for x in sentences]
        images.append(
            dict(filepath="images", sentids=ids, filename=s.filename, imgid=imgid, split=s.split, sentences=sentences)
        )
    return {"images": images, "dataset": "synthetic"}


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=None, ensure_ascii=True) + "\n").encode("utf-8")


def _write_owned_folder(
    root: Path,
    config: dict,
    make_files: Callable[[], dict[str, bytes]],
    force: bool,
    owned_dirs: Sequence[str] = ("",),
    owned_files: Sequence[str] = (),
) -> None:
    """Write ``make_files()`` under ``root`` with a manifest (see :func:`write_synthetic_dataset`): nothing is
    rewritten when the folder already holds this configuration complete, a foreign non-empty folder is refused,
    and files of an earlier configuration are removed from ``owned_dirs`` (by default the whole folder) and
    ``owned_files``."""
    manifest_path = root / MANIFEST_NAME
    manifest: dict | None = None
    if root.exists():
        if not root.is_dir():
            raise NotADirectoryError(f"{root} exists and is not a directory")
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ValueError(f"{manifest_path}: unreadable manifest ({err}); delete {root} and retry") from err
        elif any(root.iterdir()):
            raise FileExistsError(
                f"{root} is not empty and has no {MANIFEST_NAME}: refusing to write the synthetic dataset into a "
                "folder it did not create; choose an empty or new folder"
            )
    if (
        not force
        and manifest is not None
        and manifest.get("complete")
        and manifest.get("config") == config
        and all((root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in manifest["files"])
    ):
        return
    existing = next(folder for folder in (root, *root.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):  # found before the (long) rendering
        raise PermissionError(f"{root} cannot be written: {existing} is not a writable folder")
    files = make_files()  # before anything is written: a refused option leaves the filesystem untouched
    root.mkdir(parents=True, exist_ok=True)
    # Mark the folder as ours before writing any file, so that an interrupted run can be resumed.
    _write_if_changed(manifest_path, _json_bytes({"complete": False, "config": config, "files": []}))
    for rel, data in files.items():
        _write_if_changed(root / rel, data)
    for folder in owned_dirs:
        for path in sorted((root / folder).rglob("*"), reverse=True):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in files and path != manifest_path:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for rel in owned_files:
        if rel not in files and (root / rel).is_file():
            (root / rel).unlink()
    listing = sorted([rel, len(data)] for rel, data in files.items())
    _write_if_changed(manifest_path, _json_bytes({"complete": True, "config": config, "files": listing}))


def write_synthetic_dataset(
    root: str | os.PathLike[str],
    *,
    num_train: int = 2000,
    num_val: int = 100,
    num_test: int = 100,
    num_restval: int = 0,
    captions_per_image: int = 5,
    image_size: int = 64,
    max_objects: int = 2,
    num_colours: int = 4,
    num_shapes: int = 3,
    holdout_eval_scenes: bool = False,
    image_format: str = "png",
    classification_train_per_class: int = 40,
    classification_val_per_class: int = 10,
    seed: int = 0,
    force: bool = False,
    language: str = "en",
) -> SyntheticDatasetPaths:
    """Generate the synthetic dataset under ``root`` (see the module docstring for the layout) and return its paths.

    Idempotent: if ``root`` already holds a complete dataset written with the same options, nothing is rewritten
    (the call only checks that the files exist); otherwise every file is rendered again and written only where its
    bytes changed, and files of an earlier, different configuration are removed from ``images/`` and ``imagenet/``.
    ``force=True`` re-renders regardless. ``root`` must be empty, missing, or a folder this function wrote before;
    anything else is refused, so that a mistyped path never loses data.

    The classification folder holds separate single-object images (``classification_*_per_class`` per class), with
    ``num_colours * num_shapes`` classes named ``{colour}_{shape}``. ``language="zh"`` writes Chinese captions.

    Example:
        >>> import tempfile
        >>> from beit3_hf.data import load_karpathy_split
        >>> paths = write_synthetic_dataset(tempfile.mkdtemp(), num_train=4, num_val=2, num_test=3,
        ...                                 classification_train_per_class=1, classification_val_per_class=1)
        >>> records = load_karpathy_split(paths.karpathy_json, paths.image_root, "test")
        >>> len(records), len(records[0].captions)
        (3, 5)
    """
    _check_options(num_colours, num_shapes, max_objects, captions_per_image, image_size)
    if classification_train_per_class < 0 or classification_val_per_class < 0:
        raise ValueError("classification_*_per_class must be >= 0")
    root = Path(root)
    config = {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "num_restval": num_restval,
        "captions_per_image": captions_per_image,
        "image_size": image_size,
        "max_objects": max_objects,
        "num_colours": num_colours,
        "num_shapes": num_shapes,
        "holdout_eval_scenes": holdout_eval_scenes,
        "image_format": image_format,
        "classification_train_per_class": classification_train_per_class,
        "classification_val_per_class": classification_val_per_class,
        "seed": seed,
    }
    if language != "en":  # only then, so that the manifests of English datasets stay as they were
        config["language"] = language
    colours = list(COLOURS)[:num_colours]
    shapes = list(SHAPES)[:num_shapes]
    class_names = [f"{c}_{s}" for c in colours for s in shapes]
    counts = {"train": num_train, "restval": num_restval, "val": num_val, "test": num_test}
    splits = [s for s in _SPLITS if counts[s] > 0]
    paths = SyntheticDatasetPaths(
        root=root,
        karpathy_json=root / KARPATHY_NAME,
        image_root=root,
        images_dir=root / "images",
        caption_jsonl={split: root / f"captions_{split}.jsonl" for split in splits},
        imagenet=root / "imagenet",
        manifest=root / MANIFEST_NAME,
        class_names=tuple(class_names),
    )

    def make_files() -> dict[str, bytes]:
        samples = generate_synthetic_samples(
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            num_restval=num_restval,
            captions_per_image=captions_per_image,
            max_objects=max_objects,
            num_colours=num_colours,
            num_shapes=num_shapes,
            holdout_eval_scenes=holdout_eval_scenes,
            image_format=image_format,
            seed=seed,
            language=language,
        )
        files: dict[str, bytes] = {}
        for s in samples:
            files[f"images/{s.filename}"] = _encode(render_scene(s.objects, image_size, s.render_seed), image_format)
        files[KARPATHY_NAME] = _json_bytes(_karpathy_json(samples))
        for split in splits:
            lines = [
                json.dumps({"image": f"images/{s.filename}", "caption": c}, ensure_ascii=language == "en")
                for s in samples
                if s.split == split
                for c in s.captions
            ]
            files[f"captions_{split}.jsonl"] = ("\n".join(lines) + "\n").encode("utf-8")
        for split, per_class in (("train", classification_train_per_class), ("val", classification_val_per_class)):
            rng = random.Random(f"beit3-synthetic:{seed}:classification:{split}")
            for colour, shape, i in itertools.product(colours, shapes, range(per_class)):
                obj = SceneObject(colour, shape, rng.choice(POSITIONS))
                seed_text = f"beit3-synthetic:{seed}:cls:{split}:{colour}:{shape}:{i}"
                name = f"imagenet/{split}/{colour}_{shape}/{colour}_{shape}_{split}_{i:05d}.JPEG"
                files[name] = _encode(render_scene([obj], image_size, seed_text), "jpg")
        return files

    # Only images/, imagenet/ and the caption files are the generator's: other files under root are left alone.
    caption_files = [f"captions_{split}.jsonl" for split in _SPLITS]
    _write_owned_folder(root, config, make_files, force, ("images", "imagenet"), caption_files)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# VQAv2 and NLVR2 layouts
# ----------------------------------------------------------------------------------------------------------------


def _task_config(
    task: str,
    counts: dict[str, int],
    image_size: int,
    max_objects: int,
    num_colours: int,
    num_shapes: int,
    seed: int,
    **extra: int,
) -> tuple[dict, list[str], list[str]]:
    """Check the options of a VQA / NLVR2 writer; return its manifest configuration and the colours and shapes."""
    _check_options(num_colours, num_shapes, max_objects, 1, image_size)
    if min(counts.values()) < 1:
        raise ValueError(f"the synthetic {task} dataset needs at least one image (pair) per split, got {counts}")
    config = {"generator_version": GENERATOR_VERSION, "task": task, **counts, **extra, "image_size": image_size,
              "max_objects": max_objects, "num_colours": num_colours, "num_shapes": num_shapes, "seed": seed}  # fmt: skip
    return config, list(COLOURS)[:num_colours], list(SHAPES)[:num_shapes]


def _scenes(rng: random.Random, count: int, colours: Sequence[str], shapes: Sequence[str], max_objects: int) -> list:
    return [_in_reading_order(_random_scene(rng, colours, shapes, max_objects)) for _ in range(count)]


# -- VQA ----------------------------------------------------------------------------------------------------------

#: The VQAv2 splits the synthetic VQA dataset writes: (questions split, image folder, annotated).
VQA_SPLITS = (("train2014", "train2014", True), ("val2014", "val2014", True), ("test-dev2015", "test2015", False))


@dataclass(frozen=True)
class SyntheticVqaPaths:
    """Where :func:`write_synthetic_vqa` put the VQAv2-format files: ``data_dir`` holds ``train2014/``,
    ``val2014/``, ``test2015/`` and ``vqa/`` (questions and annotations), the layout ``examples/vqa`` reads with
    ``--data_dir``."""

    data_dir: Path
    annotation_dir: Path
    manifest: Path


def vqa_questions_for_scene(
    objects: Sequence[SceneObject], rng: random.Random, count: int
) -> list[tuple[str, str, str, str]]:
    """Up to ``count`` distinct questions about a scene as ``(question, answer, answer_type, question_type)``:
    the colour or the shape in an occupied cell, whether a given object is in a cell (yes/no, balanced), and how
    many shapes there are.

    Example:
        >>> import random
        >>> qs = vqa_questions_for_scene([SceneObject("red", "circle", "top left")], random.Random(0), 4)
        >>> sorted(answer for _, answer, _, _ in qs)[:2]
        ['1', 'circle']
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    by_cell = {o.position: o for o in objects}
    candidates = []
    for o in objects:
        candidates.append((f"what colour is the shape in the {o.position}?", o.colour, "other", "what color is the"))
        candidates.append((f"what shape is in the {o.position}?", o.shape, "other", "what"))
    if rng.random() < 0.5:  # yes: an object of the scene
        o = rng.choice(list(objects))
        candidates.append((f"is there a {o.colour} {o.shape} in the {o.position}?", "yes", "yes/no", "is there a"))
    else:  # no: an object of another colour in an occupied cell, or any object in an empty cell
        cell = rng.choice(POSITIONS)
        o = by_cell.get(cell) or SceneObject(rng.choice(colours[:4]), rng.choice(shapes[:3]), cell)
        colour = rng.choice([c for c in colours[:4] if c != o.colour]) if cell in by_cell else o.colour
        candidates.append((f"is there a {colour} {o.shape} in the {cell}?", "no", "yes/no", "is there a"))
    candidates.append(("how many shapes are there?", str(len(objects)), "number", "how many"))
    rng.shuffle(candidates)
    return candidates[:count]


def _annotator_answers(answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """Ten annotator answers: the right one 7 to 10 times, the rest confusable answers (other colours, shapes or
    numbers, or a synonym such as "disc", which is outside the answer vocabulary) so that soft scores vary."""
    agree = rng.choice((10, 10, 9, 9, 8, 7))
    if answer in COLOURS:
        pool = [c for c in list(COLOURS)[:4] if c != answer]
    elif answer in SHAPES:
        pool = [s for s in SHAPES[:3] if s != answer] + [w for w in _SHAPE_WORDS[answer][1:]]
    elif answer_type == "yes/no":
        pool = ["no" if answer == "yes" else "yes"]
    else:
        pool = [n for n in ("1", "2", "3") if n != answer]
    answers = [answer] * agree + [rng.choice(pool) for _ in range(10 - agree)]
    rng.shuffle(answers)
    return answers


def write_synthetic_vqa(
    root: str | os.PathLike[str],
    *,
    num_train_images: int = 1000,
    num_val_images: int = 100,
    num_test_images: int = 50,
    questions_per_image: int = 4,
    image_size: int = 64,
    max_objects: int = 2,
    num_colours: int = 4,
    num_shapes: int = 3,
    seed: int = 0,
    force: bool = False,
) -> SyntheticVqaPaths:
    """Write a VQAv2-format dataset of the coloured-shape scenes under ``root``.

    Layout (VQAv2 as released, the original recipe's ``--data_path``)::

        train2014/COCO_train2014_000000000001.jpg   val2014/...   test2015/...
        vqa/v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json
        vqa/v2_mscoco_{train2014,val2014}_annotations.json

    Questions ask for the colour or the shape in a grid cell, whether an object is in a cell (yes / no) or how many
    shapes there are (:func:`vqa_questions_for_scene`); each annotated question has ten annotator answers, 7 to 10
    of them right and the others confusable (:func:`_annotator_answers`), so that soft scores other than 1.0 occur.
    Image ids are 1.. (train), 500001.. (val), 900001.. (test); question ids ``image_id * 1000 + k``. Idempotent,
    like :func:`write_synthetic_dataset`.

    Example:
        >>> import tempfile
        >>> p = write_synthetic_vqa(tempfile.mkdtemp(), num_train_images=2, num_val_images=1, num_test_images=1)
        >>> sorted(f.name for f in p.annotation_dir.iterdir())[0]
        'v2_OpenEnded_mscoco_test-dev2015_questions.json'
    """
    if questions_per_image < 1:
        raise ValueError("write_synthetic_vqa needs at least one question per image")
    counts = {"train2014": num_train_images, "val2014": num_val_images, "test-dev2015": num_test_images}
    config, colours, shapes = _task_config(
        "vqa", counts, image_size, max_objects, num_colours, num_shapes, seed, questions_per_image=questions_per_image
    )
    root = Path(root)

    def make_files() -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for (split, folder, annotated), first_id in zip(VQA_SPLITS, (1, 500001, 900001)):
            rng = random.Random(f"beit3-synthetic:{seed}:vqa:{split}")
            questions, annotations = [], []
            for index, objects in enumerate(_scenes(rng, counts[split], colours, shapes, max_objects)):
                image_id = first_id + index
                image = render_scene(objects, image_size, f"beit3-synthetic:{seed}:vqa:{split}:{index}")
                files[f"{folder}/COCO_{folder}_{image_id:012d}.jpg"] = _encode(image, "jpg")
                for k, (question, answer, answer_type, question_type) in enumerate(
                    vqa_questions_for_scene(objects, rng, questions_per_image)
                ):
                    question_id = image_id * 1000 + k
                    questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                    answers = _annotator_answers(answer, answer_type, rng)
                    annotations.append({
                        "question_type": question_type, "multiple_choice_answer": answer,
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
                        "image_id": image_id, "answer_type": answer_type, "question_id": question_id,
                    })  # fmt: skip
            header = {
                "info": {"description": "beit3-hf synthetic VQA"},
                "license": {"name": "MIT"},
                "data_subtype": split,
            }
            files[f"vqa/v2_OpenEnded_mscoco_{split}_questions.json"] = _json_bytes(
                {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}
            )
            if annotated:
                files[f"vqa/v2_mscoco_{split}_annotations.json"] = _json_bytes({**header, "annotations": annotations})
        return files

    _write_owned_folder(root, config, make_files, force)
    return SyntheticVqaPaths(data_dir=root, annotation_dir=root / "vqa", manifest=root / MANIFEST_NAME)


# -- NLVR2 --------------------------------------------------------------------------------------------------------

#: The NLVR2 files the synthetic NLVR2 dataset writes: (split, image folder).
NLVR2_SPLITS = (("train", "images/train"), ("dev", "dev"), ("test1", "test1"))


@dataclass(frozen=True)
class SyntheticNlvr2Paths:
    """Where :func:`write_synthetic_nlvr2` put the NLVR2-format files: ``data_dir`` (the image folders
    ``images/train/N/``, ``dev/``, ``test1/``) and the statement files ``{train,dev,test1}.json`` in ``json_dir``."""

    data_dir: Path
    json_dir: Path
    manifest: Path

    def statements(self, split: str) -> Path:
        """``train``, ``dev`` or ``test1``: the JSON Lines statement file."""
        return self.json_dir / f"{split}.json"


def nlvr2_statement(
    left: Sequence[SceneObject], right: Sequence[SceneObject], side: str, rng: random.Random
) -> tuple[str, bool]:
    """A statement about the number of shapes of the ``side`` ("left" or "right") image of a pair, and its truth.

    The statement is always "two shapes" (in two wordings) and its truth is read from the named image, so that
    the label correlates with what each image shows and with the named side. Balanced designs that pair a true
    and a false statement about the same image (or name a colour present or absent with equal odds) give labels
    that neither the statement nor either image predicts on its own: a small model trained from scratch then finds
    no gradient to start from and stays at chance (measured; see ``examples/nlvr2/README.md``).

    Example:
        >>> import random
        >>> left, right = [SceneObject("red", "circle", "top left")], [SceneObject("blue", "square", "top left")]
        >>> nlvr2_statement(left, right, "left", random.Random(1))
        ('the left image has two shapes', False)
    """
    this = left if side == "left" else right
    wording = rng.choice((f"the {side} image has two shapes", f"there are two shapes in the {side} image"))
    return wording, len(this) == 2


def write_synthetic_nlvr2(
    root: str | os.PathLike[str],
    *,
    num_train_pairs: int = 800,
    num_dev_pairs: int = 100,
    num_test_pairs: int = 100,
    image_size: int = 64,
    max_objects: int = 2,
    num_colours: int = 4,
    num_shapes: int = 3,
    seed: int = 0,
    force: bool = False,
) -> SyntheticNlvr2Paths:
    """Write an NLVR2-format dataset of coloured-shape image pairs under ``root``.

    Layout (NLVR2 as released and organised by the original recipe)::

        images/train/{0..9}/train-{pair}-0-img{0,1}.png   dev/dev-{pair}-0-img{0,1}.png   test1/...
        nlvr2/data/{train,dev,test1}.json   (JSON Lines: identifier, sentence, label "True"/"False", directory)

    Each pair gets a statement about each of its images (:func:`nlvr2_statement`); with ``max_objects=2`` an image
    holds one or two shapes with equal odds, so the labels are balanced on average. Idempotent, like
    :func:`write_synthetic_dataset`.

    Example:
        >>> import tempfile
        >>> p = write_synthetic_nlvr2(tempfile.mkdtemp(), num_train_pairs=2, num_dev_pairs=1, num_test_pairs=1)
        >>> [json.loads(line)["label"] for line in p.statements("dev").read_text().splitlines()]
        ['True', 'False']
    """
    counts = {"train": num_train_pairs, "dev": num_dev_pairs, "test1": num_test_pairs}
    config, colours, shapes = _task_config("nlvr2", counts, image_size, max_objects, num_colours, num_shapes, seed)
    root = Path(root)

    def make_files() -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for split, folder in NLVR2_SPLITS:
            rng = random.Random(f"beit3-synthetic:{seed}:nlvr2:{split}")
            lines = []
            for pair in range(counts[split]):
                left, right = _scenes(rng, 2, colours, shapes, max_objects)
                directory = pair % 10
                stem = f"{folder}/{directory}/{split}-{pair}-0" if split == "train" else f"{folder}/{split}-{pair}-0"
                for side, objects in enumerate((left, right)):
                    image = render_scene(objects, image_size, f"beit3-synthetic:{seed}:nlvr2:{split}:{pair}:{side}")
                    files[f"{stem}-img{side}.png"] = _encode(image, "png")
                for sentence, side in enumerate(("left", "right")):
                    statement, label = nlvr2_statement(left, right, side, rng)
                    entry = {"identifier": f"{split}-{pair}-0-{sentence}", "sentence": statement,
                             "label": str(label), "synset": "shapes", "query": "synthetic"}  # fmt: skip
                    if split == "train":
                        entry["directory"] = directory
                    lines.append(json.dumps(entry, ensure_ascii=True))
            files[f"nlvr2/data/{split}.json"] = ("\n".join(lines) + "\n").encode("utf-8")
        return files

    _write_owned_folder(root, config, make_files, force)
    return SyntheticNlvr2Paths(data_dir=root, json_dir=root / "nlvr2" / "data", manifest=root / MANIFEST_NAME)


def train_text_tokenizer(texts: Sequence[str], path: str | os.PathLike[str], vocab_size: int = 120) -> Path:
    """Train a BPE sentencepiece model (the kind of model ``beit3.spm`` is) on ``texts`` and write it to ``path``,
    for ``--sentencepiece_model`` of the example scripts trained from scratch on the synthetic data. Needs the
    ``sentencepiece`` package (the ``train`` extra). Trained from memory, the model records no corpus or output
    path: its bytes depend on ``texts`` and ``vocab_size`` only."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _written_texts(task: str, output: Path) -> list[str]:
    """The captions / questions / statements of a dataset written by :func:`main`."""
    if task == "vqa":
        files = sorted((output / "vqa").glob("*_questions.json"))
        return [q["question"] for f in files for q in json.loads(f.read_text(encoding="utf-8"))["questions"]]
    if task == "nlvr2":
        files = sorted((output / "nlvr2" / "data").glob("*.json"))
        return [json.loads(line)["sentence"] for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    images = json.loads((output / KARPATHY_NAME).read_text(encoding="utf-8"))["images"]
    return [sentence["raw"] for image in images for sentence in image["sentences"]]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m beit3_hf.testing.synthetic_data --output DIR [options]``.

    Example:
        >>> import tempfile
        >>> main(["--output", tempfile.mkdtemp(), "--num-train", "2", "--num-val", "1", "--num-test", "1",
        ...       "--classification-train-per-class", "1", "--classification-val-per-class", "1", "--quiet"])
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m beit3_hf.testing.synthetic_data",
        description="Write the built-in synthetic image-text dataset (Karpathy JSON, caption JSONL, ImageNet folders), "
        "or with --task vqa / nlvr2 the VQAv2 / NLVR2 layouts (--num-train/val/test: images / image pairs).",
    )
    parser.add_argument("--output", required=True, help="folder to write (created; must be empty or ours)")
    parser.add_argument("--task", choices=("retrieval", "vqa", "nlvr2"), default="retrieval")
    parser.add_argument("--language", choices=LANGUAGES, default="en", help="caption language (retrieval)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--num-restval", type=int, default=0)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--num-colours", type=int, default=4)
    parser.add_argument("--num-shapes", type=int, default=3)
    parser.add_argument("--holdout-eval-scenes", action="store_true", help="no val/test scene appears in training")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--classification-train-per-class", type=int, default=40)
    parser.add_argument("--classification-val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="re-render even if the folder is up to date")
    parser.add_argument(
        "--spm-vocab-size", type=int, default=0,
        help="also train a sentencepiece model of this size on the written texts: OUTPUT/text.spm",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("output", "quiet", "task", "spm_vocab_size")}
    common = {k: options[k] for k in ("image_size", "max_objects", "num_colours", "num_shapes", "seed", "force")}
    paths: SyntheticDatasetPaths | SyntheticVqaPaths | SyntheticNlvr2Paths
    try:
        if args.task == "vqa":
            paths = write_synthetic_vqa(
                args.output, num_train_images=args.num_train, num_val_images=args.num_val, num_test_images=args.num_test,
                **common,
            )  # fmt: skip
        elif args.task == "nlvr2":
            paths = write_synthetic_nlvr2(
                args.output, num_train_pairs=args.num_train, num_dev_pairs=args.num_val, num_test_pairs=args.num_test,
                **common,
            )  # fmt: skip
        else:
            paths = write_synthetic_dataset(args.output, **options)
        if args.spm_vocab_size:
            train_text_tokenizer(_written_texts(args.task, Path(args.output)), Path(args.output) / "text.spm",
                                 args.spm_vocab_size)  # fmt: skip
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    if not args.quiet:
        summary = {k: str(v) for k, v in asdict(paths).items() if k not in ("caption_jsonl", "class_names")}
        if isinstance(paths, SyntheticDatasetPaths):
            summary["caption_jsonl"] = {k: str(v) for k, v in paths.caption_jsonl.items()}  # type: ignore[assignment]
            summary["num_classes"] = str(len(paths.class_names))
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
