"""Retrieval recall against hand-computed values and an independent brute force (python loops, sort-based)."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from beit3_hf.evaluation.retrieval import (
    recall_from_ranks,
    retrieval_ranks,
    retrieval_ranks_from_embeddings,
    retrieval_recall,
    retrieval_recall_from_embeddings,
)

KEYS = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"]


def brute_force_recall(sim: list[list[float]], text_to_image: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Pessimistic top-k, written independently: sort candidates by score, wrong before correct among equal scores,
    take the first min(k, n), hit if any correct candidate is among them."""
    num_images, num_texts = len(sim), len(sim[0])
    out = {}
    for k in ks:
        hits = total = 0
        for i in range(num_images):
            correct = {t for t in range(num_texts) if text_to_image[t] == i}
            if not correct:
                continue
            order = sorted(range(num_texts), key=lambda t, i=i, c=correct: (-sim[i][t], t in c))
            total += 1
            hits += any(t in correct for t in order[: min(k, num_texts)])
        out[f"tr_r{k}"] = hits / total
    for k in ks:
        hits = 0
        for t in range(num_texts):
            order = sorted(range(num_images), key=lambda i, t=t: (-sim[i][t], i == text_to_image[t]))
            hits += text_to_image[t] in order[: min(k, num_images)]
        out[f"ir_r{k}"] = hits / num_texts
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def assert_same(result: dict[str, float], expected: dict[str, float]) -> None:
    assert list(result) == list(expected)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_perfect_scores_with_several_captions_per_image():
    # 3 images, 2 captions each; each caption scores highest on its own image.
    t2i = torch.tensor([0, 1, 2, 0, 1, 2])
    sim = torch.full((3, 6), 0.1)
    sim[t2i, torch.arange(6)] = 0.9
    assert retrieval_recall(sim, t2i) == {k: 1.0 for k in KEYS}


def test_hand_made_matrix():
    # Image 0 owns texts 0, 1; image 1 owns text 2; image 2 owns texts 3, 4.
    sim = torch.tensor(
        [
            [0.2, 0.9, 0.8, 0.1, 0.0],  # image 0: best correct is text 1 (0.9), rank 0 -> TR@1 hit
            [0.5, 0.4, 0.3, 0.6, 0.7],  # image 1: text 2 (0.3) is beaten by 4 texts -> rank 4
            [0.9, 0.1, 0.2, 0.3, 0.8],  # image 2: best correct 0.8 (text 4), beaten by text 0 -> rank 1
        ]
    )
    t2i = torch.tensor([0, 0, 1, 2, 2])
    text_ranks, image_ranks = retrieval_ranks(sim, t2i)
    assert text_ranks.tolist() == [0, 4, 1]
    # columns: t0 [.2,.5,.9] correct 0 -> 2; t1 [.9,.4,.1] -> 0; t2 [.8,.3,.2] correct 1 -> 1;
    # t3 [.1,.6,.3] correct 2 -> 1; t4 [0,.7,.8] correct 2 -> 0
    assert image_ranks.tolist() == [2, 0, 1, 1, 0]
    result = retrieval_recall(sim, t2i, ks=(1, 2, 5))
    expected = {"tr_r1": 1 / 3, "tr_r2": 2 / 3, "tr_r5": 1.0, "ir_r1": 2 / 5, "ir_r2": 4 / 5, "ir_r5": 1.0}
    expected["r_mean"] = sum(expected.values()) / 6
    assert_same(result, expected)
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist(), ks=(1, 2, 5)))


def test_ties_count_against_the_correct_item():
    # A collapsed model: every score equal. Pessimistic ties give zero recall wherever k <= number of wrong items.
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.zeros(3, 6)
    result = retrieval_recall(sim, t2i, ks=(1, 4, 5))
    # TR: 4 wrong texts tie the best correct one -> rank 4: miss at k=1 and 4, hit at 5.
    # IR: 2 wrong images tie -> rank 2: miss at 1, hit at 4 and 5.
    assert_same(
        result, {"tr_r1": 0.0, "tr_r4": 0.0, "tr_r5": 1.0, "ir_r1": 0.0, "ir_r4": 1.0, "ir_r5": 1.0, "r_mean": 0.5}
    )
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist(), ks=(1, 4, 5)))


