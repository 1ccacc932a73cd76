"""examples/nlvr2/run_nlvr2.py on the built-in NLVR2-format data: the loader and the accuracy against the original
definitions, train / evaluate / predict, the saved folder reloaded in a fresh process with the same accuracy, two
processes with gradient checkpointing, undecodable training pairs, and (slow) learning from scratch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3_hf.data.loaders import ImageRowDecoder
from beit3_hf.data.nlvr2 import load_nlvr2, nlvr2_accuracy, nlvr2_dataset
from beit3_hf.testing.synthetic_data import write_synthetic_nlvr2

from oracle_utils import fresh_json, load_example_script, run_example, train_sentencepiece

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "nlvr2" / "run_nlvr2.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16,max_position_embeddings=24"
SMALL = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256,image_size=64,patch_size=16,max_position_embeddings=32,initializer_range=0.1"


@pytest.fixture(scope="module")
def script():
    yield load_example_script(SCRIPT)
    sys.modules.pop(SCRIPT.stem, None)


def statements(paths) -> list[str]:
    return [
        json.loads(line)["sentence"] for split in ("train", "dev", "test1") for line in paths.statements(split).open()
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    paths = write_synthetic_nlvr2(root / "data", num_train_pairs=8, num_dev_pairs=3, num_test_pairs=2, image_size=32)
    spm = train_sentencepiece(root, statements(paths), model_type="bpe", vocab_size=100)
    return paths, spm


def script_args(paths, spm, output_dir, *extra: str, model: str = TINY) -> list[str]:
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", f"{model},vocab_size=200"),
        *("--sentencepiece_model", str(spm), "--max_text_length", "16", "--data_dir", str(paths.data_dir)),
        *("--train_file", str(paths.statements("train")), "--validation_file", str(paths.statements("dev"))),
        *("--test_file", str(paths.statements("test1"))),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--seed", "3"),
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0", "--disable_tqdm", "True"),
        *extra,
    ]


def test_loader_reads_the_nlvr2_layout_and_balances_labels(data):
    paths, _ = data
    train = load_nlvr2(paths.statements("train"), paths.data_dir / "images" / "train")
    in_file = [json.loads(line)["label"] for line in paths.statements("train").read_text().splitlines()]
    assert len(train) == 16 and [e.label for e in train] == [int(label == "True") for label in in_file]
    assert {e.label for e in train} == {0, 1}
    first = train[0]
    assert first.identifier == "train-0-0-0" and first.left_image.endswith("images/train/0/train-0-0-img0.png")
    assert first.right_image.endswith("train-0-0-img1.png") and Path(first.right_image).is_file()
    dev = load_nlvr2(paths.statements("dev"), paths.data_dir / "dev")
    assert dev[0].left_image == str(paths.data_dir / "dev" / "dev-0-0-img0.png")


def test_loader_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps({"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"dev.json:1 \(dev-1-0-0\): 'label' must be"):
        load_nlvr2(bad, tmp_path, check_images=False)
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}\n{"identifier": "dev-2"}\n')
    with pytest.raises(ValueError, match=r"dev.json:2: 'identifier' must look like"):
        load_nlvr2(bad, tmp_path, check_images=False)
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x", "label": "True"}\n')
    with pytest.raises(FileNotFoundError, match="dev-1-0-img0.png"):
        load_nlvr2(bad, tmp_path)


def test_accuracy_equals_the_original_definition():
    """The original NLVR2Handler: (logits.max(-1)[-1] == label).float().sum() * 100 / batch, here as a fraction."""
    logits = torch.tensor([[0.2, 0.9], [1.0, -1.0], [0.0, 2.0], [3.0, 2.0]])
    labels = torch.tensor([1, 1, 1, 0])
    assert nlvr2_accuracy(logits, labels) == pytest.approx(0.75)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        logits, labels = torch.randn(13, 2, generator=generator), torch.randint(0, 2, (13,), generator=generator)
        original = (logits.max(-1)[-1] == labels).float().sum(0) * 100.0 / 13
        assert nlvr2_accuracy(logits, labels) * 100 == pytest.approx(original.item(), abs=1e-4)


def test_pair_decoder_replaces_a_row_with_an_undecodable_image(data, tmp_path):
    paths, _ = data
    examples = load_nlvr2(paths.statements("dev"), paths.data_dir / "dev")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    examples[0] = type(examples[0])(examples[0].identifier, "x", 1, examples[0].left_image, str(broken))
    rows = nlvr2_dataset(examples)
    batch, pairs, skipped = ImageRowDecoder(rows, ("left", "right"))(rows[:2])
    assert len(pairs) == 2 and all(image.mode == "RGB" for pair in pairs for image in pair)
    # Replacement rows are drawn at random (seeded by the row): a draw may hit the broken row again before another.
    assert batch["right"][0] != str(broken) and {r["file"] for r in skipped} == {str(broken)}
    with pytest.raises(Exception, match="broken.png"):
        ImageRowDecoder(rows, ("left", "right"), skip=False)(rows[:1])


FRESH_ACCURACY = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, examples_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
examples = json.loads(open(examples_file).read())
pairs = [(Image.open(e["left"]).convert("RGB"), Image.open(e["right"]).convert("RGB")) for e in examples]
with torch.no_grad():
    logits = model(**processor(images=pairs, text=[e["sentence"] for e in examples])).logits
correct = [int(p) == e["label"] for p, e in zip(logits.argmax(-1), examples)]
print(json.dumps({"class": type(model).__name__, "accuracy": sum(correct) / len(correct)}))
"""


