"""Captioning: the masking and the drop-worst loss against the original definitions, and the caption metrics
(PTB-style tokenisation, CIDEr-D, BLEU) against pycocoevalcap's (and its Java tokenizer, when available)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from beit3_hf.data.captioning import mask_caption
from beit3_hf.evaluation.captioning import bleu, caption_metrics, captioning_loss, cider_d, tokenize_caption
from test_vqa_metrics import original_datasets_module

# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def original_captioning_loss(logits, target, step, label_smoothing, drop_worst_ratio, drop_worst_after):
    """unilm `utils.BertCaptioningLoss.forward`, restated on (n, vocab) logits of the masked tokens."""
    n_class = logits.size(1)
    one_hot = torch.zeros_like(logits).scatter(1, target.view(-1, 1), 1)
    one_hot = one_hot * (1 - label_smoothing) + (1 - one_hot) * label_smoothing / (n_class - 1)
    loss = torch.nn.KLDivLoss(reduction="none")(F.log_softmax(logits, dim=1), one_hot).sum(1)
    if drop_worst_ratio > 0 and step > drop_worst_after:
        loss, _ = torch.topk(loss, k=int(loss.shape[0] * (1 - drop_worst_ratio)), largest=False)
    return loss.mean()


def test_captioning_loss_hand_made():
    # Two labelled tokens; without smoothing the loss is the cross-entropy: (-log p(0 | row 0) - log p(2 | row 1)) / 2.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[0, -100, 2]])
    expected = (F.cross_entropy(logits[0, [0, 2]], torch.tensor([0, 2]), reduction="sum") / 2).item()
    assert captioning_loss(logits, labels, label_smoothing=0.0).item() == pytest.approx(expected, abs=1e-6)
    # Drop-worst keeps int(n * (1 - ratio)) smallest token losses, only once step > drop_worst_after.
    per_token = F.cross_entropy(logits[0, [0, 2]], torch.tensor([0, 2]), reduction="none")
    kwargs = {"label_smoothing": 0.0, "drop_worst_ratio": 0.5, "drop_worst_after": 10}
    assert captioning_loss(logits, labels, step=10, **kwargs).item() == pytest.approx(expected, abs=1e-6)
    assert captioning_loss(logits, labels, step=11, **kwargs).item() == pytest.approx(per_token.min().item(), abs=1e-6)
    # Label smoothing: KL to (1 - eps) on the target and eps / (V - 1) elsewhere, summed over the vocabulary.
    eps = 0.1
    target = torch.tensor([1 - eps, eps / 2, eps / 2])
    kl = (target * (target.log() - F.log_softmax(logits[0, 0], dim=-1))).sum()
    single = captioning_loss(logits[:, :1], labels[:, :1], label_smoothing=eps)
    assert single.item() == pytest.approx(kl.item(), abs=1e-6)


@pytest.mark.parametrize(("step", "ratio"), [(0, 0.2), (12000, 0.2), (12001, 0.2), (20000, 0.0), (5, 0.35)])
def test_captioning_loss_equals_the_original_definition(step, ratio):
    generator = torch.Generator().manual_seed(step)
    logits = torch.randn(3, 7, 50, generator=generator) * 3
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[torch.rand(3, 7, generator=generator) < 0.4] = -100
    selected = labels != -100
    expected = original_captioning_loss(logits[selected], labels[selected], step, 0.1, ratio, 12000)
    ours = captioning_loss(
        logits, labels, label_smoothing=0.1, drop_worst_ratio=ratio, drop_worst_after=12000, step=step
    )
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.oracle("beit3")
def test_captioning_loss_equals_the_original_bert_captioning_loss():
    from beit3.utils import BertCaptioningLoss

    generator = torch.Generator().manual_seed(0)
    for step in (0, 100, 101, 5000):
        logits = torch.randn(23, 64, generator=generator) * 2
        targets = torch.randint(0, 64, (23,), generator=generator)
        original = BertCaptioningLoss(label_smoothing=0.1, drop_worst_ratio=0.2, drop_worst_after=100)
        ours = captioning_loss(logits, targets, drop_worst_ratio=0.2, drop_worst_after=100, step=step)
        assert ours.item() == pytest.approx(original(logits, targets, step).item(), abs=1e-6)


def test_drop_worst_keeps_at_least_one_token():
    # The original's topk(k=int(1 * 0.8)) = topk(k=0) gives NaN for a single masked token; we keep it.
    loss = captioning_loss(torch.randn(1, 5), torch.tensor([2]), drop_worst_ratio=0.2, drop_worst_after=0, step=1)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------


def original_masking(tokens, num_tokens, mask_prob, mask_token_id, vocab_size):
    """unilm `CaptioningDataset._masking_on_text_tokens` + `_get_mask_token`, restated, on the `random` module."""
    bool_masked_pos = [0] * len(tokens)
    to_mask = max(min(int(num_tokens * mask_prob + 0.5), num_tokens - 1), 1)
    num_masked = 0
    while num_masked < to_mask:
        i = random.randint(1, num_tokens - 1)
        if bool_masked_pos[i] == 0:
            bool_masked_pos[i] = 1
            p = random.random()
            tokens[i] = mask_token_id if p < 0.8 else tokens[i] if p < 0.9 else random.randint(3, vocab_size - 1)
            num_masked += 1
    return tokens, bool_masked_pos


def test_mask_caption_hand_made():
    ids = [0, 11, 12, 13, 14, 15, 2, 1, 1]  # <s> 5 tokens </s> <pad> <pad>
    for seed in range(50):
        masked, positions = mask_caption(ids, 7, 0.7, 99, 100, random.Random(seed))
        assert sum(positions) == 5  # round(7 * 0.7) = 5 (<= 7 - 1)
        assert positions[0] == 0 and positions[7:] == [0, 0]  # never <s>, never padding
        assert masked[7:] == [1, 1] and masked[0] == 0
        assert all(m == t for m, t, p in zip(masked, ids, positions) if not p)
    assert sum(mask_caption([0, 5, 2], 3, 0.01, 99, 100, random.Random(0))[1]) == 1  # at least one
    assert sum(mask_caption([0, 5, 2], 3, 1.0, 99, 100, random.Random(0))[1]) == 2  # at most n - 1
    masked = [mask_caption(ids, 7, 1.0, 99, 100, random.Random(s))[0] for s in range(400)]
    tokens = [t for m in masked for t, p in zip(m[1:7], ids[1:7])]
    share_mask = tokens.count(99) / len(tokens)
    assert 0.75 < share_mask < 0.85  # 80% <mask>, the rest kept or random
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mask_caption([0], 1, 0.5, 99, 100)


def test_mask_caption_draws_equal_the_original():
    ids = [0, 11, 12, 13, 14, 15, 16, 17, 2, 1]
    for seed in range(30):
        random.seed(seed)
        expected = original_masking(list(ids), 9, 0.6, 64001, 64002)
        random.seed(seed)
        assert mask_caption(ids, 9, 0.6, 64001, 64002) == expected


@pytest.mark.oracle("beit3")
def test_mask_caption_equals_the_original_captioning_dataset():
    dataset_class = original_datasets_module().CaptioningDataset
    original = object.__new__(dataset_class)
    original.mask_token_id, original.language_vocab_size = 64001, 64002
    ids = [0, 11, 12, 13, 14, 15, 16, 17, 2, 1, 1]
    for seed in range(30):
        random.seed(seed)
        expected = original._masking_on_text_tokens(list(ids), 9, 0.7)
        random.seed(seed)
        assert mask_caption(ids, 9, 0.7, 64001, 64002) == (list(expected[0]), list(expected[1]))


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation and metrics
# ----------------------------------------------------------------------------------------------------------------

# What pycocoevalcap's Java PTBTokenizer (CoreNLP 3.4.1, -lowerCase) makes of these, punctuation tokens removed.
PTB_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Two dogs' toys aren't on the table, they're under it!": "two dogs toys are n't on the table they 're under it",
    'A black-and-white photo of a "vintage" car (circa 1950).': "a black-and-white photo of a vintage car -lrb- circa 1950 -rrb-",
    "There's a cat on the couch... it's sleeping; isn't it?": "there 's a cat on the couch it 's sleeping is n't it",
    "A sign reads: STOP & go / wait 3.5 minutes, costs $1,000.": "a sign reads stop & go / wait 3.5 minutes costs $ 1,000",
    "The U.S. flag flies over Mr. Smith's house -- at dusk.": "the u.s. flag flies over mr. smith 's house at dusk",
    "a person  with  an umbrella's handle   in the rain": "a person with an umbrella 's handle in the rain",
    "Kids' play-ground near the 'old' school": "kids play-ground near the old school",
    "I'm sure you'll like it, won't you?": "i 'm sure you 'll like it wo n't you",
    "It is 3:30 p.m. now.": "it is 3:30 p.m. now",
}


@pytest.mark.parametrize("caption", sorted(PTB_CASES))
def test_tokenize_caption_matches_the_java_ptb_tokenizer_output(caption):
    assert tokenize_caption(caption) == PTB_CASES[caption]


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer runs Java")
def test_tokenize_caption_against_java():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        *PTB_CASES,
        "Children's books ('classic') lie on a desk.",
        "A dog, a cat, and a bird.",
        "Wow!! Really??",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [tokenize_caption(c) for c in captions] == [java[i][0] for i in range(len(captions))]


REFERENCES = {
    1: ["a red circle in the top left", "the upper left has a red disc", "a red circle at the top left corner"],
    2: ["a blue square and a green triangle", "there is a green triangle with a blue box"],
    3: ["an image of a yellow cross in the bottom right"],
    4: ["a purple circle in the lower left", "a purple disc at the bottom left"],
}
CANDIDATES = {
    1: "a red circle in the top left",
    2: "a blue square and a red triangle",
    3: "a yellow cross",
    4: "a purple circle in the bottom left corner of the image",
}
# pycocoevalcap 1.2's Cider() and Bleu(4) on these captions.
CIDER_EXPECTED = 3.42229581553725
BLEU_EXPECTED = [0.7379692281974892, 0.7051540139210503, 0.6621909736472213, 0.600962060898915]


def test_cider_and_bleu_on_fixed_captions():
    # Values of pycocoevalcap 1.2's Cider() and Bleu(4) on these captions: a change of its scores or of our inputs fails.
    score, per_image = cider_d(REFERENCES, CANDIDATES)
    assert score == pytest.approx(CIDER_EXPECTED, abs=1e-9)
    assert len(per_image) == 4 and per_image[0] > per_image[2]
    assert bleu(REFERENCES, CANDIDATES) == pytest.approx(BLEU_EXPECTED, abs=1e-9)
    perfect = {key: refs[0] for key, refs in REFERENCES.items()}
    assert bleu(REFERENCES, perfect)[3] == pytest.approx(1.0)
    metrics = caption_metrics(REFERENCES, CANDIDATES)
    assert metrics["cider"] == pytest.approx(CIDER_EXPECTED) and metrics["bleu4"] == pytest.approx(BLEU_EXPECTED[3])
    with pytest.raises(ValueError, match="same images"):
        cider_d(REFERENCES, {1: "a"})


def test_cider_per_image_scores_follow_the_candidates_order():
    score, per_image = cider_d(REFERENCES, CANDIDATES)
    reordered = dict(reversed(list(CANDIDATES.items())))
    score_reversed, per_image_reversed = cider_d(REFERENCES, reordered)  # references in their own order
    assert score_reversed == pytest.approx(score) and per_image_reversed == pytest.approx(per_image[::-1])
    assert per_image[0] != per_image[-1]


@pytest.mark.parametrize(
    ("references", "candidates", "message"),
    [
        ({1: "a red circle"}, {1: "a red circle"}, "non-empty list of captions"),
        ({1: []}, {1: "a red circle"}, "non-empty list of captions"),
        ({1: ["a red circle"]}, {1: ["a red circle"]}, "one caption \\(a str\\), got list"),
        ({}, {}, "no captions to score"),
    ],
)
def test_metrics_name_the_bad_input(references, candidates, message):
    for metric in (cider_d, bleu):
        with pytest.raises(ValueError, match=message):
            metric(references, candidates)


def test_metric_edge_cases():
    assert cider_d({1: [""], 2: [""]}, {1: "a", 2: "b"}) == (0.0, [0.0, 0.0])  # no reference n-gram at all
    assert bleu(REFERENCES, CANDIDATES, n=2) == pytest.approx(BLEU_EXPECTED[:2], abs=1e-9)
    with pytest.raises(ValueError, match="n must be 1 to 4, got 5"):
        bleu(REFERENCES, CANDIDATES, n=5)