def test_ties_among_correct_captions_do_not_hurt():
    t2i = torch.tensor([0, 0, 1])
    sim = torch.tensor([[0.5, 0.5, 0.4], [0.1, 0.1, 0.9]])
    text_ranks, image_ranks = retrieval_ranks(sim, t2i)
    assert text_ranks.tolist() == [0, 0]
    assert image_ranks.tolist() == [0, 0, 0]


def test_tie_between_correct_and_wrong_is_a_miss_at_1():
    t2i = torch.tensor([0, 1])
    sim = torch.tensor([[0.7, 0.7], [0.2, 0.9]])
    text_ranks, image_ranks = retrieval_ranks(sim, t2i)
    assert text_ranks.tolist() == [1, 0]  # image 0: text 1 ties text 0 -> counts against it
    assert image_ranks.tolist() == [0, 0]  # text 1: image 0 (0.7) < image 1 (0.9)


def test_k_larger_than_number_of_candidates_is_clamped():
    t2i = torch.tensor([0, 1])
    sim = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # everything wrong at rank 0
    result = retrieval_recall(sim, t2i, ks=(1, 2, 10, 1000))
    assert result["tr_r1"] == 0.0 and result["ir_r1"] == 0.0
    for k in (2, 10, 1000):
        assert result[f"tr_r{k}"] == 1.0 and result[f"ir_r{k}"] == 1.0
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist(), ks=(1, 2, 10, 1000)))


def test_images_without_captions_are_distractors_only():
    t2i = torch.tensor([0, 1])
    sim = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.95, 0.0]])  # image 2 has no caption but steals text 0
    text_ranks, image_ranks = retrieval_ranks(sim, t2i)
    assert text_ranks.tolist() == [0, 0, -1]
    assert image_ranks.tolist() == [1, 0]
    result = retrieval_recall(sim, t2i, ks=(1,))
    assert_same(result, {"tr_r1": 1.0, "ir_r1": 0.5, "r_mean": 0.75})
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist(), ks=(1,)))


def test_default_keys_and_mean():
    torch.manual_seed(0)
    result = retrieval_recall(torch.randn(4, 8), torch.arange(8) % 4)
    assert list(result) == KEYS
    assert result["r_mean"] == pytest.approx(sum(result[k] for k in KEYS[:-1]) / 6)
    assert all(0.0 <= v <= 1.0 for v in result.values())


@pytest.mark.parametrize("seed", range(6))
def test_random_matrices_with_ties_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_images = int(torch.randint(1, 9, (1,), generator=g))
    num_texts = int(torch.randint(1, 25, (1,), generator=g))
    t2i = torch.randint(0, num_images, (num_texts,), generator=g)
    sim = torch.randint(0, 4, (num_images, num_texts), generator=g).float()  # few values -> many ties
    ks = (1, 2, 3, 5, 10)
    if not (torch.bincount(t2i, minlength=num_images) > 0).any():
        pytest.skip("no image with a caption")
    assert_same(retrieval_recall(sim, t2i, ks), brute_force_recall(sim.tolist(), t2i.tolist(), ks))


