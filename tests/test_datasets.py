"""Loaders: Karpathy split files (Flickr30k and COCO layouts), caption JSON/JSONL, the `datasets` pairs and images,
imagefolder, and image decoding that names the file (checks up front, skipping during training)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from beit3_hf.data import (
    ImageFolderData,
    ImageRowDecoder,
    RetrievalEvalIndex,
    RetrievalRecord,
    UndecodableImageError,
    check_images,
    load_caption_jsonl,
    load_imagefolder,
    load_karpathy_split,
    open_image,
    retrieval_pair_dataset,
    transform_with_skipping,
)
from beit3_hf.testing.synthetic_data import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        num_train=6,
        num_restval=3,
        num_val=3,
        num_test=4,
        captions_per_image=3,
        image_size=32,
        num_colours=2,
        num_shapes=2,
        classification_train_per_class=2,
        classification_val_per_class=1,
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def karpathy_entry(filename: str, split: str, *captions: str, **extra) -> dict:
    return {
        "filename": filename,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
        **extra,
    }


# ----------------------------------------------------------------------------------------------------------------
# Karpathy
# ----------------------------------------------------------------------------------------------------------------


def test_karpathy_synthetic_test_split(synthetic):
    records = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "test")
    assert [r.image_id for r in records] == [0, 1, 2, 3]
    assert all(len(r.captions) == 3 and Path(r.image_path).is_file() for r in records)
    assert all(Path(r.image_path).parent == synthetic.images_dir for r in records)  # filepath "images" joined


def test_karpathy_train_includes_restval_by_default(synthetic):
    with_restval = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "train")
    without = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "train", include_restval=False)
    restval = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "restval")
    assert len(with_restval) == 9 and len(without) == 6 and len(restval) == 3
    assert [r.image_id for r in with_restval] == list(range(9))  # running index over train + restval
    assert [r.image_path for r in with_restval] == [r.image_path for r in without + restval]


def test_karpathy_flickr_layout_without_filepath(tmp_path):
    images = tmp_path / "flickr30k-images"
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(images / name)
    path = write_json(
        tmp_path / "dataset_flickr30k.json",
        {
            "images": [
                karpathy_entry("1.jpg", "train", "a dog runs ."),
                karpathy_entry("2.jpg", "test", " Two men. ", "A pair of men."),
                karpathy_entry("3.jpg", "test", "A cat."),
            ],
            "dataset": "flickr30k",
        },
    )
    records = load_karpathy_split(path, images, "test")
    assert records == [
        RetrievalRecord(str(images / "2.jpg"), ("Two men.", "A pair of men."), 0),
        RetrievalRecord(str(images / "3.jpg"), ("A cat.",), 1),
    ]


def test_karpathy_coco_layout_with_filepath(tmp_path):
    write_image(tmp_path / "val2014" / "COCO_val2014_1.jpg")
    write_image(tmp_path / "train2014" / "COCO_train2014_2.jpg")
    path = write_json(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                karpathy_entry("COCO_val2014_1.jpg", "restval", "x", filepath="val2014", cocoid=1),
                karpathy_entry("COCO_train2014_2.jpg", "train", "y", filepath="train2014", cocoid=2),
            ]
        },
    )
    records = load_karpathy_split(path, tmp_path, "train")
    assert [r.image_path for r in records] == [
        str(tmp_path / "val2014" / "COCO_val2014_1.jpg"),
        str(tmp_path / "train2014" / "COCO_train2014_2.jpg"),
    ]


def test_karpathy_captions_take_the_coco_ids_of_their_own_entries(tmp_path):
    from beit3_hf.data.captioning import load_karpathy_captions

    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(tmp_path / name)
    path = write_json(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                karpathy_entry("a.jpg", "train", "x", cocoid=7),
                karpathy_entry("b.jpg", "val", "y", cocoid=8),
                karpathy_entry("c.jpg", "restval", "z", cocoid=9),
                karpathy_entry("d.jpg", "train", "w"),  # neither cocoid nor imgid: the running index
            ]
        },
    )
    records = load_karpathy_captions(path, tmp_path, "train")
    assert [(Path(r.image_path).name, r.image_id) for r in records] == [("a.jpg", 7), ("c.jpg", 9), ("d.jpg", 2)]


def test_karpathy_missing_images_are_reported_up_front(tmp_path):
    write_image(tmp_path / "present.jpg")
    entries = [karpathy_entry("present.jpg", "test", "a")] + [
        karpathy_entry(f"missing_{i}.jpg", "test", "b") for i in range(7)
    ]
    path = write_json(tmp_path / "dataset_flickr30k.json", {"images": entries})
    with pytest.raises(FileNotFoundError, match=r"dataset_flickr30k\.json.*7 of 8 image files are missing") as info:
        load_karpathy_split(path, tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path / "missing_0.jpg") in message and "and 2 more" in message
    assert len(load_karpathy_split(path, tmp_path, "test", check_images=False)) == 8


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"dataset": "coco"}, r"top-level object has no 'images' field"),
        ([1, 2], r"top-level object is a list, expected an object"),
        (
            {"images": [karpathy_entry("a.jpg", "test", "x"), {"filename": "b.jpg"}]},
            r"images\[1\] has no 'split' field",
        ),
        ({"images": [{"split": "test", "sentences": []}]}, r"images\[0\] has no 'filename' field"),
        ({"images": [{"split": "test", "filename": "a.jpg"}]}, r"images\[0\] \('a\.jpg'\) has no 'sentences' field"),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"raw": "x"}, {"tokens": []}]}]},
            r"images\[0\] \('a\.jpg'\) sentences\[1\] has no 'raw' field",
        ),
        ({"images": [{"split": "test", "filename": "a.jpg", "sentences": []}]}, r"empty 'sentences' list"),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": "x"}]},
            r"'sentences' is a str, expected list",
        ),
    ],
)
def test_karpathy_malformed_entries_name_file_entry_and_field(tmp_path, data, match):
    path = write_json(tmp_path / "broken_karpathy.json", data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .*" + match):
        load_karpathy_split(path, tmp_path, "test", check_images=False)


def test_karpathy_empty_split_lists_present_splits(tmp_path):
    path = write_json(
        tmp_path / "dataset_coco.json",
        {"images": [karpathy_entry("a.jpg", "train", "x"), karpathy_entry("b.jpg", "val", "y")]},
    )
    with pytest.raises(
        ValueError, match=r"dataset_coco\.json: no images in split 'test'; splits present: \['train', 'val'\]"
    ):
        load_karpathy_split(path, tmp_path, "test")
    with pytest.raises(ValueError, match=r"no images in split 'restval \+ train'"):
        load_karpathy_split(
            write_json(tmp_path / "v.json", {"images": [karpathy_entry("b.jpg", "val", "y")]}), tmp_path, "train"
        )


def test_karpathy_missing_or_invalid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such file"):
        load_karpathy_split(tmp_path / "nope.json", tmp_path, "test")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"split": }', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json:2: invalid JSON"):
        load_karpathy_split(bad, tmp_path, "test")


def test_json_in_another_encoding_names_the_file(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"images": [{"filename": "café.jpg"}]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text \(byte 29: invalid continuation byte\)"):
        load_karpathy_split(latin1, tmp_path, "test")
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes('{"image": "a.jpg", "caption": "un café"}\n'.encode("cp1252"))
    with pytest.raises(ValueError, match=r"captions\.jsonl: not UTF-8 text"):
        load_caption_jsonl(captions)


# ----------------------------------------------------------------------------------------------------------------
# {"image", "caption"} files
# ----------------------------------------------------------------------------------------------------------------


def test_caption_jsonl_from_synthetic_matches_karpathy(synthetic):
    from_jsonl = load_caption_jsonl(synthetic.caption_jsonl["test"])
    from_karpathy = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "test")
    assert from_jsonl == from_karpathy


def test_caption_jsonl_groups_captions_and_resolves_paths(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    absolute = write_image(tmp_path / "elsewhere" / "c.png")
    path = tmp_path / "caps.jsonl"
    lines = [
        {"image": "a.png", "caption": "first a"},
        {"image": "b.png", "caption": "only b"},
        {"image": "a.png", "caption": "second a"},
        {"image": str(absolute), "captions": ["c one", "c two"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]))
    records = load_caption_jsonl(path, tmp_path / "imgs")
    assert records == [
        RetrievalRecord(str(tmp_path / "imgs" / "a.png"), ("first a", "second a"), 0),
        RetrievalRecord(str(tmp_path / "imgs" / "b.png"), ("only b",), 1),
        RetrievalRecord(str(absolute), ("c one", "c two"), 2),
    ]


def test_caption_json_list_relative_to_its_folder(tmp_path):
    write_image(tmp_path / "x.png")
    path = write_json(tmp_path / "caps.json", [{"image": "x.png", "caption": "an x"}])
    assert load_caption_jsonl(path) == [RetrievalRecord(str(tmp_path / "x.png"), ("an x",), 0)]


def test_caption_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "a.png", "caption": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON line")):
        load_caption_jsonl(path, check_images=False)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"image": "a.png"}', r":2 has no 'caption' field"),
        ('{"caption": "x"}', r":2 has no 'image' field"),
        ('["a.png", "x"]', r":2 is a list, expected an object"),
        ('{"image": "a.png", "caption": "  "}', r":2 has an empty or non-string caption"),
    ],
)
def test_caption_jsonl_bad_items(tmp_path, line, match):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "a.png", "caption": "x"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + match):
        load_caption_jsonl(path, check_images=False)


def test_caption_json_list_bad_item_names_index(tmp_path):
    path = write_json(tmp_path / "caps.json", [{"image": "a.png", "caption": "x"}, {"image": "b.png"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: item 1 has no 'caption' field")):
        load_caption_jsonl(path, check_images=False)


def test_caption_file_that_is_one_json_object(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"annotations": [], "images": []}, indent=2))
    with pytest.raises(ValueError, match=re.escape(f"{path}: is one JSON object (keys ['annotations', 'images'])")):
        load_caption_jsonl(path, check_images=False)
    path.write_text(json.dumps({"image": "a.png", "caption": "x"}, indent=2))  # a pretty-printed single item
    assert load_caption_jsonl(path, check_images=False) == [RetrievalRecord(str(tmp_path / "a.png"), ("x",), 0)]


def test_caption_jsonl_missing_images_and_empty_file(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "gone.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"(?s)caps\.jsonl.*1 of 1 image files are missing.*gone\.png"):
        load_caption_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"caps\.jsonl: no captions"):
        load_caption_jsonl(path)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------------


def test_pair_dataset_one_row_per_caption(synthetic):
    records = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "val")
    pairs = retrieval_pair_dataset(records)
    assert pairs.num_rows == 9 and pairs.column_names == ["image", "caption", "image_id"]
    assert pairs[4] == {"image": records[1].image_path, "caption": records[1].captions[1], "image_id": 1}

    def transform(batch):
        return {"n": [len(c) for c in batch["caption"]], "image_id": batch["image_id"]}

    loader = torch.utils.data.DataLoader(pairs.with_transform(transform), batch_size=4)
    batch = next(iter(loader))
    assert batch["image_id"].tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="no records"):
        retrieval_pair_dataset([])


def test_eval_index_encodes_each_image_and_caption_once(synthetic):
    records = load_karpathy_split(synthetic.karpathy_json, synthetic.image_root, "test")
    index = RetrievalEvalIndex.from_records(records)
    assert index.num_images == 4 and index.num_texts == 12
    assert index.text_to_image.tolist() == [i for i in range(4) for _ in range(3)]
    assert index.captions == [c for r in records for c in r.captions]
    images = index.image_dataset()
    assert len(images) == 4 and images[2] == {"image": records[2].image_path, "index": 2}
    assert open_image(images[2]["image"]).size == (32, 32)


def test_eval_index_merges_duplicate_images():
    index = RetrievalEvalIndex.from_records(
        [RetrievalRecord("a", ("x",), 0), RetrievalRecord("b", ("y",), 1), RetrievalRecord("a", ("z",), 2)]
    )
    assert index.image_paths == ["a", "b"] and index.image_ids == [0, 1]
    assert index.text_to_image.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="no records"):
        RetrievalEvalIndex.from_records([])


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-style folders
# ----------------------------------------------------------------------------------------------------------------


def test_imagefolder_synthetic_offline(synthetic, tmp_path, no_network):
    data = load_imagefolder(synthetic.imagenet, cache_dir=tmp_path / "cache")
    assert isinstance(data, ImageFolderData)
    assert data.class_names == sorted(synthetic.class_names) and len(data.class_names) == 4
    train, val = data.dataset["train"], data.dataset["validation"]
    assert (train.num_rows, val.num_rows) == (8, 4)
    assert train.features["label"].names == data.class_names
    row = val[3]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (32, 32)
    assert data.class_names[row["label"]] == sorted(synthetic.class_names)[3]
    assert data.id2label[0] == data.class_names[0] and data.label2id[data.class_names[1]] == 1


def make_imagefolder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_image(root / split / name / f"{name}_{i}.JPEG")
    return root


def test_imagefolder_single_class_and_validation_alias(tmp_path, no_network):
    root = make_imagefolder(tmp_path / "in", {"train": {"n01": 2}, "validation": {"n01": 1}})
    data = load_imagefolder(root, cache_dir=tmp_path / "cache")
    assert data.class_names == ["n01"] and data.dataset["validation"][0]["label"] == 0


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "in", {"train": {"n01": 2, "n02": 0}, "val": {"n01": 1}})
    (root / "train" / "n02" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(str(root / "train" / "n02")) + ": class folder has no images"):
        load_imagefolder(root)


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagefolder_missing_split_folder(tmp_path, missing):
    layout = {"train": {"n01": 1}, "val": {"n01": 1}}
    del layout[missing]
    root = make_imagefolder(tmp_path / "in", layout)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / missing)) + ": missing"):
        load_imagefolder(root)


def test_imagefolder_other_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        load_imagefolder(tmp_path / "nowhere")
    root = make_imagefolder(tmp_path / "a", {"train": {"n01": 1}, "val": {"n01": 1, "n09": 1}})
    with pytest.raises(ValueError, match=re.escape(str(root / "val")) + r": 1 class folders do not exist in .*n09"):
        load_imagefolder(root)
    root = make_imagefolder(tmp_path / "b", {"train": {"n01": 1}, "val": {"n01": 1}})
    write_image(root / "val" / "loose.JPEG")
    with pytest.raises(ValueError, match=r"lie directly in the split folder \(e\.g\. loose\.JPEG\)"):
        load_imagefolder(root)
    root = make_imagefolder(tmp_path / "c", {"train": {}, "val": {"n01": 1}})
    (root / "train").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "train")) + ": no class folders"):
        load_imagefolder(root)


# ----------------------------------------------------------------------------------------------------------------
# Images: decoding errors name the file; up-front checks; skipping during training
# ----------------------------------------------------------------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: Pillow opens it, then fails to decode with "image file is truncated"."""
    Image.radial_gradient("L").convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_open_image_names_the_file_of_truncated_and_broken_images(tmp_path):
    truncated = truncated_jpeg(tmp_path / "truncated.jpg")
    with pytest.raises(UndecodableImageError, match=re.escape(str(truncated)) + r": cannot decode .*truncated"):
        open_image(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(UndecodableImageError, match=re.escape(str(garbage)) + ": cannot decode"):
        open_image(garbage)
    with pytest.raises(UndecodableImageError, match=r"gone\.png: no such file"):
        open_image(tmp_path / "gone.png")
    # datasets.Image(decode=False) rows: by path or by bytes.
    good = write_image(tmp_path / "good.png")
    assert open_image({"path": str(good), "bytes": None}).mode == "RGB"
    assert open_image({"path": "in-memory.png", "bytes": good.read_bytes()}).size == (8, 8)
    with pytest.raises(UndecodableImageError, match=r"in-memory\.jpg: cannot decode"):
        open_image({"path": "in-memory.jpg", "bytes": truncated.read_bytes()})


def test_check_images_lists_every_undecodable_file(tmp_path):
    good = [write_image(tmp_path / f"ok_{i}.png") for i in range(3)]
    bad = [truncated_jpeg(tmp_path / f"bad_{i}.jpg") for i in range(7)]
    check_images(good, source="three good ones")
    with pytest.raises(UndecodableImageError, match=r"the set: 7 of 10 images cannot be decoded") as info:
        check_images(good + bad, source="the set", num_threads=2)
    assert all(str(path) in str(info.value) for path in bad[:5]) and "and 2 more" in str(info.value)


def test_row_decoder_replaces_and_records_undecodable_training_images(tmp_path):
    import datasets

    good = [write_image(tmp_path / f"ok_{i}.png") for i in range(4)]
    bad = truncated_jpeg(tmp_path / "bad.jpg")
    rows = datasets.Dataset.from_dict(
        {"image": [str(p) for p in [good[0], bad, good[1], good[2], good[3]]], "label": [0, 1, 2, 3, 4]}
    )

    def build(batch, images):
        return {"size": [image.size for image in images], "label": batch["label"]}

    decoder = ImageRowDecoder(rows, "image")
    transformed = rows.with_transform(transform_with_skipping(decoder, build))
    item = transformed[1]  # the broken row: replaced by another row, image and label together
    assert item["size"] == (8, 8) and item["label"] != 1
    [record] = item["skipped_images"]
    assert (
        record["file"] == str(bad)
        and record["error"].startswith(f"{bad}: cannot decode")
        and "truncated" in record["error"]
    )
    assert transformed[1]["label"] == item["label"]  # the replacement is deterministic
    batch = transformed[0:3]
    assert batch["label"][0] == 0 and batch["label"][2] == 2 and batch["skipped_images"][0][0]["file"] == str(bad)
    assert transformed[0]["skipped_images"] == []
    # Evaluation (skip=False): the broken image stops, naming the file.
    with pytest.raises(UndecodableImageError, match=re.escape(str(bad))):
        ImageRowDecoder(rows, "image", skip=False)({"image": [str(bad)], "label": [1]})
    # Nothing decodes: stop after a few draws instead of looping, naming the files.
    others = [truncated_jpeg(tmp_path / f"bad_{i}.jpg") for i in range(3)]
    broken = datasets.Dataset.from_dict({"image": [str(p) for p in [bad, *others]], "label": [0, 1, 2, 3]})
    with pytest.raises(UndecodableImageError, match=rf"4 replacement draws found no decodable image; .*{bad}"):
        ImageRowDecoder(broken, "image", max_attempts=4)({"image": [str(bad)], "label": [0]})
