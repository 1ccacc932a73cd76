"""examples/captioning/run_captioning.py on the built-in captions: the original masking in the collator and the
drop-worst loss in the trainer, train / evaluate by generation / predict, the saved folder reloaded in a fresh
process with the same captions and CIDEr, NoCaps-style prediction on an image folder, two processes with gradient
checkpointing, any tokenizer end to end (a Chinese WordPiece one; tests/test_example_retrieval.py runs it through
examples/retrieval), and (slow) learning from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from beit3_hf.data.captioning import load_karpathy_captions
from beit3_hf.evaluation.captioning import caption_metrics, captioning_loss
from beit3_hf.testing.synthetic_data import write_synthetic_dataset

from oracle_utils import (
    chinese_wordpiece_tokenizer,
    fresh_json,
    load_example_script,
    run_example,
    train_sentencepiece,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "captioning" / "run_captioning.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16,max_position_embeddings=40"
SMALL = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256,image_size=64,patch_size=16,max_position_embeddings=40,initializer_range=0.1"


@pytest.fixture(scope="module")
def script():
    yield load_example_script(SCRIPT)
    sys.modules.pop(SCRIPT.stem, None)


def captions_of(paths) -> list[str]:
    return [s["raw"] for image in json.loads(paths.karpathy_json.read_text())["images"] for s in image["sentences"]]


def small_dataset(root: Path, language: str = "en"):
    return write_synthetic_dataset(
        root, num_train=10, num_val=4, num_test=3, image_size=32, captions_per_image=2, language=language,
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioning")
    paths = small_dataset(root / "data")
    spm = train_sentencepiece(root, captions_of(paths), model_type="bpe", vocab_size=120)
    return paths, spm


def script_args(paths, spm, output_dir, *extra: str, model: str = TINY) -> list[str]:
    tokenizer = ("--sentencepiece_model", str(spm)) if spm is not None else ()
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", f"{model},vocab_size=200", *tokenizer),
        *(
            "--max_text_length",
            "24",
            "--karpathy_json",
            str(paths.karpathy_json),
            "--image_root",
            str(paths.image_root),
        ),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--seed", "3"),
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_eval_batch_size", "3", "--dataloader_num_workers", "0", "--disable_tqdm", "True"),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(script, data, tmp_path_factory):
    """One short run (train, evaluate, predict) shared by the tests that inspect its folder."""
    paths, spm = data
    output = tmp_path_factory.mktemp("trained") / "out"
    results = script.main(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--do_predict", "--max_steps", "3",
                    "--per_device_train_batch_size", "4", "--num_beams", "2", "--max_caption_length", "8")
    )  # fmt: skip
    return output, results


def test_train_evaluate_predict_outputs(trained, data):
    paths, _ = data
    output, results = trained
    for split, count in (("eval", 4), ("test", 3)):
        assert results[f"{split}_images"] == count and results[f"{split}_cider"] >= 0.0
        assert {f"{split}_bleu{n}" for n in range(1, 5)} <= set(results)
        captions = json.loads((output / f"captions_{split}.json").read_text())  # the COCO results format
        records = load_karpathy_captions(paths.karpathy_json, paths.image_root, "val" if split == "eval" else "test")
        assert [c["image_id"] for c in captions] == [r.image_id for r in records]
        assert all(isinstance(c["caption"], str) for c in captions)
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["Beit3ForCaptioning"]
    assert config["mask_token_id"] == json.loads((output / "tokenizer.json").read_text())["added_tokens"][-1]["id"]


FRESH_CAPTIONS = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, images_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.open(path).convert("RGB") for path in json.loads(open(images_file).read())]
ids = model.generate(processor(images=images)["pixel_values"], num_beams=2, max_length=8, length_penalty=0.6)
print(json.dumps({"class": type(model).__name__, "captions": [c.strip() for c in processor.batch_decode(ids)]}))
"""


