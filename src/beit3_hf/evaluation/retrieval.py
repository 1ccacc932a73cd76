"""Image-text retrieval recall (TR@k, IR@k) from one similarity matrix or, chunk by chunk, from embeddings.

Conventions, as in the original BEiT-3 evaluation (``RetrievalHandler``), except that each image is given once:

- ``similarity`` has shape ``(num_images, num_texts)``; ``text_to_image[t]`` is the row of caption ``t``'s image.
- **TR@k** (text retrieval, image -> text): the fraction of images for which at least one of their captions is among
  the ``k`` highest-scoring texts of the image's row. Images with no caption are not counted in TR (they only act as
  distractors for IR).
- **IR@k** (image retrieval, text -> image): the fraction of captions whose image is among the ``k`` highest-scoring
  images of the caption's column.
- Values are fractions in ``[0, 1]`` (the original prints them times 100); ``r_mean`` is the mean of all reported
  recalls (the original's ``average_score``). ``k`` larger than the number of candidates is clamped to it.

**Tie rule (pessimistic).** The original takes ``torch.topk``, whose order among equal scores is
implementation-defined. Here a query's rank is the number of *wrong* candidates scoring **greater than or equal to**
its best correct candidate, and a hit at ``k`` means ``rank < k``: every tie with a correct candidate is broken
against it. Other correct captions of the same image never count against it. This equals ``torch.topk`` whenever
no wrong candidate ties the best correct one, and is the lower bound over all tie orders otherwise. In particular a
collapsed model that gives every pair the same score gets zero recall (for every ``k`` not above the number of wrong
candidates) instead of the perfect score an optimistic rule would give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..data.loaders import RetrievalEvalIndex

__all__ = [
    "evaluate_retrieval",
    "recall_from_ranks",
    "retrieval_ranks",
    "retrieval_ranks_from_embeddings",
    "retrieval_recall",
    "retrieval_recall_from_embeddings",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _check_inputs(num_images: int, num_texts: int, text_to_image: torch.Tensor) -> torch.Tensor:
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"need at least one image and one text, got {num_images} images and {num_texts} texts")
    text_to_image = torch.as_tensor(text_to_image)
    if text_to_image.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    text_to_image = text_to_image.long()
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise ValueError(
            f"text_to_image values must lie in [0, {num_images}), got [{text_to_image.min()}, {text_to_image.max()}]"
        )
    return text_to_image


def _check_finite(scores: torch.Tensor) -> torch.Tensor:
    if torch.isnan(scores).any():
        raise ValueError("similarity contains NaN")
    return scores


def _ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per query row of ``scores``, the number of wrong candidates (``~correct``) scoring >= its best correct one;
    ``-1`` for a query with no correct candidate."""
    wrong = ~correct
    best = scores.masked_fill(wrong, float("-inf")).amax(dim=1, keepdim=True)
    ranks = ((scores >= best) & wrong).sum(dim=1)
    return ranks.masked_fill(~correct.any(dim=1), -1)


