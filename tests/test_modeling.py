"""Tiny-config tests of the BEiT-3 model classes: shapes, routing, masks, errors, losses, gradients, save/load,
the uniform head outputs, the attention bias, the key/value cache and vision-only models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.modeling_outputs import BaseModelOutputWithPooling

from beit3_hf import (
    BEIT3_PRESETS,
    Beit3Config,
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)
from beit3_hf.models.beit3 import modeling_beit3
from beit3_hf.models.beit3.modeling_beit3 import Beit3KeyValueCache, Beit3Multiway, build_attention_bias

from oracle_utils import randomize_, run_fresh_python, tiny_config

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


def test_a_mask_without_padding_is_dropped(monkeypatch):
    """No padding: no attention bias at all, so that SDPA can pick its fastest kernel; same outputs."""
    model = make_model(Beit3Model)
    key_masks = []
    build = modeling_beit3.build_attention_bias
    monkeypatch.setattr(modeling_beit3, "build_attention_bias", lambda key_mask, **kw: key_masks.append(key_mask) or build(key_mask, **kw))  # fmt: skip
    input_ids, attention_mask = text_batch(model.config, lengths=(6, 6, 6))
    with torch.no_grad():
        masked = model(pixel_values=images(model.config), input_ids=input_ids, attention_mask=attention_mask)
        unmasked = model(pixel_values=images(model.config), input_ids=input_ids)
        padded = text_batch(model.config, lengths=(6, 4, 3))
        model(pixel_values=images(model.config), input_ids=padded[0], attention_mask=padded[1])
    assert key_masks[0] is None and key_masks[1] is None and key_masks[2] is not None
    torch.testing.assert_close(masked.last_hidden_state, unmasked.last_hidden_state, rtol=0, atol=0)


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
    torch.testing.assert_close(out.image_embeds, model.get_image_features(pixel_values).pooler_output)
    torch.testing.assert_close(out.text_embeds, model.get_text_features(input_ids, attention_mask).pooler_output)
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
# Uniform head outputs
# ---------------------------------------------------------------------------------------------------------------------

HEADS = {
    Beit3Model: "backbone",
    Beit3ForImageClassification: "image-classification",
    Beit3ForVisualQuestionAnswering: "vqa",
    Beit3ForVisualReasoning: "nlvr2",
    Beit3ForCaptioning: "captioning",
}


def head_inputs(cls, config: Beit3Config) -> tuple[dict[str, torch.Tensor], int, int]:
    """Inputs of a head, the rows of its encoder batch and its encoder sequence length."""
    if cls is Beit3ForImageClassification:
        return {"pixel_values": images(config)}, BATCH, 5
    input_ids, attention_mask = text_batch(config)
    inputs = {"pixel_values": images(config), "input_ids": input_ids, "attention_mask": attention_mask}
    if cls is Beit3ForVisualReasoning:
        inputs["pixel_values"] = torch.stack([images(config, seed=3), images(config, seed=4)], dim=1)
        return inputs, 2 * BATCH, 5 + 6
    return inputs, BATCH, 5 + 6


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda cls: cls.__name__)
def test_every_head_returns_hidden_states_and_attentions(cls):
    model = make_model(cls, HEADS[cls])
    model.set_attn_implementation("eager")
    inputs, rows, seq_len = head_inputs(cls, model.config)
    plain = model(**inputs)
    assert plain.hidden_states is None and plain.attentions is None
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert {h.shape for h in out.hidden_states} == {(rows, seq_len, 64)}
    assert len(out.attentions) == model.config.num_hidden_layers
    assert {a.shape for a in out.attentions} == {(rows, 4, seq_len, seq_len)}
    # The config switches work too, and the outputs themselves do not change.
    model.config.output_hidden_states = model.config.output_attentions = True
    from_config = model(**inputs)
    assert len(from_config.hidden_states) == 3 and len(from_config.attentions) == 2
    first = "last_hidden_state" if cls is Beit3Model else "logits"
    torch.testing.assert_close(from_config[first], plain[first])


def test_retrieval_returns_both_tower_outputs():
    model = make_model(Beit3ForImageTextRetrieval)
    model.set_attn_implementation("eager")
    input_ids, attention_mask = text_batch(model.config)
    inputs = {"pixel_values": images(model.config), "input_ids": input_ids, "attention_mask": attention_mask}
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    vision, text = out.vision_model_output, out.text_model_output
    assert isinstance(vision, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    assert [h.shape for h in vision.hidden_states] == [(BATCH, 5, 64)] * 3
    assert [h.shape for h in text.hidden_states] == [(BATCH, 6, 64)] * 3
    assert [a.shape for a in text.attentions] == [(BATCH, 4, 6, 6)] * 2
    torch.testing.assert_close(vision.pooler_output, out.image_embeds)
    torch.testing.assert_close(text.pooler_output, out.text_embeds)
    assert model(**inputs).vision_model_output.hidden_states is None
    # As CLIPOutput: the tuple form nests the tower outputs as tuples.
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple[-1], tuple) and torch.equal(as_tuple[-1][1], out.image_embeds)


def test_feature_methods_return_model_outputs_with_normalised_pooler_output():
    model = make_model(Beit3ForImageTextRetrieval)
    pixel_values = images(model.config)
    input_ids, attention_mask = text_batch(model.config)
    image = model.get_image_features(pixel_values, output_hidden_states=True)
    text = model.get_text_features(input_ids, attention_mask)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    assert image.last_hidden_state.shape == (BATCH, 5, 64) and len(image.hidden_states) == 3
    assert text.last_hidden_state.shape == (BATCH, 6, 64) and text.hidden_states is None
    torch.testing.assert_close(image.pooler_output.norm(dim=-1), torch.ones(BATCH))
    expected = F.normalize(model.text_projection(text.last_hidden_state[:, 0]), dim=-1)
    torch.testing.assert_close(text.pooler_output, expected)
    as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)


def test_visual_reasoning_outputs_are_ordered_by_example():
    """Row 2 i of hidden_states / attentions is example i's left image, row 2 i + 1 its right image."""
    model = make_model(Beit3ForVisualReasoning, "nlvr2")
    input_ids, attention_mask = text_batch(model.config)
    pairs = torch.stack([images(model.config, seed=3), images(model.config, seed=4)], dim=1)
    out = model(pixel_values=pairs, input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    for example in range(BATCH):
        for side in (0, 1):
            single = model.beit3(
                pixel_values=pairs[example, side][None],
                input_ids=input_ids[example : example + 1],
                attention_mask=attention_mask[example : example + 1],
                output_hidden_states=True,
            )
            for ours, expected in zip(out.hidden_states, single.hidden_states):
                torch.testing.assert_close(ours[2 * example + side], expected[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Attention bias, causal text and the key/value cache
# ---------------------------------------------------------------------------------------------------------------------


def allowed(bias: torch.Tensor) -> torch.Tensor:
    return (bias == 0).int()


def test_attention_bias_rules():
    kwargs = {"dtype": torch.float32, "device": torch.device("cpu")}
    assert build_attention_bias(None, 5, 2, 0, "bidirectional", **kwargs) is None
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    padding = build_attention_bias(key_mask, 5, 2, 0, "bidirectional", **kwargs)
    assert padding.shape == (2, 1, 1, 5) and torch.equal(allowed(padding)[:, 0, 0], key_mask)
    # 2 vision + 3 text tokens: vision sees vision only, text sees vision and the text up to itself.
    causal = build_attention_bias(None, 5, 2, 0, "causal", **kwargs)
    expected = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert causal.shape == (1, 1, 5, 5) and allowed(causal)[0, 0].tolist() == expected
    padded = build_attention_bias(key_mask, 5, 2, 0, "causal", **kwargs)
    assert allowed(padded)[1, 0, 4].tolist() == [1, 1, 1, 0, 0] and allowed(padded)[0, 0].tolist() == expected
    # Two text tokens after four cached ones.
    continued = build_attention_bias(None, 2, 0, 4, "causal", **kwargs)
    assert allowed(continued)[0, 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert padded.min() == torch.finfo(torch.float32).min  # finite, so a fully masked row stays finite
    with pytest.raises(ValueError, match="text_attention must be"):
        build_attention_bias(None, 5, 2, 0, "prefix", **kwargs)


def test_causal_text_attention_of_the_base_model():
    model = make_model(Beit3Model)
    input_ids, _ = text_batch(model.config, lengths=(6, 6, 6))
    changed = input_ids.clone()
    changed[:, 4:] = 7  # change the last two tokens
    pixel_values = images(model.config)
    causal = [
        model(pixel_values=pixel_values, input_ids=ids, text_attention="causal").last_hidden_state
        for ids in (input_ids, changed)
    ]
    # Causal: image tokens and the first four text tokens do not see the change.
    torch.testing.assert_close(causal[0][:, : 5 + 4], causal[1][:, : 5 + 4])
    assert (causal[0][:, 5 + 4 :] - causal[1][:, 5 + 4 :]).abs().max() > 1e-3
    # Bidirectional: the image sees the text.
    full = model(pixel_values=pixel_values, input_ids=changed).last_hidden_state
    assert (full[:, :5] - causal[1][:, :5]).abs().max() > 1e-3


def test_base_model_continues_from_a_cache():
    model = make_model(Beit3Model)
    input_ids, _ = text_batch(model.config, lengths=(6, 6, 6))
    pixel_values = images(model.config)
    full = model(pixel_values=pixel_values, input_ids=input_ids, text_attention="causal").last_hidden_state
    cache = Beit3KeyValueCache()
    first = model(
        pixel_values=pixel_values, input_ids=input_ids[:, :4], past_key_values=cache, text_attention="causal"
    )
    assert cache.get_seq_length() == 5 + 4 and len(cache) == model.config.num_hidden_layers
    rest = model(input_ids=input_ids[:, 4:], past_key_values=cache, text_attention="causal", text_position_offset=4)
    steps = torch.cat([first.last_hidden_state, rest.last_hidden_state], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot follow a filled past_key_values"):
        model(pixel_values=pixel_values, input_ids=input_ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="Padding is not supported"):
        model(input_ids=input_ids[:, :1], attention_mask=torch.zeros(BATCH, 1), past_key_values=cache)


def test_cache_has_the_transformers_cache_methods():
    cache = Beit3KeyValueCache()
    assert cache.get_seq_length() == 0
    keys, values = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)
    cache.update(keys, values, 0)
    cache.update(keys, values, 1, cache_kwargs={})
    all_keys, all_values = cache.update(keys[:, :, :1], values[:, :, :1], 0)
    assert all_keys.shape == (2, 4, 4, 16) and torch.equal(all_values[:, :, 3:], values[:, :, :1])
    assert (cache.get_seq_length(0), cache.get_seq_length(1), len(cache)) == (4, 3, 2)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[1][0], keys[1]) and torch.equal(cache.values[1][1], values[1])


def test_cache_keeps_transient_tokens_out():
    """Captioning's `<mask>` query slot is attended to in its step but never cached."""
    cache = Beit3KeyValueCache(transient_tokens=1)
    keys, values = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)
    all_keys, _ = cache.update(keys, values, 0)
    assert torch.equal(all_keys, keys) and cache.get_seq_length() == 2
    all_keys, all_values = cache.update(keys[:, :, 2:], values[:, :, 2:], 0)
    assert torch.equal(all_keys, torch.cat([keys[:, :, :2], keys[:, :, 2:]], dim=2)) and cache.get_seq_length() == 2
    assert torch.equal(all_values[:, :, :2], values[:, :, :2])
    with pytest.raises(ValueError, match="at least transient_tokens=1"):
        cache.update(keys[:, :, :0], values[:, :, :0], 0)
    with pytest.raises(ValueError, match="transient_tokens must be >= 0"):
        Beit3KeyValueCache(transient_tokens=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Saving and the Auto classes
# ---------------------------------------------------------------------------------------------------------------------

TASK_AUTO_CLASS = {
    Beit3Model: None,
    Beit3ForImageClassification: "AutoModelForImageClassification",
    Beit3ForImageTextRetrieval: "AutoModelForZeroShotImageClassification",
    Beit3ForVisualQuestionAnswering: "AutoModelForVisualQuestionAnswering",
    Beit3ForVisualReasoning: None,
    Beit3ForCaptioning: "AutoModelForImageTextToText",
}


def expected_auto_map(cls) -> dict[str, str]:
    reference = f"modeling_beit3.{cls.__name__}"
    auto_map = {"AutoConfig": "configuration_beit3.Beit3Config", "AutoModel": reference}
    if TASK_AUTO_CLASS[cls] is not None:
        auto_map[TASK_AUTO_CLASS[cls]] = reference
    return auto_map


def test_building_or_saving_a_model_leaves_its_config_unchanged(tmp_path):
    config = tiny_config("vqa")
    before = config.to_json_string()
    models = [cls(config) for cls in TASK_AUTO_CLASS]
    assert config.to_json_string() == before and getattr(config, "auto_map", None) is None
    models[2].save_pretrained(tmp_path)  # (transformers itself sets `config.architectures` when saving)
    assert getattr(config, "auto_map", None) is None
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == expected_auto_map(type(models[2]))


@pytest.mark.parametrize("cls", list(TASK_AUTO_CLASS), ids=lambda cls: cls.__name__)
def test_saved_config_names_the_saved_class(tmp_path, cls):
    task = {Beit3ForVisualReasoning: "nlvr2", Beit3ForImageClassification: "image-classification"}.get(cls, "vqa")
    cls(tiny_config(task)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == expected_auto_map(cls) and saved["architectures"] == [cls.__name__]
    assert {"configuration_beit3.py", "modeling_beit3.py"} <= {p.name for p in tmp_path.iterdir()}


def test_resaving_as_another_class_rewrites_auto_map(tmp_path):
    make_model(Beit3ForImageTextRetrieval).save_pretrained(tmp_path / "retrieval")
    backbone = Beit3Model.from_pretrained(tmp_path / "retrieval")
    assert backbone.config.auto_map == expected_auto_map(Beit3ForImageTextRetrieval)  # as loaded
    backbone.save_pretrained(tmp_path / "backbone")
    saved = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert saved["auto_map"] == expected_auto_map(Beit3Model)
    assert backbone.config.auto_map == expected_auto_map(Beit3ForImageTextRetrieval)  # saving changed nothing


def test_save_pretrained_writes_code_and_auto_map(tmp_path):
    model = make_model(Beit3ForImageClassification, "image-classification")
    model.save_pretrained(tmp_path)
    assert {"configuration_beit3.py", "modeling_beit3.py", "model.safetensors", "config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["Beit3ForImageClassification"]
    assert config.auto_map == expected_auto_map(Beit3ForImageClassification)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixel_values = images(model.config)
    torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_saved_folders_load_as_their_class_in_a_fresh_process(tmp_path):
    """`AutoModel` and the task Auto class load every head's folder with trust_remote_code, beit3_hf hidden."""
    expected = {}
    for cls, auto_class in TASK_AUTO_CLASS.items():
        task = {Beit3ForVisualReasoning: "nlvr2", Beit3ForImageClassification: "image-classification"}.get(cls, "vqa")
        model = make_model(cls, task)
        model.save_pretrained(tmp_path / cls.__name__)
        expected[cls.__name__] = [auto_class or "AutoModel", cls.__name__]
    pixel_values = images(tiny_config())
    torch.save({"pixel_values": pixel_values}, tmp_path / "inputs.pt")
    classifier = Beit3ForImageClassification.from_pretrained(tmp_path / "Beit3ForImageClassification").eval()
    logits = classifier(pixel_values=pixel_values).logits
    result = run_fresh_python(
        """
        import json, sys, torch
        import transformers

        loaded = {}
        for name, (auto_class, _) in json.loads(sys.argv[1]).items():
            by_auto_model = transformers.AutoModel.from_pretrained(name, trust_remote_code=True)
            by_task = getattr(transformers, auto_class).from_pretrained(name, trust_remote_code=True)
            loaded[name] = [type(by_auto_model).__name__, type(by_task).__name__, type(by_task).__module__]
        model = transformers.AutoModel.from_pretrained("Beit3ForImageClassification", trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**torch.load("inputs.pt")).logits
        print(json.dumps({"loaded": loaded, "logits": logits.tolist()}))
        """,
        tmp_path,
        args=(json.dumps(expected),),
    )
    child = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (auto_model_class, task_class, module) in child["loaded"].items():
        assert auto_model_class == task_class == name and module.startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(child["logits"]), logits, atol=1e-5, rtol=1e-5)


def test_auto_model_builds_from_config():
    assert type(AutoModel.from_config(tiny_config())) is Beit3Model


# ---------------------------------------------------------------------------------------------------------------------
# Vision-only models
# ---------------------------------------------------------------------------------------------------------------------


def test_vision_only_config_is_validated():
    assert Beit3Config().vision_only is False
    assert Beit3Config.from_preset("beit3-base-patch16-224", vision_only=True).vision_only is True
    with pytest.raises(ValueError, match="vision_only must be True or False"):
        Beit3Config(vision_only="yes")


@pytest.mark.parametrize(("size", "count"), [("base", 86_659_816), ("large", 304_572_392)])
def test_vision_only_classifier_has_the_original_parameter_count(size, count):
    # The original README: 87M (base) and 305M (large) for ImageNet-1k classification; here with 1000 labels.
    config = Beit3Config.from_preset(
        f"beit3-{size}-patch16-224", vision_only=True, num_labels=1000, use_final_layernorm=False
    )
    with torch.device("meta"):
        model = Beit3ForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == count
    assert round(count / 1e6) == {"base": 87, "large": 305}[size]


def test_vision_only_model_has_no_text_side():
    model = make_model(Beit3Model, vision_only=True)
    assert model.text_embeddings is None and model.vision_embeddings.mask_token is None
    multiways = [module for module in model.modules() if isinstance(module, Beit3Multiway)]
    assert multiways and all(module.text is None for module in multiways)
    assert not [name for name, _ in model.named_parameters() if ".text." in name or "text_embeddings" in name]
    with pytest.raises(ValueError, match="vision-only .* takes pixel_values only, not input_ids"):
        model(pixel_values=images(model.config), input_ids=torch.tensor([[0, 5, 2]] * BATCH))
    with pytest.raises(ValueError, match="bool_masked_pos needs the mask token"):
        model(pixel_values=images(model.config), bool_masked_pos=torch.zeros(BATCH, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "cls", [Beit3ForImageTextRetrieval, Beit3ForVisualQuestionAnswering, Beit3ForVisualReasoning, Beit3ForCaptioning]
)
def test_heads_that_read_text_refuse_vision_only_configs(cls):
    with pytest.raises(ValueError, match="reads text, but config.vision_only=True"):
        cls(tiny_config(vision_only=True))


def test_every_parameter_of_a_vision_only_classifier_gets_a_gradient():
    model = make_model(Beit3ForImageClassification, "image-classification", vision_only=True).train()
    model(pixel_values=images(model.config), labels=torch.tensor([0, 3, 4])).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0] == []


def test_full_checkpoint_loads_into_a_vision_only_classifier(tmp_path):
    full = make_model(Beit3ForImageClassification, "image-classification")
    vision_only = Beit3ForImageClassification(tiny_config("image-classification", vision_only=True))
    result = vision_only.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    unused = set(result.unexpected_keys)
    assert unused and all(".text." in key or "text_embeddings" in key or "mask_token" in key for key in unused)
    assert set(vision_only.state_dict()) == set(full.state_dict()) - unused  # the vision keys are the same names
    pixel_values = images(full.config)
    torch.testing.assert_close(
        vision_only.eval()(pixel_values=pixel_values).logits, full(pixel_values=pixel_values).logits
    )
    # Through from_pretrained, with the switch given at load time.
    full.save_pretrained(tmp_path)
    loaded = Beit3ForImageClassification.from_pretrained(tmp_path, vision_only=True).eval()
    assert loaded.config.vision_only and loaded.beit3.text_embeddings is None
    torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, full(pixel_values=pixel_values).logits)
