"""VQAv2 answers, soft targets and the VQA score, as the original BEiT-3 fine-tuning defines them.

:func:`normalize_answer` is unilm ``beit3/glossary.py``'s ``normalize_word`` (the VQA evaluation script's
punctuation, digit, article and contraction rules), :func:`build_answer_vocabulary` and :func:`soft_scores` follow
``VQAv2Dataset``'s index builder and ``get_score``, :func:`vqa_score` is ``utils.VQAScore``.

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "answer_score",
    "build_answer_vocabulary",
    "normalize_answer",
    "soft_scores",
    "target_score_of_prediction",
    "vqa_score",
]

# The VQA evaluation's contraction table ("dont" -> "don't", ...), as `written=canonical` pairs.
_CONTRACTIONS: dict[str, str] = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
    howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
    it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
    mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
    oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
    shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
    somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
    someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
    somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
    they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
    we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've
    whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
    wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
    wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
    youll=you'll youre=you're youve=you've
    """.split()  # noqa: SIM905
)
# Number words become digits ("none" counts as zero).
_NUMBERS = {
    word: str(value)
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
} | {"none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
# The VQA evaluation's punctuation marks, in its order.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A period not followed by a digit. The original pattern's `(?!<=\d)` is a (harmless) typo for a look-behind; it
# is kept so that the rule is the original's, character for character.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
# The original calls `period.sub("", text, re.UNICODE)`: re.UNICODE (32) lands in `count`, so at most 32 periods go.
_MAX_PERIODS_REMOVED = int(re.UNICODE)

#: Soft target of an answer given by 0, 1, 2, 3 annotators; 4 or more give 1.0.
_SCORES = (0.0, 0.3, 0.6, 0.9)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer as the original does before building the answer vocabulary.

    Punctuation is removed (or turned into a space when it separates words), periods not followed by a digit are
    dropped, the text is lower-cased, number words become digits, articles are removed, known contractions are
    restored ("dont" -> "don't") and the remaining commas go.

    Example:
        >>> normalize_answer("Two dogs!"), normalize_answer("the red-ish one."), normalize_answer("dont know")
        ('2 dogs', 'red ish 1', "don't know")
    """
    text = answer
    for mark in _PUNCTUATION:
        if mark + " " in answer or " " + mark in answer or _COMMA_BETWEEN_DIGITS.search(answer) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text, count=_MAX_PERIODS_REMOVED)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def build_answer_vocabulary(majority_answers: Iterable[str], min_count: int = 9) -> list[str]:
    """The answer vocabulary: normalised ``multiple_choice_answer`` strings seen at least ``min_count`` times, in
    order of first appearance (index = label), as the original ``VQAv2Dataset.make_dataset_index``.

    Example:
        >>> build_answer_vocabulary(["Yes", "no", "yes", "2", "two", "no"], min_count=2)
        ['yes', 'no', '2']
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    counts = Counter(normalize_answer(answer) for answer in majority_answers)
    return [answer for answer, count in counts.items() if count >= min_count]


def answer_score(count: int) -> float:
    """The soft target of an answer given by `count` annotators: 0, 0.3, 0.6, 0.9, then 1.0 from 4 on.

    Example:
        >>> [answer_score(n) for n in range(6)]
        [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    return _SCORES[count] if count < len(_SCORES) else 1.0


def soft_scores(answers: Iterable[str], answer_to_label: Mapping[str, int]) -> dict[int, float]:
    """`{label: score}` of one question from its annotators' answers (usually 10).

    Answers are counted as written (not normalised, as the original); answers outside the vocabulary are dropped,
    so a question may get no target at all (the original then leaves it out of training and evaluation).

    Example:
        >>> soft_scores(["red"] * 7 + ["orange"] * 2 + ["Red"], {"red": 0, "orange": 1, "blue": 2})
        {0: 1.0, 1: 0.6}
    """
    counts = Counter(answers)
    return {answer_to_label[a]: answer_score(n) for a, n in counts.items() if a in answer_to_label}


def target_score_of_prediction(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per question, the target score of the arg-max answer: (batch, num_labels) logits and soft targets ->
    (batch,)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape.")
    predictions = logits.detach().float().argmax(dim=-1, keepdim=True)
    return targets.detach().float().gather(-1, predictions).squeeze(-1)


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The original ``utils.VQAScore`` as a fraction: mean over questions of the target score of the arg-max answer.

    Example:
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
        >>> targets = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.9, 0.6]])
        >>> round(vqa_score(logits, targets), 4)
        0.8
    """
    if logits.shape[0] == 0:
        raise ValueError("vqa_score needs at least one question.")
    return float(target_score_of_prediction(logits, targets).mean())
