"""Beit3ForCaptioning: caching, batching, errors and losses on a random tiny model, and, marked `oracle("beit3")`,
parity with the original (unilm `BEiT3ForCaptioning` and the `CaptioningHandler` beam search) and conversion."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor

from beit3_hf import Beit3ForCaptioning
from beit3_hf.conversion import checkpoint as convert
from beit3_hf.conversion import original
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer
from beit3_hf.models.beit3.modeling_beit3 import Beit3KeyValueCache

from oracle_utils import randomize_, run_fresh_python, tiny_config, train_sentencepiece, write_original_checkpoint

oracle = pytest.mark.oracle("beit3")

MASK = 119  # `<mask>` of the tiny vocabulary
MAX_LENGTH = 10
LONG_CAPTIONS, SHORT_CAPTIONS = 0.8, 1.6  # `</s>` logit biases of the models below


def images(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# A random tiny model: no original code needed
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Beit3ForCaptioning:
    """A random captioning model whose `</s>` bias makes some captions end early and others reach max_length."""
    torch.manual_seed(0)
    model = Beit3ForCaptioning(tiny_config("captioning", mask_token_id=MASK))
    randomize_(model, seed=3)
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] += 2.4  # captions of 1 to 7 tokens for `images(4, seed=9)`
    return model.eval()


def test_cached_steps_equal_the_full_forward(model):
    pixel_values = images(2)
    input_ids = torch.tensor([[0, 17, 33, 51, 2, 8], [0, 44, 45, 46, 47, 2]])
    with torch.no_grad():
        full = model(pixel_values=pixel_values, input_ids=input_ids).logits
        out = model(pixel_values=pixel_values, input_ids=input_ids[:, :2], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for position in range(2, input_ids.shape[1]):
            out = model(input_ids=input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_mask_slot_decoding_equals_the_full_forward(model):
    """The original scheme: feed [token, <mask>], read the <mask> slot (never cached), repeat."""
    pixel_values = images(2)
    tokens = torch.tensor([[0, 17, 33, 51], [0, 44, 45, 46]])
    with torch.no_grad():
        cache = Beit3KeyValueCache(transient_tokens=1)
        predicted = []
        step_ids = torch.tensor([[0, MASK]] * 2)
        for position in range(1, tokens.shape[1] + 1):
            logits = model(
                pixel_values=pixel_values if position == 1 else None,
                input_ids=step_ids,
                past_key_values=cache,
                use_cache=True,
            ).logits
            predicted.append(logits[:, 1])
            if position < tokens.shape[1]:
                step_ids = torch.stack([tokens[:, position], torch.full((2,), MASK)], dim=1)
        for position, logits in enumerate(predicted, start=1):
            prefix = torch.cat([tokens[:, :position], torch.full((2, 1), MASK)], dim=1)
            full = model(pixel_values=pixel_values, input_ids=prefix).logits[:, -1]
            assert (logits - full).abs().max() <= 1e-5


def test_batched_generation_equals_one_at_a_time(model):
    pixel_values = images(4, seed=9)
    batched = model.generate(pixel_values, num_beams=3, max_length=MAX_LENGTH)
    lengths = (batched != model.config.pad_token_id).sum(1)
    assert lengths.min() < lengths.max()  # padded rows: captions of several lengths
    for row in range(4):
        single = model.generate(pixel_values[row : row + 1], num_beams=3, max_length=MAX_LENGTH)[0]
        assert batched[row, : len(single)].tolist() == single.tolist()
        assert (batched[row, len(single) :] == model.config.pad_token_id).all()


def test_max_new_tokens_counts_the_tokens_after_bos(model):
    pixel_values = images(2)
    torch.testing.assert_close(
        model.generate(pixel_values, max_new_tokens=5), model.generate(pixel_values, max_length=7)
    )
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] -= 100  # never ends early: every caption reaches the limit
        try:
            for max_new_tokens in (2, 5):
                captions = model.generate(pixel_values, max_new_tokens=max_new_tokens)
                assert captions.shape == (2, 1 + max_new_tokens)  # <s>, then tokens up to </s> included
                assert (captions[:, 1:-1] != model.config.eos_token_id).all()
        finally:
            model.lm_head.bias[model.config.eos_token_id] += 100


def test_generation_errors(model):
    with pytest.raises(ValueError, match="needs pixel_values"):
        model.generate(None)
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        model.generate(images(1), num_beams=0)
    for max_length in (2, 3):  # max_length=3 used to return `<s> </s>`, an empty caption, for every image
        with pytest.raises(ValueError, match=f"max_length={max_length} is shorter than a caption"):
            model.generate(images(1), max_length=max_length)
    with pytest.raises(ValueError, match="max_new_tokens=1 is shorter than a caption"):
        model.generate(images(1), max_new_tokens=1)
    with pytest.raises(TypeError, match="pixel_values has dtype torch.uint8"):
        model.generate(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="max_length or max_new_tokens, not both"):
        model.generate(images(1), max_length=5, max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(images(1), max_length=31)
    with pytest.raises(ValueError, match="needs an image"):
        model(input_ids=torch.tensor([[0, MASK]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(pixel_values=images(1), input_ids=torch.tensor([[0, MASK]]), labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="cannot follow a filled past_key_values"):
        out = model(pixel_values=images(1), input_ids=torch.tensor([[0, MASK]]), use_cache=True)
        model(pixel_values=images(1), input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values)


# ---------------------------------------------------------------------------------------------------------------------
# transformers' GenerationMixin (original_beam_search=False)
# ---------------------------------------------------------------------------------------------------------------------


def greedy_by_full_forward(model: Beit3ForCaptioning, pixel_values: torch.Tensor, prompt: torch.Tensor, steps: int):
    """Greedy decoding without a cache: the whole `[prompt + generated, <mask>]` sequence at every step."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            step = torch.cat([ids, torch.full((ids.shape[0], 1), MASK)], dim=1)
            next_token = model(pixel_values=pixel_values, input_ids=step).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


