"""Parity with the original implementation (unilm `beit3` on torchscale 0.3.0) through the conversion CLI.

Each task: build the original model with random non-trivial weights, save it as an original checkpoint, convert it
with `python -m beit3_hf.convert`, and compare outputs (vision-only, text-only and fused inputs, padded text) in this
process with eager and SDPA attention, and in a fresh process that loads the folder with `trust_remote_code=True`
while `beit3_hf` cannot be imported.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from beit3_hf.conversion import checkpoint as convert
from beit3_hf.conversion import original
from beit3_hf.conversion.tasks import TASKS as TASK_TABLE

from oracle_utils import (
    PARITY_TOLERANCE,
    assert_parity,
    run_fresh_python,
    tiny_config,
    write_original_checkpoint,
)

pytestmark = pytest.mark.oracle("beit3")

TASKS = tuple(TASK_TABLE)
TOLERANCE = PARITY_TOLERANCE
EXPECTED_CLASS = {name: spec.model_class.__name__ for name, spec in TASK_TABLE.items()}
MASK_TOKEN_ID = 119  # the last id of the tiny vocabulary plays `<mask>` for captioning


def input_variants(task: str, config) -> dict[str, dict[str, torch.Tensor]]:
    """Named input sets for `task`: fused with padded text, and for the backbone also vision-only and text-only."""
    full = convert.random_inputs(config, task, batch_size=3, text_len=7, seed=11)
    if task != "backbone":
        return {"main": full}
    return {
        "fused": full,
        "vision": {"pixel_values": full["pixel_values"]},
        "text": {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]},
        "text-unpadded": {"input_ids": full["input_ids"][:1]},
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{task: (folder, original model, input variants)} with every task converted through the CLI."""
    root = tmp_path_factory.mktemp("parity")
    result = {}
    for seed, task in enumerate(TASKS):
        config = tiny_config(task)
        checkpoint = root / f"{task}.pth"
        # fp16 storage like the released checkpoints for one task, fp32 for the others.
        dtype = torch.float16 if task == "retrieval" else torch.float32
        reference = write_original_checkpoint(checkpoint, task, config, seed=seed, dtype=dtype)
        if dtype == torch.float16:  # the reference must run on exactly the weights the checkpoint holds
            reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
        folder = root / task
        args = ["--checkpoint", str(checkpoint), "--task", task, "--output", str(folder), "--num-attention-heads", "4"]
        if task == "captioning":
            args += ["--mask-token-id", str(MASK_TOKEN_ID)]
        assert convert.main(args) == 0
        result[task] = (folder, reference, input_variants(task, config))
    return result


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_model_matches_original(converted, task, attn_implementation):
    folder, reference, variants = converted[task]
    model = convert.TASK_CLASSES[task].from_pretrained(folder, attn_implementation=attn_implementation).eval()
    assert model.config._attn_implementation == attn_implementation
    for name, inputs in variants.items():
        expected = original.run_original(reference, task, **inputs)
        with torch.no_grad():
            actual = model(**inputs)
        assert_parity(actual, expected, "original", f"{task}/{name} {attn_implementation}")
        scale = max(value.abs().max().item() for value in expected.values())
        assert scale > 0.05, "outputs too small for the comparison to mean anything"


