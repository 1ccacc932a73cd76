"""No run loses its progress: the scripts' checkpoint rules (`resolve_checkpoint`), a retrieval run killed with SIGKILL
while saving a checkpoint and rerun with the same command (bit-exact with an uninterrupted run), and an image
classification run continued from its last checkpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from beit3_hf.testing.synthetic_data import write_synthetic_dataset
from beit3_hf.training.scripts import ScriptTrainingArguments, last_complete_checkpoint, resolve_checkpoint

from oracle_utils import load_example_script, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ROOT / "examples" / "retrieval" / "run_retrieval.py"
CLASSIFICATION = ROOT / "examples" / "image-classification" / "run_image_classification.py"
COMPLETE = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


# ----------------------------------------------------------------------------------------------------------------
# The rules, on fake checkpoint folders
# ----------------------------------------------------------------------------------------------------------------


def fake_checkpoint(output_dir: Path, step: int, files=COMPLETE) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            save_file({"weight": torch.zeros(4, 4)}, path)
        elif name.endswith((".pt", ".pth")):
            torch.save({"state": torch.zeros(4)}, path)
        else:
            path.write_text("{}")
    return folder


def training_args(output_dir: Path, **kwargs) -> ScriptTrainingArguments:
    return ScriptTrainingArguments(output_dir=str(output_dir), do_train=True, use_cpu=True, report_to="none", **kwargs)


def test_fresh_or_empty_output_dir_starts_from_scratch(tmp_path):
    assert resolve_checkpoint(training_args(tmp_path / "new")) is None
    (tmp_path / "empty").mkdir()
    assert resolve_checkpoint(training_args(tmp_path / "empty")) is None


def test_non_empty_output_dir_without_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # e.g. a finished run saved with --save_strategy no
    with pytest.raises(FileExistsError, match=r"is not empty and holds no checkpoint.*--overwrite_output_dir"):
        resolve_checkpoint(training_args(tmp_path))
    assert resolve_checkpoint(training_args(tmp_path, overwrite_output_dir=True)) is None


def test_last_complete_checkpoint_is_resumed_automatically(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, files=("model.safetensors",))  # a run killed while saving it
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(training_args(tmp_path)) == str(tmp_path / "checkpoint-10")  # not 2 (numeric order)
    assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-12" in caplog.text
    assert resolve_checkpoint(training_args(tmp_path, resume_from_checkpoint="last")) == str(
        tmp_path / "checkpoint-10"
    )
    # --overwrite_output_dir starts again from scratch.
    assert resolve_checkpoint(training_args(tmp_path, overwrite_output_dir=True)) is None


def test_explicit_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume_from_checkpoint last: .* holds no complete checkpoint"):
        resolve_checkpoint(training_args(tmp_path, resume_from_checkpoint="last"))
    with pytest.raises(FileNotFoundError, match=r"--resume_from_checkpoint .*nowhere: no such folder"):
        resolve_checkpoint(training_args(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")))
    partial = fake_checkpoint(tmp_path / "a", 3, files=("model.safetensors",))
    with pytest.raises(ValueError, match=r"not a complete Trainer checkpoint \(no trainer_state.json\)"):
        resolve_checkpoint(training_args(tmp_path, resume_from_checkpoint=str(partial)))
    other = fake_checkpoint(tmp_path / "b", 7)
    assert resolve_checkpoint(training_args(tmp_path / "c", resume_from_checkpoint=str(other))) == str(other)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.safetensors", truncate),
        ("optimizer.pt", truncate),
        ("scheduler.pt", lambda path: path.write_bytes(b"")),
        ("trainer_state.json", lambda path: path.write_text('{"global_step": 1')),
        ("trainer_state.json", lambda path: path.write_bytes(b'{"best_model": "\xff\xfe"}')),  # not UTF-8
    ],
)
def test_truncated_checkpoint_files_are_named_and_skipped(tmp_path, caplog, name, damage):
    fake_checkpoint(tmp_path, 2)
    damage(fake_checkpoint(tmp_path, 4) / name)  # a run killed while writing this file
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(training_args(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert f"checkpoint-4 ({name} is truncated or corrupt" in caplog.text
    with pytest.raises(ValueError, match=f"not a complete Trainer checkpoint \\({name} is truncated or corrupt"):
        resolve_checkpoint(training_args(tmp_path / "other", resume_from_checkpoint=str(tmp_path / "checkpoint-4")))


def test_checkpoint_without_optimizer_state_is_refused_unless_accepted(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4, files=("trainer_state.json", "model.safetensors"))  # --save_only_model
    with pytest.raises(ValueError, match=r"no optimizer.pt / scheduler.pt .*--ignore_missing_optimizer_state"):
        resolve_checkpoint(training_args(tmp_path))
    with caplog.at_level(logging.WARNING):
        accepted = resolve_checkpoint(training_args(tmp_path, ignore_missing_optimizer_state=True))
    assert accepted == str(tmp_path / "checkpoint-4") and "restarts the optimizer" in caplog.text
    assert last_complete_checkpoint(tmp_path / "none") is None


# ----------------------------------------------------------------------------------------------------------------
# Retrieval: SIGKILL while saving a checkpoint, then the same command again
# ----------------------------------------------------------------------------------------------------------------

# Runs the script, but the first time a run saves the optimizer of checkpoint-4 (the weights already written), the
# process kills itself with SIGKILL, as a preempted job dies: checkpoint-2 is complete, checkpoint-4 is half-written.
KILL_WHILE_SAVING = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from transformers import Trainer

    save = Trainer._save_optimizer_and_scheduler
    marker = os.environ["KILLED_ONCE_MARKER"]

    def save_or_die(self, output_dir):
        if output_dir.endswith("checkpoint-4") and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save_or_die
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    paths = write_synthetic_dataset(
        root / "data", num_train=12, num_val=4, num_test=0, image_size=32, captions_per_image=2,
        classification_train_per_class=0, classification_val_per_class=0,
    )  # fmt: skip
    captions = [
        s["raw"] for image in json.loads(paths.karpathy_json.read_text())["images"] for s in image["sentences"]
    ]
    return paths, train_sentencepiece(root, captions, model_type="bpe", vocab_size=120)


def retrieval_args(paths, spm, output_dir: Path) -> list[str]:
    tiny = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=16"
    return [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", tiny + ",max_position_embeddings=24,vocab_size=200"),
        *("--sentencepiece_model", str(spm), "--max_text_length", "20"),
        *("--karpathy_json", str(paths.karpathy_json), "--image_root", str(paths.image_root)),
        *("--output_dir", str(output_dir), "--do_train", "--do_eval", "--report_to", "none", "--seed", "3"),
        # No augmentation and no drop path: the only randomness left is the data order, which resuming restores.
        *("--min_crop_scale", "1.0", "--hflip", "False", "--learning_rate", "1e-3", "--logging_steps", "1"),
        *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--max_steps", "6"),
        *("--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--save_strategy", "steps", "--save_steps", "2"),
        *("--dataloader_num_workers", "0", "--disable_tqdm", "True"),
    ]  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_killed_retrieval_run_resumes_with_the_same_command(retrieval_data, tmp_path):
    paths, spm = retrieval_data
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "KILLED_ONCE_MARKER": str(tmp_path / "killed"),
    }
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "interrupted"
    # The uninterrupted run, in this process with one thread, as the subprocesses (OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_example_script(RETRIEVAL).main(retrieval_args(paths, spm, reference))
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(RETRIEVAL.stem, None)

    command = [sys.executable, "-c", KILL_WHILE_SAVING, str(RETRIEVAL), *retrieval_args(paths, spm, resumed)]
    killed = run(command, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (resumed / "checkpoint-4" / "model.safetensors").is_file()  # half-written: weights, no optimizer
    assert not (resumed / "checkpoint-4" / "optimizer.pt").exists()
    assert not (resumed / "model.safetensors").exists()

    again = run(command, env)  # the very same command
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "Skipping the incomplete checkpoint" in log and "Resuming from the last checkpoint" in log, log[-5000:]
    assert "checkpoint-2" in log

    # It went on from step 3 with the optimizer, the schedule and the data order of step 2: the losses of every
    # step, the final weights and the final recall equal those of the uninterrupted run, bit for bit.
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert losses(resumed) == losses(reference) and sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
    expected, actual = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    metrics = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
    recall = {k: v for k, v in json.loads((reference / "eval_results.json").read_text()).items() if k[5:] in metrics}
    assert recall and recall.items() <= json.loads((resumed / "eval_results.json").read_text()).items()


# ----------------------------------------------------------------------------------------------------------------
# Image classification: rerunning continues from the last checkpoint
# ----------------------------------------------------------------------------------------------------------------


def test_classification_rerun_continues_from_the_last_checkpoint(tmp_path):
    paths = write_synthetic_dataset(
        tmp_path / "synthetic", num_train=1, num_val=0, num_test=0, image_size=32, num_colours=2, num_shapes=2,
        classification_train_per_class=2, classification_val_per_class=1,
    )  # fmt: skip
    output = tmp_path / "out"
    tiny = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,vocab_size=100"
    args = [
        *("--data_dir", str(paths.imagenet), "--config_name", "beit3-base-patch16-224", "--config_overrides", tiny),
        *("--output_dir", str(output), "--cache_dir", str(tmp_path / "cache"), "--do_train", "--seed", "0"),
        *("--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1"),
        *("--dataloader_pin_memory", "False", "--report_to", "none"),
    ]  # fmt: skip
    script = load_example_script(CLASSIFICATION)
    try:
        script.main([*args, "--max_steps", "2"])
        script.main([*args, "--max_steps", "3"])  # a longer run, into the same folder: it continues at step 3
        state = json.loads((output / "trainer_state.json").read_text())
        assert state["global_step"] == 3 and sorted(losses(output)) == [1, 2, 3]
        (output / "checkpoint-3" / "optimizer.pt").unlink()  # as if saved with --save_only_model
        with pytest.raises(ValueError, match=r"checkpoint-3 has no optimizer.pt"):
            script.main([*args, "--max_steps", "4"])
    finally:
        sys.modules.pop(CLASSIFICATION.stem, None)
