"""The built-in synthetic dataset: determinism, unambiguous captions, real on-disk formats, idempotent writes."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3_hf.data import load_caption_jsonl, load_karpathy_split
from beit3_hf.testing.synthetic_data import (
    COLOURS,
    POSITIONS,
    SceneObject,
    caption_vocabulary,
    describe_scene,
    generate_captions,
    generate_synthetic_samples,
    main,
    parse_caption,
    render_scene,
    write_synthetic_dataset,
)

SMALL = {
    "num_train": 12,
    "num_restval": 2,
    "num_val": 5,
    "num_test": 8,
    "image_size": 32,
    "classification_train_per_class": 2,
    "classification_val_per_class": 1,
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), **SMALL)


def test_same_bytes_every_run(dataset, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", **SMALL)
    first, second = snapshot(dataset.root), snapshot(again.root)
    assert list(first) == list(second)
    assert first == second
    other_seed = snapshot(write_synthetic_dataset(tmp_path / "seed1", **SMALL, seed=1).root)
    assert other_seed[dataset.karpathy_json.name] != first[dataset.karpathy_json.name]


def test_layout(dataset):
    root = dataset.root
    assert dataset.image_root == root and dataset.karpathy_json == root / "dataset_synthetic.json"
    assert sorted(dataset.caption_jsonl) == ["restval", "test", "train", "val"]
    assert len(list((root / "images").glob("*.png"))) == 12 + 2 + 5 + 8
    assert sorted(p.name for p in (root / "imagenet").iterdir()) == ["train", "val"]
    classes = sorted(p.name for p in (root / "imagenet" / "train").iterdir())
    assert classes == sorted(dataset.class_names) and len(classes) == 4 * 3
    for split, per_class in (("train", 2), ("val", 1)):
        for name in classes:
            files = list((root / "imagenet" / split / name).iterdir())
            assert len(files) == per_class and all(f.suffix == ".JPEG" for f in files)
            with Image.open(files[0]) as image:
                assert image.format == "JPEG" and image.size == (32, 32)


def test_karpathy_json_has_the_exact_format(dataset):
    data = json.loads(dataset.karpathy_json.read_text())
    assert set(data) == {"images", "dataset"} and data["dataset"] == "synthetic"
    sentid = 0
    for imgid, entry in enumerate(data["images"]):
        assert set(entry) == {"filepath", "sentids", "filename", "imgid", "split", "sentences"}
        assert entry["imgid"] == imgid and entry["filepath"] == "images"
        assert entry["split"] in {"train", "restval", "val", "test"}
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for sentence in entry["sentences"]:
            assert set(sentence) == {"tokens", "raw", "imgid", "sentid"}
            assert sentence["imgid"] == imgid and sentence["sentid"] == sentid
            assert sentence["tokens"] == sentence["raw"].split()
            sentid += 1
    assert Counter(e["split"] for e in data["images"]) == {"train": 12, "restval": 2, "val": 5, "test": 8}


def test_karpathy_json_and_jsonl_validate_through_the_loaders(dataset):
    for split, count in (("train", 14), ("val", 5), ("test", 8)):
        records = load_karpathy_split(dataset.karpathy_json, dataset.image_root, split)
        assert len(records) == count and all(len(r.captions) == 5 for r in records)
    assert load_caption_jsonl(dataset.caption_jsonl["val"]) == load_karpathy_split(
        dataset.karpathy_json, dataset.image_root, "val"
    )


@pytest.mark.parametrize("split", ["val", "test"])
def test_each_caption_identifies_exactly_one_evaluation_image(dataset, split):
    records = load_karpathy_split(dataset.karpathy_json, dataset.image_root, split)
    scenes = [parse_caption(r.captions[0]) for r in records]
    for record, scene in zip(records, scenes):
        for caption in record.captions:
            parsed = parse_caption(caption)
            assert parsed == scene  # all captions of an image describe the same scene ...
            assert [s == parsed for s in scenes].count(True) == 1  # ... and it is no other image's scene
        assert len(set(record.captions)) == len(record.captions)  # paraphrases are distinct


def test_val_and_test_share_no_scene_and_holdout_removes_them_from_training():
    samples = generate_synthetic_samples(num_train=300, num_val=40, num_test=40, holdout_eval_scenes=True)
    evaluation = {s.scene for s in samples if s.split in ("val", "test")}
    assert len(evaluation) == 80
    assert not evaluation & {s.scene for s in samples if s.split == "train"}


def test_test_split_does_not_depend_on_other_split_sizes():
    a = [s for s in generate_synthetic_samples(num_train=3, num_val=2, num_test=6) if s.split == "test"]
    b = [s for s in generate_synthetic_samples(num_train=30, num_val=2, num_test=6) if s.split == "test"]
    assert [(s.objects, s.captions) for s in a] == [(s.objects, s.captions) for s in b]


def test_pixels_match_the_scene(dataset):
    """Each object's colour fills part of its own cell; empty cells are plain background."""
    samples = generate_synthetic_samples(**{k: v for k, v in SMALL.items() if k.startswith("num_")})
    for sample in samples:
        with Image.open(dataset.images_dir / sample.filename) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        half = pixels.shape[0] // 2
        by_cell = {o.position: o for o in sample.objects}
        for index, position in enumerate(POSITIONS):
            row, col = divmod(index, 2)
            cell = pixels[row * half : (row + 1) * half, col * half : (col + 1) * half]
            if position in by_cell:
                target = np.array(COLOURS[by_cell[position].colour])
                close = (np.abs(cell - target).max(axis=-1) <= 40).sum()
                assert close >= 0.1 * half * half, (sample.filename, position)
            else:
                assert np.ptp(cell) == 0, (sample.filename, position)  # uniform grey


