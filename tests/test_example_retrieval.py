"""examples/retrieval/run_retrieval.py end to end on the built-in dataset: one process, two processes, early stopping,
bad data (malformed files, missing and undecodable images) and the model folder a failing evaluation leaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from beit3_hf import Beit3Config, Beit3ForImageTextRetrieval
from beit3_hf.data import RetrievalEvalIndex, UndecodableImageError, load_karpathy_split
from beit3_hf.evaluation.retrieval import retrieval_recall
from beit3_hf.testing.synthetic_data import write_synthetic_dataset

from oracle_utils import (
    chinese_wordpiece_tokenizer,
    load_example_script,
    run_example,
    train_sentencepiece,
)

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "retrieval" / "run_retrieval.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16,max_position_embeddings=24"
METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
# What a saved folder needs to be used anywhere: weights, config, code, processor.
MODEL_FOLDER_FILES = (
    "config.json",
    "model.safetensors",
    "modeling_beit3.py",
    "configuration_beit3.py",
    "processing_beit3.py",
    "processor_config.json",
    "tokenizer.json",
)


@pytest.fixture(scope="module")
def script():
    yield load_example_script(SCRIPT)
    sys.modules.pop(SCRIPT.stem, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    paths = write_synthetic_dataset(
        root / "data", num_train=16, num_val=6, num_test=12, image_size=32, captions_per_image=2,
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip
    captions = [
        s["raw"] for image in json.loads(paths.karpathy_json.read_text())["images"] for s in image["sentences"]
    ]
    spm = train_sentencepiece(root, captions, model_type="bpe", vocab_size=120)
    return paths, spm


def script_args(paths, spm, output_dir, *extra: str, karpathy_json=None, image_root=None) -> list[str]:
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", TINY + ",vocab_size=200"),
        *("--sentencepiece_model", str(spm), "--max_text_length", "20"),
        *("--karpathy_json", str(karpathy_json or paths.karpathy_json)),
        *("--image_root", str(image_root or paths.image_root)),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--seed", "3"),
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_eval_batch_size", "5", "--dataloader_num_workers", "0", "--disable_tqdm", "True"),
        *extra,
    ]


def recall_of_saved_model(output: Path, paths, split: str) -> dict[str, float]:
    """Recall of the saved folder on a split, recomputed here from one similarity matrix."""
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    index = RetrievalEvalIndex.from_records(load_karpathy_split(paths.karpathy_json, paths.image_root, split))
    images = [Image.open(path).convert("RGB") for path in index.image_paths]
    with torch.no_grad():
        out = model(**processor(images=images, text=index.captions))
    return retrieval_recall(out.logits_per_image, index.text_to_image)


def copy_data(paths, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the dataset (to damage), as (karpathy_json, image_root)."""
    root = tmp_path / "data"
    shutil.copytree(paths.image_root, root)
    return root / paths.karpathy_json.relative_to(paths.image_root), root


def karpathy_images(karpathy_json: Path, image_root: Path, split: str) -> list[Path]:
    return [Path(r.image_path) for r in load_karpathy_split(karpathy_json, image_root, split)]