def _text_ranks(scores: torch.Tensor, rows: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """Rank of the best correct caption for each image of a row block (``rows`` = their image indices)."""
    return _ranks(scores, text_to_image.unsqueeze(0) == rows.unsqueeze(1))


def _image_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of the correct image for each text of a column block (``targets[j]`` = correct row of column j).

    Each text has exactly one correct image, so its score is gathered: one bool matrix, no masked float copy.
    """
    columns = torch.arange(scores.shape[1], device=scores.device)
    positive = scores[targets, columns]
    beats = scores >= positive.unsqueeze(0)
    beats[targets, columns] = False
    return beats.sum(dim=0)


def retrieval_ranks(similarity: torch.Tensor, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-based ranks under the pessimistic tie rule (see the module docstring).

    Returns ``(text_ranks, image_ranks)``: ``text_ranks[i]`` (shape ``(num_images,)``) is the rank of image ``i``'s
    best caption among all texts (``-1`` if the image has no caption); ``image_ranks[t]`` (shape ``(num_texts,)``) is
    the rank of caption ``t``'s image among all images.

    Example:
        >>> sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5]])
        >>> text_ranks, image_ranks = retrieval_ranks(sim, torch.tensor([0, 1, 1]))
        >>> text_ranks.tolist(), image_ranks.tolist()
        ([0, 0], [0, 0, 1])
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D (num_images, num_texts), got shape {tuple(similarity.shape)}")
    num_images, num_texts = similarity.shape
    text_to_image = _check_inputs(num_images, num_texts, text_to_image).to(similarity.device)
    _check_finite(similarity)
    rows = torch.arange(num_images, device=similarity.device)
    return _text_ranks(similarity, rows, text_to_image).cpu(), _image_ranks(similarity, text_to_image).cpu()


def recall_from_ranks(
    text_ranks: torch.Tensor, image_ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """``{"tr_r{k}", "ir_r{k}" for k in ks, "r_mean"}`` from the ranks of :func:`retrieval_ranks`.

    ``tr_r{k}`` averages over images with a caption (``text_ranks >= 0``); a hit is ``rank < k``, so any ``k`` at least
    the number of candidates is a sure hit (``k`` is clamped).

    Example:
        >>> recall_from_ranks(torch.tensor([0, 3]), torch.tensor([0, 1, 0]), ks=(1, 5))
        {'tr_r1': 0.5, 'tr_r5': 1.0, 'ir_r1': 0.6666666666666666, 'ir_r5': 1.0, 'r_mean': 0.7916666666666666}
    """
    if not ks:
        raise ValueError("ks must name at least one k")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    text_ranks = text_ranks[text_ranks >= 0]
    if text_ranks.numel() == 0:
        raise ValueError("no image has a caption: TR is undefined")
    if image_ranks.numel() == 0:
        raise ValueError("no texts: IR is undefined")
    result = {
        f"{name}_r{k}": (ranks < k).double().mean().item()
        for name, ranks in (("tr", text_ranks), ("ir", image_ranks))
        for k in ks
    }
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def retrieval_recall(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """TR@k, IR@k and their mean from an ``(num_images, num_texts)`` similarity matrix.

    With the default ``ks`` the keys are ``tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10, r_mean``; values are fractions.
    Ties count against the correct candidate (see the module docstring).

    Example:
        >>> sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])  # image 0 has texts 0 and 1, image 1 has text 2
        >>> retrieval_recall(sim, torch.tensor([0, 0, 1]), ks=(1,))
        {'tr_r1': 0.5, 'ir_r1': 1.0, 'r_mean': 0.75}
    """
    text_ranks, image_ranks = retrieval_ranks(similarity, text_to_image)
    return recall_from_ranks(text_ranks, image_ranks, ks)


def retrieval_ranks_from_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieval_ranks` for ``similarity = image_embeds @ text_embeds.T``, computed in chunks.

    The embeddings are used as given (pass L2-normalised ones for cosine similarity), in float32 unless they are
    float64, on their own device. At most ``chunk_size * max(num_images, num_texts)`` scores exist at a time: text
    ranks come from blocks of ``chunk_size`` image rows, image ranks from blocks of ``chunk_size`` text columns, and
    each rank compares scores of the same block, so ties are judged consistently. For 5k images and 25k captions
    with the default chunk that is 25M scores (100 MB) at a time instead of 125M.

    Example:
        >>> img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> txt = torch.cat([img, img]) + 0.01  # two captions per image
        >>> t2i = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> [r.tolist() for r in retrieval_ranks_from_embeddings(img, txt, t2i, chunk_size=2)] == [
        ...     r.tolist() for r in retrieval_ranks(img @ txt.T, t2i)]
        True
    """
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"expected (num_images, dim) and (num_texts, dim) embeddings, got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if image_embeds.device != text_embeds.device:
        raise ValueError(f"embeddings are on different devices: {image_embeds.device} and {text_embeds.device}")
    dtype = torch.float64 if torch.float64 in (image_embeds.dtype, text_embeds.dtype) else torch.float32
    image_embeds = image_embeds.detach().to(dtype)
    text_embeds = text_embeds.detach().to(dtype)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    text_to_image = _check_inputs(num_images, num_texts, text_to_image).to(image_embeds.device)

    rows = torch.arange(num_images, device=image_embeds.device).split(chunk_size)
    text_ranks = [
        _text_ranks(_check_finite(block @ text_embeds.T), block_rows, text_to_image)
        for block, block_rows in zip(image_embeds.split(chunk_size), rows)
    ]
    image_ranks = [
        _image_ranks(_check_finite(image_embeds @ block.T), targets)
        for block, targets in zip(text_embeds.split(chunk_size), text_to_image.split(chunk_size))
    ]
    return torch.cat(text_ranks).cpu(), torch.cat(image_ranks).cpu()


def retrieval_recall_from_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """:func:`retrieval_recall` of ``image_embeds @ text_embeds.T`` without materialising the whole matrix.

    Example:
        >>> img = torch.eye(4)
        >>> retrieval_recall_from_embeddings(img, img, torch.arange(4), ks=(1,), chunk_size=3)
        {'tr_r1': 1.0, 'ir_r1': 1.0, 'r_mean': 1.0}
    """
    text_ranks, image_ranks = retrieval_ranks_from_embeddings(
        image_embeds, text_embeds, text_to_image, chunk_size=chunk_size
    )
    return recall_from_ranks(text_ranks, image_ranks, ks)


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    index: RetrievalEvalIndex,
    *,
    batch_size: int = 64,
    accelerator: Any = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """TR@1/5/10, IR@1/5/10 and their mean of a retrieval model, encoding every image and every caption once.

    `model` is a `Beit3ForImageTextRetrieval` (anything with `get_image_features` / `get_text_features`, returning
    the L2-normalised embeddings or an output whose `pooler_output` they are), `processor` its `Beit3Processor`,
    `index` the evaluation set (:class:`beit3_hf.data.RetrievalEvalIndex`). With an `accelerate.Accelerator`, each
    process encodes its share and the embeddings are gathered. `num_workers` data-loader processes decode the
    images; an image that cannot be decoded stops the evaluation with an error naming its file. The original encodes
    each image once per caption; this encodes it once.
    """
    from ..data.loaders import open_image

    model.eval()
    device = next(model.parameters()).device

    def encode(dataset: Any, collate: Any, embed: Any, workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        chunks = []
        for batch in loader:
            embeds = embed({key: value.to(device) for key, value in batch.items()})
            if not isinstance(embeds, torch.Tensor):  # transformers 5-style models return an output object
                embeds = embeds.pooler_output
            chunks.append(accelerator.gather_for_metrics(embeds) if accelerator is not None else embeds)
        return torch.cat(chunks).float().cpu()

    image_embeds = encode(
        index.image_dataset(),
        lambda rows: processor(images=[open_image(row["image"]) for row in rows], return_tensors="pt"),
        lambda batch: model.get_image_features(batch["pixel_values"]),
        num_workers,
    )
    text_embeds = encode(
        index.captions,
        lambda captions: processor(text=list(captions), return_tensors="pt"),
        lambda batch: model.get_text_features(batch["input_ids"], batch["attention_mask"]),
        0,
    )
    return retrieval_recall_from_embeddings(image_embeds, text_embeds, index.text_to_image)
