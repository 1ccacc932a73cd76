"""Build BEiT-3's text tokenizer from the original ``beit3.spm`` sentencepiece model, and the full processor.

The original code (``unilm/beit3/datasets.py``) loads ``beit3.spm`` with the *slow* ``XLMRobertaTokenizer`` of
transformers 4.x, i.e. it tokenizes with sentencepiece and renumbers the pieces the fairseq way::

    <s> = 0, <pad> = 1, </s> = 2, <unk> = 3, sentencepiece piece p (p >= 3) -> p + 1, <mask> = len(sp) + 1

This module reads the model file itself (a small reader for the sentencepiece model format) and builds a
``tokenizers`` pipeline that reproduces sentencepiece's normalization and segmentation, wrapped in a plain
:class:`transformers.TokenizersBackend`. Saved, that is a ``tokenizer.json`` + ``tokenizer_config.json`` that
``AutoTokenizer`` loads with no custom code. Converting needs neither ``sentencepiece`` nor ``protobuf``.

Why not transformers' own route (copy ``beit3.spm`` to ``dir/sentencepiece.bpe.model``, then
``XLMRobertaTokenizer.from_pretrained(dir)``)? Measured with transformers 5.24 against the sentencepiece oracle of
``tests/test_processing.py`` (21 multilingual texts, with the unigram and the BPE model trained there):

* it needs ``protobuf``; without it, loading fails with a misleading ``tiktoken`` error (protobuf version errors are
  a classic BEiT-3 complaint);
* unigram: 19/21 texts exact as it comes (``Tiếng Việt`` in NFD and half-width ``ｶﾞ`` differ), 21/21 once NFKC is
  prepended to its normalizer;
* BPE: 15/21 stock, 16/21 with NFKC: the class always builds a unigram model, so BPE vocabularies segment wrongly;
* this module: 21/21 for both, with no protobuf or sentencepiece import.

Known limit: ``tokenizers``' ``Precompiled`` normalizer matches the shortest rule of a grapheme and drops the rest
(sentencepiece: the longest), so it agrees with sentencepiece's character map only for composed text
(huggingface/tokenizers#2116, #2334). NFKC is applied first, which makes decomposed accents, half-width kana and
compatibility characters come out as sentencepiece normalizes them; a combining mark stacked on a character that the
map rewrites (U+0301 after the ligature U+FB01, U+00A0 or U+2581) or non-canonically ordered marks can still normalize
differently; such sequences are rare in captions and questions.

This module is package code; the remote-code files copied into checkpoints (``image_processing_beit3.py``,
``processing_beit3.py``) never import it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast  # `TokenizersBackend` in transformers 5

from ..models.beit3.image_processing_beit3 import Beit3ImageProcessor
from ..models.beit3.processing_beit3 import DEFAULT_MAX_LENGTH, Beit3Processor
from .tasks import get_task

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "build_image_processor",
    "build_processor",
    "load_sentencepiece_tokenizer",
    "processor_for_task",
]

_BOS, _PAD, _EOS, _UNK, _MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"

# sentencepiece_model.proto enums.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


# ----------------------------------------------------------------------------------------------------------------
# Reading a sentencepiece model without protobuf
# ----------------------------------------------------------------------------------------------------------------


class _ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _ProtoError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | float | bytes]]:
    """Decode one protobuf message into ``(field_number, value)`` pairs (varints, 32-bit floats, bytes)."""
    out: list[tuple[int, int | float | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            size, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            if pos + size > len(buf):
                raise _ProtoError(f"truncated field {field}")
            value, pos = buf[pos : pos + size], pos + size
            if wire == 5:
                value = struct.unpack("<f", value)[0]
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        out.append((field, value))
    return out


def _message(value: int | float | bytes, what: str) -> dict[int, int | float | bytes]:
    """Decode a sub-message field; as protobuf does, the last occurrence of a field number wins."""
    if not isinstance(value, bytes):
        raise _ProtoError(f"{what} is not a message")
    return dict(_fields(value))


@dataclass(frozen=True)
class _SentencePieceModel:
    """The parts of a sentencepiece ``ModelProto`` that decide how text is segmented."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _parse_sentencepiece_model(data: bytes) -> _SentencePieceModel:
    """Parse a serialized ``sentencepiece.ModelProto`` (field numbers from ``sentencepiece_model.proto``)."""
    top = _fields(data)
    pieces = []
    for piece_fields in (_message(value, "piece entry") for field, value in top if field == 1):
        piece, score, kind = piece_fields.get(1, b""), piece_fields.get(2, 0.0), piece_fields.get(3, _NORMAL)
        if not isinstance(piece, bytes) or not isinstance(score, float) or not isinstance(kind, int):
            raise _ProtoError("malformed piece entry")
        pieces.append((piece.decode("utf-8"), score, kind))
    top_fields = dict(top)
    trainer = _message(top_fields.get(2, b""), "trainer spec")
    normalizer = _message(top_fields.get(3, b""), "normalizer spec")
    charsmap = normalizer.get(2, b"")
    if not isinstance(charsmap, bytes):
        raise _ProtoError("precompiled_charsmap is not bytes")
    return _SentencePieceModel(
        pieces=pieces,
        model_type=int(trainer.get(3, _UNIGRAM)),
        byte_fallback=bool(trainer.get(35, 0)),
        treat_whitespace_as_suffix=bool(trainer.get(24, 0)),
        precompiled_charsmap=charsmap,
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)),
    )