def test_fresh_process_auto_model_matches_original(converted, tmp_path):
    """AutoModel(trust_remote_code=True) in a new interpreter without beit3_hf returns each checkpoint's own class."""
    jobs = {}
    for task, (folder, _, variants) in converted.items():
        for name, inputs in variants.items():
            key = f"{task}/{name}"
            save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / f"{task}-{name}-inputs.safetensors")
            jobs[key] = {
                "folder": str(folder),
                "task": task,
                "inputs": str(tmp_path / f"{task}-{name}-inputs.safetensors"),
            }
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = run_fresh_python(
        """
        import json
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import (AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForImageTextToText,
                                  AutoModelForVisualQuestionAnswering, AutoModelForZeroShotImageClassification)

        task_auto = {"image-classification": AutoModelForImageClassification,
                     "retrieval": AutoModelForZeroShotImageClassification, "vqa": AutoModelForVisualQuestionAnswering,
                     "captioning": AutoModelForImageTextToText}
        report = {}
        for key, job in json.load(open("jobs.json")).items():
            config = AutoConfig.from_pretrained(job["folder"], trust_remote_code=True)
            outputs = {}
            for impl in ("eager", "sdpa"):
                model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True, attn_implementation=impl).eval()
                with torch.no_grad():
                    out = model(**load_file(job["inputs"]))
                outputs.update({f"{impl}.{k}": v for k, v in out.items() if isinstance(v, torch.Tensor)})
            if job["task"] in task_auto:
                task_model = task_auto[job["task"]].from_pretrained(job["folder"], trust_remote_code=True)
                assert type(task_model).__name__ == type(model).__name__
            save_file({k: v.contiguous() for k, v in outputs.items()}, key.replace("/", "-") + "-outputs.safetensors")
            report[key] = {"class": type(model).__name__, "architectures": config.architectures,
                           "module": type(model).__module__}
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in jobs:
        task, name = key.split("/")
        assert report[key]["class"] == EXPECTED_CLASS[task] == report[key]["architectures"][0]
        assert report[key]["module"].startswith("transformers_modules."), "must run the folder's copy of the code"
        _, reference, variants = converted[task]
        expected = original.run_original(reference, task, **variants[name])
        outputs = load_file(tmp_path / f"{task}-{name}-outputs.safetensors")
        for impl in ("eager", "sdpa"):
            actual = {k.split(".", 1)[1]: v for k, v in outputs.items() if k.startswith(impl + ".")}
            assert_parity(actual, expected, "original", f"fresh process {key} {impl}")


# ---------------------------------------------------------------------------------------------------------------------
# The converter
# ---------------------------------------------------------------------------------------------------------------------


def test_converter_reads_the_architecture_from_tensors(converted):
    folder, _, _ = converted["vqa"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 96)
    assert (config["image_size"], config["patch_size"], config["vocab_size"]) == (32, 16, 120)
    assert (config["max_position_embeddings"], config["use_final_layernorm"]) == (30, False)
    assert len(config["id2label"]) == 7
    weights = load_file(folder / "model.safetensors")
    assert weights["beit3.vision_embeddings.position_embedding.weight"].shape == (5, 64)  # CLS + 4 patches
    assert weights["beit3.text_embeddings.position_embedding.weight"].shape == (30, 64)


def test_resizing_positions_matches_the_original_loader(tmp_path):
    """--image-size interpolates the vision positions exactly as unilm's load_model_and_may_interpolate does."""
    from beit3.utils import load_model_and_may_interpolate

    config = tiny_config("retrieval")
    checkpoint = tmp_path / "ckpt.pth"
    write_original_checkpoint(checkpoint, "retrieval", config, seed=5, dtype=torch.float16)
    assert convert.main(["--checkpoint", str(checkpoint), "--task", "retrieval", "--output", str(tmp_path / "out"),
                         "--num-attention-heads", "4", "--image-size", "64"]) == 0  # fmt: skip
    big = tiny_config("retrieval", image_size=64)
    reference = original.build_original_model("retrieval", big)
    load_model_and_may_interpolate(str(checkpoint), reference, "model|module", "")  # our own trusted test file
    model = convert.TASK_CLASSES["retrieval"].from_pretrained(tmp_path / "out").eval()
    assert model.config.image_size == 64
    inputs = convert.random_inputs(big, "retrieval", seed=3)
    assert_parity(
        model(**inputs), original.run_original(reference.float(), "retrieval", **inputs), "original", "resized"
    )


def test_verify_flag_reports_parity(tmp_path, capsys):
    config = tiny_config("nlvr2")
    write_original_checkpoint(tmp_path / "nlvr2.pth", "nlvr2", config, seed=2)
    args = ["--checkpoint", str(tmp_path / "nlvr2.pth"), "--task", "nlvr2", "--output", str(tmp_path / "out")]
    assert convert.main([*args, "--num-attention-heads", "4", "--verify"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "Max |diff|" in line)
    assert float(line.rsplit(" ", 1)[1]) <= TOLERANCE


def test_backbone_drops_and_lists_pretraining_heads(tmp_path, capsys):
    config = tiny_config("backbone")
    heads = {"mlm_head.weight": torch.randn(120, 64), "mlm_head.bias": torch.randn(120)}
    write_original_checkpoint(tmp_path / "pt.pth", "backbone", config, extra=heads)
    out = tmp_path / "out"
    assert (
        convert.main(
            [
                "--checkpoint",
                str(tmp_path / "pt.pth"),
                "--task",
                "backbone",
                "--output",
                str(out),
                "--num-attention-heads",
                "4",
            ]
        )
        == 0
    )
    assert "Dropped 2 keys not used by --task backbone: mlm_head.bias, mlm_head.weight" in capsys.readouterr().out
    assert not any(key.startswith("mlm_head") for key in load_file(out / "model.safetensors"))


def test_default_heads_is_hidden_over_64(tmp_path):
    config = tiny_config("backbone", hidden_size=128, num_attention_heads=2)
    write_original_checkpoint(tmp_path / "b.pth", "backbone", config)
    model, _ = convert.convert_checkpoint(tmp_path / "b.pth", "backbone")
    assert model.config.num_attention_heads == 2


def test_deepspeed_module_container_is_accepted(tmp_path):
    config = tiny_config("image-classification")
    write_original_checkpoint(tmp_path / "ckpt.pth", "image-classification", config)
    state_dict = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model"]
    torch.save({"module": state_dict}, tmp_path / "ds.pth")
    model, _ = convert.convert_checkpoint(tmp_path / "ds.pth", "image-classification", num_attention_heads=4)
    assert model.config.num_labels == 5 and not model.config.use_final_layernorm


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            "vqa",
            "not used by --task vqa: fc_norm.bias, fc_norm.weight, head.bias, head.weight.* looks like a 'image-classification' checkpoint",
        ),
        ("retrieval", "not used by --task retrieval.* looks like a 'image-classification' checkpoint"),
        ("backbone", "not used by --task backbone: fc_norm.bias"),
    ],
)
def test_checkpoint_of_another_task_is_refused(tmp_path, capsys, task, message):
    config = tiny_config("image-classification")
    write_original_checkpoint(tmp_path / "cls.pth", "image-classification", config)
    assert (
        convert.main(["--checkpoint", str(tmp_path / "cls.pth"), "--task", task, "--output", str(tmp_path / "out")])
        == 2
    )
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert_checkpoint(tmp_path / "cls.pth", task)
    assert not (tmp_path / "out").exists()