@pytest.mark.parametrize("seed", range(4))
def test_random_matrices_without_ties_match_the_original_topk(seed):
    """Without ties the rule is the original's `topk` computation, whatever the tie rule."""
    g = torch.Generator().manual_seed(seed)
    num_images, captions_per_image = 20, 5
    t2i = torch.arange(num_images).repeat(captions_per_image)
    sim = torch.randn(num_images, num_images * captions_per_image, generator=g, dtype=torch.float64)
    result = retrieval_recall(sim, t2i)
    for k in (1, 5, 10):
        top_texts = sim.topk(k, dim=1).indices  # as RetrievalHandler: any top-k text of this image
        tr = (t2i[top_texts] == torch.arange(num_images).unsqueeze(1)).any(dim=1).double().mean().item()
        top_images = sim.topk(k, dim=0).indices
        ir = (top_images == t2i.unsqueeze(0)).any(dim=0).double().mean().item()
        assert result[f"tr_r{k}"] == pytest.approx(tr)
        assert result[f"ir_r{k}"] == pytest.approx(ir)
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist()))


@pytest.mark.parametrize(
    ("chunk_size", "dtype"), [(1, torch.float32), (3, torch.float32), (7, torch.float64), (1000, torch.float32)]
)
def test_chunked_embeddings_match_full_matrix(chunk_size, dtype):
    g = torch.Generator().manual_seed(chunk_size)
    # Small integer embeddings make exact ties likely, and every dot product exact in float.
    image_embeds = torch.randint(-2, 3, (11, 4), generator=g).to(dtype)
    text_embeds = torch.randint(-2, 3, (29, 4), generator=g).to(dtype)
    t2i = torch.randint(0, 11, (29,), generator=g)
    sim = image_embeds @ text_embeds.T
    full = retrieval_ranks(sim, t2i)
    chunked = retrieval_ranks_from_embeddings(image_embeds, text_embeds, t2i, chunk_size=chunk_size)
    assert [r.tolist() for r in chunked] == [r.tolist() for r in full]
    ks = (1, 3, 5, 10)
    result = retrieval_recall_from_embeddings(image_embeds, text_embeds, t2i, ks, chunk_size=chunk_size)
    assert_same(result, brute_force_recall(sim.tolist(), t2i.tolist(), ks))


def test_chunked_bounds_block_size(monkeypatch):
    """No score block larger than chunk_size x max(num_images, num_texts) is ever formed."""
    import beit3_hf.evaluation.retrieval as rm

    seen: list[tuple[int, int]] = []
    original = rm._check_finite

    def spy(scores):
        seen.append(tuple(scores.shape))
        return original(scores)

    monkeypatch.setattr(rm, "_check_finite", spy)
    image_embeds = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(250, 8), dim=-1)
    t2i = torch.arange(250) % 50
    rm.retrieval_ranks_from_embeddings(image_embeds, text_embeds, t2i, chunk_size=16)
    assert seen and all(min(shape) <= 16 for shape in seen)
    assert sum(r for r, c in seen if c == 250) == 50 and sum(c for r, c in seen if r == 50) == 250


def test_recall_from_ranks_and_pessimism_on_collapsed_embeddings():
    embeds = torch.ones(5, 3) / 3**0.5  # every image and text identical
    result = retrieval_recall_from_embeddings(embeds, embeds.repeat(2, 1), torch.arange(10) % 5)
    assert result["tr_r1"] == 0.0 and result["ir_r1"] == 0.0
    assert recall_from_ranks(torch.tensor([0, -1]), torch.tensor([2]), ks=(3,)) == {
        "tr_r3": 1.0,
        "ir_r3": 1.0,
        "r_mean": 1.0,
    }


@pytest.mark.parametrize(
    ("sim", "t2i", "error", "match"),
    [
        (torch.zeros(2, 3), torch.tensor([0, 1]), ValueError, r"shape \(2,\), expected \(3,\)"),
        (torch.zeros(2, 2), torch.tensor([0, 2]), ValueError, r"must lie in \[0, 2\)"),
        (torch.zeros(2, 2), torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
        (torch.zeros(2), torch.tensor([0, 1]), ValueError, "must be 2-D"),
        (torch.zeros(0, 2), torch.tensor([0, 0]), ValueError, "at least one image"),
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0, 0]), ValueError, "NaN"),
    ],
)
def test_bad_inputs(sim, t2i, error, match):
    with pytest.raises(error, match=match):
        retrieval_recall(sim, t2i)