def test_captions_paraphrase_and_mention_every_object():
    rng = random.Random(0)
    objects = [SceneObject("red", "circle", "top left"), SceneObject("blue", "square", "bottom right")]
    captions = generate_captions(objects, 8, rng)
    assert len(set(captions)) == 8
    assert all(parse_caption(c) == frozenset(objects) for c in captions)
    assert any(c.index("red") > c.index("blue") for c in captions)  # both mention orders occur
    assert any("upper" in c or "lower" in c for c in captions)  # synonyms occur
    assert describe_scene(objects) == "a red circle in the top left and a blue square in the bottom right"
    vocabulary = set(caption_vocabulary())
    for sample in generate_synthetic_samples(num_train=200, num_val=0, num_test=0, num_colours=6, num_shapes=4):
        assert set(" ".join(sample.captions).split()) <= vocabulary


def test_parse_caption_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("a red thing in the top left")
    with pytest.raises(ValueError, match="does not describe"):
        parse_caption("a picture of nothing")
    with pytest.raises(ValueError, match="does not describe"):
        parse_caption("a red circle in the top left and a blue square in the upper left")


def test_render_scene_is_deterministic():
    objects = [SceneObject("green", "triangle", "top right")]
    assert render_scene(objects, 48, seed="x").tobytes() == render_scene(objects, 48, seed="x").tobytes()
    assert render_scene(objects, 48, seed="x").tobytes() != render_scene(objects, 48, seed="y").tobytes()


def test_rerun_is_cheap_and_keeps_files(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.root.rglob("*") if p.is_file()}
    again = write_synthetic_dataset(dataset.root, **SMALL)
    assert again == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.root.rglob("*") if p.is_file()} == before


def test_damaged_files_are_repaired(tmp_path):
    root = tmp_path / "data"
    write_synthetic_dataset(root, **SMALL)
    reference = snapshot(root)
    image = root / "images" / "synthetic_000000.png"
    image.write_bytes(b"truncated")  # size differs from the manifest: a plain rerun notices
    write_synthetic_dataset(root, **SMALL)
    assert snapshot(root) == reference
    image.write_bytes(bytes(len(reference["images/synthetic_000000.png"])))  # same size: only force notices
    write_synthetic_dataset(root, **SMALL)
    assert snapshot(root) != reference
    write_synthetic_dataset(root, **SMALL, force=True)
    assert snapshot(root) == reference


def test_rewrite_with_other_options_removes_stale_files(tmp_path):
    root = tmp_path / "data"
    write_synthetic_dataset(root, **SMALL)
    smaller = {**SMALL, "num_train": 3, "num_restval": 0, "classification_val_per_class": 0, "image_format": "jpg"}
    write_synthetic_dataset(root, **smaller)
    fresh = write_synthetic_dataset(tmp_path / "fresh", **smaller)
    assert snapshot(root) == snapshot(fresh.root)
    assert not (root / "captions_restval.jsonl").exists()


def test_interrupted_or_damaged_folder_is_regenerated(tmp_path):
    root = tmp_path / "data"
    write_synthetic_dataset(root, **SMALL)
    reference = snapshot(root)
    victim = root / "imagenet" / "val" / "red_circle"
    for path in victim.iterdir():
        path.unlink()
    victim.rmdir()
    write_synthetic_dataset(root, **SMALL)
    assert snapshot(root) == reference


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{tmp_path} is not empty"):
        write_synthetic_dataset(tmp_path, **SMALL)
    assert os.listdir(tmp_path) == ["thesis.tex"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_val": 600, "num_test": 400}, r"1000 unique scenes requested, but only 912 exist"),
        ({"num_colours": 7}, r"num_colours must be in \[1, 6\]"),
        ({"max_objects": 5}, r"max_objects must be in \[1, 4\]"),
        ({"num_train": -1}, r"num_train must be >= 0"),
        ({"image_format": "gif"}, r"image_format must be 'png' or 'jpg'"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic_samples(**options)


def test_cli(tmp_path, capsys):
    args = ["--output", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--num-test", "2"]
    args += ["--image-size", "32", "--classification-train-per-class", "1", "--classification-val-per-class", "1"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["karpathy_json"] == str(tmp_path / "cli" / "dataset_synthetic.json")
    assert len(load_karpathy_split(printed["karpathy_json"], printed["image_root"], "test")) == 2
    with pytest.raises(SystemExit) as info:
        main(["--output", str(tmp_path / "cli"), "--num-val", "2000", "--quiet"])
    assert info.value.code == 2
