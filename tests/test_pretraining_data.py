"""MIM pretraining data: the two views share one crop, shapes and ranges, seeding, undecodable images, sources.

No network: image folders and webdataset shards are written in temporary folders (`webdataset.TarWriter`).
"""

from __future__ import annotations

import doctest
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

import beit3_hf.data.pretraining
from beit3_hf.data.pretraining import (
    CropParams,
    DecodeFailures,
    MaskedImageModelingCollator,
    PretrainingImageFolder,
    PretrainingWebDataset,
    TwoViewTransform,
    decode_image,
    sample_crop_params,
)
from beit3_hf.training.masking import BlockMaskingGenerator

webdataset = pytest.importorskip("webdataset")

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _half_red_half_blue(width: int = 64, height: int = 48) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def _textured(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """Smooth, asymmetric content: any two different crops (or a flip) look different."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    channels = [
        0.5 + 0.5 * np.sin(x / 9.0 + rng.uniform(0, 6)) * np.cos(y / 13.0),
        x / width,
        (y / height) ** 2,
    ]
    return Image.fromarray((np.stack(channels, axis=-1) * 255).round().astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    data = _jpeg(_textured(seed=1))
    return data[: int(len(data) * 0.6)]  # the header is intact: Image.open succeeds, decoding fails


def _unnormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * 0.5 + 0.5  # BEiT-3 mean = std = 0.5


# ----------------------------------------------------------------------------------------------------------------
# The two views
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_same_crop_in_both_views_red_blue(flip):
    transform = TwoViewTransform(32, patch_size=16, visual_tokenizer="dall-e", color_jitter=None)
    # A 32x32 box centred on the red/blue boundary of a 64x48 image.
    views = transform.apply_params(_half_red_half_blue(), CropParams(top=8, left=16, height=32, width=32, flip=flip))
    model = _unnormalise(views["pixel_values"])  # (3, 32, 32)
    tokenizer = views["tokenizer_pixel_values"]  # (3, 16, 16)
    assert model.shape == (3, 32, 32) and tokenizer.shape == (3, 16, 16)
    left_colour, right_colour = (BLUE, RED) if flip else (RED, BLUE)
    for view, size in ((model, 32), (tokenizer, 16)):
        half = size // 2
        left = view[:, :, : half - 2].mean(dim=(1, 2))  # away from the boundary, where interpolation mixes
        right = view[:, :, half + 2 :].mean(dim=(1, 2))
        assert torch.allclose(left, torch.tensor(left_colour) / 255.0, atol=0.02)
        assert torch.allclose(right, torch.tensor(right_colour) / 255.0, atol=0.02)
    # The boundary is at the same relative position in both views.
    red_fraction_model = (model[0] > 0.5).float().mean()
    red_fraction_tokenizer = (tokenizer[0] > 0.5).float().mean()
    assert red_fraction_model == pytest.approx(0.5, abs=0.04) and red_fraction_tokenizer == pytest.approx(
        0.5, abs=0.07
    )


def test_same_crop_in_both_views_random_params():
    """With random crops, flips and jitter, the tokenizer view is the model view downsampled, sample after sample."""
    transform = TwoViewTransform(64, patch_size=16, visual_tokenizer="dall-e", color_jitter=0.4, seed=0)
    image = _textured()
    downsampled, tokenizer_views = [], []
    for key in range(8):
        out = transform(image, key=key)
        model = _unnormalise(out["pixel_values"])  # (3, 64, 64)
        downsampled.append(torch.nn.functional.avg_pool2d(model[None], 2)[0])  # (3, 32, 32)
        tokenizer_views.append(out["tokenizer_pixel_values"])  # (3, 32, 32)
    for key in range(8):
        same = (downsampled[key] - tokenizer_views[key]).abs().mean()
        other = (downsampled[key] - tokenizer_views[(key + 1) % 8]).abs().mean()
        assert same < 0.03, (key, same)
        assert other > 2 * same, (key, same, other)


def test_shapes_dtypes_and_ranges():
    image = _textured()
    vqkd = TwoViewTransform(64, patch_size=16, visual_tokenizer="vqkd", seed=0)
    out = vqkd(image, key=0)
    assert list(out) == ["pixel_values", "tokenizer_pixel_values", "bool_masked_pos"] == list(vqkd.output_names)
    assert out["pixel_values"].shape == (3, 64, 64) and out["pixel_values"].dtype == torch.float32
    assert out["tokenizer_pixel_values"].shape == (3, 64, 64) and out["tokenizer_pixel_values"].dtype == torch.float32
    assert vqkd.tokenizer_interpolation == InterpolationMode.BICUBIC == vqkd.interpolation
    assert out["pixel_values"].min() >= -1.0 and out["pixel_values"].max() <= 1.0
    assert out["pixel_values"].min() < -0.5 and out["pixel_values"].max() > 0.5  # normalised, not [0, 1]
    assert out["tokenizer_pixel_values"].min() >= 0.0 and out["tokenizer_pixel_values"].max() <= 1.0
    mask = out["bool_masked_pos"]
    assert mask.dtype == torch.bool and mask.shape == (16,)  # a 4x4 patch grid
    assert int(mask.sum()) <= round(16 * 75 / 196)

    dalle = TwoViewTransform(224, visual_tokenizer="dall-e", seed=0)
    assert dalle.tokenizer_image_size == (112, 112) and dalle.tokenizer_interpolation == InterpolationMode.LANCZOS
    out = dalle(image, key=0)
    assert out["pixel_values"].shape == (3, 224, 224) and out["tokenizer_pixel_values"].shape == (3, 112, 112)
    assert out["bool_masked_pos"].shape == (196,) and 60 <= int(out["bool_masked_pos"].sum()) <= 75

    # Same seed and key, so the same crop: only the tokenizer view's normalisation differs.
    plain = TwoViewTransform(32, visual_tokenizer="vqkd", seed=3)(image, key=5)["tokenizer_pixel_values"]
    normalised = TwoViewTransform(
        32, visual_tokenizer="vqkd", tokenizer_mean=(0.5,) * 3, tokenizer_std=(0.5,) * 3, seed=3
    )
    torch.testing.assert_close(normalised(image, key=5)["tokenizer_pixel_values"], (plain - 0.5) / 0.5)

    exact = TwoViewTransform(64, mask_generator=BlockMaskingGenerator(4, 6, min_num_patches=1, exact=True), seed=1)
    assert all(int(exact(image, key=k)["bool_masked_pos"].sum()) == 6 for k in range(10))

    bare = TwoViewTransform(32, visual_tokenizer=None, mask_generator=None, color_jitter=None)
    assert list(bare(image)) == ["pixel_values"] and bare.output_names == ("pixel_values",)
    grey = bare(Image.new("L", (20, 30), 128))["pixel_values"]
    assert grey.shape == (3, 32, 32) and torch.allclose(grey, torch.full_like(grey, 128 / 255 * 2 - 1), atol=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="patch grid"):
        TwoViewTransform(224, mask_generator=BlockMaskingGenerator(7, 20))
    with pytest.raises(ValueError, match="visual_tokenizer"):
        TwoViewTransform(224, visual_tokenizer="vq-gan")
    with pytest.raises(ValueError, match="interpolation"):
        TwoViewTransform(224, interpolation="cubic-ish")
    with pytest.raises(ValueError, match="both"):
        TwoViewTransform(224, tokenizer_mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="key or rng"):
        TwoViewTransform(32)(_textured(), key=0, rng=np.random.default_rng(0))


def test_determinism_given_a_seed():
    image = _textured()
    first, second = TwoViewTransform(64, seed=3), TwoViewTransform(64, seed=3)
    a, b = first(image, key=5), second(image, key=5)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(first(image, key=6)["pixel_values"], a["pixel_values"])
    assert not torch.equal(TwoViewTransform(64, seed=4)(image, key=5)["pixel_values"], a["pixel_values"])
    assert torch.equal(first(image, key=("shard-1.tar", "000000005"))["pixel_values"],
                       second(image, key=("shard-1.tar", "000000005"))["pixel_values"])  # fmt: skip
    second.set_epoch(1)  # a new epoch: new crops and masks, reproducibly
    c = second(image, key=5)
    assert not torch.equal(c["pixel_values"], a["pixel_values"])
    first.set_epoch(1)
    assert torch.equal(first(image, key=5)["pixel_values"], c["pixel_values"])
    unseeded = TwoViewTransform(64)
    assert not torch.equal(unseeded(image, key=5)["pixel_values"], unseeded(image, key=5)["pixel_values"])


def test_crop_params():
    rng = np.random.default_rng(0)
    boxes = [sample_crop_params((300, 400), (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(500)]
    for top, left, height, width in boxes:
        assert top >= 0 and top + height <= 300 and left >= 0 and left + width <= 400
    fractions = np.array([h * w / (300 * 400) for _, _, h, w in boxes])
    assert fractions.min() >= 0.07 and fractions.max() <= 1.0 and 0.4 < fractions.mean() < 0.65
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert (aspects > 0.7).all() and (aspects < 1.4).all()
    # No proposal fits (a 10:1 crop of a square image): the central box with the nearest allowed aspect ratio.
    assert sample_crop_params((100, 100), (0.5, 1.0), (10.0, 10.0), rng) == (45, 0, 10, 100)


# ----------------------------------------------------------------------------------------------------------------
# Decoding failures and the collator
# ----------------------------------------------------------------------------------------------------------------


def test_decode_image_and_failures():
    with pytest.raises(OSError):
        decode_image(_truncated_jpeg())
    with pytest.raises(OSError):
        decode_image(b"not an image at all")
    assert decode_image({"bytes": _jpeg(_textured()), "path": None}).size == (96, 80)
    failures = DecodeFailures(max_examples=2)
    for i in range(3):
        failures.record(f"image-{i}.jpg", OSError("image file is truncated"))
    assert failures.count == 3 and failures.names == ["image-0.jpg", "image-1.jpg"]
    assert failures.examples[0] == ("image-0.jpg", "OSError: image file is truncated")
    import copy
    import pickle

    assert copy.deepcopy(failures) is failures
    assert pickle.loads(pickle.dumps(failures)).count == 0  # outside worker start-up: an independent counter
    failures.reset()
    assert failures.count == 0 and failures.names == []


def test_collator():
    transform = TwoViewTransform(32, visual_tokenizer="dall-e", seed=0)
    samples = [transform(_textured(), key=i) for i in range(3)]
    batch = MaskedImageModelingCollator()([samples[0], None, samples[1], {"pixel_values": None}, samples[2]])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["tokenizer_pixel_values"].shape == (3, 3, 16, 16)
    assert batch["bool_masked_pos"].shape == (3, 4) and batch["bool_masked_pos"].dtype == torch.bool
    assert torch.equal(batch["bool_masked_pos"][1], samples[1]["bool_masked_pos"])
    with pytest.raises(ValueError, match="no decodable image"):
        MaskedImageModelingCollator()([None])


def test_with_transform_on_a_datasets_dataset():
    import datasets

    rows = {
        "image": [{"bytes": _jpeg(_textured()), "path": "good.jpg"}, {"bytes": _truncated_jpeg(), "path": "bad.jpg"}]
    }
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(decode=False)}))
    transform = TwoViewTransform(32, seed=0)
    ds = ds.with_transform(transform.apply_to_batch)
    samples = [ds[0], ds[1]]
    assert samples[0]["pixel_values"].shape == (3, 32, 32) and samples[1]["pixel_values"] is None
    assert transform.failures.count == 1 and transform.failures.names == ["bad.jpg"]
    assert torch.equal(samples[0]["pixel_values"], ds[0]["pixel_values"])  # keyed by path: the same views again
    batch = MaskedImageModelingCollator()(samples)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "train"
    for label, name in enumerate(["n01", "n02"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            _textured(seed=10 * label + i).save(root / name / f"{name}_{i}.JPEG", format="JPEG")
    (root / "n01" / "n01_truncated.JPEG").write_bytes(_truncated_jpeg())
    (root / "n02" / "n02_garbage.JPEG").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def _expected_failures(paths: list[str]) -> int:
    """Reading every index once skips, for each index, the run of bad images starting there (wrapping)."""
    bad = ["truncated" in p or "garbage" in p for p in paths]
    total = 0
    for start in range(len(paths)):
        run = 0
        while bad[(start + run) % len(paths)]:
            run += 1
        total += run
    return total


def test_image_folder_skips_and_counts_undecodable_images(image_folder, tmp_path):
    transform = TwoViewTransform(32, visual_tokenizer="vqkd", seed=0)
    ds = PretrainingImageFolder(image_folder, transform, cache_dir=tmp_path / "cache")
    paths = [row["path"] for row in ds.dataset["image"]]
    assert len(ds) == 8
    samples = [ds[i] for i in range(len(ds))]
    assert all(s["pixel_values"].shape == (3, 32, 32) and s["bool_masked_pos"].shape == (4,) for s in samples)
    assert ds.failures.count == _expected_failures(paths) >= 2
    assert {Path(name).name for name in ds.failures.names} == {"n01_truncated.JPEG", "n02_garbage.JPEG"}
    # Reproducible per index; a new epoch gives new views.
    again = PretrainingImageFolder(image_folder, TwoViewTransform(32, visual_tokenizer="vqkd", seed=0),
                                   cache_dir=tmp_path / "cache")  # fmt: skip
    assert torch.equal(again[3]["pixel_values"], samples[3]["pixel_values"])
    again.set_epoch(1)
    assert not torch.equal(again[3]["pixel_values"], samples[3]["pixel_values"])


def test_image_folder_keeps_every_image_whatever_the_file_names(tmp_path):
    # datasets' data-dir inference would take the names with "train" as the train split and drop the other images.
    root = tmp_path / "mixed"
    (root / "all").mkdir(parents=True)
    for i in range(3):
        _textured(seed=i).save(root / "all" / f"red_circle_train_{i}.JPEG", format="JPEG")
        _textured(seed=10 + i).save(root / "all" / f"scene_{i}.png")
    ds = PretrainingImageFolder(root, TwoViewTransform(32, seed=0), cache_dir=tmp_path / "cache")
    assert sorted(Path(row["path"]).name for row in ds.dataset["image"]) == sorted(p.name for p in root.rglob("*.*"))
    # A root with train/ and val/ reads its `split` folder only.
    split_root = tmp_path / "imagenet"
    (split_root / "train" / "a").mkdir(parents=True)
    (split_root / "val" / "a").mkdir(parents=True)
    _textured(seed=0).save(split_root / "train" / "a" / "0.png")
    _textured(seed=1).save(split_root / "val" / "a" / "1.png")
    _textured(seed=2).save(split_root / "val" / "a" / "2.png")
    assert len(PretrainingImageFolder(split_root, TwoViewTransform(32, seed=0), cache_dir=tmp_path / "cache")) == 1
    assert len(PretrainingImageFolder(split_root, TwoViewTransform(32), split="val", cache_dir=tmp_path / "c")) == 2
    with pytest.raises(ValueError, match=r"data_dir .*empty.* holds no image"):
        (tmp_path / "empty").mkdir()
        PretrainingImageFolder(tmp_path / "empty", TwoViewTransform(32))


def test_image_folder_failure_count_reaches_the_main_process(image_folder, tmp_path):
    ds = PretrainingImageFolder(image_folder, TwoViewTransform(32, seed=0), cache_dir=tmp_path / "cache")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=MaskedImageModelingCollator())
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4]
    assert ds.failures.count == _expected_failures([row["path"] for row in ds.dataset["image"]])


# ----------------------------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, set[str], set[str]]:
    """Two img2dataset-style shards of 5 samples; one truncated JPEG and one sample without an image."""
    folder = tmp_path_factory.mktemp("shards")
    good, bad = set(), set()
    for shard in range(2):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(5):
                key = f"{shard:04d}{i:05d}"
                sample = {"__key__": key, "txt": f"caption {key}".encode(), "json": json.dumps({"key": key}).encode()}
                name = f"{shard:05d}.tar:{key}"
                if (shard, i) == (1, 2):
                    sample["jpg"] = _truncated_jpeg()
                    bad.add(name)
                elif (shard, i) == (0, 4):
                    bad.add(name)  # no image at all
                else:
                    sample["jpg"] = _jpeg(_textured(seed=shard * 10 + i))
                    good.add(name)
                sink.write(sample)
    return str(folder / "{00000..00001}.tar"), good, bad


def _dataset(urls: str, **kwargs) -> PretrainingWebDataset:
    return PretrainingWebDataset(
        urls, TwoViewTransform(32, visual_tokenizer="dall-e", seed=0), with_keys=True, **kwargs
    )


def test_webdataset_streams_and_skips_undecodable_images(shards):
    urls, good, bad = shards
    ds = _dataset(urls)
    samples = list(ds)
    assert {s["__key__"] for s in samples} == good and len(samples) == len(good)
    assert ds.failures.count == 2 and set(ds.failures.names) == bad
    sample = samples[0]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["tokenizer_pixel_values"].shape == (3, 16, 16)
    batch = MaskedImageModelingCollator()(samples[:3])
    assert set(batch) == {"pixel_values", "tokenizer_pixel_values", "bool_masked_pos"}
    assert batch["bool_masked_pos"].shape == (3, 4)


def test_webdataset_views_follow_the_sample_not_the_order(shards):
    urls, _, _ = shards
    plain = {s["__key__"]: s for s in _dataset(urls, shuffle_shards=False)}
    shuffled = list(_dataset(urls, shuffle_buffer=4, seed=1))
    assert [s["__key__"] for s in shuffled] != sorted(plain)
    for sample in shuffled:
        assert torch.equal(sample["pixel_values"], plain[sample["__key__"]]["pixel_values"])
        assert torch.equal(sample["bool_masked_pos"], plain[sample["__key__"]]["bool_masked_pos"])


def test_webdataset_split_by_node(shards, monkeypatch):
    urls, good, _ = shards
    seen = []
    for rank in range(2):  # webdataset reads RANK / WORLD_SIZE, as torchrun sets them
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({s["__key__"] for s in _dataset(urls, split_by_node=True)})
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == good
    assert {k.split(":")[0] for k in seen[0]} != {k.split(":")[0] for k in seen[1]}  # whole shards per rank
    # Without node splitting (the default: accelerate shards the stream itself), every rank reads everything.
    assert {s["__key__"] for s in _dataset(urls)} == good


def test_webdataset_data_loader_workers(shards):
    urls, good, bad = shards
    ds = _dataset(urls)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [sample["__key__"] for sample in loader]
    assert sorted(keys) == sorted(good)  # each shard read by one worker, each sample once
    assert ds.failures.count == 2 and set(ds.failures.names) == bad  # counted in the workers, read here


def test_webdataset_resampled_and_broken_shards(shards, tmp_path):
    urls, good, _ = shards
    ds = _dataset(urls, resampled=True, samples_per_worker=12)
    keys = [s["__key__"] for s in ds]
    assert len(keys) == 12 and set(keys) <= good
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    first = urls.replace("{00000..00001}", "00000")
    ds = _dataset([first, str(broken)], shuffle_shards=False)
    assert len(list(ds)) == 4  # the first shard's good samples; the broken shard is skipped and counted
    assert ds.failures.count == 2  # the sample without an image, and the unreadable shard
    assert ds.failures.names == ["00000.tar:000000004", "broken.tar"]


def test_docstring_examples():
    result = doctest.testmod(beit3_hf.data.pretraining, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
