"""LoRA through PEFT on BEiT-3's experts: targets, modality isolation, self-regularisation, merging."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from beit3_hf import Beit3Config, Beit3Model
from beit3_hf.training.lora import add_lora, lora_target_regex, main, self_regularization_loss

from oracle_utils import run_fresh_python

PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "ffn.{}.fc1",
    "ffn.{}.fc2",
]


def tiny_model(seed: int = 0) -> Beit3Model:
    torch.manual_seed(seed)
    config = Beit3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         image_size=32, patch_size=16, vocab_size=60, max_position_embeddings=20)  # fmt: skip
    return Beit3Model(config).eval()


def expected_targets(expert: str) -> set[str]:
    names = set()
    for layer in range(2):
        for projection in PROJECTIONS:
            name = projection.format(expert) if "{}" in projection else f"{projection}.{expert}"
            names.add(f"encoder.layers.{layer}.{name}")
    return names


@pytest.mark.parametrize("target", ["text", "vision", "all"])
def test_shortcuts_target_every_projection_of_their_experts(target):
    peft_model = add_lora(tiny_model(), rank=2, alpha=2, target=target)
    experts = ["text", "vision"] if target == "all" else [target]
    assert set(peft_model.targeted_module_names) == set().union(*(expected_targets(e) for e in experts))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_a_regex_target_and_errors():
    peft_model = add_lora(tiny_model(), rank=2, alpha=2, target=r".*\.self_attn\.(q|v)_proj\.text")
    assert set(peft_model.targeted_module_names) == {
        f"encoder.layers.{layer}.self_attn.{proj}_proj.text" for layer in range(2) for proj in "qv"
    }
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(tiny_model(), rank=2, alpha=2, target=r".*\.nothing")
    with pytest.raises(ValueError, match="neither one of"):
        lora_target_regex("text[")
    with pytest.raises(ValueError, match="--lora_rank must be positive"):
        add_lora(tiny_model(), rank=0, alpha=2)


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
        "input_ids": torch.randint(3, 60, (2, 6), generator=generator),
    }


def train_text_only(peft_model, steps: int = 3) -> None:
    """A few optimisation steps of a text-only objective (with the self-regularisation term)."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(steps):
        hidden = peft_model(input_ids=inputs(step)["input_ids"]).last_hidden_state
        loss = hidden.pow(2).mean() + 1e-3 * self_regularization_loss(peft_model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def test_text_only_lora_leaves_vision_outputs_bit_identical():
    base = tiny_model()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        vision_before = base(pixel_values=inputs()["pixel_values"]).last_hidden_state
        fused_before = base(**inputs()).last_hidden_state
    peft_model = add_lora(base, rank=4, alpha=4, target="text")
    train_text_only(peft_model)
    with torch.no_grad():
        vision_after = peft_model(pixel_values=inputs()["pixel_values"]).last_hidden_state
        fused_after = peft_model(**inputs()).last_hidden_state
    assert torch.equal(vision_after, vision_before)
    assert (fused_after - fused_before).abs().max() > 1e-4, "the adapters must have learned something"
    base_weights = {k.replace("base_layer.", ""): v for k, v in peft_model.base_model.model.state_dict().items()}
    assert all(torch.equal(base_weights[key], value) for key, value in reference.items()), "base weights frozen"


def test_self_regularization_equals_the_formula():
    peft_model = add_lora(tiny_model(), rank=3, alpha=6, target="all")
    with torch.no_grad():  # B starts at zero: give it values so that the term is not trivially 0
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    expected = torch.zeros((), dtype=torch.float64)
    modules = dict(peft_model.named_modules())
    for name in peft_model.targeted_module_names:
        module = modules[f"base_model.model.{name}"]
        weight = module.base_layer.weight.double()
        update = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        for row in range(weight.shape[0]):  # written out, element by element
            for col in range(weight.shape[1]):
                expected += (weight[row, col] * update[row, col]) ** 2
    assert expected > 0
    torch.testing.assert_close(self_regularization_loss(peft_model).double(), expected, rtol=1e-5, atol=0)
    assert self_regularization_loss(tiny_model()).item() == 0.0


def test_merged_folder_has_no_lora_keys_and_equals_the_adapter_model(tmp_path):
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_model().save_pretrained(base_dir)
    base = Beit3Model.from_pretrained(base_dir)
    peft_model = add_lora(base, rank=4, alpha=8, target="all")
    train_text_only(peft_model)
    peft_model.save_pretrained(adapter_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in adapter_dir.iterdir()}
    with torch.no_grad():
        expected = peft_model(**inputs()).last_hidden_state
    assert main([str(adapter_dir), "--output", str(merged_dir)]) == 0
    assert not [key for key in load_file(merged_dir / "model.safetensors") if "lora" in key]
    assert main([str(adapter_dir), "--output", str(merged_dir)]) == 2  # never overwrite
    save_file({k: v.contiguous() for k, v in inputs().items()}, tmp_path / "inputs.safetensors")
    result = run_fresh_python(
        f"""
        import json, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(merged_dir)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**load_file({str(tmp_path / "inputs.safetensors")!r})).last_hidden_state
        save_file({{"out": out.contiguous()}}, "merged.safetensors")
        print(json.dumps({{"class": type(model).__name__}}))
        """,
        tmp_path,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"class": "Beit3Model"}
    actual = load_file(tmp_path / "merged.safetensors")["out"]
    assert (actual - expected).abs().max() <= 1e-5