def _read_sentencepiece_file(path: Path) -> _SentencePieceModel:
    """Parse ``path`` and check that this converter reproduces it exactly; errors name the file."""
    if not path.exists():
        raise FileNotFoundError(f"Sentencepiece model not found: {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"Sentencepiece model {str(path)!r} is not a file.")
    data = path.read_bytes()
    not_spm = (
        f"{str(path)!r} is not a sentencepiece model (expected the binary `beit3.spm` file that the original "
        "BEiT-3 code passes as --sentencepiece_model)"
    )
    if not data:
        raise ValueError(f"{not_spm}: the file is empty.")
    try:
        model = _parse_sentencepiece_model(data)
    except (_ProtoError, UnicodeDecodeError) as error:
        raise ValueError(f"{not_spm}: {error}.") from None
    if len(model.pieces) < 4 or not any(kind == _UNKNOWN for _, _, kind in model.pieces):
        raise ValueError(f"{not_spm}: it has {len(model.pieces)} pieces and no <unk> piece.")
    where = f"sentencepiece model {str(path)!r}"
    if model.model_type not in (_UNIGRAM, _BPE):
        name = _MODEL_TYPE_NAMES.get(model.model_type, str(model.model_type))
        raise ValueError(f"{where} is a {name!r} model; only unigram and bpe models (like beit3.spm) are supported.")
    # The fairseq renumbering of XLMRobertaTokenizer assumes sentencepiece's default special pieces and ids.
    specials = [(piece, kind) for piece, _, kind in model.pieces[:3]]
    if specials != [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL)]:
        raise ValueError(
            f"{where} starts with pieces {[piece for piece, _ in specials]}; the XLM-R id mapping used by BEiT-3 "
            "requires sentencepiece's defaults <unk>, <s>, </s> at ids 0, 1, 2."
        )
    if model.treat_whitespace_as_suffix or not model.escape_whitespaces:
        raise ValueError(
            f"{where} uses treat_whitespace_as_suffix=true or escape_whitespaces=false, which this converter does "
            "not reproduce."
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building the tokenizers pipeline
# ----------------------------------------------------------------------------------------------------------------


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges that make ``tokenizers``' BPE apply sentencepiece's rule: merge the best-scoring pair first."""
    merges = []
    for merged, score in scores.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(left, right) for _, _, _, left, right in merges]


def _build_backend(model: _SentencePieceModel) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with XLM-R ids whose segmentation equals ``SentencePieceProcessor.encode``."""
    # Vocabulary in XLM-R (fairseq) order: the four specials, then sentencepiece pieces 3.. shifted by one, then <mask>.
    vocab = [(_BOS, 0.0), (_PAD, 0.0), (_EOS, 0.0), (_UNK, 0.0)]
    vocab += [(piece, score) for piece, score, _ in model.pieces[3:]]
    vocab.append((_MASK, 0.0))

    if model.model_type == _UNIGRAM:
        backend = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=model.byte_fallback))
    else:
        ids = {piece: index for index, (piece, _) in enumerate(vocab)}
        normal = {piece: score for piece, score, kind in model.pieces[3:] if kind in (_NORMAL, _USER_DEFINED)}
        backend = Tokenizer(
            BPE(
                ids,
                _bpe_merges(ids, normal),
                unk_token=_UNK,
                fuse_unk=True,
                byte_fallback=model.byte_fallback,
                dropout=None,
            )
        )

    # sentencepiece normalization: character map (nmt_nfkc for beit3.spm), then drop leading/trailing spaces and
    # squeeze runs of spaces (remove_extra_whitespaces). sentencepiece only counts U+0020 *after* the map as space.
    steps = []
    if model.precompiled_charsmap:  # NFKC first: see "Known limit" in the module docstring
        steps += [normalizers.NFKC(), normalizers.Precompiled(model.precompiled_charsmap)]
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)

    # Pieces never span a space in models trained with split_by_whitespace (beit3.spm), so splitting on "▁" first
    # gives the same segmentation as sentencepiece's whole-sentence lattice; otherwise keep the sentence whole.
    split = not any("\u2581" in piece[1:] for piece, _, _ in model.pieces)
    prepend = "always" if model.add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=split)
    if model.byte_fallback:
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=split)

    # Control / user-defined pieces beyond the first three behave as sentencepiece does: never produced from text
    # (control, marked special) or matched verbatim (user-defined), as transformers' own SpmConverter does.
    extra = [
        AddedToken(piece, normalized=False, special=kind == _CONTROL)
        for piece, _, kind in model.pieces[3:]
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_special_tokens([_BOS, _PAD, _EOS, _UNK])
    backend.add_special_tokens([AddedToken(_MASK, lstrip=True, normalized=False, special=True)])
    if extra:
        backend.add_tokens(extra)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A {_EOS}",
        pair=f"{_BOS} $A {_EOS} {_EOS} $B {_EOS}",
        special_tokens=[(_BOS, 0), (_EOS, 2)],
    )
    return backend


