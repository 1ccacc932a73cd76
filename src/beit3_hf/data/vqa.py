"""VQAv2 as released: question and annotation JSON files next to the COCO image folders.

The layout of the original BEiT-3 recipe (``get_started_for_vqav2.md``)::

    DATA_DIR/train2014/COCO_train2014_000000000009.jpg
    DATA_DIR/val2014/COCO_val2014_000000000042.jpg
    DATA_DIR/test2015/COCO_test2015_000000000001.jpg
    DATA_DIR/vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    DATA_DIR/vqa/v2_mscoco_{train2014,val2014}_annotations.json

:func:`load_vqa_split` reads a split as :class:`VqaQuestion` records, :func:`answer_vocabulary` /
:func:`read_answer_list` give the answer list, :func:`with_targets` attaches the soft targets,
:func:`hold_out_images` makes the original's (ViLT's) validation split and :func:`vqa_dataset` turns the records into
a ``datasets.Dataset`` for a ``Trainer`` pipeline.

Library code (never shipped in a checkpoint folder).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..evaluation.vqa import build_answer_vocabulary, soft_scores
from .loaders import check_images_exist, read_json, read_json_items, read_text

__all__ = [
    "VqaQuestion",
    "answer_vocabulary",
    "hold_out_images",
    "image_folder_of_split",
    "load_vqa_split",
    "read_answer_list",
    "vqa_dataset",
    "vqa_split_files",
    "with_targets",
]

#: Splits whose questions come without annotations (predictions go to the evaluation server).
UNANNOTATED_SPLITS = ("test2015", "test-dev2015")


@dataclass(frozen=True)
class VqaQuestion:
    """One question: ids, text, image file, the annotators' answers and (after :func:`with_targets`) its targets.

    ``answers`` are the raw ``answers[*].answer`` strings (usually 10) and ``majority_answer`` is
    ``multiple_choice_answer``; both are empty for test splits. ``labels`` / ``scores`` are the soft targets.

    Example:
        >>> q = VqaQuestion(1001, 1, "train2014/COCO_train2014_000000000001.jpg", "what colour?", ("red",) * 10, "red")
        >>> q.question_id, q.labels
        (1001, ())
    """

    question_id: int
    image_id: int
    image_path: str
    question: str
    answers: tuple[str, ...] = ()
    majority_answer: str = ""
    labels: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()


def image_folder_of_split(split: str) -> str:
    """The COCO image folder of a VQAv2 split: ``test-dev2015`` questions are about ``test2015`` images.

    Example:
        >>> image_folder_of_split("test-dev2015"), image_folder_of_split("val2014")
        ('test2015', 'val2014')
    """
    return "test2015" if split == "test-dev2015" else split


def vqa_split_files(data_dir: str | os.PathLike[str], split: str, annotation_dir: str | None = None) -> dict[str, Any]:
    """The files of a VQAv2 split under the original layout: ``questions``, ``annotations`` (None for test
    splits) and ``image_dir``.

    Example:
        >>> files = vqa_split_files("data", "val2014")
        >>> str(files["questions"]), str(files["image_dir"])
        ('data/vqa/v2_OpenEnded_mscoco_val2014_questions.json', 'data/val2014')
    """
    data_dir = Path(data_dir)
    folder = Path(annotation_dir) if annotation_dir is not None else data_dir / "vqa"
    return {
        "questions": folder / f"v2_OpenEnded_mscoco_{split}_questions.json",
        "annotations": None if split in UNANNOTATED_SPLITS else folder / f"v2_mscoco_{split}_annotations.json",
        "image_dir": data_dir / image_folder_of_split(split),
    }


def _entries(path: Path, key: str) -> list[dict]:
    """The ``key`` list (``questions`` or ``annotations``) of a VQAv2 JSON file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected an object with a {key!r} list (the VQAv2 format)")
    return data[key]


def _int_field(entry: Any, name: str, where: str) -> int:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, expected an object")
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} has no integer {name!r} field (got {value!r})")
    return value