def test_new_models_carry_the_original_recipe(model, tmp_path):
    config = model.generation_config
    assert (config.num_beams, config.max_length, config.length_penalty) == (3, 30, 0.6)  # 30: the position table
    assert config.original_beam_search is True and model.can_generate()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {key: saved[key] for key in ("num_beams", "max_length", "length_penalty", "original_beam_search")} == {
        "num_beams": 3, "max_length": 30, "length_penalty": 0.6, "original_beam_search": True,
    }  # fmt: skip
    assert not {"repetition_penalty", "min_length", "no_repeat_ngram_size", "do_sample"} & set(saved)
    assert Beit3ForCaptioning.from_pretrained(tmp_path).generation_config.original_beam_search is True


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decoding_is_the_argmax_at_the_mask_slot(model, use_cache):
    pixel_values = images(3, seed=9)
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] -= 100  # no early end: every row decodes all steps
        try:
            generated = model.generate(
                pixel_values, original_beam_search=False, num_beams=1, max_new_tokens=6, use_cache=use_cache
            )
            expected = greedy_by_full_forward(model, pixel_values, torch.zeros(3, 1, dtype=torch.long), 6)
        finally:
            model.lm_head.bias[model.config.eos_token_id] += 100
    assert generated.tolist() == expected.tolist()


def test_greedy_continues_a_prompt(model):
    pixel_values, prompt = images(2), torch.tensor([[0, 17, 33], [0, 44, 45]])
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] -= 100
        try:
            generated = model.generate(
                pixel_values, input_ids=prompt, original_beam_search=False, max_new_tokens=4, num_beams=1
            )
            expected = greedy_by_full_forward(model, pixel_values, prompt, 4)
        finally:
            model.lm_head.bias[model.config.eos_token_id] += 100
    assert generated.tolist() == expected.tolist()