def load_sentencepiece_tokenizer(
    path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH
) -> PreTrainedTokenizerBase:
    """Convert BEiT-3's sentencepiece model into a transformers tokenizer with the original ids.

    The result is a :class:`transformers.TokenizersBackend` (the generic tokenizer class of transformers 5, alias
    ``PreTrainedTokenizerFast``). ``save_pretrained`` writes ``tokenizer.json`` and ``tokenizer_config.json``;
    ``AutoTokenizer.from_pretrained`` reloads them without custom code, sentencepiece or protobuf.

    Ids follow the original ``XLMRobertaTokenizer("beit3.spm")``: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
    sentencepiece piece ``p`` -> ``p + 1``, ``<mask>`` = number of pieces + 1. Encoding a text gives
    ``[<s>] + pieces + [</s>]``; ``model_max_length`` is ``max_length`` and padding is on the right with ``<pad>``.

    Args:
        path: the sentencepiece model file (``beit3.spm``).
        max_length: the text length the model was fine-tuned with (64 in the original recipes, 32 for captioning).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a sentencepiece model, or one this converter cannot reproduce exactly.

    Example:
        >>> tokenizer = load_sentencepiece_tokenizer("beit3.spm")  # doctest: +SKIP
        >>> tokenizer("a photo of a cat", padding="max_length", truncation=True).input_ids[:2]  # doctest: +SKIP
        [0, ...]
    """
    model = _read_sentencepiece_file(Path(path))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(model),
        bos_token=_BOS,
        eos_token=_EOS,
        sep_token=_EOS,
        cls_token=_BOS,
        unk_token=_UNK,
        pad_token=_PAD,
        mask_token=AddedToken(_MASK, lstrip=True, normalized=False, special=True),
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    expected_mask = len(model.pieces) + 1
    if tokenizer.mask_token_id != expected_mask or tokenizer.pad_token_id != 1 or tokenizer.unk_token_id != 3:
        raise RuntimeError(
            f"Tokenizer conversion of {str(path)!r} produced unexpected special ids (mask={tokenizer.mask_token_id}, "
            f"expected {expected_mask}); please report this."
        )
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Processor assembly (called by the checkpoint converter)
# ----------------------------------------------------------------------------------------------------------------


def build_image_processor(*, task: str, image_size: int) -> Beit3ImageProcessor:
    """The eval image processor of a converter task (its preset in :data:`beit3_hf.conversion.tasks.TASKS`) at the
    checkpoint's resolution."""
    return Beit3ImageProcessor(task=get_task(task).image_processor, image_size=image_size)


def processor_for_task(
    tokenizer: PreTrainedTokenizerBase, *, task: str, image_size: int, max_length: int = DEFAULT_MAX_LENGTH
) -> Beit3Processor:
    """A :class:`Beit3Processor` around `tokenizer` with the eval image transform of `task` at `image_size`."""
    image_processor = build_image_processor(task=task, image_size=image_size)
    return Beit3Processor(image_processor=image_processor, tokenizer=tokenizer, max_length=max_length)


def build_processor(
    sentencepiece_path: str | os.PathLike,
    *,
    task: str,
    image_size: int,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Beit3Processor:
    """Assemble the :class:`Beit3Processor` matching an original fine-tuned (or pretrained) checkpoint.

    Args:
        sentencepiece_path: ``beit3.spm``.
        task: one of ``"backbone"``, ``"image-classification"``, ``"retrieval"``, ``"vqa"``, ``"nlvr2"``,
            ``"captioning"``. Image classification gets timm's ImageNet eval transform (short-side resize + center
            crop, ImageNet mean/std); every other task the vision-language one (squash to a square, mean = std = 0.5).
        image_size: the checkpoint's input resolution (e.g. 224, 384, 480, 768).
        max_length: text length (64 in the original recipes; the captioning recipes used 32).

    Example:
        >>> processor = build_processor("beit3.spm", task="vqa", image_size=480)  # doctest: +SKIP
        >>> processor.save_pretrained("beit3-base-vqa")  # doctest: +SKIP
    """
    tokenizer = load_sentencepiece_tokenizer(sentencepiece_path, max_length=max_length)
    return processor_for_task(tokenizer, task=task, image_size=image_size, max_length=max_length)