def test_reloads_in_a_fresh_process_with_the_same_captions_and_cider(trained, data, tmp_path):
    paths, _ = data
    output, results = trained
    records = load_karpathy_captions(paths.karpathy_json, paths.image_root, "val")
    fresh = fresh_json(FRESH_CAPTIONS, tmp_path, output, [r.image_path for r in records])
    assert fresh["class"] == "Beit3ForCaptioning"
    assert fresh["captions"] == [c["caption"] for c in json.loads((output / "captions_eval.json").read_text())]
    references = {r.image_id: list(r.captions) for r in records}
    metrics = caption_metrics(references, dict(zip(references, fresh["captions"])))
    assert metrics["cider"] == pytest.approx(results["eval_cider"], abs=1e-9)
    assert metrics["bleu4"] == pytest.approx(results["eval_bleu4"], abs=1e-9)


def test_nocaps_style_prediction_on_an_image_folder(script, trained, data, tmp_path):
    """--do_predict only, from the saved folder, on a folder of images with a NoCaps-style image-info file."""
    paths, _ = data
    folder = tmp_path / "nocaps"
    folder.mkdir()
    records = load_karpathy_captions(paths.karpathy_json, paths.image_root, "test")
    info = {"images": [{"id": 100 + i, "file_name": f"{i:08x}.png"} for i in range(len(records))]}
    for record, entry in zip(records, info["images"]):
        (folder / entry["file_name"]).write_bytes(Path(record.image_path).read_bytes())
    (tmp_path / "image_info.json").write_text(json.dumps(info))
    output = tmp_path / "predict"
    results = script.main(
        [
            *("--model_name_or_path", str(trained[0]), "--output_dir", str(output), "--do_predict"),
            *("--test_image_dir", str(folder), "--test_image_info", str(tmp_path / "image_info.json")),
            *("--num_beams", "2", "--max_caption_length", "8", "--max_text_length", "24", "--report_to", "none"),
        ]
    )
    captions = json.loads((output / "captions_test.json").read_text())
    assert [c["image_id"] for c in captions] == [100, 101, 102] and "test_cider" not in results
    # Same model, same images: the captions of the Karpathy test split.
    expected = json.loads((trained[0] / "captions_test.json").read_text())
    assert [c["caption"] for c in captions] == [c["caption"] for c in expected]


def test_collator_masks_as_the_original_and_trainer_drops_the_worst(script, trained, data):
    paths, _ = data
    processor = AutoProcessor.from_pretrained(trained[0])
    model = AutoModel.from_pretrained(trained[0])
    mask_id = model.config.mask_token_id
    collator = script.MaskedCaptionCollator(processor, 0.7, mask_id)
    items = [{"pixel_values": torch.zeros(3, 32, 32), "caption": c} for c in captions_of(paths)[:6]]
    batch = collator(items)
    original = processor(text=[item["caption"] for item in items], return_tensors="pt")["input_ids"]
    for row in range(len(items)):
        n = int(batch["attention_mask"][row].sum())
        masked = batch["labels"][row] != -100
        assert int(masked.sum()) == max(1, min(int(n * 0.7 + 0.5), n - 1)) and not masked[0] and not masked[n:].any()
        assert torch.equal(batch["labels"][row][masked], original[row][masked])
        assert torch.equal(batch["input_ids"][row][~masked], original[row][~masked])
    trainer = script.CaptioningTrainer(
        model=model, args=script.CaptioningTrainingArguments(output_dir="unused", report_to="none", use_cpu=True),
        drop_worst_ratio=0.5, drop_worst_after=10, generation={"max_length": 8},
    )  # fmt: skip
    inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask", "labels")}
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    for step, ratio in ((10, 0.0), (11, 0.5)):
        trainer.state.global_step = step
        expected = captioning_loss(
            logits, inputs["labels"], label_smoothing=0.1, drop_worst_ratio=0.5, drop_worst_after=10, step=step
        )
        assert ratio == 0.0 or expected < captioning_loss(logits, inputs["labels"], label_smoothing=0.1)
        assert trainer.compute_loss(model, dict(inputs)).item() == pytest.approx(expected.item(), abs=1e-6)