def test_empty_prompts_are_the_plain_caption(model):
    """The processor's `<s> </s> <pad>...` for text="", or (batch, 0) ids, change nothing."""
    pixel_values = images(2)
    processor_ids = torch.tensor([[0, 2, 1, 1], [0, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    for kwargs in ({}, {"original_beam_search": False, "num_beams": 1, "max_new_tokens": 5}):
        plain = model.generate(pixel_values, **kwargs)
        assert model.generate(pixel_values, input_ids=processor_ids, attention_mask=mask, **kwargs).tolist() == (
            plain.tolist()
        )
        assert model.generate(pixel_values, input_ids=torch.zeros(2, 0, dtype=torch.long), **kwargs).tolist() == (
            plain.tolist()
        )


def test_sampling_streaming_and_generation_config(model):
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    pixel_values = images(1)
    torch.manual_seed(1)
    first = model.generate(pixel_values, original_beam_search=False, do_sample=True, max_new_tokens=8, top_k=0)
    torch.manual_seed(1)
    again = model.generate(pixel_values, original_beam_search=False, do_sample=True, max_new_tokens=8, top_k=0)
    assert first.tolist() == again.tolist() and first[0, 0] == model.config.bos_token_id
    streamer = Collect()
    streamed = model.generate(
        pixel_values, original_beam_search=False, num_beams=1, max_new_tokens=5, streamer=streamer
    )
    assert streamer.tokens == [*streamed[0].tolist(), "end"]
    greedy = GenerationConfig(num_beams=1, max_new_tokens=5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    assert model.generate(pixel_values, generation_config=greedy).tolist() == streamed.tolist()
    beams = model.generate(
        pixel_values, original_beam_search=False, num_beams=3, num_return_sequences=2, max_new_tokens=5
    )
    assert beams.shape[0] == 2 and (beams[:, 0] == model.config.bos_token_id).all()


def test_original_beam_search_refuses_what_it_cannot_do(model):
    pixel_values = images(1)
    for kwargs, named in [
        ({"do_sample": True}, "do_sample"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"input_ids": torch.tensor([[0, 17]])}, "a prompt"),
    ]:
        with pytest.raises(ValueError, match=f"does not support {named}.*original_beam_search=False"):
            model.generate(pixel_values, **kwargs)
    with pytest.raises(ValueError, match="same length"):
        model.generate(
            images(2),
            input_ids=torch.tensor([[0, 17, 2], [0, 2, 1]]),
            attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        )
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(pixel_values, original_beam_search=False, max_new_tokens=40)
    output = model.generate(pixel_values, return_dict_in_generate=True)
    assert output.sequences.tolist() == model.generate(pixel_values).tolist()


def test_label_smoothing_zero_is_cross_entropy(model):
    model = copy.deepcopy(model)  # the fixture is shared: change a copy's config
    model.config.label_smoothing = 0.0
    input_ids = torch.tensor([[0, MASK, 12, MASK, 2]])
    labels = torch.tensor([[-100, 11, -100, 13, -100]])
    out = model(pixel_values=images(1), input_ids=input_ids, labels=labels)
    expected = F.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    assert abs(out.loss.item() - expected.item()) <= 1e-5


def test_label_smoothing_spreads_the_target_mass(model):
    input_ids = torch.tensor([[0, MASK, 12, MASK, 2]])
    labels = torch.tensor([[-100, 11, -100, 13, -100]])
    out = model(pixel_values=images(1), input_ids=input_ids, labels=labels)
    log_probs = out.logits[labels != -100].log_softmax(-1)
    targets = torch.full_like(log_probs, 0.1 / (log_probs.shape[-1] - 1))
    targets[[0, 1], [11, 13]] = 0.9
    expected = (targets * (targets.log() - log_probs)).sum(-1).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 and model.config.label_smoothing == 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[LONG_CAPTIONS, SHORT_CAPTIONS], ids=["long-captions", "short-captions"])
def pair(request, tmp_path_factory):
    """(original model, converted model, `</s>` bias). The bias sets how soon captions end, so that both captions
    that stop at `</s>` and captions cut at max_length occur."""
    config = tiny_config("captioning", mask_token_id=MASK)
    path = tmp_path_factory.mktemp("captioning") / "captioning.pth"
    reference = write_original_checkpoint(path, "captioning", config, seed=3)
    with torch.no_grad():
        reference.mlm_head.bias[config.eos_token_id] += request.param
    torch.save({"model": reference.state_dict()}, path)
    args = ["--checkpoint", str(path), "--task", "captioning", "--output", str(path.parent / "hf")]
    assert convert.main([*args, "--num-attention-heads", "4", "--mask-token-id", str(MASK)]) == 0
    model = Beit3ForCaptioning.from_pretrained(path.parent / "hf").eval()
    assert model.config.mask_token_id == MASK
    return reference, model, request.param


@oracle
def test_training_logits_and_loss_match_the_original(pair):
    reference, model, _ = pair
    inputs = convert.random_inputs(model.config, "captioning", batch_size=3, text_len=7, seed=1)
    input_ids = inputs["input_ids"].clone()
    masked = torch.zeros_like(input_ids, dtype=torch.bool)
    masked[0, [1, 4]] = masked[1, 2] = masked[2, 1] = True  # never <s>, inside each caption
    input_ids[masked] = MASK
    inputs["input_ids"] = input_ids
    expected = original.run_original(reference, "captioning", **inputs)["logits"]
    labels = torch.full_like(input_ids, -100)
    labels[masked] = inputs["input_ids"].new_tensor([11, 12, 13, 14])
    out = model(**inputs, labels=labels)
    assert (out.logits - expected).abs().max() <= 1e-4
    # The original loss: BertCaptioningLoss(label_smoothing=0.1, drop_worst_ratio=0) on the masked positions.
    from beit3.utils import BertCaptioningLoss

    reference_loss = BertCaptioningLoss(0.1, 0.0, 0)(expected[masked], labels[masked], 0)
    assert abs(out.loss.item() - reference_loss.item()) <= 1e-4
    assert next(iter(out)) == "loss"


@oracle
@pytest.mark.parametrize("num_beams", [3, 1, 2])
def test_generate_matches_the_original_beam_search(pair, num_beams):
    reference, model, _ = pair
    pixel_values = images(5)
    config = model.config
    expected = original.original_beam_search(
        reference, pixel_values, num_beams=num_beams, max_length=MAX_LENGTH, length_penalty=0.6,
        vocab_size=config.vocab_size, mask_token_id=MASK,
    )  # fmt: skip
    generated = model.generate(pixel_values, num_beams=num_beams, max_length=MAX_LENGTH, length_penalty=0.6)
    # The original keeps the <mask> placeholder of the step that ended a caption in front of `</s>`; we return
    # only the tokens: `<s> tokens </s>` and padding.
    for ours, theirs in zip(generated.tolist(), expected.tolist()):
        theirs = [token for token in theirs if token != MASK]
        assert ours == theirs[: len(ours)] and set(theirs[len(ours) :]) <= {config.pad_token_id}
    lengths = (generated != config.pad_token_id).sum(1)
    assert lengths.max() <= MAX_LENGTH - 1 and ((generated == config.eos_token_id).sum(1) == 1).all()


@oracle
def test_generation_covers_both_endings(pair):
    """Sanity of the fixture: some captions end at `</s>` early, the long-caption model also reaches max_length."""
    _, model, eos_bias = pair
    lengths = (model.generate(images(5), max_length=MAX_LENGTH) != model.config.pad_token_id).sum(1)
    assert lengths.min() < MAX_LENGTH - 1  # a caption ended at `</s>` before the limit
    if eos_bias == LONG_CAPTIONS:
        assert lengths.max() == MAX_LENGTH - 1  # a caption was cut at max_length


@oracle
def test_captioning_conversion_needs_a_mask_id(tmp_path):
    config = tiny_config("captioning")
    write_original_checkpoint(tmp_path / "cap.pth", "captioning", config)
    with pytest.raises(convert.ConversionError, match="pass --sentencepiece or --mask-token-id"):
        convert.convert_checkpoint(tmp_path / "cap.pth", "captioning")


SPM_TEXTS = ["a red circle above a blue square", "two dogs play in the park", "a cat sleeps on the bed"]


@oracle
def test_conversion_with_sentencepiece_end_to_end(tmp_path):
    """--sentencepiece writes the processor and takes <mask> from it; in a fresh process without beit3_hf,
    AutoProcessor + AutoModelForImageTextToText caption an image and batch_decode gives the same text as here."""
    spm = train_sentencepiece(tmp_path, SPM_TEXTS, vocab_size=40)
    tokenizer_size = len(load_sentencepiece_tokenizer(spm))
    config = tiny_config("captioning", vocab_size=tokenizer_size + 8)  # 8 unused rows, as 64002 vs 64010
    write_original_checkpoint(tmp_path / "cap.pth", "captioning", config, seed=4)
    folder = tmp_path / "hf"
    args = ["--checkpoint", str(tmp_path / "cap.pth"), "--task", "captioning", "--output", str(folder)]
    assert convert.main([*args, "--num-attention-heads", "4", "--sentencepiece", str(spm)]) == 0
    assert {"tokenizer.json", "processor_config.json", "processing_beit3.py", "image_processing_beit3.py"} <= {
        p.name for p in folder.iterdir()
    }
    processor = AutoProcessor.from_pretrained(folder)
    model = Beit3ForCaptioning.from_pretrained(folder).eval()
    assert model.config.mask_token_id == processor.tokenizer.mask_token_id == tokenizer_size - 1
    # The recipe's 32 tokens, cut to the tiny model's 30 positions: the processor never pads beyond the model.
    assert model.config.max_position_embeddings == 30
    assert processor.max_length == 30 and processor.image_processor.size["height"] == 32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    ids = model.generate(processor(images=[image])["pixel_values"], max_length=8)
    expected = processor.batch_decode(ids, skip_special_tokens=True)
    result = run_fresh_python(
        """
        import json, sys
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        ids = model.generate(processor(images=[Image.open(sys.argv[2])])["pixel_values"], max_length=8)
        print(json.dumps({"ids": ids.tolist(), "text": processor.batch_decode(ids, skip_special_tokens=True),
                          "class": type(model).__name__}))
        """,
        tmp_path,
        args=(str(folder), str(tmp_path / "image.png")),
    )
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child == {"ids": ids.tolist(), "text": expected, "class": "Beit3ForCaptioning"}


@oracle
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path / "missing.spm", "missing.spm"),
        (lambda path: (path / "text.spm").write_text("not a model") and path / "text.spm", "text.spm"),
    ],
)
def test_bad_sentencepiece_fails_before_conversion(tmp_path, capsys, make, message):
    write_original_checkpoint(tmp_path / "cap.pth", "captioning", tiny_config("captioning"))
    args = ["--checkpoint", str(tmp_path / "cap.pth"), "--task", "captioning", "--output", str(tmp_path / "out")]
    assert convert.main([*args, "--sentencepiece", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


@oracle
def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    spm = train_sentencepiece(tmp_path, SPM_TEXTS, vocab_size=40)
    config = tiny_config("retrieval", vocab_size=20)
    write_original_checkpoint(tmp_path / "r.pth", "retrieval", config)
    args = ["--checkpoint", str(tmp_path / "r.pth"), "--task", "retrieval", "--output", str(tmp_path / "out")]
    assert convert.main([*args, "--num-attention-heads", "4", "--sentencepiece", str(spm)]) == 2
    assert "is not this checkpoint's tokenizer" in capsys.readouterr().err
