"""`torch.compile` of every head, loss included, traces as one graph (`fullgraph=True`: a graph break is an error).

The default run traces with dynamo's `eager` backend (seconds per head); the slow run also generates inductor code
and compares the compiled outputs with the eager ones at 1e-4 (fp32, CPU).
"""

from __future__ import annotations

import pytest
import torch

from beit3_hf import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForMaskedImageModeling,
    Beit3ForPreTraining,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)

from oracle_utils import randomize_, tiny_config


def cases() -> dict[str, tuple[type, dict, dict]]:
    """{name: (class, config overrides, inputs)} with labels wherever the head computes a loss."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    input_ids = torch.tensor([[0, 5, 6, 2, 1], [0, 7, 8, 9, 2]])
    text = {"input_ids": input_ids, "attention_mask": (input_ids != 1).long()}
    masked = torch.tensor([[True, False, True, False], [False, True, True, False]])
    return {
        "backbone": (Beit3Model, {}, {"pixel_values": pixels, **text}),
        "image-classification": (Beit3ForImageClassification, {}, {"pixel_values": pixels, "labels": torch.tensor([1, 4])}),
        "retrieval": (Beit3ForImageTextRetrieval, {}, {"pixel_values": pixels, **text, "return_loss": True}),
        "vqa": (Beit3ForVisualQuestionAnswering, {}, {"pixel_values": pixels, **text, "labels": torch.rand(2, 7, generator=generator)}),
        "nlvr2": (Beit3ForVisualReasoning, {}, {"pixel_values": torch.randn(2, 2, 3, 32, 32, generator=generator), **text, "labels": torch.tensor([0, 1])}),
        "captioning": (Beit3ForCaptioning, {"mask_token_id": 119}, {"pixel_values": pixels, **text, "labels": torch.tensor([[-100, 5, -100, 2, -100]] * 2)}),
        "masked-image-modeling": (Beit3ForMaskedImageModeling, {"visual_vocab_size": 16}, {"pixel_values": pixels, "bool_masked_pos": masked, "labels": torch.randint(16, (2, 4), generator=generator)}),
        "pretraining": (Beit3ForPreTraining, {"visual_vocab_size": 16}, {"pixel_values": pixels, **text, "bool_masked_pos": masked, "mlm_labels": torch.tensor([[-100, 5, -100, -100, -100]] * 2), "mim_labels": torch.randint(16, (2, 4), generator=generator)}),
    }  # fmt: skip


CASES = cases()


def compiled_and_eager(name: str, backend: str) -> tuple[dict, dict]:
    cls, overrides, inputs = CASES[name]
    task = {"image-classification": "image-classification", "vqa": "vqa", "nlvr2": "nlvr2"}.get(name, "backbone")
    torch.manual_seed(0)
    model = cls(tiny_config(task, **overrides))
    randomize_(model, seed=1)
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # any graph break raises
    with torch.no_grad():
        return compiled(**inputs), model(**inputs)


def assert_outputs_close(actual, expected, atol: float) -> None:
    keys = [key for key, value in expected.items() if isinstance(value, torch.Tensor)]
    assert "loss" in keys or "last_hidden_state" in keys
    for key in keys:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("name", CASES)
def test_every_head_traces_without_graph_breaks(name):
    actual, expected = compiled_and_eager(name, backend="eager")
    assert_outputs_close(actual, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_inductor_outputs_equal_eager(name):
    actual, expected = compiled_and_eager(name, backend="inductor")
    assert_outputs_close(actual, expected, atol=1e-4)
