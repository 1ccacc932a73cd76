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
- :func:`cider_d` and :func:`bleu`: CIDEr-D (``Cider`` of pycocoevalcap: n = 1..4, sigma = 6, document frequencies
  from the references of the evaluated set, clipped tf-idf, Gaussian length penalty, x 10) and corpus BLEU-1..4
  (``Bleu``: "closest" reference length, the same smoothing constants), reimplemented so that evaluation needs
  neither Java nor pycocoevalcap's 100 MB of jars; the tests check both against pycocoevalcap when it is installed.
- :func:`caption_metrics`: tokenise, then CIDEr and BLEU-1..4, as ``COCOEvalCap`` reports them (fractions; CIDEr
  on its usual 0-10 scale, e.g. 1.336 for the 133.6 of the BEiT-3 paper).

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

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


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of the 1- to n-grams of `words`."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check_pairs(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> list[tuple[str, list[str]]]:
    if set(references) != set(candidates):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ValueError(f"references and candidates must cover the same images; they differ on e.g. {missing}.")
    if not candidates:
        raise ValueError("no captions to score.")
    pairs = []
    for key, candidate in candidates.items():
        refs = references[key]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {key!r}: references must be a non-empty list of captions.")
        if not isinstance(candidate, str):
            raise ValueError(
                f"image {key!r}: the candidate must be one caption (a str), got {type(candidate).__name__}."
            )
        pairs.append((candidate, list(refs)))
    return pairs


def cider_d(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions (pycocoevalcap's ``Cider``): (corpus score, per-image scores).

    Document frequencies come from the references of the images scored together, so a score depends on the whole
    set (as in COCO evaluation). Each n-gram vector is tf-idf weighted with ``idf = log(num_images) - log(max(1,
    df))``; the candidate's weights are clipped to the reference's; the cosine is multiplied by
    ``exp(-(len_candidate - len_reference)^2 / (2 sigma^2))`` (lengths in words); scores average over n = 1..n and
    over the references, times 10.

    Example:
        >>> refs = {1: ["a red circle", "a red disc"], 2: ["a blue box", "a blue square"]}
        >>> round(cider_d(refs, {1: "a red circle", 2: "a green box"})[0], 4)
        2.8125
    """
    pairs = _check_pairs(references, candidates)
    cooked = [(_ngrams(c.split(), n), [_ngrams(r.split(), n) for r in refs]) for c, refs in pairs]
    document_frequency: Counter = Counter()
    for _, refs in cooked:
        document_frequency.update({gram for ref in refs for gram in ref})
    log_num_images = math.log(float(len(cooked)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_num_images - math.log(max(1.0, document_frequency[gram])))
            weights[order][gram] = weight
            norms[order] += weight**2
            if order == 1:  # pycocoevalcap counts the bigrams here, not the words (its length penalty does so too)
                length += tf
        return weights, [math.sqrt(value) for value in norms], length

    scores = []
    for candidate, refs in cooked:
        cand_vec, cand_norm, cand_len = vector(candidate)
        total = [0.0] * n
        for ref in refs:
            ref_vec, ref_norm, ref_len = vector(ref)
            penalty = math.e ** (-(float(cand_len - ref_len) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = sum(
                    min(weight, ref_vec[order].get(gram, 0.0)) * ref_vec[order].get(gram, 0.0)
                    for gram, weight in cand_vec[order].items()
                )
                if cand_norm[order] != 0 and ref_norm[order] != 0:
                    value /= cand_norm[order] * ref_norm[order]
                total[order] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def bleu(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions (pycocoevalcap's ``Bleu``, "closest" reference length).

    Clipped n-gram matches and candidate n-grams are summed over the corpus; BLEU-k is the geometric mean of the
    first k precisions (with pycocoevalcap's 1e-15 / 1e-9 smoothing constants) times the brevity penalty of the
    summed candidate and closest-reference lengths.

    Example:
        >>> [round(b, 4) for b in bleu({1: ["a red circle on grey"]}, {1: "a red circle"})]
        [0.5134, 0.5134, 0.5134, 0.0162]
    """
    pairs = _check_pairs(references, candidates)
    small, tiny = 1e-9, 1e-15
    guess, correct = [0] * n, [0] * n
    test_length = reference_length = 0
    for candidate, refs in pairs:
        words = candidate.split()
        counts = _ngrams(words, n)
        max_counts: dict = {}
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        test_length += len(words)
        reference_length += min((abs(length - len(words)), length) for length in ref_lengths)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (reference_length + small)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


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
