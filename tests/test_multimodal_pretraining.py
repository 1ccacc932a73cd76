"""Multimodal and continual pretraining: objectives, their schedule, the data mixture and run_pretraining.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from beit3_hf import Beit3Config, Beit3ForImageTextRetrieval, Beit3ForPreTraining
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer
from beit3_hf.data.loaders import list_image_files
from beit3_hf.data.mixture import PretrainingCollator, PretrainingMixture, load_caption_texts, load_pairs
from beit3_hf.data.pretraining import DecodeFailures, TwoViewTransform
from beit3_hf.testing.synthetic_data import train_text_tokenizer, write_synthetic_dataset
from beit3_hf.training import lora
from beit3_hf.training.masking import BlockMaskingGenerator
from beit3_hf.training.objectives import (
    OBJECTIVES,
    ObjectiveSchedule,
    batch_objective,
    mask_tokens,
    parse_objectives,
    word_starts,
)

from oracle_utils import load_example_script, run_example, run_fresh_python

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretraining" / "run_pretraining.py"
run_pretraining = load_example_script(SCRIPT)
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=48,image_size=32,patch_size=16,max_position_embeddings=32,vocab_size=128"  # fmt: skip


# ---- objectives and masking ----------------------------------------------------------------------------------


def test_parse_objectives_and_errors():
    assert parse_objectives("text_mlm:1,itc:2") == {"text_mlm": 1.0, "itc": 2.0}
    for spec, message in [("mlm:1", "unknown objective 'mlm'"), ("itc:0", "must be positive"),
                          ("itc:x", "not a number"), ("itc,itc", "given twice"), (" , ", "names no objective")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_objectives(spec)


def test_schedule_follows_the_weights_and_depends_on_seed_and_step_only():
    schedule = ObjectiveSchedule({"text_mlm": 1.0, "itc": 3.0}, seed=1)
    steps = [schedule(step) for step in range(4000)]
    assert steps.count("itc") / len(steps) == pytest.approx(0.75, abs=0.03)
    again = ObjectiveSchedule({"itc": 3.0, "text_mlm": 1.0}, seed=1)  # the order of the weights does not matter
    assert [again(step) for step in range(4000)][::-1] == steps[::-1]
    assert [ObjectiveSchedule({"text_mlm": 1.0, "itc": 3.0}, seed=2)(s) for s in range(100)] != steps[:100]


def test_mask_tokens_rates_and_special_tokens():
    ids = [0, *list(range(10, 110)), 2, 1, 1]
    special = [True] + [False] * 100 + [True] * 3
    rng = np.random.default_rng(0)
    masked = replaced = kept = chosen = 0
    for _ in range(200):
        new, labels = mask_tokens(ids, special=special, probability=0.15, mask_token_id=5, vocab_size=200, rng=rng)
        for old, token, label, is_special in zip(ids, new, labels, special):
            if is_special:
                assert token == old and label == -100
            elif label != -100:
                chosen += 1
                assert label == old
                masked += token == 5
                kept += token == old
                replaced += token not in (5, old)
            else:
                assert token == old
    assert chosen / (200 * 100) == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert kept / chosen == pytest.approx(0.1, abs=0.02) and replaced / chosen == pytest.approx(0.1, abs=0.02)


def test_whole_word_masking_masks_every_piece_of_a_word():
    tokens = ["<s>", "▁a", "▁red", "dish", "▁circ", "le", "s", "</s>"]
    assert word_starts(tokens) == [True, True, True, False, True, False, False, True]
    ids = list(range(len(tokens)))
    special = [True] + [False] * 6 + [True]
    for seed in range(30):
        _, labels = mask_tokens(ids, special=special, probability=0.5, mask_token_id=99, vocab_size=100,
                                rng=np.random.default_rng(seed), starts=word_starts(tokens))  # fmt: skip
        picked = [label != -100 for label in labels]
        assert picked[2] == picked[3] and picked[4] == picked[5] == picked[6]


def test_contrastive_head_and_loading_it_into_a_retrieval_model(tmp_path):
    config = Beit3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         image_size=32, patch_size=16, vocab_size=60, contrastive_head=True)  # fmt: skip
    torch.manual_seed(0)
    model = Beit3ForPreTraining(config).eval()
    pixel_values, input_ids = torch.randn(3, 3, 32, 32), torch.randint(3, 60, (3, 6))
    out = model(pixel_values=pixel_values, input_ids=input_ids, image_text_contrastive=True)
    model.save_pretrained(tmp_path)
    retrieval = Beit3ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    reference = retrieval(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)
    torch.testing.assert_close(out.image_embeds, reference.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.itc_loss, reference.loss, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="contrastive_head=True"):
        Beit3ForPreTraining(Beit3Config(**{**config.to_diff_dict(), "contrastive_head": False}))(
            pixel_values=pixel_values, input_ids=input_ids, image_text_contrastive=True
        )


# ---- data ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretraining_data")
    write_synthetic_dataset(root / "synthetic", num_train=24, num_val=4, num_test=8,
                                    classification_train_per_class=2, classification_val_per_class=1)  # fmt: skip
    captions = [json.loads(line)["caption"] for line in (root / "synthetic" / "captions_train.jsonl").open()]
    spm = train_text_tokenizer(captions, root / "spm.model")
    texts = root / "texts.jsonl"  # a caption file with an empty caption, which is skipped and counted
    texts.write_text("".join(json.dumps({"caption": c}) + "\n" for c in [*captions[:20], "  ", *captions[20:40]]))
    return {"root": root / "synthetic", "spm": spm, "texts": texts, "pairs": root / "synthetic" / "captions_train.jsonl",
            "karpathy": root / "synthetic" / "dataset_synthetic.json", "images": root / "synthetic" / "imagenet" / "train"}  # fmt: skip


def test_loaders_skip_empty_captions_and_read_both_pair_formats(data):
    skipped = DecodeFailures(what="an empty caption")
    texts = load_caption_texts(data["texts"], skipped)
    assert len(texts) == 40 and skipped.count == 1 and skipped.names == [f"{data['texts']}:21"]
    karpathy = load_pairs(data["karpathy"], data["root"])
    jsonl = load_pairs(data["pairs"], data["root"])
    assert sorted(karpathy) == sorted(jsonl) and len(jsonl) == 24 * 5
    with pytest.raises(ValueError, match="pass --image_root"):
        load_pairs(data["karpathy"])
    with pytest.raises(ValueError, match="must not straddle"):
        PretrainingCollator()([{"objective": 0}, {"objective": 3}])


def test_batch_objective_names_the_objective_of_every_mixture_batch(data):
    # PretrainingTrainer dispatches on batch_objective (the batch keys), never reading the `objective` tensor.
    tokenizer = load_sentencepiece_tokenizer(data["spm"], max_length=24)
    pair = TwoViewTransform(32, patch_size=16, mask_generator=None, color_jitter=None)
    mim = TwoViewTransform(32, patch_size=16, mask_generator=BlockMaskingGenerator.for_grid(2, 0.5), color_jitter=None)
    mixture = PretrainingMixture(
        ObjectiveSchedule(dict.fromkeys(OBJECTIVES, 1.0)), batch_size=2, tokenizer=tokenizer, max_length=24,
        pair_transform=pair, mim_transform=mim, images=list_image_files(data["images"]),
        pairs=load_pairs(data["pairs"], data["root"]),
    )  # fmt: skip
    stream, seen = iter(mixture), set()
    for _ in range(steps_covering_every_objective()):
        batch = PretrainingCollator()([next(stream), next(stream)])
        assert batch_objective(batch) == OBJECTIVES[int(batch["objective"][0])]
        seen.add(batch_objective(batch))
    assert seen == set(OBJECTIVES)
    with pytest.raises(ValueError, match="none of the objectives' batches"):  # e.g. a MIM transform without masks
        batch_objective({"objective": 0, "pixel_values": 0})


def base_args(data, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config_name", "beit3-base-patch16-224", "--config_overrides", TINY,
        "--sentencepiece_model", str(data["spm"]), "--max_text_length", "24", "--mim_target", "pixels",
        "--text_file", str(data["texts"]), "--image_dir", str(data["images"]),
        "--pair_file", str(data["pairs"]), "--image_root", str(data["root"]),
        "--output_dir", str(output_dir), "--do_train", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
        "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--logging_steps", "1", "--seed", "0",
        *extra,
    ]  # fmt: skip


def step_logs(output_dir: Path) -> dict[int, dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def steps_covering_every_objective(seed: int = 0) -> int:
    schedule = ObjectiveSchedule(dict.fromkeys(OBJECTIVES, 1.0), seed=seed)
    seen: set[str] = set()
    for step in range(100):
        seen.add(schedule(step))
        if len(seen) == len(OBJECTIVES):
            return step + 1
    raise AssertionError("the schedule never covers every objective")


def test_two_processes_give_the_losses_of_one_process(data, tmp_path):
    """The same global batch (4) on 1 process and on 2 gloo processes: every objective's loss at every step is the
    same (learning rate 0, so each step is a first step of its objective), and the 2-process mixture completes."""
    steps = str(steps_covering_every_objective())
    frozen = ["--learning_rate", "0", "--max_steps", steps, "--save_strategy", "no"]
    run_pretraining.main([*base_args(data, tmp_path / "one"), "--per_device_train_batch_size", "4", *frozen])
    two = base_args(data, tmp_path / "two", "--per_device_train_batch_size", "2", *frozen)
    run_example(SCRIPT, two, tmp_path, processes=2, timeout=600)
    one_logs, two_logs = step_logs(tmp_path / "one"), step_logs(tmp_path / "two")
    assert sorted(one_logs) == sorted(two_logs) == list(range(1, int(steps) + 1))
    logged = set()
    for step, entry in one_logs.items():
        (name,) = [key[: -len("_loss")] for key in entry if key.endswith("_loss") and key[:-5] in OBJECTIVES]
        logged.add(name)
        assert two_logs[step][f"{name}_loss"] == pytest.approx(entry[f"{name}_loss"], abs=1e-5), (step, name)
        assert entry[f"{name}_loss"] > 0
    assert logged == set(OBJECTIVES)


def test_resume_continues_at_the_same_step_with_the_same_data(data, tmp_path):
    args = [*base_args(data, tmp_path / "whole", "--per_device_train_batch_size", "4"), "--save_strategy", "no"]
    run_pretraining.main([*args, "--max_steps", "6"])
    interrupted = [*base_args(data, tmp_path / "cut", "--per_device_train_batch_size", "4"), "--save_steps", "3"]
    run_pretraining.main([*interrupted, "--max_steps", "3"])  # stops at step 3, as a killed run would have
    run_pretraining.main([*interrupted, "--max_steps", "6"])  # the same command resumes from checkpoint-3
    whole, cut = step_logs(tmp_path / "whole"), step_logs(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert cut[step]["loss"] == pytest.approx(whole[step]["loss"], abs=1e-6), step


def write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for key, image, caption in samples:
            sink.write({"__key__": key, "jpg": image, "txt": caption.encode()})


def test_corrupt_webdataset_images_and_empty_captions_are_skipped_and_counted(data, tmp_path):
    pairs = load_pairs(data["pairs"], data["root"])[:12]
    samples = []
    for i, (image_path, caption) in enumerate(pairs):
        buffer = io.BytesIO()
        Image.open(image_path).convert("RGB").save(buffer, format="JPEG")
        samples.append((f"{i:09d}", buffer.getvalue(), caption))
    samples[3] = (samples[3][0], samples[3][1][:200], samples[3][2])  # a truncated JPEG
    samples[5] = (samples[5][0], samples[5][1], "")  # an empty caption
    write_shard(tmp_path / "00000.tar", samples[:6])
    write_shard(tmp_path / "00001.tar", samples[6:])
    args = [a for a in base_args(data, tmp_path / "run") if a not in ("--pair_file", str(data["pairs"]))]
    metrics = run_pretraining.main([
        *args, "--webdataset", str(tmp_path / "{00000..00001}.tar"), "--objectives", "pair_mlm:1,itc:1,text_mlm:1",
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--save_strategy", "no",
    ])  # fmt: skip
    assert metrics["train_skipped_images"] >= 1 and metrics["train_skipped_texts"] >= 2  # + the text file's one
    logs = step_logs(tmp_path / "run")
    assert sorted(logs) == [1, 2, 3, 4, 5, 6] and logs[6]["skipped_images"] >= 1


def test_errors_name_the_argument(data, tmp_path):
    endless = base_args(data, tmp_path / "e")
    args = [*endless, "--max_steps", "1"]
    with pytest.raises(ValueError, match="itc needs data: pass --pair_file"):
        no_pairs = [a for a in args if a not in ("--pair_file", str(data["pairs"]))]
        run_pretraining.main([*no_pairs, "--objectives", "itc"])
    with pytest.raises(ValueError, match="needs --lora_rank"):
        run_pretraining.main([*args, "--reg_loss_weight", "0.1"])
    with pytest.raises(ValueError, match="LoRA adapts a pretrained model"):
        run_pretraining.main([*args, "--lora_rank", "4"])
    with pytest.raises(ValueError, match="pass --max_steps"):
        run_pretraining.main(endless)
    for flag in ("--do_eval", "--do_predict"):
        with pytest.raises(ValueError, match="has no evaluation data: pass --do_train, without --do_eval"):
            run_pretraining.main([*args, flag])


def test_lora_text_pretraining_keeps_vision_outputs_and_merges(data, tmp_path):
    """Full pretraining from scratch, then LoRA on the text experts with self-regularisation from that folder:
    vision-only outputs bit-identical to the start, adapter in PEFT's format, merged folder without LoRA keys that
    equals the adapter model and loads through AutoModel in a fresh process."""
    base = tmp_path / "base"
    run_pretraining.main([*base_args(data, base, "--per_device_train_batch_size", "4"), "--max_steps", "2",
                          "--save_strategy", "no"])  # fmt: skip
    lora_dir = tmp_path / "lora"
    args = [a for a in base_args(data, lora_dir) if a not in ("--config_name", "beit3-base-patch16-224", "--config_overrides", TINY,
                                                              "--sentencepiece_model", str(data["spm"]))]  # fmt: skip
    metrics = run_pretraining.main([
        *args, "--model_name_or_path", str(base), "--objectives", "text_mlm", "--lora_rank", "4", "--lora_alpha", "8",
        "--lora_target", "text", "--reg_loss_weight", "0.01", "--per_device_train_batch_size", "4",
        "--max_steps", "3", "--learning_rate", "5e-2", "--save_strategy", "no",
    ])  # fmt: skip
    assert metrics["train_loss"] > 0
    assert (lora_dir / "adapter_config.json").is_file() and (lora_dir / "adapter_model.safetensors").is_file()
    adapter_keys = list(load_file(lora_dir / "adapter_model.safetensors"))
    assert adapter_keys and all(".text." in key and "lora_" in key for key in adapter_keys)
    assert all("reg_loss" in entry for entry in step_logs(lora_dir).values())

    from peft import PeftModel

    start = Beit3ForPreTraining.from_pretrained(base).eval()
    adapted = PeftModel.from_pretrained(Beit3ForPreTraining.from_pretrained(base), lora_dir).eval()
    pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.randint(4, 60, (2, 8))
    with torch.no_grad():
        assert torch.equal(adapted(pixel_values=pixel_values).mim_logits, start(pixel_values=pixel_values).mim_logits)
        text_change = (adapted(input_ids=input_ids).mlm_logits - start(input_ids=input_ids).mlm_logits).abs().max()
    assert text_change > 1e-4  # the adapters did train

    merged_dir = tmp_path / "merged"
    assert lora.main([str(lora_dir), "--output", str(merged_dir)]) == 0
    assert not [key for key in load_file(merged_dir / "model.safetensors") if "lora_" in key]
    merged = Beit3ForPreTraining.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        expected = adapted(input_ids=input_ids).mlm_logits
        torch.testing.assert_close(merged(input_ids=input_ids).mlm_logits, expected, rtol=0, atol=1e-5)
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "data = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n    logits = model(input_ids=data['input_ids']).mlm_logits\n"
        "print(type(model).__name__, float((logits - data['expected']).abs().max()))\n"
    )
    result = run_fresh_python(code, tmp_path, args=(str(merged_dir), str(tmp_path / "expected.pt")))
    name, diff = result.stdout.split()[-2:]
    assert name == "Beit3ForPreTraining" and float(diff) <= 1e-5


def test_image_mim_with_a_visual_tokenizer(data, tmp_path):
    from beit3_hf import VqkdConfig, VqkdModel

    torch.manual_seed(0)
    VqkdModel(VqkdConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, codebook_size=16, codebook_dim=8)).save_pretrained(tmp_path / "vqkd")  # fmt: skip
    args = [a for a in base_args(data, tmp_path / "run") if a not in ("--mim_target", "pixels")]
    run_pretraining.main([*args, "--objectives", "image_mim", "--visual_tokenizer", str(tmp_path / "vqkd"),
                          "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no"])  # fmt: skip
    assert all("image_mim_accuracy" in entry for entry in step_logs(tmp_path / "run").values())
    assert Beit3ForPreTraining.from_pretrained(tmp_path / "run").config.visual_vocab_size == 16


@pytest.mark.slow
def test_mixed_pretraining_gives_zero_shot_retrieval_above_chance(tmp_path):
    """examples/pretraining/README.md's CPU demonstration: 450 steps of pair MLM + ITC + MIM on the built-in data, then
    the saved folder retrieves the 100 test images zero-shot (no retrieval fine-tuning) far above chance
    (R@1 0.01, R@10 0.10). Measured: TR@1 0.08, IR@1 0.088, TR@10 0.49, IR@10 0.69."""
    demo = load_example_script(ROOT / "examples" / "demo" / "run_demo.py")
    run_retrieval = load_example_script(ROOT / "examples" / "retrieval" / "run_retrieval.py")
    data = write_synthetic_dataset(tmp_path / "data", num_train=2000, num_val=0, num_test=100,
                                   classification_train_per_class=0, classification_val_per_class=0)  # fmt: skip
    spm = demo.train_caption_tokenizer(data.karpathy_json, tmp_path / "tokenizer" / "captions.spm")
    run_pretraining.main([
        "--config_name", "beit3-base-patch16-224", "--config_overrides", demo.MODEL_OVERRIDES,
        "--sentencepiece_model", str(spm), "--max_text_length", "24",
        "--pair_file", str(data.karpathy_json), "--image_root", str(data.image_root),
        "--objectives", "pair_mlm:1,itc:2,image_mim:1", "--mim_target", "pixels", "--hflip", "False",
        "--min_crop_scale", "1.0", "--output_dir", str(tmp_path / "pretrained"), "--do_train", "--max_steps", "450",
        "--per_device_train_batch_size", "64", "--learning_rate", "1e-3", "--weight_decay", "0.05",
        "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "100", "--logging_steps", "25",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
    ])  # fmt: skip
    metrics = run_retrieval.main([
        "--model_name_or_path", str(tmp_path / "pretrained"), "--karpathy_json", str(data.karpathy_json),
        "--image_root", str(data.image_root), "--do_eval", "--eval_split", "test", "--max_text_length", "24",
        "--output_dir", str(tmp_path / "zero-shot"), "--per_device_eval_batch_size", "128", "--use_cpu",
        "--report_to", "none",
    ])  # fmt: skip
    assert metrics["eval_tr_r1"] >= 0.04 and metrics["eval_ir_r1"] >= 0.04  # chance: 0.01
    assert metrics["eval_tr_r10"] >= 0.3 and metrics["eval_ir_r10"] >= 0.3  # chance: 0.10
