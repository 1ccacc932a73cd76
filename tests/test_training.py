"""Layer-wise learning-rate decay groups, `--optim` with them, and the global-batch contrastive loss (one and two
processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.optimization import Adafactor

from beit3_hf import Beit3ForImageClassification, Beit3ForImageTextRetrieval
from beit3_hf.models.beit3.modeling_beit3 import image_text_contrastive_loss
from beit3_hf.training import global_contrastive_loss, layer_decay_parameter_groups, parameter_layer_id
from beit3_hf.training.scripts import ScriptTrainingArguments
from beit3_hf.training.trainer import Beit3Trainer

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


def make_trainer(tmp_path, model, **args) -> Beit3Trainer:
    training_args = ScriptTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args)
    return Beit3Trainer(model=model, args=training_args, layer_decay=0.5)


@pytest.mark.parametrize(
    ("optim", "expected"),
    [("adamw_torch", torch.optim.AdamW), ("adafactor", Adafactor), ("sgd", torch.optim.SGD)],
)
def test_optim_is_honoured_with_the_layer_decay_groups(tmp_path, optim, expected):
    model = Beit3ForImageTextRetrieval(tiny_config())
    trainer = make_trainer(tmp_path, model, optim=optim, learning_rate=1e-3, weight_decay=0.05)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is expected
    reference = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert len(optimizer.param_groups) == len(reference) > 2
    for group, ref in zip(optimizer.param_groups, reference):
        assert group["lr"] == pytest.approx(ref["lr"]) and group["weight_decay"] == ref["weight_decay"]
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
    if optim == "adafactor":  # Trainer's adafactor: the given learning rates, not Adafactor's relative steps
        assert optimizer.defaults["relative_step"] is False and optimizer.defaults["scale_parameter"] is False
    # The schedule scales every group alike: the layer-decay ratios survive it.
    trainer.create_scheduler(num_training_steps=10)
    optimizer.step()
    trainer.lr_scheduler.step()
    scales = [group["lr"] / ref["lr"] for group, ref in zip(optimizer.param_groups, reference)]
    assert scales == pytest.approx([0.9] * len(scales))


def test_optim_that_builds_its_own_groups_refuses_layer_decay(tmp_path, monkeypatch):
    model = Beit3ForImageTextRetrieval(tiny_config())
    trainer = make_trainer(tmp_path, model)

    def own_groups(args, model=None):
        return torch.optim.SGD, {"lr": 1e-3, "params": [{"params": list(model.parameters())}]}

    monkeypatch.setattr(Beit3Trainer, "get_optimizer_cls_and_kwargs", staticmethod(own_groups))
    with pytest.raises(ValueError, match=r"--optim .* cannot apply the layer-wise learning-rate decay"):
        trainer.create_optimizer()


def test_global_contrastive_is_an_explicit_flag(tmp_path):
    torch.manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "input_ids": torch.randint(3, 100, (4, 5)),
        "return_loss": True,
    }
    model = Beit3ForImageTextRetrieval(tiny_config())
    # Off (the default): the model's own loss; on: the global loss, equal on one process.
    own = make_trainer(tmp_path, model).compute_loss(model, dict(inputs))
    trainer = make_trainer(tmp_path, model)
    trainer.global_contrastive = True
    torch.testing.assert_close(trainer.compute_loss(model, dict(inputs)), own)
    # On, for a model that is not image-text contrastive: a clear error instead of a silent fallback.
    classifier = Beit3ForImageClassification(tiny_config("image-classification"))
    trainer = make_trainer(tmp_path, classifier)
    trainer.global_contrastive = True
    with pytest.raises(ValueError, match=r"global_contrastive=True needs an image-text contrastive model"):
        trainer.compute_loss(
            classifier, {"pixel_values": inputs["pixel_values"], "labels": torch.tensor([0, 1, 2, 3])}
        )


def test_run_stages_saves_the_model_then_stops_at_a_non_finite_training_loss(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from beit3_hf.training import scripts

    events = []
    monkeypatch.setattr(scripts, "save_final_model", lambda trainer, **card: events.append("model"))

    class StubTrainer:
        train_dataset = [0, 1]

        def train(self, resume_from_checkpoint=None):
            return SimpleNamespace(metrics={"train_loss": float("nan")})

        def log_metrics(self, split, metrics):
            events.append(f"log {split}")

        def save_metrics(self, split, metrics):
            events.append(f"metrics {split}")

        def save_state(self):
            events.append("state")

    args = ScriptTrainingArguments(output_dir=str(tmp_path), do_train=True, do_eval=True, report_to="none")
    with pytest.raises(RuntimeError, match="the training loss is not finite: nan"):
        scripts.run_stages(
            StubTrainer(), args, checkpoint=None, card={}, evaluate=lambda split: events.append(split) or {}
        )
    assert events == ["model", "log train", "metrics train", "state"]  # saved, and never evaluated
