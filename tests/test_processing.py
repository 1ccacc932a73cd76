"""Tokenizer, image processor and Beit3Processor against the original BEiT-3 preprocessing.

Oracles, built here without downloads:
* text: what `XLMRobertaTokenizer("beit3.spm")` (slow, transformers 4.x) + `BaseDataset._get_text_segment` did, written
  with `sentencepiece` directly: pieces -> ids (sentencepiece unk -> 3, piece p -> p + 1), `[0] + ids[:max_len - 2] +
  [2]`, padded with 1, `padding_mask` 1 = pad. The sentencepiece models are trained here on a small multilingual text.
* images: the original eval transforms, torchvision on `pil_loader`-style `convert("RGB")` PIL images.
"""

from __future__ import annotations

import copy
import doctest
import importlib.util
import json
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torchvision import transforms
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, TokenizersBackend
from transformers.utils import logging as hf_logging

import beit3_hf.models.beit3.image_processing_beit3 as image_processing_module
import beit3_hf.models.beit3.processing_beit3 as processing_module
from beit3_hf.conversion.tasks import TASKS
from beit3_hf.conversion.tokenizer import build_processor, load_sentencepiece_tokenizer
from beit3_hf.models.beit3.configuration_beit3 import Beit3Config
from beit3_hf.models.beit3.image_processing_beit3 import Beit3ImageProcessor
from beit3_hf.models.beit3.processing_beit3 import Beit3Processor

from oracle_utils import run_fresh_python, train_sentencepiece

# ----------------------------------------------------------------------------------------------------------------
# Fixtures and oracles
# ----------------------------------------------------------------------------------------------------------------

TRAINING_TEXT = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play in the snow near a red fence.",
    "What color is the bus? Is there a dog in the picture?",
    "The left image contains exactly two dogs, and the right image contains one.",
    "A plate of food with broccoli, rice and a fork on a wooden table.",
    "一只猫坐在窗台上。两个孩子在公园里踢足球。一辆红色的公共汽车停在路边。",
    "Crème brûlée à la française, naïve café, Ångström, São Paulo, Zürich, façade, señor.",
    "Tiếng Việt rất đẹp. Đây là một con chó.",
    "Emoji 🙂 🚀 👍 ❤ test, smiles 🙂🙂 and rockets 🚀.",
    "Numbers 12345 and 3.14, symbols # % & * ( ) [ ] - _ + = / \\ | ; : ' \" , . < > ? !",
    "ｶﾞｷﾞ full width ＡＢＣ and ligature fi, one half 1/2.",  # noqa: RUF001
]

CORPUS = [
    "A man riding a wave on top of a surfboard.",
    "two dogs play in the snow",
    "一只猫坐在窗台上。",
    "两个孩子在公园里踢足球,一辆红色的公共汽车停在路边。",
    "Crème brûlée à la française, naïve café, Ångström, São Paulo.",
    unicodedata.normalize("NFD", "Crème brûlée, naïve café"),  # decomposed accents
    "Tiếng Việt rất đẹp",
    unicodedata.normalize("NFD", "Tiếng Việt rất đẹp"),
    "Emoji 🙂🚀 test 👍🏽 ❤️ 👨‍👩‍👧 🦜",  # skin tone, variation selector, ZWJ family, unseen parrot
    "",
    " ",
    "   \t \n  ",
    "multiple   spaces\tand\ttabs\nand newlines  ",
    "  leading and trailing  ",
    "ＦＵＬＬ width ｶﾞｷﾞ and ﬁ ligature ½ … ™",  # noqa: RUF001
    "no\u00a0break\u3000ideographic\u200bzero width",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. 안녕하세요",  # noqa: RUF001 (scripts absent from training: <unk>)
    "x" * 300,
    " ".join(["word"] * 100),
    "猫" * 100,
    "The left image contains exactly two dogs, and the right image contains one. " * 5,
]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("spm")
    return {model_type: train_sentencepiece(folder, TRAINING_TEXT, model_type) for model_type in ("unigram", "bpe")}


@pytest.fixture(scope="module")
def spm_path(spm_models) -> Path:
    return spm_models["unigram"]


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return load_sentencepiece_tokenizer(spm_path)