def test_missing_head_weights_are_refused(tmp_path):
    config = tiny_config("backbone")
    write_original_checkpoint(tmp_path / "backbone.pth", "backbone", config)
    with pytest.raises(convert.ConversionError, match="weights of --task retrieval are missing.*logit_scale"):
        convert.convert_checkpoint(tmp_path / "backbone.pth", "retrieval")


def test_unreadable_checkpoints_are_refused(tmp_path):
    config = tiny_config("backbone")
    write_original_checkpoint(tmp_path / "good.pth", "backbone", config)
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pth")
    for name, message in [
        ("missing.pth", "does not exist"),
        ("truncated.pth", "corrupt, truncated or not a PyTorch state dict"),
        ("text.pth", "corrupt, truncated or not a PyTorch state dict"),
        ("other.pth", "not an original BEiT-3 checkpoint"),
    ]:
        with pytest.raises(convert.ConversionError, match=message):
            convert.convert_checkpoint(tmp_path / name, "backbone")


def test_checkpoints_that_run_code_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": {"beit3.text_embed.weight": torch.zeros(2, 2)}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(convert.ConversionError, match="corrupt, truncated or not a PyTorch state dict"):
        convert.convert_checkpoint(tmp_path / "evil.pth", "backbone")


def test_resize_rejects_sizes_off_the_patch_grid(tmp_path):
    config = tiny_config("backbone")
    write_original_checkpoint(tmp_path / "b.pth", "backbone", config)
    with pytest.raises(convert.ConversionError, match="not a multiple of the patch size 16"):
        convert.convert_checkpoint(tmp_path / "b.pth", "backbone", image_size=40)


def test_half_precision_output(tmp_path):
    config = tiny_config("backbone")
    write_original_checkpoint(tmp_path / "b.pth", "backbone", config)
    model, _ = convert.convert_checkpoint(tmp_path / "b.pth", "backbone", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert math.isfinite(model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.float().sum().item())
