"""Layer-wise learning-rate decay groups and the global-batch contrastive loss (one and two processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beit3_hf import Beit3ForImageTextRetrieval
from beit3_hf.models.beit3.modeling_beit3 import image_text_contrastive_loss
from beit3_hf.training import global_contrastive_loss, layer_decay_parameter_groups, parameter_layer_id

from oracle_utils import free_port, tiny_config


def test_layer_ids_follow_the_original():
    assert parameter_layer_id("beit3.vision_embeddings.cls_token", 2) == 0
    assert parameter_layer_id("beit3.text_embeddings.token_embedding.weight", 2) == 0
    assert parameter_layer_id("beit3.encoder.layers.0.ffn.text.fc1.weight", 2) == 1
    assert parameter_layer_id("beit3.encoder.layers.1.self_attn.q_proj.vision.bias", 2) == 2
    assert parameter_layer_id("beit3.encoder.layernorm.vision.weight", 2) == 3
    assert parameter_layer_id("logit_scale", 2) == 3


def test_layer_decay_groups():
    model = Beit3ForImageTextRetrieval(tiny_config())
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.5)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    by_name = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (3 - group["layer_id"]))
        names = [by_name[id(p)] for p in group["params"]]
        if group["weight_decay"] == 0.0:
            assert all(
                model.get_parameter(n).ndim == 1
                or n.endswith(("cls_token", "mask_token", "position_embedding.weight", "logit_scale"))
                for n in names
            )
        else:
            assert group["weight_decay"] == 0.05 and all(model.get_parameter(n).ndim > 1 for n in names)
    no_decay = {by_name[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {
        "logit_scale",
        "beit3.vision_embeddings.cls_token",
        "beit3.text_embeddings.position_embedding.weight",
    } <= no_decay
    assert "beit3.encoder.layers.0.ffn.vision.fc1.weight" not in no_decay


def test_single_process_global_loss_is_the_model_loss():
    torch.manual_seed(0)
    model = Beit3ForImageTextRetrieval(tiny_config())
    input_ids = torch.randint(3, 100, (4, 5))
    out = model(pixel_values=torch.randn(4, 3, 32, 32), input_ids=input_ids, return_loss=True)
    torch.testing.assert_close(global_contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale), out.loss)


def _two_process_worker(rank: int, port: int, images: torch.Tensor, texts: torch.Tensor, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = images.shape[0] // 2
        local_images = images[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        local_texts = texts[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        loss = global_contrastive_loss(local_images, local_texts, torch.tensor(10.0))
        loss.backward()
        results[rank] = (loss.detach(), local_images.grad, local_texts.grad)
    finally:
        dist.destroy_process_group()


def test_two_process_global_loss_equals_the_combined_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_process_worker, args=(free_port(), images, texts, results), nprocs=2, join=True)
        results = dict(results)
    # One process holding the whole batch.
    full_images, full_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    full_loss = image_text_contrastive_loss(10.0 * full_images @ full_texts.t())
    full_loss.backward()
    mean_loss = (results[0][0] + results[1][0]) / 2
    torch.testing.assert_close(mean_loss, full_loss.detach())
    # DDP averages gradients over the 2 processes; the features' gradients then equal the single-process ones.
    image_grads = torch.cat([results[0][1], results[1][1]]) / 2
    text_grads = torch.cat([results[0][2], results[1][2]]) / 2
    torch.testing.assert_close(image_grads, full_images.grad)
    torch.testing.assert_close(text_grads, full_texts.grad)
