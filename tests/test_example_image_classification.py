"""examples/image-classification/run_image_classification.py: end to end on the built-in synthetic ImageNet-style
folder (one process in-process, two CPU processes under `accelerate launch`), its errors, its mixup / label-smoothing
collator against timm's losses, and its metrics."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from transformers import AutoImageProcessor, AutoModelForImageClassification, EvalPrediction

from beit3_hf import Beit3Config, Beit3ForImageClassification, Beit3ImageProcessor
from beit3_hf.data import UndecodableImageError, load_imagefolder
from beit3_hf.testing.synthetic_data import write_synthetic_dataset

from oracle_utils import load_example_script, run_example

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "image-classification" / "run_image_classification.py"
TINY = "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128,image_size=32,vocab_size=100"
NUM_CLASSES = 9  # 3 colours x 3 shapes: more than 5, so that top-5 accuracy can be below 1


@pytest.fixture(scope="module")
def script():
    yield load_example_script(SCRIPT)
    sys.modules.pop(SCRIPT.stem, None)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    paths = write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        num_train=1,
        num_val=0,
        num_test=0,
        image_size=32,
        num_colours=3,
        num_shapes=3,
        classification_train_per_class=2,
        classification_val_per_class=1,
    )
    return paths.imagenet


def tiny_config(num_labels: int) -> Beit3Config:
    return Beit3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=16,
        vocab_size=100,
        use_final_layernorm=False,
        num_labels=num_labels,
    )


def script_args(data_dir: Path, output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--data_dir", str(data_dir),
        "--config_name", "beit3-base-patch16-224",
        "--config_overrides", TINY,
        "--output_dir", str(output_dir),
        "--cache_dir", str(cache_dir),
        "--do_train",
        "--do_eval",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--save_strategy", "no",
        "--dataloader_pin_memory", "False",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def accuracy_of_saved_model(output_dir: Path, imagenet: Path, cache_dir: Path) -> tuple[float, float]:
    """Top-1 / top-5 of the saved folder on the whole validation split, computed here independently."""
    model = AutoModelForImageClassification.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)
    validation = load_imagefolder(imagenet, cache_dir=cache_dir).dataset["validation"]
    with torch.no_grad():
        logits = model(pixel_values=processor(list(validation["image"]), return_tensors="pt").pixel_values).logits
    labels = torch.tensor(list(validation["label"]))
    top5 = logits.topk(5, dim=-1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(-1).float().mean().item()


def read_results(output_dir: Path) -> dict:
    results = json.loads((output_dir / "all_results.json").read_text())
    for key in ("eval_top1", "eval_top5"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    assert results["eval_top5"] >= results["eval_top1"]
    return results


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def test_single_process_run_saves_a_reloadable_classifier(script, imagenet, tmp_path):
    output_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    # 11 images in batches of 4: the last batch has 3, an odd size under mixup.
    # --do_predict on the validation folder (class folders: labelled) must agree with --do_eval.
    returned = script.main(
        script_args(imagenet, output_dir, cache_dir, "--num_train_epochs", "1", "--max_train_samples", "11",
                    "--do_predict", "--test_dir", str(imagenet / "val"))
    )  # fmt: skip

    results = read_results(output_dir)
    assert returned["eval_top1"] == results["eval_top1"]
    assert results["train_samples"] == 11 and results["eval_samples"] == NUM_CLASSES
    assert results["train_skipped_images"] == 0 and not (output_dir / "skipped_images.json").exists()
    assert (results["test_top1"], results["test_top5"]) == (results["eval_top1"], results["eval_top5"])
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == NUM_CLASSES and all(len(p["top5"]) == 5 for p in predictions)
    assert sum(p["prediction"] == p["label"] for p in predictions) == round(results["test_top1"] * NUM_CLASSES)
    assert "| eval_top1 |" in (output_dir / "README.md").read_text()
    assert np.isfinite(results["train_loss"])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    # The folder reloads through the Auto classes with its own code, labels and (classification) image processor.
    for name in ("config.json", "model.safetensors", "modeling_beit3.py", "preprocessor_config.json"):
        assert (output_dir / name).is_file(), name
    model = AutoModelForImageClassification.from_pretrained(output_dir, trust_remote_code=True)
    assert type(model).__name__ == "Beit3ForImageClassification"
    class_names = load_imagefolder(imagenet, cache_dir=cache_dir).class_names
    assert [model.config.id2label[i] for i in range(NUM_CLASSES)] == class_names
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.use_final_layernorm is False and model.config.drop_path_rate == 0.1
    processor = AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert processor.task == "image-classification" and processor.crop_size.height == 32

    # The reported accuracies are those of the saved model on the validation split.
    top1, top5 = accuracy_of_saved_model(output_dir, imagenet, cache_dir)
    assert results["eval_top1"] == pytest.approx(top1) and results["eval_top5"] == pytest.approx(top5)

    # Evaluating the saved folder as a pretrained checkpoint (its image processor, its labels) gives the same.
    eval_only = [
        "--model_name_or_path", str(output_dir),
        "--data_dir", str(imagenet),
        "--output_dir", str(tmp_path / "eval-only"),
        "--cache_dir", str(cache_dir),
        "--do_eval",
        "--per_device_eval_batch_size", "5",
        "--dataloader_pin_memory", "False",
    ]  # fmt: skip
    flat = tmp_path / "flat"  # unlabelled images to classify: predictions only
    flat.mkdir()
    for i, path in enumerate(sorted((imagenet / "val").rglob("*.JPEG"))[:3]):
        shutil.copy(path, flat / f"{i}.JPEG")
    again = script.main([*eval_only, "--do_predict", "--test_dir", str(flat)])
    assert again["eval_top1"] == pytest.approx(top1) and again["eval_top5"] == pytest.approx(top5)
    assert "test_top1" not in again and again["test_samples"] == 3
    lines = [json.loads(line) for line in (tmp_path / "eval-only" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(line["file"]).name for line in lines] == ["0.JPEG", "1.JPEG", "2.JPEG"]
    assert all(line["prediction"] in class_names and "label" not in line for line in lines)


def test_undecodable_images_skipped_in_training_and_named_in_evaluation(script, imagenet, tmp_path):
    """A broken training image is replaced and reported; a broken validation image stops the evaluation, naming
    it, after the model folder was saved complete."""
    data, output_dir = tmp_path / "data", tmp_path / "out"
    shutil.copytree(imagenet, data)
    bad_train = sorted((data / "train").rglob("*.JPEG"))[4]
    bad_train.write_bytes(b"not an image")
    bad_val = sorted((data / "val").rglob("*.JPEG"))[1]
    bad_val.write_bytes(bad_val.read_bytes()[:200])  # truncated
    with pytest.raises(UndecodableImageError, match=rf"{bad_val}: cannot decode the image"):
        script.main(script_args(data, output_dir, tmp_path / "cache", "--num_train_epochs", "1"))
    for name in ("config.json", "model.safetensors", "modeling_beit3.py", "configuration_beit3.py",
                 "preprocessor_config.json", "README.md", "train_results.json"):  # fmt: skip
        assert (output_dir / name).is_file(), name
    report = json.loads((output_dir / "skipped_images.json").read_text())
    assert report["files"] == [str(bad_train)] and report["count"] >= 1
    assert json.loads((output_dir / "train_results.json").read_text())["train_skipped_images"] == report["count"]
    # --check_images finds both before any model is built.
    with pytest.raises(UndecodableImageError, match=rf"(?s)1 of 18 images cannot be decoded.*{bad_train}"):
        script.main(script_args(data, tmp_path / "checked", tmp_path / "cache", "--check_images", "True"))


def test_two_cpu_processes_with_accelerate_launch(imagenet, tmp_path):
    output_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    args = script_args(
        imagenet, output_dir, cache_dir, "--max_steps", "2", "--gradient_checkpointing",
        "--ddp_find_unused_parameters", "False",  # the vision-only model uses every parameter: plain DDP works
    )  # fmt: skip
    run = run_example(SCRIPT, args, tmp_path, processes=2, timeout=240)
    output = run.stdout + run.stderr
    for rank in (0, 1):
        assert f"Process rank: {rank}, world size: 2, device: cpu" in output, output[-5000:]
    assert "distributed training: True" in output

    results = read_results(output_dir)
    assert results["eval_samples"] == NUM_CLASSES
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # Each process gets 9 of the 18 training images: 3 batches of 4 per epoch (one process alone would take 5).
    assert state["epoch"] == pytest.approx(2 / 3)
    # Evaluation gathered each validation image exactly once across the processes.
    top1, top5 = accuracy_of_saved_model(output_dir, imagenet, cache_dir)
    assert results["eval_top1"] == pytest.approx(top1) and results["eval_top5"] == pytest.approx(top5)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_empty_class_folder_is_reported_before_training(script, imagenet, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imagenet, data)
    empty = data / "train" / "zz_empty"
    empty.mkdir()
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=str(empty)):
        script.main(script_args(data, output_dir, tmp_path / "cache"))
    assert not output_dir.exists()


def test_missing_validation_split_is_reported_before_training(script, imagenet, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imagenet / "train", data / "train")
    output_dir = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=str(data / "val")):
        script.main(script_args(data, output_dir, tmp_path / "cache"))
    assert not output_dir.exists()


def test_argument_errors(script, imagenet, tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size must be even"):
        script.main(script_args(imagenet, tmp_path / "out", tmp_path / "cache", "--per_device_train_batch_size", "3"))
    no_model = script_args(imagenet, tmp_path / "out", tmp_path / "cache")
    del no_model[2:6]  # --config_name and --config_overrides
    with pytest.raises(ValueError, match="--model_name_or_path"):
        script.main(no_model)
    with pytest.raises(ValueError, match="--data_dir"):
        script.main(["--output_dir", str(tmp_path / "out"), "--config_name", "beit3-base-patch16-224"])
    for scale in ("0", "1.5"):
        with pytest.raises(ValueError, match=r"--min_crop_scale must be in \(0, 1\]"):
            script.main(script_args(imagenet, tmp_path / "out", tmp_path / "cache", "--min_crop_scale", scale))


# ----------------------------------------------------------------------------------------------------------------
# Collator, metrics, image processor
# ----------------------------------------------------------------------------------------------------------------


def examples_of(images: torch.Tensor, labels: list[int]) -> list[dict]:
    return [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]


def test_mixup_collator_gives_soft_targets_and_the_model_loss_is_soft_target_cross_entropy(script):
    np.random.seed(0)
    torch.manual_seed(0)
    num_labels, smoothing = 5, 0.1
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing, num_classes=num_labels)
    collator = script.ImageClassificationCollator(num_labels, mixup, smoothing)
    images, labels = torch.randn(5, 3, 32, 32), [0, 1, 2, 3, 4]
    batch = collator(examples_of(images, labels))  # odd size: the first 4 are mixed, the last only smoothed

    targets = batch["labels"]
    assert targets.dtype == torch.float32 and targets.shape == (5, num_labels)
    torch.testing.assert_close(targets.sum(-1), torch.ones(5))
    off, on = smoothing / num_labels, 1 - smoothing + smoothing / num_labels
    lam = ((targets[0, 0] - off) / (on - off)).item()
    assert 0.0 < lam < 1.0
    # Batch mixup pairs image i with image 3 - i, with the same weight in the images and in the targets.
    torch.testing.assert_close(batch["pixel_values"][:4], lam * images[:4] + (1 - lam) * images[:4].flip(0))
    for i, j in ((0, 3), (1, 2), (2, 1), (3, 0)):
        expected = torch.full((num_labels,), off)
        expected[labels[i]] += lam * (on - off)
        expected[labels[j]] += (1 - lam) * (on - off)
        torch.testing.assert_close(targets[i], expected)
    torch.testing.assert_close(batch["pixel_values"][4], images[4])
    torch.testing.assert_close(targets[4], torch.tensor([off, off, off, off, on]))

    torch.manual_seed(0)
    model = Beit3ForImageClassification(tiny_config(num_labels)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_()  # logits far from uniform, so that the losses below differ
        out = model(**batch)
    torch.testing.assert_close(out.loss, SoftTargetCrossEntropy()(out.logits, targets))
    assert not torch.allclose(out.loss, F.cross_entropy(out.logits, torch.tensor(labels)), atol=1e-3)


def test_recipe_mixup_cutmix_collator(script):
    np.random.seed(1)
    num_labels = 4
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_labels)
    collator = script.ImageClassificationCollator(num_labels, mixup, 0.1)
    for _ in range(4):
        batch = collator(examples_of(torch.randn(4, 3, 32, 32), [0, 1, 2, 3]))
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, num_labels)
        torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(4))
        assert (batch["labels"] > 0.1 / num_labels + 1e-6).sum(-1).le(2).all()  # own class and partner's only


def test_label_smoothing_without_mixup_matches_timm_and_eval_gets_integer_labels(script):
    num_labels, smoothing = 6, 0.1
    images, labels = torch.randn(3, 3, 32, 32), [5, 0, 2]
    batch = script.ImageClassificationCollator(num_labels, None, smoothing)(examples_of(images, labels))
    torch.testing.assert_close(batch["pixel_values"], images)
    expected = torch.full((3, num_labels), smoothing / num_labels)
    expected[torch.arange(3), torch.tensor(labels)] += 1 - smoothing
    torch.testing.assert_close(batch["labels"], expected)

    torch.manual_seed(0)
    model = Beit3ForImageClassification(tiny_config(num_labels)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_()
        out = model(**batch)
    torch.testing.assert_close(
        out.loss, LabelSmoothingCrossEntropy(smoothing=smoothing)(out.logits, torch.tensor(labels))
    )

    plain = script.ImageClassificationCollator(num_labels)(examples_of(images, labels))
    assert plain["labels"].dtype == torch.long and plain["labels"].tolist() == labels


def test_trainer_mixes_training_batches_only(script, tmp_path):
    num_labels = 4
    args = script.ImageClassificationTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, use_cpu=True
    )
    data = examples_of(torch.randn(8, 3, 32, 32), [0, 1, 2, 3] * 2)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_labels)
    trainer = script.ImageClassificationTrainer(
        model=Beit3ForImageClassification(tiny_config(num_labels)),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=script.ImageClassificationCollator(num_labels, mixup, 0.1),
        eval_data_collator=script.ImageClassificationCollator(num_labels),
        layer_decay=0.65,
    )
    assert next(iter(trainer.get_train_dataloader()))["labels"].dtype == torch.float32
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    assert eval_batch["labels"].dtype == torch.long
    torch.testing.assert_close(eval_batch["pixel_values"], torch.stack([d["pixel_values"] for d in data[:4]]))
    assert next(iter(trainer.get_test_dataloader(data)))["labels"].dtype == torch.long
    assert trainer.data_collator.mixup is mixup  # restored after building the evaluation loaders


def test_top1_top5_metrics(script):
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 0, 0],  # label 0: top-1
            [8.0, 9, 7, 6, 5, 0, 0],  # label 0: top-5 only
            [0.0, 0, 5, 6, 7, 8, 9],  # label 0: neither
            [0.0, 0, 9, 0, 0, 0, 0],  # label 2: top-1
        ]
    )
    labels = torch.tensor([0, 0, 0, 2])
    topk = script.preprocess_logits_for_metrics(logits, labels)
    assert topk.shape == (4, 5) and topk[:, 0].tolist() == [0, 1, 6, 2]
    metrics = script.compute_metrics(EvalPrediction(predictions=topk.numpy(), label_ids=labels.numpy()))
    assert metrics == {"top1": 0.5, "top5": 0.75}
    # Fewer than 5 classes: top-k over all of them.
    few = script.preprocess_logits_for_metrics(torch.tensor([[0.0, 2.0, 1.0]]), None)
    assert few.tolist() == [[1, 2, 0]]


def test_eval_image_processor_choice(script, tmp_path):
    vision_language, classification = tmp_path / "vl", tmp_path / "cls"
    Beit3ImageProcessor(task="vision-language", image_size=32).save_pretrained(vision_language)
    Beit3ImageProcessor(task="image-classification", image_size=48).save_pretrained(classification)

    chosen = script.load_eval_image_processor(script.ModelArguments(model_name_or_path=str(vision_language)), 32)
    assert chosen.task == "image-classification" and chosen.crop_size.height == 32
    chosen = script.load_eval_image_processor(script.ModelArguments(model_name_or_path=str(classification)), 32)
    assert chosen.task == "image-classification" and chosen.crop_size.height == 48  # the folder's own
    no_processor = tmp_path / "no-processor"  # a local folder without preprocessor_config.json
    no_processor.mkdir()
    chosen = script.load_eval_image_processor(script.ModelArguments(model_name_or_path=str(no_processor)), 64)
    assert chosen.task == "image-classification" and chosen.crop_size.height == 64


def test_train_transform_is_timms_and_survives_zero_bit_posterize(script):
    data_args = script.DataTrainingArguments(data_dir="unused")
    transform = script.build_train_transform(data_args, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    names = [type(step).__name__ for step in transform.transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    rand_augment = transform.transforms[2]
    assert (rand_augment.num_layers, rand_augment.ops[0].magnitude, rand_augment.ops[0].magnitude_std) == (2, 9, 0.5)
    erasing = transform.transforms[-1]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert transform.transforms[0].scale == (0.08, 1.0)  # the original's and timm's default
    small_objects = script.DataTrainingArguments(data_dir="unused", min_crop_scale=0.5)
    crop = script.build_train_transform(small_objects, 32, (0.5,) * 3, (0.5,) * 3).transforms[0]
    assert crop.scale == (0.5, 1.0)

    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    assert posterize.aug_fn is script.posterize_keeping_any_bits
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    posterize.prob, posterize.magnitude_std = 1.0, 0.0
    posterize.magnitude = 10  # 0 bits kept: a black image (Pillow >= 11 raises on timm's own op)
    assert np.asarray(posterize(image)).max() == 0
    posterize.magnitude = 5  # 2 bits kept: what timm and Pillow do
    assert np.array_equal(np.asarray(posterize(image)), np.asarray(image) & 0b11000000)
    assert transform(image).shape == (3, 32, 32)
