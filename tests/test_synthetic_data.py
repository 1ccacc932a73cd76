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
from beit3_hf.testing import synthetic_data
from beit3_hf.testing.synthetic_data import (
    COLOURS,
    POSITIONS,
    SceneObject,
    caption_vocabulary,
    describe_scene,
    generate_captions,
    generate_synthetic_samples,
    main,
    nlvr2_statement,
    parse_caption,
    render_scene,
    train_text_tokenizer,
    write_synthetic_dataset,
    write_synthetic_nlvr2,
    write_synthetic_vqa,
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


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_train": -1}, r"num_train must be >= 0"),
        ({"num_val": 600, "num_test": 400}, r"1000 unique scenes requested"),
        ({"image_format": "gif"}, r"image_format must be 'png' or 'jpg'"),
        ({"language": "fr"}, r"language must be one of"),
    ],
)
def test_refused_options_leave_the_filesystem_untouched(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "new", **{**SMALL, **options})
    assert not (tmp_path / "new").exists()
    written = write_synthetic_dataset(tmp_path / "written", **SMALL).root
    reference = snapshot(written)
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(written, **{**SMALL, **options})
    assert snapshot(written) == reference  # still complete: a plain rerun would not re-render


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


# ----------------------------------------------------------------------------------------------------------------
# Chinese captions, VQAv2 and NLVR2 layouts
# ----------------------------------------------------------------------------------------------------------------


def test_chinese_captions_describe_the_same_scenes(tmp_path):
    english = generate_synthetic_samples(num_train=20, num_val=3, num_test=3)
    chinese = generate_synthetic_samples(num_train=20, num_val=3, num_test=3, language="zh")
    assert [s.objects for s in chinese] == [s.objects for s in english]
    colour_zh = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
    for sample in chinese:
        assert len(set(sample.captions)) == 5
        for caption in sample.captions:
            assert all(colour_zh[o.colour] in caption for o in sample.objects)
    paths = write_synthetic_dataset(tmp_path / "zh", **SMALL, language="zh")
    records = load_karpathy_split(paths.karpathy_json, paths.image_root, "test")
    assert len(records) == 8 and "色" in records[0].captions[0]
    with pytest.raises(ValueError, match="language must be one of"):
        generate_captions([SceneObject("red", "circle", "top left")], 1, random.Random(0), "fr")


def test_english_manifest_is_unchanged_by_the_language_option(dataset):
    manifest = json.loads((dataset.root / "synthetic_manifest.json").read_text())
    assert "language" not in manifest["config"]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_synthetic_vqa(
        tmp_path_factory.mktemp("vqa"), num_train_images=30, num_val_images=5, num_test_images=4, image_size=32
    )


def test_vqa_files_have_the_vqav2_format_and_load(vqa):
    from beit3_hf.data.vqa import answer_vocabulary, load_vqa_split, vqa_split_files, with_targets

    names = sorted(p.name for p in vqa.annotation_dir.iterdir())
    assert names == [
        "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        "v2_OpenEnded_mscoco_train2014_questions.json",
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_train2014_annotations.json",
        "v2_mscoco_val2014_annotations.json",
    ]
    annotations = json.loads((vqa.annotation_dir / "v2_mscoco_train2014_annotations.json").read_text())
    entry = annotations["annotations"][0]
    assert set(entry) == {
        "question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"
    }  # fmt: skip
    assert all(len(a["answers"]) == 10 for a in annotations["annotations"])
    counts = [Counter(x["answer"] for x in a["answers"]) for a in annotations["annotations"]]
    assert all(c[a["multiple_choice_answer"]] >= 7 for c, a in zip(counts, annotations["annotations"]))
    assert any(len(c) > 1 for c in counts)  # annotators disagree: soft scores below 1 occur
    files = vqa_split_files(vqa.data_dir, "train2014")
    questions = load_vqa_split(files["questions"], files["image_dir"], files["annotations"])
    assert len(questions) == 30 * 4 and Path(questions[0].image_path).name == "COCO_train2014_000000000001.jpg"
    answers = answer_vocabulary(questions, min_count=1)
    kept, _ = with_targets(questions, answers)
    assert {s for q in kept for s in q.scores} >= {1.0, 0.3}
    test = vqa_split_files(vqa.data_dir, "test-dev2015")
    assert test["annotations"] is None and test["image_dir"].name == "test2015"
    assert len(load_vqa_split(test["questions"], test["image_dir"])) == 16


