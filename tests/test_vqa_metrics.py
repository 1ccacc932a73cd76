"""VQAv2 targets and metrics against the original definitions: soft scores, answer normalisation, the answer list,
the VQA score, and the VQAv2 file loader's errors. Hand-made cases always run; with the original package installed
(`make test`) they are also compared with its own `get_score` and `normalize_word`."""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
import types

import pytest
import torch

from beit3_hf.data.vqa import (
    VqaQuestion,
    answer_vocabulary,
    hold_out_images,
    load_vqa_split,
    read_answer_list,
    with_targets,
)
from beit3_hf.evaluation.vqa import (
    answer_score,
    build_answer_vocabulary,
    normalize_answer,
    soft_scores,
    target_score_of_prediction,
    vqa_score,
)


def original_datasets_module():
    """unilm's `beit3/datasets.py` (it imports `utils`, `glossary`, `randaug` as top-level modules; `randaug` needs
    OpenCV, which the tests do not, so it is stubbed)."""
    import beit3

    folder = os.path.dirname(beit3.__file__)
    saved = {name: sys.modules.get(name) for name in ("utils", "glossary", "randaug")}
    stub = types.ModuleType("randaug")
    stub.RandomAugment = object
    sys.modules["randaug"] = stub
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("beit3.datasets")
    finally:
        sys.path.remove(folder)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def original_vqa_score(logits: torch.Tensor, target: torch.Tensor) -> float:
    """unilm `utils.VQAScore.update` + `compute`, restated: one-hot of the arg-max times the target, summed, / N."""
    predictions = torch.max(logits.float(), 1)[1]
    one_hots = torch.zeros(*target.size())
    one_hots.scatter_(1, predictions.view(-1, 1), 1)
    return float((one_hots * target).sum() / len(predictions))


def test_soft_scores_of_annotator_counts():
    assert [answer_score(n) for n in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    with pytest.raises(ValueError, match="count must be >= 0"):
        answer_score(-1)
    vocabulary = {"red": 0, "orange": 1, "yes": 2, "2": 3}
    # 10 annotators: 6 red, 3 orange, 1 "Red" (counted as written, outside the list: dropped, as the original).
    assert soft_scores(["red"] * 6 + ["orange"] * 3 + ["Red"], vocabulary) == {0: 1.0, 1: 0.9}
    assert soft_scores(["red", "red", "orange", "blue"] + ["two"] * 6, vocabulary) == {0: 0.6, 1: 0.3}
    assert soft_scores(["purple"] * 10, vocabulary) == {}


@pytest.mark.oracle("beit3")
def test_soft_scores_equal_the_original_get_score():
    original = original_datasets_module()
    assert [answer_score(n) for n in range(12)] == [original.VQAv2Dataset.get_score(n) for n in range(12)]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Two", "2"),
        ("two dogs!", "2 dogs"),
        ("the red-ish one.", "red ish 1"),
        ("A Dog", "dog"),
        ("dont know", "don't know"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        ("(none)", "0"),
        ("t-shirt", "t shirt"),
        ("left / right", "left right"),
    ],
)
def test_normalize_answer_hand_made(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.oracle("beit3")
def test_normalize_answer_equals_the_original_normalize_word():
    from beit3.glossary import normalize_word

    rng = random.Random(0)
    pieces = [*list("abcdeinotwy .,!?-/;()\"'1234567890"), "dont ", "the ", "an ", "Two ", "ten", "youre ", "none "]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 24))) for _ in range(3000)]
    texts.append(".".join("a" * 40))  # more periods than the original's (accidental) substitution limit
    for text in texts:
        assert normalize_answer(text) == normalize_word(text), text


def test_answer_vocabulary_keeps_frequent_normalised_majority_answers_in_order():
    majority = ["Yes", "no", "yes", "2", "two", "no", "blue", "yes"]
    assert build_answer_vocabulary(majority, min_count=2) == ["yes", "no", "2"]
    assert build_answer_vocabulary(majority, min_count=1) == ["yes", "no", "2", "blue"]
    questions = [VqaQuestion(i, i, "x.jpg", "q?", (), answer) for i, answer in enumerate(majority)]
    assert answer_vocabulary(questions, min_count=3) == ["yes"]
    with pytest.raises(ValueError, match="min_count"):
        build_answer_vocabulary(majority, min_count=0)