def run_script(script: Path, args: list[str], tmp_path: Path, processes: int) -> subprocess.CompletedProcess:
    return run_example(script, args, tmp_path, processes)


def test_two_processes_with_gradient_checkpointing(data, tmp_path):
    """DDP over 2 gloo processes with gradient checkpointing trains; the distributed generation gathers every image
    once, in order: the captions are those of the saved model."""
    paths, spm = data
    output = tmp_path / "out"
    result = run_script(
        SCRIPT,
        script_args(paths, spm, output, "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size",
                    "2", "--gradient_checkpointing", "True", "--num_beams", "2", "--max_caption_length", "8"),
        tmp_path,
        processes=2,
    )  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    records = load_karpathy_captions(paths.karpathy_json, paths.image_root, "val")
    from PIL import Image

    images = [Image.open(r.image_path).convert("RGB") for r in records]
    ids = model.generate(processor(images=images)["pixel_values"], num_beams=2, max_length=8)
    captions = [c.strip() for c in processor.batch_decode(ids)]
    assert [c["caption"] for c in json.loads((output / "captions_eval.json").read_text())] == captions


# ----------------------------------------------------------------------------------------------------------------
# Any tokenizer: a Chinese BERT-style WordPiece one ([CLS] / [SEP], no <s> / </s>)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    """Chinese synthetic captions and a WordPiece tokenizer trained on them here (no download)."""
    root = tmp_path_factory.mktemp("chinese")
    paths = small_dataset(root / "data", language="zh")
    tokenizer = chinese_wordpiece_tokenizer(root / "tokenizer", captions_of(paths))
    return paths, root / "tokenizer", tokenizer


def test_chinese_wordpiece_tokenizer_through_captioning(script, chinese, tmp_path):
    paths, tokenizer_dir, tokenizer = chinese
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    output = tmp_path / "out"
    results = script.main(
        script_args(paths, None, output, "--tokenizer_name_or_path", str(tokenizer_dir), "--do_train", "--do_eval",
                    "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_beams", "2",
                    "--max_caption_length", "8")
    )  # fmt: skip
    assert results["eval_images"] == 4 and results["eval_cider"] >= 0.0
    config = json.loads((output / "config.json").read_text())
    # A model trained from scratch takes its special ids from the tokenizer: [CLS] / [SEP] stand in for <s> / </s>.
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert (config["pad_token_id"], config["mask_token_id"]) == (tokenizer.pad_token_id, tokenizer.mask_token_id)
    processor = AutoProcessor.from_pretrained(output)
    ids = processor(text=["左上角有一个红色的圆形"])["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id in ids.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_learns_from_scratch(tmp_path, processes):
    """Hidden 128, 4 layers, 64 px, from scratch on the CPU: test CIDEr far above an untrained model's (~0)."""
    paths = write_synthetic_dataset(
        tmp_path / "data", num_train=1000, num_val=0, num_test=50,
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip
    spm = train_sentencepiece(tmp_path, captions_of(paths), model_type="bpe", vocab_size=120)
    output = tmp_path / "out"
    run_script(
        SCRIPT,
        script_args(paths, spm, output, "--do_train", "--do_predict", "--max_steps", str(LEARNING_STEPS),
                    "--per_device_train_batch_size", str(32 // processes), "--per_device_eval_batch_size", "25",
                    "--learning_rate", "5e-4", "--warmup_steps", "50", "--logging_steps", "50", "--max_caption_length", "24", model=SMALL),
        tmp_path,
        processes,
    )  # fmt: skip
    results = json.loads((output / "all_results.json").read_text())
    print(
        f"CIDEr / BLEU-4 after {LEARNING_STEPS} steps on {processes} process(es): "
        f"{results['test_cider']:.3f} / {results['test_bleu4']:.3f}"
    )
    assert results["test_cider"] >= 1.0


LEARNING_STEPS = 600