def fresh_accuracy(folder: Path, paths, tmp_path: Path) -> dict:
    examples = [
        {"left": e.left_image, "right": e.right_image, "sentence": e.sentence, "label": e.label}
        for e in load_nlvr2(paths.statements("dev"), paths.data_dir / "dev")
    ]
    return fresh_json(FRESH_ACCURACY, tmp_path, folder, examples)


def test_train_evaluate_predict_and_reload_in_a_fresh_process(script, data, tmp_path):
    paths, spm = data
    output = tmp_path / "out"
    results = script.main(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--do_predict", "--max_steps", "3",
                    "--per_device_train_batch_size", "4", "--layer_decay", "0.65", "--eval_before_training", "True")
    )  # fmt: skip
    assert results["eval_samples"] == 6 and results["test_samples"] == 4 and results["before_samples"] == 6
    assert 0.0 <= results["before_accuracy"] <= 1.0 and (output / "before_results.json").is_file()
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["test_accuracy"] <= 1.0
    with (output / "predictions_test1.csv").open() as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["test1-0-0-0", "test1-0-0-1", "test1-1-0-0", "test1-1-0-1"]
    assert {r[1] for r in rows} <= {"True", "False"}
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["Beit3ForVisualReasoning"] and config["id2label"] == {"0": "False", "1": "True"}
    fresh = fresh_accuracy(output, paths, tmp_path)
    assert fresh["class"] == "Beit3ForVisualReasoning"
    assert fresh["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-9)


def run_script(args: list[str], tmp_path: Path, processes: int) -> subprocess.CompletedProcess:
    return run_example(SCRIPT, args, tmp_path, processes)


@pytest.mark.slow  # about a minute; tests/test_example_captioning.py runs its 2-process test by default
def test_two_processes_with_gradient_checkpointing(data, tmp_path):
    """DDP over 2 gloo processes with gradient checkpointing trains (the original fails with "Expected to mark a
    variable ready only once"), and the distributed evaluation equals the saved model's accuracy."""
    paths, spm = data
    output = tmp_path / "out"
    result = run_script(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--max_steps", "2",
                    "--per_device_train_batch_size", "2", "--gradient_checkpointing", "True"),
        tmp_path,
        processes=2,
    )  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert results["eval_samples"] == 6
    assert fresh_accuracy(output, paths, tmp_path)["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-9)


@pytest.mark.slow  # a few CPU minutes per case
@pytest.mark.parametrize("processes", [1, 2])
def test_learns_from_scratch(tmp_path, processes):
    """Hidden 128, 4 layers, 64 px, from scratch on the CPU: dev accuracy well above chance (0.5, balanced)."""
    paths = write_synthetic_nlvr2(tmp_path / "data", num_train_pairs=2000, num_dev_pairs=100, num_test_pairs=1)
    spm = train_sentencepiece(tmp_path, statements(paths), model_type="bpe", vocab_size=100)
    output = tmp_path / "out"
    run_script(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--max_steps", str(LEARNING_STEPS),
                    "--per_device_train_batch_size", str(32 // processes), "--per_device_eval_batch_size", "50",
                    "--layer_decay", "1.0", "--weight_decay", "0.05", "--learning_rate", "5e-4", "--warmup_steps", "50", "--logging_steps", "50",
                    model=SMALL),
        tmp_path,
        processes,
    )  # fmt: skip
    results = json.loads((output / "all_results.json").read_text())
    print(
        f"NLVR2 dev accuracy after {LEARNING_STEPS} steps on {processes} process(es): {results['eval_accuracy']:.3f}"
    )
    # Measured: 0.745 (1 process) and 1.000 (2 processes) after 600 steps; when the model "clicks" varies by run.
    assert results["eval_accuracy"] >= 0.7


LEARNING_STEPS = 600
