"""The `transformers.pipeline` tasks that transformers itself does not offer for BEiT-3 heads.

transformers 5.x has no `visual-question-answering` pipeline any more (it points to `image-text-to-text`, which
generates answers), and no task takes NLVR2's image pairs. A saved `Beit3ForVisualQuestionAnswering` or
`Beit3ForVisualReasoning` folder declares these classes in its `config.json` (`custom_pipelines`), so that

    pipeline("visual-question-answering", model=folder, trust_remote_code=True)
    pipeline("visual-reasoning", model=folder, trust_remote_code=True)

load them. This file is remote code: it is copied into checkpoints and imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

__all__ = ["Beit3VisualQuestionAnsweringPipeline", "Beit3VisualReasoningPipeline"]


class _Beit3HeadPipeline(Pipeline):
    """What both pipelines share: the folder's processor (tokenizer + image processor) and the head's logits.

    `pipe(images, text)` calls are turned into the `{images_key: ..., text_key: ...}` dicts that `preprocess` takes.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    images_key, text_key = "image", "question"

    def __call__(self, images: Any, text: str | None = None, **kwargs: Any) -> Any:
        text = kwargs.pop(self.text_key, text)  # pipe(image, question=...) / pipe(pair, statement=...)
        if text is None and isinstance(images, dict):
            return super().__call__(images, **kwargs)
        if text is None:
            raise ValueError(f"Pass a {self.text_key}: pipe({self.images_key}, {self.text_key}).")
        return super().__call__({self.images_key: images, self.text_key: text}, **kwargs)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.model(**model_inputs).logits}


class Beit3VisualQuestionAnsweringPipeline(_Beit3HeadPipeline):
    """Answer a question about an image with a `Beit3ForVisualQuestionAnswering` folder.

    `pipe(image, question, top_k=5)` returns `[{"answer", "score"}, ...]`: the `top_k` answers of `id2label` with the
    highest sigmoid scores (the head is trained with a binary cross-entropy on soft scores), best first.

    Example (with a saved folder `beit3-vqa`)::

        >>> from transformers import pipeline
        >>> vqa = pipeline("visual-question-answering", model="beit3-vqa", trust_remote_code=True)  # doctest: +SKIP
        >>> vqa(image, "what colour is the car?", top_k=1)  # doctest: +SKIP
        [{'answer': 'red', 'score': 0.93}]
    """

    def _sanitize_parameters(self, top_k: int | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        postprocess = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess["top_k"] = top_k
        return {}, {}, postprocess

    def preprocess(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, dict) or not {"image", "question"} <= set(inputs):
            raise ValueError("Each input must be a dict with an 'image' and a 'question'.")
        return self.processor(images=inputs["image"], text=inputs["question"], return_tensors="pt")

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int = 5) -> list[dict[str, Any]]:
        scores = model_outputs["logits"][0].float().sigmoid()  # (num_labels,)
        top = scores.topk(min(top_k, scores.numel()))
        id2label = self.model.config.id2label
        return [
            {"answer": id2label[index], "score": score}
            for score, index in zip(top.values.tolist(), top.indices.tolist())
        ]


class Beit3VisualReasoningPipeline(_Beit3HeadPipeline):
    """Say whether a statement holds for a pair of images with a `Beit3ForVisualReasoning` (NLVR2) folder.

    `pipe((left_image, right_image), statement)` returns `{"label", "score"}`: the `id2label` name of the most
    probable class (NLVR2: 1 = the statement is true) and its softmax probability.

    Example (with a saved folder `beit3-nlvr2`)::

        >>> from transformers import pipeline
        >>> nlvr2 = pipeline("visual-reasoning", model="beit3-nlvr2", trust_remote_code=True)  # doctest: +SKIP
        >>> nlvr2((left, right), "There are two dogs in total.")  # doctest: +SKIP
        {'label': 'LABEL_1', 'score': 0.88}
    """

    images_key, text_key = "images", "statement"

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        return {}, {}, {}

    def preprocess(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, dict) or not {"images", "statement"} <= set(inputs):
            raise ValueError("Each input must be a dict with 'images' (a (left, right) pair) and a 'statement'.")
        pair = inputs["images"]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"images must be a (left, right) pair of images, got {type(pair).__name__}.")
        return self.processor(images=[tuple(pair)], text=[inputs["statement"]], return_tensors="pt")

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        probabilities = model_outputs["logits"][0].float().softmax(dim=-1)
        score, index = probabilities.max(dim=-1)
        return {"label": self.model.config.id2label[int(index)], "score": float(score)}