def truncate(path: Path) -> None:
    """Cut an image file in half: it opens, but decoding fails ("image file is truncated")."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_single_process_train_evaluate_predict_save(script, data, tmp_path):
    paths, spm = data
    output = tmp_path / "out"
    results = script.main(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--do_predict", "--eval_before_training", "True",
                    "--per_device_train_batch_size", "8", "--max_steps", "3", "--layer_decay", "0.65",
                    "--drop_path_rate", "0.1")
    )  # fmt: skip
    names = [f"{split}_{metric}" for split in ("before", "eval", "test") for metric in METRICS]
    assert set(names) <= set(results) and all(0.0 <= results[name] <= 1.0 for name in names)
    assert (results["eval_images"], results["eval_texts"], results["test_images"], results["test_texts"]) == (
        6, 12, 12, 24,
    )  # fmt: skip
    assert results["train_samples"] == 32 and results["train_skipped_images"] == 0
    # transformers' example outputs: per-split and combined results, the trainer state, no results.json.
    assert json.loads((output / "all_results.json").read_text()) == pytest.approx(results)
    for split in ("before", "train", "eval", "test"):
        assert (output / f"{split}_results.json").is_file(), split
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3
    assert not (output / "results.json").exists()
    card = (output / "README.md").read_text()
    assert "| eval_tr_r1 |" in card and "trust_remote_code=True" in card and "[](https://huggingface.co/)" not in card
    # The saved folder is Hub-ready: code, weights, processor; it reloads as the retrieval model.
    assert all((output / name).is_file() for name in MODEL_FOLDER_FILES)
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "Beit3ForImageTextRetrieval"
    assert model.config.drop_path_rate == 0.1 and model.beit3.encoder.layers[-1].drop_path.drop_prob == 0.1
    assert model.config.mask_token_id == processor.tokenizer.mask_token_id
    # The reported recall is the recall of the saved model (val for --do_eval, test for --do_predict).
    for split, prefix in (("val", "eval"), ("test", "test")):
        expected = recall_of_saved_model(output, paths, split)
        assert {f"{prefix}_{k}": v for k, v in expected.items()} == pytest.approx(
            {f"{prefix}_{k}": results[f"{prefix}_{k}"] for k in METRICS}, abs=1e-6
        )


def test_early_stopping_callback_stops_the_run(script, data, tmp_path):
    """The trainer's `evaluate` runs the callbacks: with a frozen model (learning rate 0) recall never improves, so
    patience 1 stops training at the second evaluation instead of step 10."""
    paths, spm = data
    output = tmp_path / "out"
    script.main(
        script_args(paths, spm, output, "--do_train", "--per_device_train_batch_size", "8", "--max_steps", "10",
                    "--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps", "1",
                    "--metric_for_best_model", "r_mean", "--early_stopping_patience", "1")
    )  # fmt: skip
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "eval_r_mean" in entry] == [1, 2]


def run_script(args: list[str], tmp_path: Path, processes: int) -> subprocess.CompletedProcess:
    return run_example(SCRIPT, args, tmp_path, processes)


def train_loss(output: Path) -> float:
    return json.loads((output / "all_results.json").read_text())["train_loss"]


def test_two_process_global_batch_loss_equals_one_process(data, tmp_path):
    """Two processes with 4 pairs each contrast against the gathered 8: the logged loss of the first step equals
    one process holding the same 8 pairs. The two processes checkpoint their activations (DDP with gradient
    checkpointing, where the original fails with "Expected to mark a variable ready only once")."""
    paths, spm = data
    one, two, local = tmp_path / "one", tmp_path / "two", tmp_path / "local"
    run_script(script_args(paths, spm, one, "--do_train", "--per_device_train_batch_size", "8", "--max_steps", "1"),
               tmp_path, 1)  # fmt: skip
    result = run_script(
        script_args(paths, spm, two, "--do_train", "--per_device_train_batch_size", "4", "--max_steps", "1",
                    "--gradient_checkpointing", "True"),
        tmp_path,
        2,
    )  # fmt: skip
    assert "world size: 2" in result.stderr + result.stdout
    assert train_loss(two) == pytest.approx(train_loss(one), abs=1e-5)
    # Without the global batch each process would contrast 4 pairs only: a different (smaller) loss.
    run_script(
        script_args(paths, spm, local, "--do_train", "--per_device_train_batch_size", "4", "--max_steps", "1",
                    "--global_contrastive", "False"),
        tmp_path,
        2,
    )  # fmt: skip
    assert train_loss(local) != pytest.approx(train_loss(one), abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["images"][1].pop("sentences"), r"images\[1\].*no 'sentences' field"),
        (lambda d: [image.update(split="train") for image in d["images"]], r"no images in split 'val'"),
    ],
)
def test_bad_karpathy_files_are_named(script, data, tmp_path, mutate, message):
    paths, spm = data
    broken = json.loads(paths.karpathy_json.read_text())
    mutate(broken)
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    args = script_args(paths, spm, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "1", karpathy_json=bad)
    with pytest.raises(ValueError, match=message) as error:
        script.main(args)
    assert "broken.json" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_image_is_named(script, data, tmp_path):
    paths, spm = data
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "images/nope.png", "caption": "a red circle"}) + "\n")
    args = script_args(paths, spm, tmp_path / "out", "--do_train", "--max_steps", "1", "--train_file", str(jsonl))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        script.main(args)


def test_undecodable_eval_image_still_leaves_a_complete_model_folder(script, data, tmp_path):
    """The model, its code, processor and card are saved before evaluating: an evaluation that stops on a broken
    image (naming it) costs nothing that training made."""
    paths, spm = data
    karpathy_json, image_root = copy_data(paths, tmp_path)
    broken = karpathy_images(karpathy_json, image_root, "val")[2]
    truncate(broken)
    output = tmp_path / "out"
    args = script_args(paths, spm, output, "--do_train", "--do_eval", "--per_device_train_batch_size", "8",
                       "--max_steps", "2", karpathy_json=karpathy_json, image_root=image_root)  # fmt: skip
    with pytest.raises(UndecodableImageError, match=rf"{broken}: cannot decode the image .*truncated"):
        script.main(args)
    assert all((output / name).is_file() for name in (*MODEL_FOLDER_FILES, "README.md")), sorted(os.listdir(output))
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "Beit3ForImageTextRetrieval"


def test_undecodable_training_image_is_skipped_and_reported(script, data, tmp_path):
    paths, spm = data
    karpathy_json, image_root = copy_data(paths, tmp_path)
    broken = karpathy_images(karpathy_json, image_root, "train")[5]
    broken.write_bytes(b"this is no image")
    output = tmp_path / "out"
    common = ("--do_train", "--per_device_train_batch_size", "8", "--max_steps", "4")  # one epoch: every pair
    results = script.main(script_args(paths, spm, output, *common, karpathy_json=karpathy_json, image_root=image_root))
    report = json.loads((output / "skipped_images.json").read_text())
    assert report["files"] == [str(broken)] and report["count"] == results["train_skipped_images"] >= 2
    assert all(r["file"] == str(broken) and "cannot identify image file" in r["error"] for r in report["images"])
    assert {r["step"] for r in report["images"]} <= {1, 2, 3, 4}
    # --check_images decodes everything up front and stops before building a model, listing the file.
    with pytest.raises(
        UndecodableImageError, match=rf"(?s)the training set: 1 of 16 images cannot be decoded.*{broken}"
    ):
        script.main(
            script_args(paths, spm, tmp_path / "checked", *common, "--check_images", "True",
                        karpathy_json=karpathy_json, image_root=image_root)
        )  # fmt: skip
    assert not (tmp_path / "checked").exists()
    # --skip_undecodable_images False: the first one stops training, naming it.
    with pytest.raises(UndecodableImageError, match=str(broken)):
        script.main(
            script_args(paths, spm, tmp_path / "strict", *common, "--skip_undecodable_images", "False",
                        karpathy_json=karpathy_json, image_root=image_root)
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Any tokenizer: a Chinese BERT-style WordPiece one ([CLS] / [SEP], no <s> / </s>), larger than the model's vocabulary
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    """Chinese synthetic captions, a WordPiece tokenizer trained on them here, and an English model folder."""
    root = tmp_path_factory.mktemp("chinese")
    paths = write_synthetic_dataset(
        root / "data", num_train=16, num_val=6, num_test=3, image_size=32, captions_per_image=2, language="zh",
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip
    captions = [
        s["raw"] for image in json.loads(paths.karpathy_json.read_text())["images"] for s in image["sentences"]
    ]
    assert all("\u4e00" <= caption[0] <= "\u9fff" for caption in captions)
    tokenizer = chinese_wordpiece_tokenizer(root / "tokenizer", captions, vocab_size=200)
    return paths, root / "tokenizer", tokenizer


@pytest.mark.parametrize("start", ["scratch", "pretrained"])
def test_chinese_wordpiece_tokenizer_trains_and_evaluates(script, chinese, tmp_path, start, caplog):
    """--tokenizer_name_or_path with a tokenizer that has more ids than the model's text embeddings (a model from
    scratch, or a saved folder, with 20 rows): the embeddings grow to the tokenizer (no index error), [CLS] / [SEP]
    stand in for <s> / </s> with a notice, and the run trains and evaluates."""
    paths, tokenizer_dir, tokenizer = chinese
    assert tokenizer.bos_token_id is None and len(tokenizer) > 20
    if start == "scratch":
        model = ("--config_name", "beit3-base-patch16-224", "--config_overrides", TINY + ",vocab_size=20")
    else:
        config = Beit3Config.from_preset("beit3-base-patch16-224")
        config.update_from_string(TINY + ",vocab_size=20")
        Beit3ForImageTextRetrieval(config).save_pretrained(tmp_path / "english")
        model = ("--model_name_or_path", str(tmp_path / "english"))
    output = tmp_path / "out"
    with caplog.at_level("INFO"):
        results = script.main(
            [
                *model, "--tokenizer_name_or_path", str(tokenizer_dir), "--max_text_length", "24",
                *("--karpathy_json", str(paths.karpathy_json), "--image_root", str(paths.image_root)),
                *("--output_dir", str(output), "--report_to", "none", "--save_strategy", "no", "--seed", "3"),
                *("--do_train", "--do_eval", "--eval_before_training", "True", "--max_steps", "3"),
                *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3"),
                *("--min_crop_scale", "1.0", "--hflip", "False", "--disable_tqdm", "True"),
            ]
        )  # fmt: skip
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert f"The tokenizer has {len(tokenizer)} ids but the model's text embeddings only 20 rows" in messages
    assert "BEiT-3 uses its [CLS] / [SEP]" in messages
    for prefix in ("before", "eval"):
        assert 0.0 <= results[f"{prefix}_tr_r1"] <= 1.0 and 0.0 <= results[f"{prefix}_ir_r1"] <= 1.0
    assert results["eval_images"] == 6 and results["eval_texts"] == 12 and results["train_samples"] == 32
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    saved = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert saved.get_input_embeddings().num_embeddings == len(tokenizer)
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    ids = processor(text=["左上角有一个红色的圆形"])["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and ids.max() < len(tokenizer) and tokenizer.unk_token_id not in ids