def load_vqa_split(
    questions_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    annotations_file: str | os.PathLike[str] | None = None,
    *,
    image_prefix: str | None = None,
    check_images: bool = True,
) -> list[VqaQuestion]:
    """Read one VQAv2 split: questions (and annotations, when given) joined by ``question_id``.

    The image of a question is ``image_dir / f"{image_prefix}{image_id:012d}.jpg"``; ``image_prefix`` defaults to
    ``COCO_{folder}_`` with ``folder`` the name of ``image_dir`` (``COCO_val2014_000000000042.jpg``). Every
    annotated question must have an annotation and vice versa; errors name the file and the entry.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "q.json").write_text(json.dumps({"questions": [
        ...     {"image_id": 42, "question": "What colour?", "question_id": 42000}]}))
        >>> _ = (d / "a.json").write_text(json.dumps({"annotations": [{"question_id": 42000, "image_id": 42,
        ...     "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": 1}]}]}))
        >>> q = load_vqa_split(d / "q.json", d / "val2014", d / "a.json", check_images=False)[0]
        >>> pathlib.Path(q.image_path).name, q.answers, q.majority_answer
        ('COCO_val2014_000000000042.jpg', ('red',), 'red')
    """
    questions_file = Path(questions_file)
    image_dir = Path(image_dir)
    prefix = f"COCO_{image_dir.name}_" if image_prefix is None else image_prefix
    annotations: dict[int, tuple[tuple[str, ...], str]] | None = None  # question_id -> (answers, majority answer)
    if annotations_file is not None:
        annotations_file = Path(annotations_file)
        annotations = {}
        for index, entry in enumerate(_entries(annotations_file, "annotations")):
            where = f"{annotations_file}: annotations[{index}]"
            question_id = _int_field(entry, "question_id", where)
            answers = entry.get("answers")
            if not isinstance(answers, list) or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers
            ):
                raise ValueError(f"{where} (question {question_id}): 'answers' must be a list of {{'answer': text}}")
            if not isinstance(entry.get("multiple_choice_answer"), str):
                raise ValueError(f"{where} (question {question_id}) has no 'multiple_choice_answer' string")
            if question_id in annotations:
                raise ValueError(f"{where}: question {question_id} is annotated twice")
            annotations[question_id] = (tuple(a["answer"] for a in answers), entry["multiple_choice_answer"])

    records: list[VqaQuestion] = []
    seen: set[int] = set()
    for index, entry in enumerate(_entries(questions_file, "questions")):
        where = f"{questions_file}: questions[{index}]"
        question_id = _int_field(entry, "question_id", where)
        image_id = _int_field(entry, "image_id", where)
        question = entry.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where} (question {question_id}) has no 'question' text")
        if question_id in seen:
            raise ValueError(f"{where}: question_id {question_id} appears twice")
        seen.add(question_id)
        annotation = () if annotations is None else annotations.get(question_id)
        if annotation is None:
            raise ValueError(f"{where}: question {question_id} has no annotation in {annotations_file}")
        image_path = str(image_dir / f"{prefix}{image_id:012d}.jpg")
        records.append(VqaQuestion(question_id, image_id, image_path, question.strip(), *annotation))
    if not records:
        raise ValueError(f"{questions_file}: no questions")
    if annotations is not None and len(annotations) != len(records):
        extra = sorted(set(annotations) - seen)[:5]
        raise ValueError(f"{annotations_file}: annotates questions that {questions_file} does not have, e.g. {extra}")
    if check_images:
        check_images_exist(sorted({r.image_path for r in records}), source=f"{questions_file} (images in {image_dir})")
    return records


def answer_vocabulary(questions: Iterable[VqaQuestion], min_count: int = 9) -> list[str]:
    """The answer list of the original: normalised majority answers seen at least ``min_count`` times."""
    return build_answer_vocabulary((q.majority_answer for q in questions if q.majority_answer), min_count)