def oracle_text(sp: sentencepiece.SentencePieceProcessor, text: str, max_len: int = 64) -> tuple[list, list]:
    """Original: slow XLMRobertaTokenizer ids + `_get_text_segment` (returns ids and padding_mask, 1 = pad)."""
    pieces = sp.encode(text, out_type=str)  # XLMRobertaTokenizer._tokenize
    ids = []
    for piece in pieces:  # XLMRobertaTokenizer._convert_token_to_id
        spm_id = sp.piece_to_id(piece)
        ids.append(spm_id + 1 if spm_id else 3)
    assert ids == [3 if i == 0 else i + 1 for i in sp.encode(text)]
    tokens = [0, *ids[: max_len - 2], 2]
    return tokens + [1] * (max_len - len(tokens)), [0] * len(tokens) + [1] * (max_len - len(tokens))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real-looking RGB test picture: gradients, noise, filled shapes with hard edges, thin lines."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 100 * np.sin((x + 2 * y) / 9)], axis=-1
    )
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.15, height * 0.2, width * 0.65, height * 0.8), fill=(220, 30, 60))
    draw.rectangle((width * 0.5, height * 0.1, width * 0.9, height * 0.45), outline=(0, 255, 0), width=3)
    draw.line((0, height - 1, width - 1, 0), fill=(255, 255, 255), width=1)
    return image


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":  # 16-bit grey using the full range, as a 16-bit PNG decodes
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    if mode == "RGBA":  # varying alpha: the original drops it
        rgba = image.convert("RGBA")
        rgba.putalpha(image.convert("L"))
        return rgba
    return image.convert(mode)