def test_bad_ks_and_embeddings():
    with pytest.raises(ValueError, match=">= 1"):
        retrieval_recall(torch.eye(2), torch.arange(2), ks=(0,))
    with pytest.raises(ValueError, match="at least one k"):
        retrieval_recall(torch.eye(2), torch.arange(2), ks=())
    with pytest.raises(ValueError, match="embeddings"):
        retrieval_recall_from_embeddings(torch.eye(2), torch.eye(3), torch.arange(3))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_recall_from_embeddings(torch.eye(2), torch.eye(2), torch.arange(2), chunk_size=0)


def test_every_permutation_of_a_small_case():
    """Exhaustive: all score orders of 3 candidates (with repeats) for one image, one caption each side."""
    values = [0.0, 0.5, 1.0]
    for row in itertools.product(values, repeat=3):
        sim = torch.tensor([row, [0.3, 0.3, 0.3], [0.4, 0.2, 0.6]])
        t2i = torch.tensor([0, 1, 2])
        assert_same(retrieval_recall(sim, t2i, ks=(1, 2)), brute_force_recall(sim.tolist(), t2i.tolist(), ks=(1, 2)))


# ----------------------------------------------------------------------------------------------------------------
# evaluate_retrieval: a model and its processor over an evaluation index
# ----------------------------------------------------------------------------------------------------------------


class CountingProcessor:
    """Images -> their mean colour as a 3-d feature; texts -> a one-hot of their first character's digit."""

    def __init__(self) -> None:
        self.images_seen = self.texts_seen = 0

    def __call__(self, images=None, text=None, return_tensors="pt"):
        if images is not None:
            self.images_seen += len(images)
            pixels = torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) for image in images])
            return {"pixel_values": pixels}
        self.texts_seen += len(text)
        ids = torch.tensor([int(caption[0]) for caption in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class EmbeddingModel(torch.nn.Module):
    """Image i (colour (i, 0, 0) ...) and caption "i ..." embed to one-hot i; `wrap` returns output objects."""

    def __init__(self, wrap: bool) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.wrap = wrap

    def _out(self, embeds):
        return types.SimpleNamespace(pooler_output=embeds) if self.wrap else embeds

    def get_image_features(self, pixel_values):
        return self._out(torch.nn.functional.one_hot(pixel_values[:, 0].long(), 4).float())

    def get_text_features(self, input_ids, attention_mask):
        return self._out(torch.nn.functional.one_hot(input_ids, 4).float())


def test_evaluate_retrieval_encodes_each_item_once_and_accepts_both_output_styles(tmp_path):
    from PIL import Image

    from beit3_hf.data import RetrievalEvalIndex, RetrievalRecord, UndecodableImageError
    from beit3_hf.evaluation.retrieval import evaluate_retrieval

    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4), (i, 0, 0)).save(path)
        wrong = (i + 1) % 3  # the second caption of each image points at the next image
        records.append(RetrievalRecord(str(path), (f"{i} right", f"{wrong} wrong"), i))
    index = RetrievalEvalIndex.from_records(records)
    expected = retrieval_recall(
        torch.nn.functional.one_hot(torch.arange(3), 4).float()
        @ torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 2, 0]), 4).float().T,
        index.text_to_image,
    )
    for wrap in (False, True):
        processor = CountingProcessor()
        result = evaluate_retrieval(EmbeddingModel(wrap), processor, index, batch_size=2)
        assert result == expected and (processor.images_seen, processor.texts_seen) == (3, 6)
    assert result["ir_r1"] == 0.5 and result["tr_r1"] == 0.0  # every image ties a wrong caption: pessimistic
    (tmp_path / "1.png").write_bytes(b"broken")
    with pytest.raises(UndecodableImageError, match=str(tmp_path / "1.png")):
        evaluate_retrieval(EmbeddingModel(False), CountingProcessor(), index, batch_size=2)
