"""Generate the golden parity fixtures of `tests/fixtures/golden/` from the original implementation.

The fixtures let every numeric parity check run without the original code: tiny random-weight models of every task
in the original (unilm) checkpoint format, their inputs, and the original's outputs; the original captioning beam
search's ids; and a small sentencepiece model with the ids the original tokenizer gives on a multilingual corpus.
`tests/test_golden.py` converts and compares them on every run, on every transformers version of the test matrix.

Run once, in `make test`'s environment (it has unilm `beit3` on torchscale 0.3.0 and sentencepiece):

    .venv/bin/python scripts/make_golden_fixtures.py --output tests/fixtures/golden

Regenerating changes the fixtures only if the original code or the recipe below changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # randomize_ and train_sentencepiece are shared with the tests

from beit3_hf import Beit3Config  # noqa: E402
from beit3_hf.conversion import original  # noqa: E402
from beit3_hf.conversion.checkpoint import random_inputs  # noqa: E402

from oracle_utils import randomize_, train_sentencepiece  # noqa: E402

#: The architecture of every golden model: small enough for well under 1 MB per task, 16 patches per image.
GOLDEN_ARCHITECTURE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=32,
    patch_size=8,
    vocab_size=120,
    max_position_embeddings=30,
)
TASK_LABELS = {"image-classification": 5, "vqa": 7, "nlvr2": 2}
NO_FINAL_LAYERNORM = {"image-classification", "vqa"}  # the original drops the encoder's final layer norm there
TASKS = ("backbone", "image-classification", "retrieval", "vqa", "nlvr2", "captioning", "pretraining")
VISUAL_VOCAB_SIZE = 24  # the `mim_head` width of the pretraining fixture
CAPTION_MAX_LENGTH = 10
# Added to the captioning head's `</s>` bias: short captions that end at `</s>`, and long ones cut at max_length.
CAPTION_EOS_BIASES = {"long": 0.8, "short": 1.6}

TOKENIZER_TRAINING_TEXT = [
    "A man riding a wave on top of a surfboard.",
    "two dogs play in the snow next to a red car",
    "一只猫坐在窗台上。两个孩子在公园里踢足球。",
    "Crème brûlée à la française, naïve café, Ångström, São Paulo, Zürich.",
    "Tiếng Việt rất đẹp. Đây là một con chó.",
    "ｶﾞｷﾞ full width ＡＢＣ and ligature fi, one half 1/2.",  # noqa: RUF001
]
TOKENIZER_CORPUS = [
    "A man riding a wave on top of a surfboard.",
    "两个孩子在公园里踢足球,一辆红色的公共汽车停在路边。",
    "Crème brûlée, naïve café",
    "Cre\u0300me bru\u0302le\u0301e, nai\u0308ve cafe\u0301",  # decomposed accents
    "Tiếng Việt rất đẹp",
    "Emoji 🙂🚀 test 👍🏽 ❤️ 🦜",
    "",
    "   \t \n  ",
    "multiple   spaces\tand\ttabs\nand newlines  ",
    "ＦＵＬＬ width ｶﾞｷﾞ and ﬁ ligature ½ …",  # noqa: RUF001
    "no\u00a0break\u3000ideographic\u200bzero width",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. 안녕하세요",  # noqa: RUF001
    "x" * 300,
    "猫" * 100,
]
TOKENIZER_MAX_LENGTH = 64


def golden_config(task: str, **overrides) -> Beit3Config:
    kwargs = dict(GOLDEN_ARCHITECTURE, use_final_layernorm=task not in NO_FINAL_LAYERNORM, **overrides)
    if task in TASK_LABELS:
        kwargs["num_labels"] = TASK_LABELS[task]
    return Beit3Config(**kwargs)


def input_variants(task: str, config: Beit3Config) -> dict[str, dict[str, torch.Tensor]]:
    """Fused inputs with padded text; for the backbone also vision-only, text-only and unpadded text."""
    full = random_inputs(config, task, batch_size=3, text_len=7, seed=11)
    if task == "pretraining":  # masked images, texts, and pairs (masked image + text)
        return {
            "pair": full,
            "image": {"pixel_values": full["pixel_values"], "bool_masked_pos": full["bool_masked_pos"]},
            "text": {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]},
        }
    if task != "backbone":
        return {"main": full}
    return {
        "fused": full,
        "vision": {"pixel_values": full["pixel_values"]},
        "text": {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]},
        "text-unpadded": {"input_ids": full["input_ids"][:1]},
    }


def original_ids(processor, text: str) -> tuple[list[int], list[int]]:
    """The original `XLMRobertaTokenizer` + `_get_text_segment`: `<s> pieces </s>` then `<pad>`, mask 1 = attend.

    XLM-R ids are sentencepiece ids shifted by the fairseq offset 1, with sentencepiece's `<unk>` (0) at 3.
    """
    ids = [3 if piece == 0 else piece + 1 for piece in processor.encode(text)]
    tokens = [0, *ids[: TOKENIZER_MAX_LENGTH - 2], 2]
    padding = TOKENIZER_MAX_LENGTH - len(tokens)
    return tokens + [1] * padding, [1] * len(tokens) + [0] * padding


def write_tokenizer_fixture(output: Path) -> int:
    """Train the golden sentencepiece model and record the original ids; returns its `<mask>` id."""
    import shutil

    import sentencepiece

    model_path = train_sentencepiece(output, TOKENIZER_TRAINING_TEXT, "unigram", vocab_size=100)
    shutil.move(model_path, output / "tokenizer.spm")
    for leftover in output.glob("tiny_unigram*"):
        leftover.unlink()
    for leftover in output.glob("corpus_*.txt"):
        leftover.unlink()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(output / "tokenizer.spm"))
    encoded = [original_ids(processor, text) for text in TOKENIZER_CORPUS]
    mask_token_id = processor.get_piece_size() + 1  # XLM-R puts `<mask>` after the shifted pieces
    fixture = {
        "max_length": TOKENIZER_MAX_LENGTH,
        "mask_token_id": mask_token_id,
        "texts": TOKENIZER_CORPUS,
        "input_ids": [ids for ids, _ in encoded],
        "attention_mask": [mask for _, mask in encoded],
    }
    (output / "tokenizer_ids.json").write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    return mask_token_id


def write_task_fixture(output: Path, task: str, seed: int, mask_token_id: int) -> None:
    config = golden_config(task, mask_token_id=mask_token_id if task == "captioning" else None)
    if task == "pretraining":
        config.visual_vocab_size = VISUAL_VOCAB_SIZE
    model = original.build_original_model(task, config)
    randomize_(model, seed)
    tensors = {f"weights/{key}": value.clone() for key, value in model.state_dict().items()}
    for variant, inputs in input_variants(task, config).items():
        outputs = original.run_original(model, task, **inputs)
        tensors.update({f"inputs/{variant}/{name}": value.clone() for name, value in inputs.items()})
        tensors.update({f"outputs/{variant}/{name}": value.contiguous() for name, value in outputs.items()})
    metadata = {"task": task, "num_attention_heads": str(config.num_attention_heads)}
    if task == "captioning":
        pixel_values = torch.randn(
            5, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5)
        )
        tensors["beams/pixel_values"] = pixel_values
        eos_bias = model.mlm_head.bias.detach()[config.eos_token_id].item()
        for name, bias in CAPTION_EOS_BIASES.items():
            with torch.no_grad():
                model.mlm_head.bias[config.eos_token_id] = eos_bias + bias
            tensors[f"beams/{name}/weights/mlm_head.bias"] = model.mlm_head.bias.detach().clone()
            for num_beams in (1, 2, 3):
                ids = original.original_beam_search(
                    model, pixel_values, num_beams=num_beams, max_length=CAPTION_MAX_LENGTH, length_penalty=0.6,
                    vocab_size=config.vocab_size, mask_token_id=mask_token_id,
                )  # fmt: skip
                tensors[f"beams/{name}/num_beams_{num_beams}"] = ids.contiguous()
        metadata.update(mask_token_id=str(mask_token_id), max_length=str(CAPTION_MAX_LENGTH), length_penalty="0.6")
    save_file(tensors, output / f"beit3_tiny_{task}.safetensors", metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "tests" / "fixtures" / "golden")
    args = parser.parse_args(argv)
    if not original.is_available():
        parser.error("the original beit3 / torchscale code is not installed: run `make test` once to install it.")
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the same bits on every run (multi-threaded reductions may differ in the last bit)
    mask_token_id = write_tokenizer_fixture(args.output)
    for seed, task in enumerate(TASKS):
        write_task_fixture(args.output, task, seed, mask_token_id)
    total = sum(path.stat().st_size for path in args.output.iterdir())
    print(f"wrote {len(list(args.output.iterdir()))} files, {total / 1e6:.2f} MB, to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
