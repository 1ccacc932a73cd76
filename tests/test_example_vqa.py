"""examples/vqa/run_vqa.py on the built-in VQAv2-format data: train / evaluate / predict in one process, the saved
folder reloaded in a fresh process with the same VQA score, the original optimizer settings, two processes with
gradient checkpointing, and (slow) learning from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3_hf.data.vqa import load_vqa_split, vqa_split_files, with_targets
from beit3_hf.testing.synthetic_data import write_synthetic_vqa
from beit3_hf.training.scripts import ModelArguments, load_processor, parse_script_args

from oracle_utils import fresh_json, load_example_script, run_example, train_sentencepiece

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "vqa" / "run_vqa.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16,max_position_embeddings=24"
#: The model of the learning runs: hidden 128, 4 layers, 64 px images, trained from scratch.
SMALL = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256,image_size=64,patch_size=16,max_position_embeddings=32,initializer_range=0.1"


@pytest.fixture(scope="module")
def script():
    yield load_example_script(SCRIPT)
    sys.modules.pop(SCRIPT.stem, None)


def vqa_texts(data_dir: Path) -> list[str]:
    files = sorted((data_dir / "vqa").glob("*questions.json"))
    return [q["question"] for f in files for q in json.loads(f.read_text())["questions"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = write_synthetic_vqa(
        root / "data", num_train_images=12, num_val_images=4, num_test_images=3, questions_per_image=3, image_size=32
    )
    spm = train_sentencepiece(root, vqa_texts(paths.data_dir), model_type="bpe", vocab_size=120)
    return paths, spm


def script_args(paths, spm, output_dir, *extra: str, model: str = TINY, vocab: int = 200) -> list[str]:
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", f"{model},vocab_size={vocab}"),
        *("--sentencepiece_model", str(spm), "--max_text_length", "16", "--data_dir", str(paths.data_dir)),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--seed", "3"),
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_eval_batch_size", "5", "--dataloader_num_workers", "0", "--disable_tqdm", "True"),
        *("--min_answer_count", "1"),
        *extra,
    ]


def eval_questions(paths, answers: list[str]):
    files = vqa_split_files(paths.data_dir, "val2014")
    questions = load_vqa_split(files["questions"], files["image_dir"], files["annotations"])
    return with_targets(questions, answers)[0]


FRESH_VQA_SCORE = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, questions_file = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
questions = json.loads(open(questions_file).read())
images = [Image.open(q["image"]).convert("RGB") for q in questions]
with torch.no_grad():
    logits = model(**processor(images=images, text=[q["question"] for q in questions])).logits
scores = [q["targets"].get(model.config.id2label[int(i)], 0.0) for q, i in zip(questions, logits.argmax(-1))]
print(json.dumps({"class": type(model).__name__, "vqa_accuracy": sum(scores) / len(scores)}))
"""


def fresh_vqa_accuracy(folder: Path, paths, tmp_path: Path) -> dict:
    """The VQA score of a saved folder on the val questions, computed in a process where beit3_hf is hidden."""
    config = json.loads((folder / "config.json").read_text())
    answers = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    questions = [
        {
            "image": q.image_path,
            "question": q.question,
            "targets": {answers[label]: s for label, s in zip(q.labels, q.scores)},
        }
        for q in eval_questions(paths, answers)
    ]
    return fresh_json(FRESH_VQA_SCORE, tmp_path, folder, questions)