def test_targets_attach_and_questions_without_any_are_dropped():
    questions = [
        VqaQuestion(1, 1, "a.jpg", "what colour?", ("red",) * 8 + ("blue",) * 2, "red"),
        VqaQuestion(2, 1, "a.jpg", "what shape?", ("disc",) * 10, "disc"),
    ]
    kept, dropped = with_targets(questions, ["blue", "red"])
    assert dropped == 1 and [q.question_id for q in kept] == [1]
    assert dict(zip(kept[0].labels, kept[0].scores)) == {1: 1.0, 0: 0.6}


def test_vqa_score_hand_made_and_against_the_original_definition():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [0.1, 0.2, 0.0]])
    targets = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.9, 0.6], [0.0, 0.0, 1.0]])
    # per question: 1.0 (answer 0), 0.6 (answer 2), 0.0 (answer 1)
    assert target_score_of_prediction(logits, targets).tolist() == pytest.approx([1.0, 0.6, 0.0])
    assert vqa_score(logits, targets) == pytest.approx(1.6 / 3)
    assert vqa_score(logits, targets) == pytest.approx(original_vqa_score(logits, targets))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(17, 9, generator=generator)
        targets = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0])[torch.randint(0, 5, (17, 9), generator=generator)]
        assert vqa_score(logits, targets) == pytest.approx(original_vqa_score(logits, targets), abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        vqa_score(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hold_out_images_is_deterministic_and_by_image():
    questions = [VqaQuestion(i, i // 3, f"{i // 3}.jpg", "q") for i in range(30)]
    rest, held = hold_out_images(questions, 4, seed=1)
    assert len({q.image_id for q in held}) == 4 and len(held) == 12 and len(rest) == 18
    assert not {q.image_id for q in held} & {q.image_id for q in rest}
    assert hold_out_images(questions, 4, seed=1) == (rest, held)
    with pytest.raises(ValueError, match="cannot hold out 10 of 10 images"):
        hold_out_images(questions, 10)


def test_answer_list_formats(tmp_path):
    (tmp_path / "answer2label.txt").write_text('{"answer": "yes", "label": 0}\n{"answer": "no", "label": 1}\n')
    (tmp_path / "answers.json").write_text('["yes", "no"]')
    (tmp_path / "answers.txt").write_text("yes\nno\n")
    for name in ("answer2label.txt", "answers.json", "answers.txt"):
        assert read_answer_list(tmp_path / name) == ["yes", "no"]
    (tmp_path / "bad.txt").write_text('{"answer": "yes", "label": 1}\n')
    with pytest.raises(ValueError, match=r"bad.txt:1: expected"):
        read_answer_list(tmp_path / "bad.txt")


def test_vqa_files_errors_name_the_file_and_entry(tmp_path):
    questions = {"questions": [{"image_id": 7, "question": "what?", "question_id": 7000}]}
    annotations = {
        "annotations": [
            {"question_id": 7000, "image_id": 7, "multiple_choice_answer": "x", "answers": [{"answer": "x"}]}
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000007.jpg"):
        load_vqa_split(tmp_path / "q.json", tmp_path / "val2014", tmp_path / "a.json")
    records = load_vqa_split(tmp_path / "q.json", tmp_path / "val2014", tmp_path / "a.json", check_images=False)
    assert records[0].answers == ("x",) and records[0].majority_answer == "x"
    annotations["annotations"][0]["question_id"] = 8000
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"q.json: questions\[0\]: question 7000 has no annotation"):
        load_vqa_split(tmp_path / "q.json", tmp_path / "val2014", tmp_path / "a.json", check_images=False)
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 7, "question_id": 1}]}))
    with pytest.raises(ValueError, match=r"q.json: questions\[0\] \(question 1\) has no 'question' text"):
        load_vqa_split(tmp_path / "q.json", tmp_path / "val2014", check_images=False)
