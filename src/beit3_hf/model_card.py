"""Model cards (`README.md`) for converted and fine-tuned BEiT-3 folders, written with `huggingface_hub.ModelCard`.

A card carries the Hub metadata that makes a pushed folder render and index correctly (`library_name: transformers`,
the task's `pipeline_tag`, license, tags, base model, datasets) and a body with the task's usage snippet, the source
checkpoint and the known metrics. The snippets are run by the tests, on tiny folders of every task.

Library code (never shipped in a checkpoint folder's code files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers import PreTrainedModel

__all__ = ["PIPELINE_TAGS", "USAGE", "build_model_card", "card_task", "write_model_card_file"]

#: The Hub pipeline tag of each converter task (`beit3_hf.conversion.tasks.TASKS`). NLVR2 takes image *pairs*, which
#: no Hub task describes, hence "other"; the pretraining heads and the bare backbone give features.
PIPELINE_TAGS: dict[str, str] = {
    "backbone": "feature-extraction",
    "image-classification": "image-classification",
    "retrieval": "zero-shot-image-classification",
    "vqa": "visual-question-answering",
    "nlvr2": "other",
    "pretraining": "feature-extraction",
    "captioning": "image-to-text",
    "masked-image-modeling": "image-feature-extraction",  # `run_mim.py`'s image-only pretrained models
}

_LOAD = """from PIL import Image
from transformers import {auto_class}, AutoProcessor

model = {auto_class}.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
image = Image.open("image.jpg")
"""

#: How to use a folder of each task; `{repo}` is the folder or Hub repo id. Each needs only transformers + Pillow.
USAGE: dict[str, str] = {
    "backbone": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """inputs = processor(images=image, text="a photo of a dog", return_tensors="pt")
features = model(**inputs).last_hidden_state  # (1, image tokens + text tokens, hidden_size)
""",
    "image-classification": """from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
logits = model(**processor(images=Image.open("image.jpg"), return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax(-1))])
""",
    "retrieval": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """inputs = processor(images=image, text=["a photo of a dog", "a photo of a cat"], return_tensors="pt")
print(model(**inputs).logits_per_image.softmax(dim=-1))  # (1 image, 2 texts)
""",
    "vqa": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """logits = model(**processor(images=image, text="what is in the picture?", return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax(-1))])
""",
    "nlvr2": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """inputs = processor(images=[(image, image)], text=["The two images are the same."], return_tensors="pt")
print(model(**inputs).logits.argmax(-1).item() == 1)  # True: the statement holds for the (left, right) pair
""",
    "pretraining": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """inputs = processor(images=image, text="a photo of a <mask>", return_tensors="pt")
outputs = model(**inputs)  # mlm_logits over the vocabulary at every text token, mim_logits at every patch
""",
    "captioning": _LOAD.format(auto_class="AutoModel", repo="{repo}")
    + """ids = model.generate(**processor(images=image, return_tensors="pt"))  # original beam search: generation_config.json
print(processor.batch_decode(ids, skip_special_tokens=True))
# the same caption: pipeline("image-text-to-text", model=<this repo>, trust_remote_code=True)(images=image, text="")
""",
    "masked-image-modeling": """from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
outputs = model(**processor(images=Image.open("image.jpg"), return_tensors="pt"), output_hidden_states=True)
features = outputs.hidden_states[-1]  # (1, 1 + patches, hidden_size); fine-tune with run_image_classification.py
""",
}

_TEMPLATE = """---
{card_data}
---

# {title}

{summary}

## How to use

The folder carries its modelling code: load it with `trust_remote_code=True`, no other package is needed.

```python
{usage}```
{details}"""


def card_task(model: PreTrainedModel) -> str:
    """The task a model's card describes: its converter task (by class), or "masked-image-modeling"."""
    from .conversion.tasks import TASKS
    from .models.beit3.modeling_beit3 import Beit3ForMaskedImageModeling

    if isinstance(model, Beit3ForMaskedImageModeling):
        return "masked-image-modeling"
    for name, spec in TASKS.items():
        if type(model) is spec.model_class:
            return name
    raise ValueError(f"No model card task for {type(model).__name__}.")


def build_model_card(
    task: str,
    *,
    repo: str,
    summary: str,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    results: Mapping[str, float | int | str] | None = None,
    details: str | None = None,
    tags: Sequence[str] = (),
    license: str = "mit",
) -> ModelCard:
    """The card of a BEiT-3 folder of `task` (a converter task name, e.g. "retrieval").

    Args:
        task: the task, which sets the pipeline tag and the usage snippet.
        repo: the name the snippet loads (the folder's name, or its Hub repo id).
        summary: what the folder is and where it comes from (a paragraph of Markdown).
        base_model: the Hub id it was fine-tuned from, if it is one (a local path is not written).
        datasets: Hub dataset ids it was trained on.
        results: metrics (name -> value), shown as a table.
        details: more Markdown after the results (training notes, metric definitions).
        tags: extra Hub tags (`beit3` and `beit3-hf` are always there).
        license: the license id (the original BEiT-3 weights are MIT).

    Example:
        >>> card = build_model_card("vqa", repo="beit3-base-vqa", summary="BEiT-3 base fine-tuned on VQAv2.")
        >>> card.data.pipeline_tag, card.data.library_name
        ('visual-question-answering', 'transformers')
    """
    if task not in PIPELINE_TAGS:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(PIPELINE_TAGS)}.")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[task],
        license=license,
        tags=list(dict.fromkeys(["beit3", "beit3-hf", task, *tags])),
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        datasets=list(datasets) if datasets else None,
    )
    sections = []
    if results:
        rows = "\n".join(
            f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in sorted(results.items())
        )
        sections.append(f"## Results\n\n| metric | value |\n|---|---|\n{rows}\n")
    if details:
        sections.append(details.strip() + "\n")
    return ModelCard(
        _TEMPLATE.format(
            card_data=card_data.to_yaml(),
            title=Path(repo).name,
            summary=summary.strip(),
            usage=USAGE[task].format(repo=repo),
            details="".join(f"\n{section}" for section in sections),
        ),
        ignore_metadata_errors=False,
    )


def write_model_card_file(folder: str | Path, task: str, **card_kwargs: object) -> ModelCard:
    """Write `build_model_card(task, repo=<folder name>, ...)` as `folder/README.md`; returns the card."""
    folder = Path(folder)
    card = build_model_card(task, repo=str(card_kwargs.pop("repo", folder.name)), **card_kwargs)
    card.save(folder / "README.md")
    return card
