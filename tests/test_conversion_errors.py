"""The converter never writes a wrong model or loses an output silently: each bad input gets an error naming it.

Runs on the golden backbone fixture (no original code needed), except the `--verify` cases.
"""

from __future__ import annotations

import pytest
import torch

from beit3_hf.conversion import checkpoint as convert

from oracle_utils import original_checkpoint, read_fixture

HEADS = ["--num-attention-heads", "2"]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    tensors, _ = read_fixture("backbone")
    return tensors


def run(capsys, *args: str) -> tuple[int, str]:
    status = convert.main([*args, *HEADS])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_integer_weights_are_refused_by_name(tmp_path, capsys, weights):
    key = "beit3.encoder.layers.1.ffn.A.fc2.bias"
    checkpoint = original_checkpoint(weights, tmp_path / "int.pth", {key: weights[f"weights/{key}"].long()})
    status, output = run(
        capsys, "--checkpoint", str(checkpoint), "--task", "backbone", "--output", str(tmp_path / "o")
    )
    assert status == 2 and "not floating-point tensors" in output and key in output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, capsys, weights, value):
    key = "beit3.encoder.layers.0.self_attn.q_proj.B.weight"
    broken = weights[f"weights/{key}"].clone()
    broken[0, 0] = value
    checkpoint = original_checkpoint(weights, tmp_path / "nan.pth", {key: broken})
    status, output = run(
        capsys, "--checkpoint", str(checkpoint), "--task", "backbone", "--output", str(tmp_path / "o")
    )
    assert status == 2 and "NaN or inf" in output and key in output


def test_missing_architecture_keys_are_listed(tmp_path, capsys, weights):
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]["beit3.vision_embed.proj.weight"], state["model"]["beit3.encoder.embed_positions.B.weight"]
    torch.save(state, checkpoint)
    status, output = run(
        capsys, "--checkpoint", str(checkpoint), "--task", "backbone", "--output", str(tmp_path / "o")
    )
    assert status == 2 and "lacks 2 of the keys" in output
    assert "beit3.vision_embed.proj.weight" in output and "beit3.encoder.embed_positions.B.weight" in output


def test_output_that_is_a_file_is_refused_before_reading_the_checkpoint(tmp_path, capsys):
    (tmp_path / "model").write_text("not a folder")
    status, output = run(capsys, "--checkpoint", str(tmp_path / "absent.pth"), "--task", "backbone",
                         "--output", str(tmp_path / "model"))  # fmt: skip
    assert status == 2 and "is an existing file" in output and "absent.pth" not in output


def test_unwritable_output_fails_before_the_conversion(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status, output = run(capsys, "--checkpoint", str(tmp_path / "absent.pth"), "--task", "backbone",
                         "--output", str(tmp_path / "file" / "sub" / "model"))  # fmt: skip
    assert status == 2 and "cannot be written" in output and "absent.pth" not in output


def test_non_empty_output_needs_overwrite_which_removes_stale_files(tmp_path, capsys, weights):
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "preprocessor_config.json").write_text("{}")  # an earlier conversion's processor
    args = ["--checkpoint", str(checkpoint), "--task", "backbone", "--output", str(out)]
    status, output = run(capsys, *args)
    assert status == 2 and "not empty" in output and "--overwrite" in output
    assert [path.name for path in out.iterdir()] == ["preprocessor_config.json"]
    status, output = run(capsys, *args, "--overwrite")
    assert status == 0, output
    assert not (out / "preprocessor_config.json").exists() and (out / "model.safetensors").is_file()
    assert "2 attention heads" in output
    assert not list(tmp_path.glob(".out.partial-*")), "the staging folder must not be left behind"


def test_overwrite_never_replaces_the_current_folder(tmp_path, capsys, weights, monkeypatch):
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "sub")
    for output in (".", ".."):
        status, output_text = run(capsys, "--checkpoint", str(checkpoint), "--task", "backbone", "--output", output,
                                  "--overwrite")  # fmt: skip
        assert status == 2 and "holds the current or the home folder" in output_text
    assert (work / "notes.txt").read_text() == "mine" and (work / "sub").is_dir()
    assert not list(tmp_path.rglob(".*.partial-*"))


def test_converted_folder_has_the_usual_permissions(tmp_path, capsys, weights):
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    status, output = run(
        capsys, "--checkpoint", str(checkpoint), "--task", "backbone", "--output", str(tmp_path / "o")
    )
    assert status == 0, output
    made = tmp_path / "made"
    made.mkdir()  # what the umask gives a new folder (a private staging folder would be 0o700)
    assert (tmp_path / "o").stat().st_mode & 0o777 == made.stat().st_mode & 0o777


def test_failed_conversion_leaves_the_existing_output_untouched(tmp_path, capsys, weights):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"kept": true}')
    status, _ = run(capsys, "--checkpoint", str(tmp_path / "absent.pth"), "--task", "backbone",
                    "--output", str(out), "--overwrite")  # fmt: skip
    assert status == 2 and (out / "config.json").read_text() == '{"kept": true}'
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("value", ["0", "-32", "abc"])
def test_image_size_must_be_a_positive_integer(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--checkpoint", "x.pth", "--task", "backbone", "--output", str(tmp_path), "--image-size", value])
    assert exit_info.value.code == 2 and "--image-size" in capsys.readouterr().err


def test_verify_fails_on_a_non_finite_difference(tmp_path, capsys, weights, monkeypatch):
    """`nan > 1e-4` is False: a NaN difference must fail --verify, not pass it."""
    monkeypatch.setattr(convert, "verify_against_original", lambda *args, **kwargs: float("nan"))
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    status, output = run(capsys, "--checkpoint", str(checkpoint), "--task", "backbone",
                         "--output", str(tmp_path / "out"), "--verify")  # fmt: skip
    assert status == 2 and "differ from the original by nan" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.oracle("beit3")
def test_verify_reports_the_assumed_head_count(tmp_path, capsys, weights):
    checkpoint = original_checkpoint(weights, tmp_path / "ckpt.pth")
    status, output = run(capsys, "--checkpoint", str(checkpoint), "--task", "backbone",
                         "--output", str(tmp_path / "out"), "--verify")  # fmt: skip
    assert status == 0, output
    line = next(line for line in output.splitlines() if "Max |diff|" in line)
    assert "2 attention heads assumed" in line and float(line.rsplit(" ", 1)[1]) <= 1e-4
