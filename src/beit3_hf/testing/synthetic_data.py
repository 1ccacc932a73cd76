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
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
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
    "SyntheticSample",
    "caption_vocabulary",
    "describe_scene",
    "generate_captions",
    "generate_synthetic_samples",
    "main",
    "parse_caption",
    "render_scene",
    "write_synthetic_dataset",
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
    if style == 0:
        return " and ".join(_located(o, rng) for o in objs)
    if style == 1:
        return "there is " + " and ".join(_located(o, rng) for o in objs)
    if style == 2:
        return "an image of " + " and ".join(_located(o, rng) for o in objs)
    if style == 3:
        return " and ".join(_position_first(o, rng) for o in objs)
    # style 4: "X with Y [and Z]"
    head, *rest = (_located(o, rng) for o in objs)
    return head if not rest else head + " with " + " and ".join(rest)


def generate_captions(objects: Sequence[SceneObject], count: int, rng: random.Random) -> tuple[str, ...]:
    """``count`` distinct paraphrases, each naming every object of the scene with its colour, shape and cell.

    Example:
        >>> import random
        >>> caps = generate_captions([SceneObject("red", "circle", "top left")], 3, random.Random(0))
        >>> len(set(caps)), all(parse_caption(c) == {SceneObject("red", "circle", "top left")} for c in caps)
        (3, True)
    """
    if not objects:
        raise ValueError("a scene needs at least one object")
    captions: list[str] = []
    for _ in range(200 * count):
        caption = _one_caption(objects, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return tuple(captions)
    raise ValueError(f"could not find {count} distinct captions for {list(objects)}")


def describe_scene(objects: Iterable[SceneObject]) -> str:
    """The canonical caption of a scene (objects in reading order, first synonyms).

    Example:
        >>> describe_scene([SceneObject("blue", "square", "bottom right"), SceneObject("red", "circle", "top left")])
        'a red circle in the top left and a blue square in the bottom right'
    """
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o.position))
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
    for shape in SHAPES[:num_shapes]:
        for phrase in _SHAPE_WORDS[shape]:
            words.update(phrase.split())
    for phrases in _POSITION_WORDS.values():
        for phrase in phrases:
            words.update(phrase.split())
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
) -> list[SyntheticSample]:
    """The retrieval samples (scenes and captions, no pixels), in Karpathy order: train, restval, val, test.

    ``val`` and ``test`` scenes are each unique within their split and the two splits share none, so every caption
    of an evaluation image describes that image only. With ``holdout_eval_scenes=True`` no train/restval image
    shows a val or test scene either (a compositional-generalisation setting); by default train scenes are drawn
    freely, so an evaluation scene may also appear, rendered differently, in training.

    Each split draws from its own seeded stream, so e.g. changing ``num_train`` does not change the test images.

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
    taken: set[Scene] = set()
    for split in ("test", "val"):  # unique scenes; test first so that it does not depend on num_val
        rng = random.Random(f"beit3-synthetic:{seed}:scenes:{split}")
        chosen: list[Scene] = []
        while len(chosen) < counts[split]:
            scene = _random_scene(rng, colours, shapes, max_objects)
            if scene not in taken:
                taken.add(scene)
                chosen.append(scene)
        scenes[split] = chosen
    for split in ("train", "restval"):
        rng = random.Random(f"beit3-synthetic:{seed}:scenes:{split}")
        chosen = []
        while len(chosen) < counts[split]:
            scene = _random_scene(rng, colours, shapes, max_objects)
            if not (holdout_eval_scenes and scene in taken):
                chosen.append(scene)
        scenes[split] = chosen

    samples: list[SyntheticSample] = []
    for split in _SPLITS:
        rng = random.Random(f"beit3-synthetic:{seed}:captions:{split}")
        for i, scene in enumerate(scenes[split]):
            objects = tuple(sorted(scene, key=lambda o: POSITIONS.index(o.position)))
            captions = generate_captions(objects, captions_per_image, rng)
            filename = f"synthetic_{len(samples):06d}.{image_format}"
            samples.append(SyntheticSample(split, filename, objects, captions, f"beit3-synthetic:{seed}:{split}:{i}"))
    _assert_unambiguous(samples)
    return samples


def _assert_unambiguous(samples: Sequence[SyntheticSample]) -> None:
    """Every caption parses back to its own scene, and val/test scenes are unique within and across the two splits."""
    seen: dict[Scene, str] = {}
    for s in samples:
        for caption in s.captions:
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
    return re.findall(r"[a-z0-9]+", raw.lower())


def _karpathy_json(samples: Sequence[SyntheticSample]) -> dict:
    images = []
    sentid = 0
    for imgid, s in enumerate(samples):
        sentences = []
        for caption in s.captions:
            sentences.append({"tokens": _tokens(caption), "raw": caption, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": "images",
                "sentids": [x["sentid"] for x in sentences],
                "filename": s.filename,
                "imgid": imgid,
                "split": s.split,
                "sentences": sentences,
            }
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


def _paths(root: Path, splits: Iterable[str], class_names: Sequence[str]) -> SyntheticDatasetPaths:
    return SyntheticDatasetPaths(
        root=root,
        karpathy_json=root / KARPATHY_NAME,
        image_root=root,
        images_dir=root / "images",
        caption_jsonl={split: root / f"captions_{split}.jsonl" for split in splits},
        imagenet=root / "imagenet",
        manifest=root / MANIFEST_NAME,
        class_names=tuple(class_names),
    )


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
) -> SyntheticDatasetPaths:
    """Generate the synthetic dataset under ``root`` (see the module docstring for the layout) and return its paths.

    Idempotent: if ``root`` already holds a complete dataset written with the same options, nothing is rewritten
    (the call only checks that the files exist); otherwise every file is rendered again and written only where its
    bytes changed, and files of an earlier, different configuration are removed from ``images/`` and ``imagenet/``.
    ``force=True`` re-renders regardless. ``root`` must be empty, missing, or a folder this function wrote before;
    anything else is refused, so that a mistyped path never loses data.

    The classification folder holds separate single-object images (``classification_*_per_class`` per class), with
    ``num_colours * num_shapes`` classes named ``{colour}_{shape}``.

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
    colours = list(COLOURS)[:num_colours]
    shapes = list(SHAPES)[:num_shapes]
    class_names = [f"{c}_{s}" for c in colours for s in shapes]
    counts = {"train": num_train, "restval": num_restval, "val": num_val, "test": num_test}
    splits = [s for s in _SPLITS if counts[s] > 0]
    paths = _paths(root, splits, class_names)

    manifest: dict | None = None
    if root.exists():
        if not root.is_dir():
            raise NotADirectoryError(f"{root} exists and is not a directory")
        if paths.manifest.is_file():
            try:
                manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ValueError(f"{paths.manifest}: unreadable manifest ({err}); delete {root} and retry") from err
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
        return paths

    root.mkdir(parents=True, exist_ok=True)
    # Mark the folder as ours before writing anything, so that an interrupted run can be resumed.
    _write_if_changed(paths.manifest, _json_bytes({"complete": False, "config": config, "files": []}))

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
    )
    files: dict[str, bytes] = {}
    for s in samples:
        files[f"images/{s.filename}"] = _encode(render_scene(s.objects, image_size, s.render_seed), image_format)
    files[KARPATHY_NAME] = _json_bytes(_karpathy_json(samples))
    for split in splits:
        lines = [
            json.dumps({"image": f"images/{s.filename}", "caption": c}, ensure_ascii=True)
            for s in samples
            if s.split == split
            for c in s.captions
        ]
        files[f"captions_{split}.jsonl"] = ("\n".join(lines) + "\n").encode("utf-8")
    for split, per_class in (("train", classification_train_per_class), ("val", classification_val_per_class)):
        rng = random.Random(f"beit3-synthetic:{seed}:classification:{split}")
        for colour in colours:
            for shape in shapes:
                for i in range(per_class):
                    obj = SceneObject(colour, shape, rng.choice(POSITIONS))
                    image = render_scene([obj], image_size, f"beit3-synthetic:{seed}:cls:{split}:{colour}:{shape}:{i}")
                    name = f"imagenet/{split}/{colour}_{shape}/{colour}_{shape}_{split}_{i:05d}.JPEG"
                    files[name] = _encode(image, "jpg")

    for rel, data in files.items():
        _write_if_changed(root / rel, data)
    # Remove leftovers of an earlier configuration (only inside the folders this generator owns).
    for owned in (paths.images_dir, paths.imagenet):
        if owned.is_dir():
            for path in sorted(owned.rglob("*"), reverse=True):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and rel not in files:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
    for split in _SPLITS:
        stale = root / f"captions_{split}.jsonl"
        if split not in splits and stale.is_file():
            stale.unlink()
    listing = sorted([rel, len(data)] for rel, data in files.items())
    _write_if_changed(paths.manifest, _json_bytes({"complete": True, "config": config, "files": listing}))
    return paths


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
        description="Write the built-in synthetic image-text dataset (Karpathy JSON, caption JSONL, ImageNet folders).",
    )
    parser.add_argument("--output", required=True, help="folder to write (created; must be empty or ours)")
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
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("output", "quiet")}
    try:
        paths = write_synthetic_dataset(args.output, **options)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    if not args.quiet:
        summary = {k: str(v) for k, v in asdict(paths).items() if k not in ("caption_jsonl", "class_names")}
        summary["caption_jsonl"] = {k: str(v) for k, v in paths.caption_jsonl.items()}  # type: ignore[assignment]
        summary["num_classes"] = str(len(paths.class_names))
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