def original_transform(task: str, size: int) -> transforms.Compose:
    """`build_transform(is_train=False)` / `build_imagenet_transform(is_train=False)` of unilm/beit3/datasets.py."""
    if task == "vision-language":
        return transforms.Compose(
            [
                transforms.Resize((size, size), interpolation=3),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )
    return transforms.Compose(
        [
            transforms.Resize(int(size / 1.0), interpolation=3),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def wordpiece_tokenizer() -> TokenizersBackend:
    """A tiny Chinese BERT-style WordPiece tokenizer: cls/sep/pad/unk/mask, no bos/eos."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一只猫坐在窗台上。两个孩子公园里踢足球"]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return TokenizersBackend(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_token_ids_and_mask_match_original(spm_models, model_type):
    path = spm_models[model_type]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokenizer = load_sentencepiece_tokenizer(path)
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer)
    batch = processor(text=CORPUS)
    encoded = tokenizer(CORPUS, padding="max_length", truncation=True, max_length=64)
    assert batch["input_ids"].shape == (len(CORPUS), 64)
    for row, text in enumerate(CORPUS):
        ids, padding_mask = oracle_text(sp, text)
        assert batch["input_ids"][row].tolist() == ids, text
        assert batch["attention_mask"][row].tolist() == [1 - m for m in padding_mask], text
        assert encoded["input_ids"][row] == ids, text  # the tokenizer alone reproduces it too
        assert encoded["attention_mask"][row] == [1 - m for m in padding_mask], text
    # The corpus exercises what it claims to: unknown characters, truncation and the empty text.
    flat = batch["input_ids"].flatten().tolist()
    assert 3 in flat and batch["attention_mask"].sum(1).max() == 64 and batch["attention_mask"].sum(1).min() == 2


def test_special_ids_and_settings(spm_path, tokenizer):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.cls_token_id == 0 and tokenizer.sep_token_id == 2
    assert tokenizer.mask_token_id == len(sp) + 1 and len(tokenizer) == len(sp) + 2
    assert tokenizer.model_max_length == 64 and tokenizer.padding_side == "right"
    pieces = [sp.id_to_piece(i) for i in range(3, len(sp))]
    assert tokenizer.convert_tokens_to_ids(pieces) == list(range(4, len(sp) + 1))
    assert tokenizer("a dog <mask> here").input_ids.count(len(sp) + 1) == 1


def test_shorter_max_length_like_captioning(spm_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tokenizer = load_sentencepiece_tokenizer(spm_path, max_length=32)
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer, max_length=32)
    batch = processor(text=CORPUS[-3:])
    for row, text in enumerate(CORPUS[-3:]):
        assert batch["input_ids"][row].tolist() == oracle_text(sp, text, max_len=32)[0]
    assert tokenizer.model_max_length == 32


def test_saved_tokenizer_is_plain_transformers(tmp_path, spm_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend" and "auto_map" not in config
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    kwargs = {"padding": "max_length", "truncation": True}
    assert reloaded(CORPUS, **kwargs)["input_ids"] == tokenizer(CORPUS, **kwargs)["input_ids"]
    assert reloaded.model_max_length == 64 and reloaded.mask_token_id == tokenizer.mask_token_id


def test_conversion_needs_neither_sentencepiece_nor_protobuf(spm_path, tokenizer):
    code = (
        "import json, sys\n"
        "sys.modules.update(dict.fromkeys(['sentencepiece', 'google', 'google.protobuf']))  # None: imports fail\n"
        "from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer\n"
        "print(json.dumps(load_sentencepiece_tokenizer(sys.argv[1])(sys.argv[2:])['input_ids']))\n"
    )
    texts = CORPUS[:9]
    args = [sys.executable, "-c", code, str(spm_path), *texts]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == tokenizer(texts)["input_ids"]


def test_decode_round_trip(tokenizer):
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer)
    texts = ["a man riding a wave on top of a surfboard.", "两个孩子在公园里踢足球。"]
    ids = processor(text=texts)["input_ids"]
    assert processor.batch_decode(ids) == texts
    assert processor.decode(ids[0]) == texts[0]
    assert processor.decode(ids[0], skip_special_tokens=False).startswith("<s>")


def test_bad_sentencepiece_files(tmp_path):
    missing = tmp_path / "nope.spm"
    with pytest.raises(FileNotFoundError, match="nope.spm"):
        load_sentencepiece_tokenizer(missing)
    text_file = tmp_path / "vocab.txt"
    text_file.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.* is not a sentencepiece model"):
        load_sentencepiece_tokenizer(text_file)
    empty = tmp_path / "empty.spm"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.spm.*empty"):
        load_sentencepiece_tokenizer(empty)
    noise = tmp_path / "noise.spm"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"noise\.spm.* is not a sentencepiece model"):
        load_sentencepiece_tokenizer(noise)
    with pytest.raises(ValueError, match="is not a file"):
        load_sentencepiece_tokenizer(tmp_path)
    noise.write_bytes(b"\x1a\x00" * 8)  # well-formed protobuf (empty normalizer specs), no pieces
    with pytest.raises(ValueError, match=r"noise\.spm.* is not a sentencepiece model.*0 pieces"):
        load_sentencepiece_tokenizer(noise)
    (tmp_path / "corpus.txt").write_text("\n".join(TRAINING_TEXT * 5), encoding="utf-8")
    for name, ids in [("no_bos", {"bos_id": -1}), ("moved", {"unk_id": 3, "bos_id": 0, "eos_id": 1, "pad_id": 2})]:
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / name), vocab_size=180, minloglevel=2, **ids
        )
        with pytest.raises(ValueError, match=rf"{name}\.model.* starts with pieces .* requires .* <unk>, <s>, </s>"):
            load_sentencepiece_tokenizer(tmp_path / f"{name}.model")


def test_wordpiece_tokenizer_adds_its_own_cls_sep():
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=wordpiece_tokenizer())
    first = processor(text=["一只猫坐在窗台上。", "两个孩子"], max_length=8)
    assert sorted(first.keys()) == ["attention_mask", "input_ids"]
    assert first["input_ids"].tolist() == [[2, 5, 6, 7, 8, 9, 10, 3], [2, 14, 15, 16, 17, 3, 0, 0]]
    assert first["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]


def test_text_type_errors(tokenizer):
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer)
    with pytest.raises(TypeError, match=r"text\[1\] must be a str, got int: 3"):
        processor(text=["a dog", 3])
    with pytest.raises(TypeError, match="text must be a str or a list of str, got bytes"):
        processor(text=b"a dog")
    with pytest.raises(TypeError, match=r"text\[0\] must be a str, got list"):
        processor(text=[["pre", "tokenized"]])
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="needs images=..., text=..., or both"):
        processor()
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['add_special_tokens'\]"):
        processor(text="a", add_special_tokens=False)
    with pytest.raises(ValueError, match="sideways is not a valid PaddingStrategy"):
        processor(text="a", padding="sideways")


def test_max_length_is_validated_wherever_it_is_set(tokenizer):
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer, max_length=1)
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 2 .*got 1"):
        processor(text="a dog")
    processor.max_length = 16  # as examples/retrieval does after loading
    assert processor(text="a dog")["input_ids"].shape == (1, 16)
    with pytest.raises(ValueError, match="got True"):
        processor(text="a dog", max_length=True)


def test_padding_options_and_tensor_types(tokenizer):
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=tokenizer)
    longest = processor(text=["a dog", "a man riding a wave"], padding="longest", return_tensors=None)
    lengths = [len(row) for row in longest["input_ids"]]
    assert lengths[0] == lengths[1] < 64 and longest["attention_mask"][0][-1] == 0
    as_numpy = processor(text="a dog", return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["input_ids"].shape == (1, 64)


def test_text_is_padded_on_the_right_whatever_the_tokenizers_padding_side(tokenizer):
    """BEiT-3's text positions start at `<s>`; transformers 5.25's image-text-to-text pipeline sets the tokenizer to
    left padding, which put padding before `<s>` (the captioning pipeline then failed on its attention mask)."""
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(), tokenizer=copy.deepcopy(tokenizer))
    right = processor(text=["a dog", "a man riding a wave"], padding="longest")
    processor.tokenizer.padding_side = "left"
    for padding in ("longest", "max_length"):
        batch = processor(text=["a dog", "a man riding a wave"], padding=padding)
        assert batch["input_ids"][:, 0].tolist() == [tokenizer.bos_token_id] * 2
        assert batch["attention_mask"][:, 0].tolist() == [1, 1] and batch["attention_mask"][0, -1] == 0
    assert torch.equal(
        processor(text=["a dog", "a man riding a wave"], padding="longest")["input_ids"], right["input_ids"]
    )


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------

SIZES = [(333, 517), (640, 427), (37, 1200), (1, 1), (518, 333)]
MODES = ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr"]


@pytest.mark.parametrize(("task", "size"), [("vision-language", 384), ("image-classification", 224)])
def test_pixel_values_equal_original_transforms(task, size):
    processor = Beit3ImageProcessor(task=task, image_size=size)
    reference = original_transform(task, size)
    images, expected = [], []
    for index, (width, height) in enumerate(SIZES):
        for mode in MODES:
            image = as_mode(photo(width, height, seed=index), mode)
            images.append(image)
            expected.append(reference(image.convert("RGB")))
    assert {image.mode for image in images} == set(MODES)
    pixel_values = processor(images, return_tensors="pt").pixel_values
    assert pixel_values.shape == (len(images), 3, size, size) and pixel_values.dtype == torch.float32
    assert (pixel_values - torch.stack(expected)).abs().max().item() == 0.0
    # One at a time gives the same values.
    single = processor(images[7], return_tensors="pt").pixel_values[0]
    assert torch.equal(single, pixel_values[7])


def test_center_crop_larger_than_the_image_pads_like_torchvision():
    processor = Beit3ImageProcessor(
        task="image-classification", size={"shortest_edge": 30}, crop_size={"height": 33, "width": 37}
    )
    reference = transforms.Compose([transforms.Resize(30, interpolation=3), transforms.CenterCrop((33, 37))])
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(processor.image_mean, processor.image_std)]
    )
    for width, height in [(41, 30), (30, 30), (90, 61)]:
        image = photo(width, height, seed=width)
        got = processor(image, return_tensors="pt").pixel_values[0]
        assert got.shape == (3, 33, 37) and torch.equal(got, normalize(reference(image))), (width, height)


def test_array_and_tensor_inputs_match_pil():
    processor = Beit3ImageProcessor(task="vision-language", image_size=96)
    base = photo(130, 70, seed=3)
    rgb = np.array(base)
    rgba = np.array(as_mode(base, "RGBA"))
    grey = np.array(base.convert("L"))
    la = np.array(base.convert("LA"))
    cases = [
        (rgb, base),  # HWC uint8
        (torch.from_numpy(rgb).permute(2, 0, 1), base),  # CHW uint8 tensor
        (rgba, Image.fromarray(rgba)),  # RGBA array: alpha dropped like convert("RGB")
        (grey[..., None], Image.fromarray(grey)),  # (H, W, 1)
        (torch.from_numpy(grey)[None], Image.fromarray(grey)),  # (1, H, W)
        (la, base.convert("LA")),  # (H, W, 2): grey + alpha
    ]
    reference = original_transform("vision-language", 96)
    for array, pil in cases:
        expected = reference(pil.convert("RGB"))
        got = processor(array, return_tensors="pt").pixel_values[0]
        assert torch.equal(got, expected), type(array)
    batch = np.stack([rgb, rgb[:, ::-1]])  # rank-4 batch
    out = processor(batch, return_tensors="pt").pixel_values
    assert out.shape == (2, 3, 96, 96)
    assert torch.equal(out[1], reference(Image.fromarray(np.ascontiguousarray(rgb[:, ::-1]))))
    channels_first = processor(rgb.transpose(2, 0, 1), input_data_format="channels_first", return_tensors="pt")
    assert torch.equal(channels_first.pixel_values[0], reference(base))


def test_float_integer_and_16bit_inputs(caplog):
    processor = Beit3ImageProcessor(task="vision-language", image_size=96)
    reference = original_transform("vision-language", 96)
    image = photo(130, 70, seed=5)
    expected = reference(image)
    array = np.asarray(image)
    # 8-bit values in other dtypes and on other scales: the same pixels (float data is rounded to 8 bits).
    for other in (
        array.astype(np.float32),
        array.astype(np.int64),
        array.astype(np.uint16),
        np.clip(array + 0.3, 0, 255),
    ):
        assert torch.equal(processor(other, return_tensors="pt").pixel_values[0], expected), other.dtype
    chw = array.transpose(2, 0, 1).astype(np.float32)  # never modified in place, even when nothing is resized
    processor(chw, do_resize=False, return_tensors="pt")
    assert np.array_equal(chw, array.transpose(2, 0, 1))
    zero_one = processor(array / 255.0, do_rescale=False, return_tensors="pt").pixel_values[0]
    assert (zero_one - expected).abs().max().item() <= 2 / 255 / 0.5  # quantised to 8 bits for Pillow's resize
    # Never silently saturated: values beyond 0-255 are an error naming the entry ...
    sixteen = array.astype(np.uint16) * 257
    with pytest.raises(ValueError, match=r"images\[1\] \(uint16\) has values in \[0, 65535\].*0-255 scale"):
        processor([array, sixteen])
    with pytest.raises(ValueError, match=r"images \(int64\) has values in \[-1, "):
        processor(torch.from_numpy(array.astype(np.int64) - 1).permute(2, 0, 1))
    # ... and a 16-bit PIL image is converted as the original's convert("RGB") does, with a warning that it clips.
    hf_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        sixteen_bit = as_mode(image, "I;16")
        got = processor(sixteen_bit, return_tensors="pt").pixel_values[0]
    assert torch.equal(got, reference(sixteen_bit.convert("RGB")))
    assert any("'I;16' PIL image with values outside 0-255 is clipped" in r.getMessage() for r in caplog.records)


def test_empty_images_are_errors_naming_the_argument():
    processor = Beit3ImageProcessor()
    with pytest.raises(ValueError, match=r"images\[1\] is an empty image \(0x0 pixels\)"):
        processor([photo(8, 8), Image.new("RGB", (0, 0))])
    with pytest.raises(ValueError, match=r"images is an empty image \(5x0 pixels\)"):
        processor(Image.new("L", (5, 0)))
    with pytest.raises(ValueError, match=r"images\[0\] is empty \(shape \(0, 0, 3\)\)"):
        processor([np.zeros((0, 0, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"images is empty \(shape \(0, 3, 8, 8\)\)"):
        processor(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_paths_and_unreadable_files(tmp_path):
    processor = Beit3ImageProcessor(task="vision-language", image_size=64)
    image = photo(120, 90, seed=1)
    jpeg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    image.save(jpeg, quality=90)
    as_mode(image, "RGBA").save(png)
    from_paths = processor([str(jpeg), png], return_tensors="pt").pixel_values
    reference = original_transform("vision-language", 64)
    with Image.open(jpeg) as a, Image.open(png) as b:
        expected = torch.stack([reference(a.convert("RGB")), reference(b.convert("RGB"))])
    assert torch.equal(from_paths, expected)

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"Cannot read image file .*truncated\.jpg.*truncated"):
        processor([str(jpeg), str(truncated)])
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match=r"Cannot read image file .*notes\.txt"):
        processor(str(not_image))
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        processor(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="URL"):
        processor("https://example.com/cat.jpg")


def test_repeated_and_lazily_decoded_images(tmp_path):
    path = tmp_path / "lazy.png"
    as_mode(photo(80, 60, seed=2), "P").save(path)
    lazy = Image.open(path)  # not decoded yet, and listed twice
    processor = Beit3ImageProcessor(task="vision-language", image_size=32)
    out = processor([lazy, photo(20, 30), lazy, str(path)], return_tensors="pt").pixel_values
    expected = original_transform("vision-language", 32)(Image.open(path).convert("RGB"))
    for row in (0, 2, 3):
        assert torch.equal(out[row], expected)


def test_wrong_rank_and_type_errors():
    processor = Beit3ImageProcessor()
    with pytest.raises(ValueError, match=r"images has rank 2 \(shape \(32, 32\)\).*add a channel axis"):
        processor(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images has rank 5"):
        processor(torch.zeros(1, 2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images\[1\] has rank 1"):
        processor([np.zeros((8, 8, 3), dtype=np.uint8), np.zeros(8, dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"images\[0\] is a int"):
        processor([3])
    with pytest.raises(ValueError, match="images is empty"):
        processor([])
    with pytest.raises(ValueError, match="Cannot find the channel axis"):
        processor(np.zeros((10, 10, 7), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"images\[0\] has dtype bool"):
        processor([np.zeros((4, 4, 3), dtype=bool)])


def test_config_round_trip_and_task_presets(tmp_path):
    classifier = Beit3ImageProcessor(task="image-classification", image_size=480)
    assert classifier.do_center_crop and classifier.size.shortest_edge == 480 and classifier.crop_size.height == 480
    assert tuple(classifier.image_mean) == (0.485, 0.456, 0.406)
    classifier.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["task"] == "image-classification" and saved["size"] == {"shortest_edge": 480}
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_beit3.Beit3ImageProcessor"
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is Beit3ImageProcessor and reloaded.to_dict() == classifier.to_dict()
    vl = Beit3ImageProcessor(image_size=384)
    assert not vl.do_center_crop and vl.size.height == vl.size.width == 384 and tuple(vl.image_std) == (0.5,) * 3
    with pytest.raises(ValueError, match="Unknown task 'detection'"):
        Beit3ImageProcessor(task="detection")
    with pytest.raises(ValueError, match="either image_size"):
        Beit3ImageProcessor(image_size=224, size=384)


@pytest.mark.parametrize("module", [image_processing_module, processing_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------
# Processor: pairs, build_processor, fresh-process round trip
# ----------------------------------------------------------------------------------------------------------------


def test_nlvr2_pairs(tokenizer):
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(image_size=64), tokenizer=tokenizer)
    a, b, c = photo(90, 60, 1), as_mode(photo(50, 80, 2), "L"), photo(64, 64, 3)
    batch = processor(images=[(a, b), [c, a]], text=["Two dogs.", "One cat."])
    assert batch["pixel_values"].shape == (2, 2, 3, 64, 64) and batch["input_ids"].shape == (2, 64)
    singles = processor(images=[a, b, c, a])["pixel_values"]
    assert torch.equal(batch["pixel_values"].reshape(4, 3, 64, 64), singles)
    as_lists = processor(images=[(a, b)], return_tensors=None)["pixel_values"]
    assert len(as_lists) == 1 and as_lists[0].shape == (2, 3, 64, 64)

    with pytest.raises(ValueError, match=r"NLVR2 pair images\[1\] has 3 element\(s\)"):
        processor(images=[(a, b), (a, b, c)], text=["x", "y"])
    with pytest.raises(ValueError, match=r"NLVR2 pair images\[0\] has 1 element"):
        processor(images=[(a,)])
    with pytest.raises(ValueError, match=r"images mixes NLVR2 pairs and single images: images\[1\]"):
        processor(images=[(a, b), c])
    with pytest.raises(ValueError, match=r"images\[0\]\[1\] is a list of length 2, not a single image"):
        processor(images=[(a, [b, c])])
    with pytest.raises(ValueError, match=r"images\[0\]\[0\] is a ndarray of shape \(2, 8, 8, 3\)"):
        processor(images=[(np.zeros((2, 8, 8, 3), dtype=np.uint8), a)])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_build_processor_tasks(spm_path, task):
    processor = build_processor(spm_path, task=task, image_size=96)
    image_processor = processor.image_processor
    assert image_processor.task == TASKS[task].image_processor and processor.max_length == 64
    expected = original_transform(TASKS[task].image_processor, 96)(photo(150, 100, 4))
    assert torch.equal(processor(images=photo(150, 100, 4))["pixel_values"][0], expected)


def test_build_processor_rejects_unknown_task(spm_path):
    with pytest.raises(ValueError, match=r"Unknown task 'imagenet'; choose one of"):
        build_processor(spm_path, task="imagenet", image_size=224)


CHILD = textwrap.dedent(
    """
    import json, sys

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder, data = sys.argv[1], sys.argv[2]
    inputs = json.load(open(data + "/inputs.json"))
    images = [Image.open(data + "/" + name) for name in inputs["images"]]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    names = [type(processor).__name__, type(processor.image_processor).__name__, type(image_processor).__name__,
             type(tokenizer).__name__]
    out = dict(processor(images=images, text=inputs["texts"]))
    out["pairs"] = processor(images=[(images[0], images[1])], text=inputs["texts"][0])["pixel_values"]
    out["image_processor"] = image_processor(images, return_tensors="pt")["pixel_values"]
    out["tokenizer"] = tokenizer(inputs["texts"], padding="max_length", truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    out["decoded"] = processor.batch_decode(out["input_ids"])
    processor.save_pretrained(data + "/resaved")  # save again from the remote-code classes, reload, compare
    again = AutoProcessor.from_pretrained(data + "/resaved", trust_remote_code=True)
    out["resaved"] = again(images=images, text=inputs["texts"])["pixel_values"]
    out["names"] = names
    out["modules"] = sorted(m for m in sys.modules if "beit3" in m)
    torch.save(out, data + "/child.pt")
    """
)


def test_fresh_process_round_trip_without_package(tmp_path, spm_path):
    folder, data = tmp_path / "checkpoint", tmp_path / "data"
    data.mkdir()
    processor = build_processor(spm_path, task="vqa", image_size=96)
    Beit3Config().save_pretrained(folder)  # the converter's folder also holds the model config
    processor.save_pretrained(folder)
    files = {p.name for p in folder.iterdir()}
    expected_files = {"processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected_files | {"processing_beit3.py", "image_processing_beit3.py"} <= files
    assert "preprocessor_config.json" not in files  # the image processor is nested in processor_config.json
    assert "tokenization_beit3.py" not in files
    nested = json.loads((folder / "processor_config.json").read_text())
    assert nested["auto_map"] == {"AutoProcessor": "processing_beit3.Beit3Processor"} and nested["max_length"] == 64
    assert nested["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_beit3.Beit3ImageProcessor"

    # In a process that imported beit3_hf, the registered classes load without trust_remote_code.
    assert type(AutoProcessor.from_pretrained(folder)) is Beit3Processor
    assert type(AutoImageProcessor.from_pretrained(folder)) is Beit3ImageProcessor

    names = []
    for index, (size, mode) in enumerate([((333, 517), "RGB"), ((640, 427), "RGBA"), ((50, 700), "I;16")]):
        image = as_mode(photo(*size, seed=index), mode)
        image.save(data / f"{index}.png")
        names.append(f"{index}.png")
    texts = ["what color is the bus?", "两只猫在床上睡觉。", "x" * 200]
    (data / "inputs.json").write_text(json.dumps({"images": names, "texts": texts}))

    run_fresh_python(CHILD, tmp_path, args=(str(folder), str(data)), timeout=300)
    child = torch.load(data / "child.pt", weights_only=False)

    assert child["names"] == ["Beit3Processor", "Beit3ImageProcessor", "Beit3ImageProcessor", "TokenizersBackend"]
    assert all(module.startswith("transformers_modules.") for module in child["modules"]), child["modules"]
    images = []
    for name in names:
        with Image.open(data / name) as image:
            image.load()
            images.append(image)
    ours = processor(images=images, text=texts)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(child[key], ours[key]), key
    assert torch.equal(child["image_processor"], ours["pixel_values"])
    assert torch.equal(child["resaved"], ours["pixel_values"])
    assert torch.equal(child["tokenizer"], ours["input_ids"])
    assert torch.equal(child["pairs"][0], ours["pixel_values"][:2])
    assert child["decoded"] == processor.batch_decode(ours["input_ids"])
    reference = original_transform("vision-language", 96)
    assert torch.equal(ours["pixel_values"][2], reference(images[2].convert("RGB")))


def test_benchmark_script_runs(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "preprocessing.py"
    spec = importlib.util.spec_from_file_location("preprocessing_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--num-images", "3", "--size", "32", "--repeats", "1", "--workers", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("original", "Beit3ImageProcessor"))]
    assert len(rows) == 5 and all(line.endswith("0.00e+00") for line in rows), lines
