"""examples/retrieval/run_retrieval.py end to end on the built-in dataset: one process, two processes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from beit3_hf.data import RetrievalEvalIndex, load_karpathy_split
from beit3_hf.evaluation.retrieval import retrieval_recall
from beit3_hf.testing.synthetic_data import write_synthetic_dataset

from oracle_utils import accelerate_launch, load_example_script, train_sentencepiece

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "retrieval" / "run_retrieval.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16,max_position_embeddings=24"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    paths = write_synthetic_dataset(
        root / "data", num_train=16, num_val=0, num_test=12, image_size=32, captions_per_image=2,
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip
    captions = [
        s["raw"] for image in json.loads(paths.karpathy_json.read_text())["images"] for s in image["sentences"]
    ]
    spm = train_sentencepiece(root, captions, model_type="bpe", vocab_size=120)
    return paths, spm


def script_args(paths, spm, output_dir, *extra: str) -> list[str]:
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", TINY + ",vocab_size=200"),
        *("--sentencepiece_model", str(spm), "--max_text_length", "20"),
        *("--karpathy_json", str(paths.karpathy_json), "--image_root", str(paths.image_root)),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none", "--seed", "3"),
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_eval_batch_size", "5", "--dataloader_num_workers", "0", "--disable_tqdm", "True"),
        *extra,
    ]


def test_single_process_train_evaluate_save(data, tmp_path):
    paths, spm = data
    output = tmp_path / "out"
    results = load_example_script(SCRIPT).main(
        script_args(paths, spm, output, "--per_device_train_batch_size", "8", "--max_steps", "3",
                    "--eval_before_training", "True", "--layer_decay", "0.65", "--drop_path_rate", "0.1")
    )  # fmt: skip
    names = [
        f"{when}_{metric}"
        for when in ("before", "after")
        for metric in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
    ]
    assert set(names) <= set(results) and all(0.0 <= results[name] <= 1.0 for name in names)
    assert json.loads((output / "results.json").read_text()) == pytest.approx(results)
    assert "| tr_r1 |" in (output / "README.md").read_text()
    # The saved folder is Hub-ready: code, weights, processor; it reloads as the retrieval model.
    files = {p.name for p in output.iterdir()}
    assert {
        "modeling_beit3.py",
        "configuration_beit3.py",
        "processing_beit3.py",
        "tokenizer.json",
        "model.safetensors",
    } <= files
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "Beit3ForImageTextRetrieval"
    assert model.config.drop_path_rate == 0.1 and model.beit3.encoder.layers[-1].drop_path.drop_prob == 0.1
    assert model.config.mask_token_id == processor.tokenizer.mask_token_id
    # The reported recall is the recall of the saved model, recomputed here from one similarity matrix.
    index = RetrievalEvalIndex.from_records(load_karpathy_split(paths.karpathy_json, paths.image_root, "test"))
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in index.image_paths]
    with torch.no_grad():
        out = model(**processor(images=images, text=index.captions))
    expected = retrieval_recall(out.logits_per_image, index.text_to_image)
    assert {f"after_{k}": v for k, v in expected.items()} == pytest.approx(
        {k: v for k, v in results.items() if k.startswith("after_") and k != "after_epoch"}, abs=1e-6
    )


def run_script(args: list[str], tmp_path: Path, processes: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *args] if processes == 1 else accelerate_launch(SCRIPT, args, processes)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_process_global_batch_loss_equals_one_process(data, tmp_path):
    """Two processes with 4 pairs each contrast against the gathered 8: the logged loss of the first step equals
    one process holding the same 8 pairs."""
    paths, spm = data
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_script(script_args(paths, spm, one, "--per_device_train_batch_size", "8", "--max_steps", "1"), tmp_path, 1)
    result = run_script(
        script_args(paths, spm, two, "--per_device_train_batch_size", "4", "--max_steps", "1"), tmp_path, 2
    )
    assert "world size: 2" in result.stderr + result.stdout
    one_loss = json.loads((one / "results.json").read_text())["train_loss"]
    two_loss = json.loads((two / "results.json").read_text())["train_loss"]
    assert two_loss == pytest.approx(one_loss, abs=1e-5)
    # Without the global batch each process would contrast 4 pairs only: a different (smaller) loss.
    local = tmp_path / "local"
    run_script(
        script_args(
            paths,
            spm,
            local,
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "1",
            "--global_contrastive",
            "False",
        ),
        tmp_path,
        2,
    )
    assert json.loads((local / "results.json").read_text())["train_loss"] != pytest.approx(one_loss, abs=1e-3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["images"][1].pop("sentences"), r"images\[1\].*no 'sentences' field"),
        (lambda d: [image.update(split="train") for image in d["images"]], "test"),
    ],
)
def test_bad_karpathy_files_are_named(data, tmp_path, mutate, message):
    paths, spm = data
    broken = json.loads(paths.karpathy_json.read_text())
    mutate(broken)
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(broken))
    args = script_args(paths, spm, tmp_path / "out", "--max_steps", "1")
    args[args.index("--karpathy_json") + 1] = str(bad)
    with pytest.raises(ValueError, match=message) as error:
        load_example_script(SCRIPT).main(args)
    assert "broken.json" in str(error.value)


def test_missing_image_is_named(data, tmp_path):
    paths, spm = data
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "images/nope.png", "caption": "a red circle"}) + "\n")
    args = script_args(paths, spm, tmp_path / "out", "--max_steps", "1", "--train_file", str(jsonl))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_example_script(SCRIPT).main(args)
