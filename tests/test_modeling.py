"""Tiny-config tests of the BEiT-3 model classes: shapes, routing, masks, errors, losses, gradients, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from beit3_hf import (
    BEIT3_PRESETS,
    Beit3Config,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)
from beit3_hf.models.beit3.modeling_beit3 import Beit3Multiway

from oracle_utils import randomize_, tiny_config

BATCH = 3


def make_model(cls, task="backbone", seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(task, **overrides))
    randomize_(model, seed)
    return model.eval()


def text_batch(config: Beit3Config, lengths=(6, 4, 3), text_len=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), text_len), generator=generator)
    attention_mask = torch.zeros(len(lengths), text_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0], input_ids[row, length - 1] = 0, 2
        input_ids[row, length:] = 1
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def images(config: Beit3Config, batch=BATCH, size=None, seed=2):
    size = size or config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 64, "num_attention_heads": 5}, "divisible by num_attention_heads"),
        ({"image_size": 30, "patch_size": 16}, "image_size \\(30\\) must be divisible by patch_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"hidden_act": "relu"}, "hidden_act must be one of"),
        ({"drop_path_rate": 1.5}, "drop_path_rate must be in"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be positive"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Beit3Config(**kwargs)


def test_presets_cover_released_sizes():
    assert set(BEIT3_PRESETS) == {
        f"beit3-{size}-patch16-{image}" for size in ("base", "large") for image in (224, 384, 480, 768)
    }
    large = Beit3Config.from_preset("beit3-large-patch16-480", drop_path_rate=0.15)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    assert (large.intermediate_size, large.num_patches, large.drop_path_rate) == (4096, 900, 0.15)
    assert large.vocab_size == 64010 and large.mask_token_id == 64001
    with pytest.raises(ValueError, match="Unknown BEiT-3 preset"):
        Beit3Config.from_preset("beit3-huge")


def test_base_parameter_count_matches_the_original():
    # The README's count of the retrieval backbone at 224: 222,167,041 parameters (unilm_beit3.md, section 2.3).
    with torch.device("meta"):
        model = Beit3ForImageTextRetrieval(Beit3Config.from_preset("beit3-base-patch16-224"))
    # Ours drops the two unused rows of both position tables: 2 * 2 * 768 fewer parameters.
    assert sum(p.numel() for p in model.parameters()) == 222_167_041 - 4 * 768


# ---------------------------------------------------------------------------------------------------------------------
# Multiway routing and the encoder
# ---------------------------------------------------------------------------------------------------------------------


def test_multiway_routes_tokens_by_split_position():
    torch.manual_seed(0)
    multiway = Beit3Multiway(vision=torch.nn.Linear(4, 4), text=torch.nn.Linear(4, 4))
    hidden = torch.randn(2, 7, 4)
    assert torch.equal(multiway(hidden, 7), multiway.vision(hidden))
    assert torch.equal(multiway(hidden, 0), multiway.text(hidden))
    mixed = multiway(hidden, 3)
    assert torch.equal(mixed[:, :3], multiway.vision(hidden[:, :3]))
    assert torch.equal(mixed[:, 3:], multiway.text(hidden[:, 3:]))


def test_fused_sequence_is_vision_then_text():
    model = make_model(Beit3Model)
    config = model.config
    input_ids, attention_mask = text_batch(config)
    out = model(pixel_values=images(config), input_ids=input_ids, attention_mask=attention_mask)
    assert out.last_hidden_state.shape == (BATCH, config.num_patches + 1 + input_ids.shape[1], config.hidden_size)
    assert model(pixel_values=images(config)).last_hidden_state.shape == (BATCH, 5, config.hidden_size)
    assert model(input_ids=input_ids).last_hidden_state.shape == (BATCH, 6, config.hidden_size)


def test_padding_does_not_change_attended_tokens():
    model = make_model(Beit3Model)
    input_ids, attention_mask = text_batch(model.config, lengths=(4, 4, 4), text_len=4)
    padded_ids = torch.cat([input_ids, torch.ones(BATCH, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(BATCH, 5, dtype=torch.long)], dim=1)
    pixel_values = images(model.config)
    short = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    long = model(pixel_values=pixel_values, input_ids=padded_ids, attention_mask=padded_mask).last_hidden_state
    torch.testing.assert_close(long[:, : short.shape[1]], short, atol=1e-5, rtol=1e-5)
    # Without the mask the padding would be attended to and change the result.
    unmasked = model(pixel_values=pixel_values, input_ids=padded_ids).last_hidden_state
    assert (unmasked[:, : short.shape[1]] - short).abs().max() > 1e-3


def test_eager_and_sdpa_agree():
    model = make_model(Beit3Model)
    input_ids, attention_mask = text_batch(model.config)
    inputs = {"pixel_values": images(model.config), "input_ids": input_ids, "attention_mask": attention_mask}
    model.set_attn_implementation("eager")
    eager = model(**inputs).last_hidden_state
    model.set_attn_implementation("sdpa")
    sdpa = model(**inputs).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_hidden_states_and_attentions():
    model = make_model(Beit3Model, attn_implementation="eager")
    model.set_attn_implementation("eager")
    input_ids, attention_mask = text_batch(model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (BATCH, 4, 6, 6)
    # Padding keys get no attention.
    assert out.attentions[0][2, :, :, 3:].abs().max() == 0


def test_interpolate_pos_encoding_runs_other_sizes_in_half_precision():
    model = make_model(Beit3Model)
    with pytest.raises(ValueError, match="doesn't match the model .*interpolate_pos_encoding=True"):
        model(pixel_values=images(model.config, size=48))
    out = model(pixel_values=images(model.config, size=48), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (BATCH, 1 + 9, 64)
    # Same size with interpolation on is the identity.
    torch.testing.assert_close(
        model(pixel_values=images(model.config), interpolate_pos_encoding=True).last_hidden_state,
        model(pixel_values=images(model.config)).last_hidden_state,
    )
    half = model.to(torch.bfloat16)
    out = half(pixel_values=images(model.config, size=64).bfloat16(), interpolate_pos_encoding=True)
    assert out.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(out.last_hidden_state.float()).all()


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ({}, ValueError, "Pass pixel_values, input_ids, or both"),
        ({"pixel_values": torch.randn(2, 3, 32)}, ValueError, "pixel_values must have shape"),
        ({"pixel_values": torch.randn(2, 1, 32, 32)}, ValueError, "has 1 channels"),
        ({"pixel_values": torch.randn(2, 3, 40, 40)}, ValueError, "multiple of the patch size"),
        ({"input_ids": torch.zeros(2, 31, dtype=torch.long)}, ValueError, "longer than the position table"),
        (
            {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 6)},
            ValueError,
            "attention_mask shape \\(2, 6\\) doesn't match input_ids shape \\(2, 5\\)",
        ),
        ({"pixel_values": torch.randn(2, 3, 32, 32), "attention_mask": torch.ones(2, 6)}, ValueError, "no input_ids"),
        (
            {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.zeros(3, 5, dtype=torch.long)},
            ValueError,
            "batch size 2 but input_ids has 3",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(inputs, error, message):
    model = make_model(Beit3Model)
    with pytest.raises(error, match=message):
        model(**inputs)


def test_every_parameter_gets_a_gradient():
    model = make_model(Beit3Model).train()
    input_ids, attention_mask = text_batch(model.config)
    masked = torch.zeros(BATCH, model.config.num_patches, dtype=torch.bool)
    masked[:, 1] = True
    out = model(
        pixel_values=images(model.config), input_ids=input_ids, attention_mask=attention_mask, bool_masked_pos=masked
    )
    out.last_hidden_state.square().mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []


# `gradient_checkpointing_enable` is the name that exists on every supported transformers (5.13 has no alias).
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model(Beit3ForImageTextRetrieval).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        input_ids, attention_mask = text_batch(model.config)
        model(
            pixel_values=images(model.config), input_ids=input_ids, attention_mask=attention_mask, return_loss=True
        ).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_drop_path_is_active_only_in_training():
    model = make_model(Beit3Model, drop_path_rate=0.5)
    pixel_values = images(model.config)
    torch.testing.assert_close(
        model(pixel_values=pixel_values).last_hidden_state, model(pixel_values=pixel_values).last_hidden_state
    )
    model.train()
    torch.manual_seed(0)
    first = model(pixel_values=pixel_values).last_hidden_state
    second = model(pixel_values=pixel_values).last_hidden_state
    assert (first - second).abs().max() > 0
    assert model.encoder.layers[0].drop_path.drop_prob == 0.0 and model.encoder.layers[-1].drop_path.drop_prob == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


def test_image_classification_losses():
    model = make_model(Beit3ForImageClassification, "image-classification")
    pixel_values = images(model.config)
    labels = torch.tensor([0, 3, 4])
    out = model(pixel_values=pixel_values, labels=labels)
    assert next(iter(out)) == "loss"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    soft = torch.softmax(torch.randn(BATCH, 5), dim=-1)
    soft_loss = model(pixel_values=pixel_values, labels=soft).loss
    torch.testing.assert_close(soft_loss, -(soft * out.logits.log_softmax(-1)).sum(-1).mean())
    with pytest.raises(ValueError, match="soft targets and must have the logits' shape"):
        model(pixel_values=pixel_values, labels=torch.rand(BATCH, 4))
    with pytest.raises(ValueError, match="needs pixel_values"):
        model()


def test_classification_head_starts_small_like_the_original():
    torch.manual_seed(0)
    model = Beit3ForImageClassification(tiny_config("image-classification"))
    assert model.classifier.weight.abs().max() <= 0.02 * 0.001 + 1e-9
    assert model.beit3.encoder.layers[0].ffn.vision.fc1.weight.abs().max() > 0.01
    # torchscale initialises token embeddings with std hidden_size ** -0.5 (= 0.125 here).
    assert abs(model.beit3.text_embeddings.token_embedding.weight.std().item() - 0.125) < 0.01
    nlvr2 = Beit3ForVisualReasoning(tiny_config("nlvr2"))
    assert nlvr2.classifier.dense.weight.abs().max() <= 0.02 * 0.001 + 1e-9
    assert math.isclose(Beit3ForImageTextRetrieval(tiny_config()).logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_retrieval_outputs_and_loss():
    model = make_model(Beit3ForImageTextRetrieval)
    input_ids, attention_mask = text_batch(model.config)
    pixel_values = images(model.config)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    assert next(iter(out)) == "loss"
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(BATCH))
    torch.testing.assert_close(out.image_embeds, model.get_image_features(pixel_values))
    torch.testing.assert_close(out.text_embeds, model.get_text_features(input_ids, attention_mask))
    logits = model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, logits)
    torch.testing.assert_close(out.logits_per_text, logits.t())
    targets = torch.arange(BATCH)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    torch.testing.assert_close(out.loss, expected)
    only_text = model(input_ids=input_ids, attention_mask=attention_mask)
    assert only_text.image_embeds is None and only_text.logits_per_image is None
    with pytest.raises(ValueError, match="return_loss=True needs both"):
        model(input_ids=input_ids, return_loss=True)


def test_vqa_loss_is_mean_bce_times_answers():
    model = make_model(Beit3ForVisualQuestionAnswering, "vqa")
    input_ids, attention_mask = text_batch(model.config)
    labels = torch.zeros(BATCH, 7)
    labels[0, 2], labels[1, 0], labels[2, 6] = 1.0, 0.3, 0.6
    out = model(pixel_values=images(model.config), input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = F.binary_cross_entropy_with_logits(out.logits, labels, reduction="sum") / BATCH
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="soft scores of shape"):
        model(pixel_values=images(model.config), input_ids=input_ids, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="needs both pixel_values and input_ids"):
        model(pixel_values=images(model.config))


def test_visual_reasoning_pairs():
    model = make_model(Beit3ForVisualReasoning, "nlvr2")
    input_ids, attention_mask = text_batch(model.config)
    pairs = torch.stack([images(model.config, seed=3), images(model.config, seed=4)], dim=1)
    out = model(pixel_values=pairs, input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (BATCH, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 1, 1])))
    # Swapping the images of a pair changes the prediction (the head sees them in order).
    swapped = model(pixel_values=pairs.flip(1), input_ids=input_ids, attention_mask=attention_mask).logits
    assert (swapped - out.logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image pair per example"):
        model(pixel_values=images(model.config), input_ids=input_ids)


def test_return_dict_false_gives_tuples_with_loss_first():
    model = make_model(Beit3ForImageClassification, "image-classification")
    out = model(pixel_values=images(model.config), labels=torch.tensor([0, 1, 2]), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (BATCH, 5)


# ---------------------------------------------------------------------------------------------------------------------
# Saving and the Auto classes (in this process; see test_remote_code.py for fresh processes)
# ---------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_code_and_auto_map(tmp_path):
    model = make_model(Beit3ForImageClassification, "image-classification")
    model.save_pretrained(tmp_path)
    assert {"configuration_beit3.py", "modeling_beit3.py", "model.safetensors", "config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["Beit3ForImageClassification"]
    assert config.auto_map == {
        "AutoConfig": "configuration_beit3.Beit3Config",
        "AutoModel": "modeling_beit3.Beit3ForImageClassification",
        "AutoModelForImageClassification": "modeling_beit3.Beit3ForImageClassification",
    }
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = images(model.config)
    torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_shared_config_does_not_leak_auto_map_entries():
    config = tiny_config("vqa")
    Beit3ForVisualQuestionAnswering(config)
    Beit3ForImageTextRetrieval(config)
    assert config.auto_map == {
        "AutoConfig": "configuration_beit3.Beit3Config",
        "AutoModel": "modeling_beit3.Beit3ForImageTextRetrieval",
        "AutoModelForZeroShotImageClassification": "modeling_beit3.Beit3ForImageTextRetrieval",
    }


def test_auto_model_builds_from_config():
    assert type(AutoModel.from_config(tiny_config())) is Beit3Model
