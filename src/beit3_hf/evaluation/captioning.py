"""Captioning: the original BEiT-3 training loss (label smoothing + drop-worst) and the COCO caption metrics.

- :func:`captioning_loss`: the original ``utils.BertCaptioningLoss``: KL divergence to label-smoothed one-hot
  targets, summed over the vocabulary, on the masked caption tokens; after ``drop_worst_after`` training steps only
  the ``1 - drop_worst_ratio`` fraction of tokens with the smallest losses is kept; then the mean.
- :func:`tokenize_caption`: the tokenisation pycocoevalcap applies before scoring (Stanford CoreNLP 3.4.1
  ``PTBTokenizer -preserveLines -lowerCase``, then its punctuation tokens removed), in pure Python: no Java.
  It reproduces the Java tokenizer on ordinary captions (lower case, punctuation split off, clitics ``n't``,
  ``'s``, ``'re`` ... split, hyphenated words, ``3.5`` and ``1,000`` kept whole, brackets as ``-lrb-`` ...,
  abbreviations such as ``u.s.`` and ``mr.`` kept); it does not implement CoreNLP's full lexer (URLs, e-mail
  addresses, emoticons, SGML, rare abbreviations or Unicode quote variants may split differently).
- :func:`cider_d` and :func:`bleu`: CIDEr-D and corpus BLEU-1..4 by pycocoevalcap's own scorers (``Cider``:
  n = 1..4, sigma = 6; ``Bleu``: "closest" reference length), which are pure Python; only its tokenizer needs Java,
  and :func:`tokenize_caption` replaces that.
- :func:`caption_metrics`: tokenise, then CIDEr and BLEU-1..4, as ``COCOEvalCap`` reports them (fractions; CIDEr
  on its usual 0-10 scale, e.g. 1.336 for the 133.6 of the BEiT-3 paper).

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "PTB_PUNCTUATION",
    "bleu",
    "caption_metrics",
    "captioning_loss",
    "cider_d",
    "tokenize_caption",
]


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def captioning_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.1,
    drop_worst_ratio: float = 0.0,
    drop_worst_after: int = 0,
    step: int = 0,
) -> torch.Tensor:
    """The original ``BertCaptioningLoss`` on the labelled positions (``labels != -100``).

    Args:
        logits: (..., vocab) scores, e.g. (batch, text_len, vocab) from ``Beit3ForCaptioning``.
        labels: (...) target ids at the masked positions and -100 elsewhere, e.g. (batch, text_len).
        label_smoothing: ``eps``: the target gets ``1 - eps`` and every other id ``eps / (vocab - 1)``.
        drop_worst_ratio: fraction of the token losses dropped, the largest ones, once ``step > drop_worst_after``
            (0.2 in the original recipes; 0 turns it off).
        drop_worst_after: the step (0-based optimizer step, the original's ``global_step``) after which tokens are
            dropped (12000 in the original COCO recipe).
        step: the current step.

    The loss is the mean of the kept per-token losses. Unlike the original, at least one token is always kept
    (the original's ``topk(k=int(n * (1 - ratio)))`` keeps none, and returns NaN, when ``n * (1 - ratio) < 1``).

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
        >>> labels = torch.tensor([[0, 2]])
        >>> round(float(captioning_loss(logits, labels, label_smoothing=0.0)), 4)
        0.1672
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the shape of the logits without the vocabulary axis, {tuple(logits.shape[:-1])}; "
            f"got {tuple(labels.shape)}."
        )
    if not 0.0 <= drop_worst_ratio < 1.0:
        raise ValueError(f"drop_worst_ratio must be in [0, 1), got {drop_worst_ratio}.")
    selected = labels != -100
    logits, targets = logits[selected].float(), labels[selected]  # (n, vocab), (n,)
    num_classes = logits.shape[-1]
    smoothed = torch.full_like(logits, label_smoothing / (num_classes - 1))
    smoothed.scatter_(1, targets[:, None], 1.0 - label_smoothing)
    per_token = F.kl_div(F.log_softmax(logits, dim=-1), smoothed, reduction="none").sum(dim=1)
    if drop_worst_ratio > 0 and step > drop_worst_after and per_token.numel() > 0:
        keep = max(1, int(per_token.shape[0] * (1 - drop_worst_ratio)))
        per_token = per_token.topk(keep, largest=False).values
    return per_token.mean()


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation (pycocoevalcap's PTBTokenizer, without Java)
# ----------------------------------------------------------------------------------------------------------------

#: Tokens pycocoevalcap removes after PTB tokenisation. (With ``-lowerCase`` the bracket tokens come out as
#: ``-lrb-`` ..., which this upper-case list does not match, so they stay, in pycocoevalcap and here.)
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words whose final period belongs to them (CoreNLP knows many more; these are the ones captions use).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec".split()  # noqa: SIM905
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_LEADING = "\"'`([{$#"
_TRAILING = "\"'`)]}.,;:!?%"


def _split_word(word: str) -> list[str]:
    """PTB tokens of one whitespace-separated, lower-cased word."""
    before: list[str] = []
    after: list[str] = []
    while word and word[0] in _LEADING:
        char, word = word[0], word[1:]
        if char == '"':
            before.append("``")
        elif char == "'" and word.startswith("'"):
            before.append("``")
            word = word[1:]
        elif char == "'":
            before.append("`")
        else:
            before.append(_BRACKETS.get(char, char))
    while word:
        if word.endswith("..."):
            after.insert(0, "...")
            word = word[:-3]
        elif word.endswith("--"):
            after.insert(0, "--")
            word = word[:-2]
        elif word[-1] == "." and (re.fullmatch(r"(?:[a-z]\.)+", word) or word[:-1] in _ABBREVIATIONS):
            break  # u.s. / mr.: the period is part of the word
        elif word[-1] in _TRAILING:
            char = word[-1]
            if char == "'" and (word.endswith("''") or word.endswith("'\"")):
                after.insert(0, "''")
                word = word[:-2]
                continue
            if char in "!?":  # a run such as "!!" is one token (which the punctuation list does not remove)
                run = len(word) - len(word.rstrip("!?"))
                after.insert(0, word[-run:])
                word = word[:-run]
                continue
            if char == "'" and len(word) > 1 and word[-2] == "s":
                after.insert(0, "'")  # plural possessive: dogs' -> dogs '
                word = word[:-1]
                continue
            after.insert(0, "''" if char == '"' else _BRACKETS.get(char, char))
            word = word[:-1]
        else:
            break
    middle: list[str] = []
    for piece in re.split(r"(--|\.\.\.|[;!?\"()\[\]{}&/$])", word):
        if not piece:
            continue
        if piece in _BRACKETS:
            middle.append(_BRACKETS[piece])
            continue
        if piece == '"':
            middle.append("''")
            continue
        # Commas and colons split words unless they sit between digits (1,000 / 3:30).
        for part in re.split(r"((?<!\d)[,:]|[,:](?!\d))", piece):
            if not part:
                continue
            match = _CLITIC.match(part)
            if match and part not in ("'s", "'re", "'ve", "'ll", "'d", "'m"):
                middle.extend(match.groups())
            else:
                middle.append(part)
    return before + middle + after


def tokenize_caption(caption: str) -> str:
    """The caption as pycocoevalcap scores it: PTB tokens, lower case, punctuation tokens removed, space-joined.

    Example:
        >>> tokenize_caption("Two dogs' toys aren't on the table, they're under it!")
        "two dogs toys are n't on the table they 're under it"
        >>> tokenize_caption('A "vintage" car (circa 1950) costs $1,000.')
        'a vintage car -lrb- circa 1950 -rrb- costs $ 1,000'
    """
    tokens = [token for word in caption.replace("\n", " ").lower().split() for token in _split_word(word)]
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


# ----------------------------------------------------------------------------------------------------------------
# CIDEr-D and BLEU
# ----------------------------------------------------------------------------------------------------------------


def _scorer_inputs(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """Check the captions and put them in pycocoevalcap's layout ({image: references}, {image: [candidate]}), in the
    candidates' order (which orders the per-image scores). pycocoevalcap itself only `assert`s its layout."""
    if set(references) != set(candidates):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ValueError(f"references and candidates must cover the same images; they differ on e.g. {missing}.")
    if not candidates:
        raise ValueError("no captions to score.")
    for key, candidate in candidates.items():
        refs = references[key]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {key!r}: references must be a non-empty list of captions.")
        if not isinstance(candidate, str):
            raise ValueError(
                f"image {key!r}: the candidate must be one caption (a str), got {type(candidate).__name__}."
            )
    return {key: list(references[key]) for key in candidates}, {key: [text] for key, text in candidates.items()}


def _pycocoevalcap_scorer(name: str) -> Any:
    """pycocoevalcap's ``Cider`` or ``Bleu`` class (pure Python; the package comes with the ``train`` extra)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError("Caption metrics need pycocoevalcap: pip install 'beit3-hf[train]'.") from error
    return {"Bleu": Bleu, "Cider": Cider}[name]


def cider_d(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions, by pycocoevalcap's ``Cider``: (corpus score, per-image scores).

    Document frequencies come from the references of the images scored together, so a score depends on the whole
    set (as in COCO evaluation); tf-idf vectors of the 1- to 4-grams, the candidate's weights clipped to the
    reference's, a Gaussian length penalty of width `sigma`, averaged over the references, times 10.

    Example:
        >>> refs = {1: ["a red circle", "a red disc"], 2: ["a blue box", "a blue square"]}
        >>> round(cider_d(refs, {1: "a red circle", 2: "a green box"})[0], 4)
        2.8125
    """
    refs, cands = _scorer_inputs(references, candidates)
    if not any(ref.split() for texts in refs.values() for ref in texts):  # no n-gram at all: pycocoevalcap fails
        return 0.0, [0.0] * len(cands)
    score, scores = _pycocoevalcap_scorer("Cider")(sigma=sigma).compute_score(refs, cands)
    return float(score), [float(value) for value in scores]


def bleu(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (n <= 4) of tokenised captions, by pycocoevalcap's ``Bleu`` ("closest" reference length).

    Example:
        >>> [round(b, 4) for b in bleu({1: ["a red circle on grey"]}, {1: "a red circle"})]
        [0.5134, 0.5134, 0.5134, 0.0162]
    """
    if not 1 <= n <= 4:  # pycocoevalcap counts 1- to 4-grams
        raise ValueError(f"bleu: n must be 1 to 4, got {n}.")
    refs, cands = _scorer_inputs(references, candidates)
    return [float(value) for value in _pycocoevalcap_scorer("Bleu")(n).compute_score(refs, cands, verbose=0)[0]]


def caption_metrics(
    references: Mapping[Hashable, Iterable[str]], candidates: Mapping[Hashable, str], tokenize: bool = True
) -> dict[str, float]:
    """CIDEr (CIDEr-D) and BLEU-1..4 of one generated caption per image against its references, after
    :func:`tokenize_caption` (``tokenize=False``: the captions are already tokenised).

    Example:
        >>> metrics = caption_metrics({1: ["A red circle."], 2: ["A blue box."]}, {1: "a red circle", 2: "a box"})
        >>> sorted(metrics), round(metrics["bleu1"], 3)
        (['bleu1', 'bleu2', 'bleu3', 'bleu4', 'cider'], 0.819)
    """
    prepare = tokenize_caption if tokenize else (lambda text: text)
    refs = {key: [prepare(text) for text in texts] for key, texts in references.items()}
    cands = {key: prepare(text) for key, text in candidates.items()}
    metrics = {"cider": cider_d(refs, cands)[0]}
    metrics.update({f"bleu{k + 1}": value for k, value in enumerate(bleu(refs, cands))})
    return metrics
