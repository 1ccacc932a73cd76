"""Model input checks (issue 15): each mistake a user makes with the models' inputs gives an error that names the
argument, where it used to give a wrong output, NaNs or an error from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beit3_hf import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForMaskedImageModeling,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)

from oracle_utils import randomize_, tiny_config

VOCAB = 120  # tiny_config's vocabulary


def make_model(cls, task="backbone", **overrides):
    torch.manual_seed(0)
    model = cls(tiny_config(task, **overrides))
    randomize_(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def backbone() -> Beit3Model:
    return make_model(Beit3Model)


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def text(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`<s> w w </s> <pad> <pad>` and an unpadded row, with the mask (1 = attend)."""
    input_ids = torch.tensor([[0, 17, 33, 2, 1, 1], [0, 44, 45, 46, 47, 2]])[:batch]
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])[:batch]
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------------
# Attention masks in the original's conventions (1 = pad, additive) used to run silently
# ---------------------------------------------------------------------------------------------------------------------


def test_padding_mask_of_the_original_is_named(backbone):
    input_ids, attention_mask = text()
    padding_mask = 1 - attention_mask  # the original's convention: 1 = pad
    with pytest.raises(ValueError, match="1 = pad.*attention_mask = 1 - padding_mask"):
        backbone(pixel_values=pixels(), input_ids=input_ids, attention_mask=padding_mask)


def test_left_padded_text_is_named(backbone):
    input_ids, attention_mask = text()
    left_ids, left_mask = input_ids[:, [4, 5, 0, 1, 2, 3]], attention_mask[:, [4, 5, 0, 1, 2, 3]]  # padding first
    with pytest.raises(ValueError, match="padded on the left: .* pad on the right"):
        backbone(pixel_values=pixels(), input_ids=left_ids, attention_mask=left_mask)


@pytest.mark.parametrize("fill", [float("-inf"), -10000.0])
def test_additive_masks_are_named(backbone, fill):
    input_ids, attention_mask = text()
    additive = torch.zeros(attention_mask.shape).masked_fill(attention_mask == 0, fill)
    with pytest.raises(ValueError, match="additive mask.*\\(additive_mask == 0\\).long\\(\\)"):
        backbone(input_ids=input_ids, attention_mask=additive)


def test_mask_values_other_than_zero_and_one_are_refused(backbone):
    input_ids, attention_mask = text()
    with pytest.raises(ValueError, match="1 \\(attend\\) and 0 \\(padding\\) only, got values \\[0, 2\\]"):
        backbone(input_ids=input_ids, attention_mask=attention_mask * 2)


def test_bool_and_float_masks_equal_the_integer_mask(backbone):
    input_ids, attention_mask = text()
    with torch.no_grad():
        reference = backbone(pixel_values=pixels(), input_ids=input_ids, attention_mask=attention_mask)
        for mask in (attention_mask.bool(), attention_mask.float()):
            out = backbone(pixel_values=pixels(), input_ids=input_ids, attention_mask=mask)
            torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state)


# ---------------------------------------------------------------------------------------------------------------------
# Token ids, labels, empty inputs, tensor types
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [VOCAB, 5000, -1])
def test_token_ids_outside_the_vocabulary_are_named(backbone, bad_id):
    input_ids, _ = text()
    input_ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=f"token id {bad_id}, outside the model's vocabulary \\[0, {VOCAB}\\)"):
        backbone(input_ids=input_ids)