def test_train_evaluate_predict_and_reload_in_a_fresh_process(script, data, tmp_path):
    paths, spm = data
    output = tmp_path / "out"
    results = script.main(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--do_predict", "--max_steps", "3",
                    "--per_device_train_batch_size", "6", "--task_head_lr_weight", "20", "--eval_before_training", "True")
    )  # fmt: skip
    assert 0.0 <= results["before_vqa_accuracy"] <= 1.0 and (output / "before_results.json").is_file()
    assert 0.0 <= results["eval_vqa_accuracy"] <= 1.0 and results["train_skipped_images"] == 0
    assert results["eval_samples"] == 12 and results["test_samples"] == 9 and results["num_answers"] >= 9
    for name in ("train_results.json", "eval_results.json", "test_results.json", "all_results.json", "README.md"):
        assert (output / name).is_file(), name
    # The test-dev submission: one answer of the answer list per question, in the server's format.
    submission = json.loads((output / "predictions_test-dev2015.json").read_text())
    questions = json.loads((paths.annotation_dir / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    config = json.loads((output / "config.json").read_text())
    assert [s["question_id"] for s in submission] == [q["question_id"] for q in questions["questions"]]
    assert {s["answer"] for s in submission} <= set(config["id2label"].values())
    assert config["architectures"] == ["Beit3ForVisualQuestionAnswering"] and config["use_final_layernorm"] is False
    # The folder reloads without beit3_hf and gives the VQA score the script reported.
    fresh = fresh_vqa_accuracy(output, paths, tmp_path)
    assert fresh["class"] == "Beit3ForVisualQuestionAnswering"
    assert fresh["vqa_accuracy"] == pytest.approx(results["eval_vqa_accuracy"], abs=1e-6)


def test_optimizer_has_the_original_betas_and_head_learning_rate(script, data, tmp_path):
    """AdamW betas (0.9, 0.98) and the classifier (the original's `head`, not the pooler) at 20x the learning rate."""
    paths, spm = data
    model_args, _data_args, training_args = parse_script_args(
        (script.ModelArguments, script.DataArguments, script.VqaTrainingArguments),
        script_args(paths, spm, tmp_path / "out", "--task_head_lr_weight", "20", "--learning_rate", "1e-4"),
    )
    assert (training_args.adam_beta1, training_args.adam_beta2, training_args.weight_decay) == (0.9, 0.98, 0.01)
    model = script.build_model(model_args, ["yes", "no", "red"])
    trainer = script.VqaTrainer(model=model, args=training_args, task_head_lr_weight=20)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == len(names)
    assert {n for n, lr in lr_of.items() if lr == pytest.approx(2e-3)} == {
        n for n in names.values() if n.startswith("classifier.")
    }
    assert all(lr == pytest.approx(1e-4) for n, lr in lr_of.items() if not n.startswith("classifier."))
    assert all(group["betas"] == (0.9, 0.98) for group in optimizer.param_groups)
    # The loss is the original's: BCE with logits (mean) times the number of answers.
    batch = script.VqaCollator(_processor(model, spm), 3)(
        [{"pixel_values": torch.zeros(3, 32, 32), "question": "what?", "labels": [0, 2], "scores": [1.0, 0.3]}]
    )
    assert batch["labels"].tolist() == [[1.0, 0.0, pytest.approx(0.3)]]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"]) * 3
    assert model(**batch).loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _processor(model, spm):
    model_args = ModelArguments(sentencepiece_model=str(spm))
    return load_processor(model_args, task="vqa", image_size=model.config.image_size, max_length=16)


def run_script(args: list[str], tmp_path: Path, processes: int) -> subprocess.CompletedProcess:
    return run_example(SCRIPT, args, tmp_path, processes)


@pytest.mark.slow  # about a minute; tests/test_example_captioning.py runs its 2-process test by default
def test_two_processes_with_gradient_checkpointing(data, tmp_path):
    """DDP over 2 gloo processes with (non-reentrant) gradient checkpointing trains, and the distributed evaluation
    gathers every question once: its score equals the saved model's, recomputed in a fresh process."""
    paths, spm = data
    output = tmp_path / "out"
    result = run_script(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--max_steps", "2",
                    "--per_device_train_batch_size", "4", "--gradient_checkpointing", "True"),
        tmp_path,
        processes=2,
    )  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    results = json.loads((output / "all_results.json").read_text())
    assert results["eval_samples"] == 12
    assert fresh_vqa_accuracy(output, paths, tmp_path)["vqa_accuracy"] == pytest.approx(
        results["eval_vqa_accuracy"], abs=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_learns_from_scratch(tmp_path, processes):
    """Hidden 128, 4 layers, 64 px, from scratch on the CPU: the VQA score goes well above the answer prior."""
    paths = write_synthetic_vqa(tmp_path / "data", num_train_images=1000, num_val_images=100, num_test_images=1)
    spm = train_sentencepiece(tmp_path, vqa_texts(paths.data_dir), model_type="bpe", vocab_size=120)
    output = tmp_path / "out"
    batch = str(32 // processes)
    run_script(
        script_args(paths, spm, output, "--do_train", "--do_eval", "--max_steps", str(LEARNING_STEPS),
                    "--per_device_train_batch_size", batch, "--per_device_eval_batch_size", "64",
                    "--learning_rate", "5e-4", "--warmup_steps", "50", "--logging_steps", "50", "--min_answer_count", "9",
                    model=SMALL, vocab=200),
        tmp_path,
        processes,
    )  # fmt: skip
    results = json.loads((output / "all_results.json").read_text())
    print(f"VQA accuracy after {LEARNING_STEPS} steps on {processes} process(es): {results['eval_vqa_accuracy']:.3f}")
    assert results["eval_vqa_accuracy"] >= 0.75  # the answer prior gives about 0.5


LEARNING_STEPS = 600