def read_answer_list(path: str | os.PathLike[str]) -> list[str]:
    """An answer list: the original's ``answer2label.txt`` (JSON lines ``{"answer", "label"}``), a JSON list of
    answers, or a text file with one answer per line; index = label.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "answer2label.txt"
        >>> _ = f.write_text('{"answer": "yes", "label": 0}\\n{"answer": "no", "label": 1}\\n')
        >>> read_answer_list(f)
        ['yes', 'no']
    """
    path = Path(path)
    text = read_text(path)  # a missing file: FileNotFoundError naming it
    if text.lstrip().startswith("["):
        answers = read_json(path, text)
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: a JSON answer list must hold strings only")
    elif text.lstrip().startswith("{"):
        answers = []
        for where, entry in read_json_items(path, text):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("answer"), str)
                or entry.get("label") != len(answers)
            ):
                raise ValueError(f"{where}: expected {{'answer': text, 'label': {len(answers)}}}")
            answers.append(entry["answer"])
    else:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"{path}: no answers")
    if len(set(answers)) != len(answers):
        raise ValueError(f"{path}: an answer appears twice")
    return answers


def with_targets(questions: Iterable[VqaQuestion], answers: Sequence[str]) -> tuple[list[VqaQuestion], int]:
    """Attach the soft targets of each annotated question; questions with no answer in ``answers`` are dropped, as
    the original does. Returns the kept questions and the number dropped.

    Example:
        >>> q = VqaQuestion(1, 1, "x.jpg", "what?", ("red",) * 9 + ("blue",), "red")
        >>> kept, dropped = with_targets([q], ["blue", "red"])
        >>> kept[0].labels, kept[0].scores, dropped
        ((1, 0), (1.0, 0.3), 0)
    """
    answer_to_label = {answer: label for label, answer in enumerate(answers)}
    questions = list(questions)
    targets = [soft_scores(question.answers, answer_to_label) for question in questions]
    kept = [replace(q, labels=tuple(t), scores=tuple(t.values())) for q, t in zip(questions, targets) if t]
    return kept, len(questions) - len(kept)


def hold_out_images(
    questions: Sequence[VqaQuestion], num_images: int, seed: int = 0
) -> tuple[list[VqaQuestion], list[VqaQuestion]]:
    """Split questions by image: ``num_images`` images drawn at random (seeded) and their questions, the rest.

    The original (after ViLT) evaluates on 1000 random ``val2014`` images and trains on the other val images
    together with ``train2014``. Returns ``(rest, held_out)``, both in the input order.

    Example:
        >>> qs = [VqaQuestion(i, i // 2, f"{i // 2}.jpg", "q") for i in range(6)]
        >>> rest, held = hold_out_images(qs, 1)
        >>> len(rest), len(held), len({q.image_id for q in held})
        (4, 2, 1)
    """
    images = sorted({q.image_id for q in questions})
    if not 0 < num_images < len(images):
        raise ValueError(f"cannot hold out {num_images} of {len(images)} images: choose 1 to {len(images) - 1}")
    held = set(random.Random(seed).sample(images, num_images))
    return [q for q in questions if q.image_id not in held], [q for q in questions if q.image_id in held]


def vqa_dataset(questions: Sequence[VqaQuestion]) -> Any:
    """A ``datasets.Dataset`` of the questions: ``image`` (path), ``question``, ``question_id``, ``labels`` and
    ``scores`` (empty lists for unannotated questions). Transform it lazily with ``.with_transform``."""
    import datasets

    if not questions:
        raise ValueError("no questions")
    return datasets.Dataset.from_dict(
        {
            "image": [q.image_path for q in questions],
            "question": [q.question for q in questions],
            "question_id": [q.question_id for q in questions],
            "labels": [list(q.labels) for q in questions],
            "scores": [list(q.scores) for q in questions],
        },
        features=datasets.Features(
            {
                "image": datasets.Value("string"),
                "question": datasets.Value("string"),
                "question_id": datasets.Value("int64"),
                "labels": datasets.Sequence(datasets.Value("int64")),
                "scores": datasets.Sequence(datasets.Value("float32")),
            }
        ),
    )