def test_float_token_ids_are_refused(backbone):
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype torch.float32"):
        backbone(input_ids=text()[0].float())


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ({"pixel_values": torch.randn(0, 3, 32, 32)}, ValueError, "pixel_values is an empty batch"),
        ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, ValueError, "input_ids is empty \\(shape \\(0, 5\\)\\)"),
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, ValueError, "input_ids is empty \\(shape \\(2, 0\\)\\)"),
        ({"pixel_values": np.zeros((2, 3, 32, 32), "float32")}, TypeError, "pixel_values must be a torch.Tensor"),
        ({"input_ids": [[0, 5, 2]]}, TypeError, "input_ids must be a torch.Tensor, got list"),
        (
            {"input_ids": torch.tensor([[0, 5, 2]]), "attention_mask": np.ones((1, 3), "int64")},
            TypeError,
            "attention_mask must be a torch.Tensor, got ndarray",
        ),
        (
            {"pixel_values": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)},
            TypeError,
            "pixel_values has dtype torch.uint8: the model takes normalised float images.*Beit3ImageProcessor",
        ),
    ],
)
def test_empty_and_non_tensor_inputs_are_named(backbone, inputs, error, message):
    with pytest.raises(error, match=message):
        backbone(**inputs)


def test_retrieval_checks_each_tower_input():
    model = make_model(Beit3ForImageTextRetrieval, "retrieval")
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got ndarray"):
        model.get_image_features(np.zeros((1, 3, 32, 32), "float32"))
    with pytest.raises(ValueError, match="token id 999"):
        model.get_text_features(torch.tensor([[0, 999, 2]]))


@pytest.mark.parametrize("labels", [torch.tensor([3, 10]), torch.tensor([-1, 0])])
def test_class_labels_out_of_range_are_named(labels):
    model = make_model(Beit3ForImageClassification, "image-classification", num_labels=10)
    with pytest.raises(ValueError, match="labels must be class ids in \\[0, 10\\) \\(config.num_labels\\)"):
        model(pixel_values=pixels(), labels=labels)
    with pytest.raises(ValueError, match="one class id per example \\(2\\), got shape \\(3,\\)"):
        model(pixel_values=pixels(), labels=torch.tensor([1, 2, 3]))
    assert model(pixel_values=pixels(), labels=torch.tensor([0, 9])).loss.isfinite()


def test_visual_reasoning_errors_use_the_callers_sizes():
    model = make_model(Beit3ForVisualReasoning, "nlvr2")
    pairs = torch.randn(2, 2, 3, 32, 32)
    input_ids, attention_mask = text()
    with pytest.raises(ValueError, match="2 image pairs but input_ids has shape \\(3, 6\\)"):
        model(pixel_values=pairs, input_ids=torch.cat([input_ids, input_ids[:1]]))
    with pytest.raises(ValueError, match="labels must be class ids in \\[0, 2\\)"):
        model(pixel_values=pairs, input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got list"):
        model(pixel_values=pairs.tolist(), input_ids=input_ids)
    out = model(pixel_values=pairs, input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1]))
    assert out.loss.isfinite()


def test_token_labels_out_of_range_are_named():
    captioner = make_model(Beit3ForCaptioning, "captioning", mask_token_id=119)
    input_ids = torch.tensor([[0, 119, 5, 2]])
    with pytest.raises(ValueError, match="labels must be -100 or token ids in \\[0, 120\\)"):
        captioner(pixel_values=pixels(1), input_ids=input_ids, labels=torch.tensor([[-100, 500, -100, -100]]))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got ndarray"):
        captioner(pixel_values=pixels(1), input_ids=input_ids, labels=np.full((1, 4), -100))
    mim = make_model(Beit3ForMaskedImageModeling, "backbone", visual_vocab_size=16)
    with pytest.raises(ValueError, match="labels must be -100 or token ids in \\[0, 16\\)"):
        mim(pixel_values=pixels(1), bool_masked_pos=torch.ones(1, 4, dtype=torch.bool), labels=torch.full((1, 4), 16))


def test_vqa_labels_must_be_a_tensor_of_soft_scores():
    model = make_model(Beit3ForVisualQuestionAnswering, "vqa")
    input_ids, attention_mask = text()
    num_labels = model.config.num_labels
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        model(pixel_values=pixels(), input_ids=input_ids, labels=[[0.0] * num_labels] * 2)
    with pytest.raises(ValueError, match="soft scores of shape \\(batch, num_labels\\)"):
        model(pixel_values=pixels(), input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([1, 2]))