def test_vqa_answers_match_the_pixels(vqa):
    """The colour answer of a cell is the colour drawn there."""
    questions = json.loads((vqa.annotation_dir / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    annotations = json.loads((vqa.annotation_dir / "v2_mscoco_val2014_annotations.json").read_text())
    checked = 0
    for question, annotation in zip(questions["questions"], annotations["annotations"]):
        if not question["question"].startswith("what colour"):
            continue
        cell = question["question"].split(" in the ")[1].rstrip("?")
        row, col = divmod(POSITIONS.index(cell), 2)
        path = vqa.data_dir / "val2014" / f"COCO_val2014_{question['image_id']:012d}.jpg"
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)[
            row * 16 : row * 16 + 16, col * 16 : col * 16 + 16
        ]
        target = np.array(COLOURS[annotation["multiple_choice_answer"]])
        assert (np.abs(pixels - target).max(axis=-1) <= 60).sum() >= 20, question
        checked += 1
    assert checked > 0


def test_nlvr2_files_have_the_nlvr2_layout_and_balanced_labels(tmp_path):
    paths = write_synthetic_nlvr2(
        tmp_path / "nlvr2", num_train_pairs=12, num_dev_pairs=3, num_test_pairs=2, image_size=32
    )
    train = [json.loads(line) for line in paths.statements("train").read_text().splitlines()]
    assert len(train) == 24 and set(Counter(e["label"] for e in train)) == {"True", "False"}  # balanced on average
    assert [" left image" in e["sentence"] for e in train[:2]] == [True, False]  # one statement per image
    first = train[0]
    assert first["identifier"] == "train-0-0-0" and first["directory"] == 0
    assert (paths.data_dir / "images/train/0/train-0-0-img0.png").is_file()
    assert (paths.data_dir / "dev/dev-2-0-img1.png").is_file() and (
        paths.data_dir / "test1/test1-1-0-img0.png"
    ).is_file()
    again = write_synthetic_nlvr2(
        tmp_path / "again", num_train_pairs=12, num_dev_pairs=3, num_test_pairs=2, image_size=32
    )
    assert snapshot(paths.data_dir) == snapshot(again.data_dir)  # deterministic
    before = {p: p.stat().st_mtime_ns for p in paths.data_dir.rglob("*") if p.is_file()}
    write_synthetic_nlvr2(tmp_path / "nlvr2", num_train_pairs=12, num_dev_pairs=3, num_test_pairs=2, image_size=32)
    assert {p: p.stat().st_mtime_ns for p in paths.data_dir.rglob("*") if p.is_file()} == before  # idempotent
    write_synthetic_nlvr2(tmp_path / "nlvr2", num_train_pairs=4, num_dev_pairs=3, num_test_pairs=2, image_size=32)
    assert not (paths.data_dir / "images/train/5/train-5-0-img0.png").exists()  # stale pairs removed
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_nlvr2(tmp_path / "foreign", num_train_pairs=1, num_dev_pairs=1, num_test_pairs=1)


def test_nlvr2_statements_are_true_or_false_of_their_image():
    rng = random.Random(0)
    one, two = [SceneObject("red", "circle", "top left")], [SceneObject("blue", "square", "bottom right"),
                                                            SceneObject("red", "triangle", "top left")]  # fmt: skip
    for left, right in ((one, two), (two, one), (two, two), (one, one)):
        for side in ("left", "right"):
            statement, label = nlvr2_statement(left, right, side, rng)
            assert f" {side} image" in statement and "two shapes" in statement
            assert label == (len(left if side == "left" else right) == 2), statement


def test_nlvr2_labels_are_balanced_and_read_from_the_named_image(tmp_path):
    paths = write_synthetic_nlvr2(tmp_path / "nlvr2", num_train_pairs=300, num_dev_pairs=1, num_test_pairs=1)
    entries = [json.loads(line) for line in paths.statements("train").read_text().splitlines()]
    assert len(entries) == 600
    assert 0.4 < sum(entry["label"] == "True" for entry in entries) / len(entries) < 0.6


def test_cli_trains_a_sentencepiece_model_of_the_written_texts(tmp_path):
    import sentencepiece

    common = ["--num-train", "3", "--num-val", "1", "--num-test", "1", "--image-size", "32", "--quiet"]
    assert main(["--task", "nlvr2", "--output", str(tmp_path / "nlvr2"), *common, "--spm-vocab-size", "60"]) == 0
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "nlvr2" / "text.spm"))
    statement = json.loads((tmp_path / "nlvr2" / "nlvr2" / "data" / "dev.json").read_text().splitlines()[0])
    assert model.get_piece_size() >= 30 and model.decode(model.encode(statement["sentence"])) == statement["sentence"]
    assert sorted(p.name for p in (tmp_path / "nlvr2").iterdir() if p.is_file()) == [
        "synthetic_manifest.json",
        "text.spm",
    ]


def test_cli_writes_the_vqa_and_nlvr2_layouts(tmp_path, capsys):
    common = ["--num-train", "2", "--num-val", "1", "--num-test", "1", "--image-size", "32"]
    assert main(["--task", "vqa", "--output", str(tmp_path / "vqa"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["annotation_dir"] == str(tmp_path / "vqa" / "vqa")
    assert main(["--task", "nlvr2", "--output", str(tmp_path / "nlvr2"), *common, "--quiet"]) == 0
    assert (tmp_path / "nlvr2" / "nlvr2" / "data" / "dev.json").is_file()


def test_text_tokenizer_bytes_do_not_depend_on_where_it_is_written(tmp_path):
    texts = [c for sample in generate_synthetic_samples(num_train=12, num_val=5, num_test=8) for c in sample.captions]
    first = train_text_tokenizer(texts, tmp_path / "a" / "spm.model").read_bytes()
    assert train_text_tokenizer(texts, tmp_path / "elsewhere" / "other.model").read_bytes() == first
    assert str(tmp_path).encode() not in first  # the file-based trainer recorded its corpus and output paths


def test_unwritable_output_is_refused_before_rendering(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    rendered = []
    monkeypatch.setattr(synthetic_data, "render_scene", lambda *args: rendered.append(args))
    with pytest.raises(PermissionError, match="a-file is not a writable folder"):
        write_synthetic_dataset(tmp_path / "a-file" / "data", **SMALL)
    assert rendered == []
