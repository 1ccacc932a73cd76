"""Data for multimodal pretraining: texts, images and image-text pairs, mixed into one stream of one-objective steps.

Sources, in the formats people have:

- texts: caption JSON / JSON Lines (:func:`load_caption_texts`: ``[{"caption": ...}]``, one object or string per
  line); empty captions are skipped and counted;
- images: an ImageNet-style folder (:func:`~beit3_hf.data.loaders.list_image_files`, labels ignored);
- pairs: a Karpathy split file or ``{"image", "caption"}`` JSON / JSON Lines (:func:`load_pairs`), or webdataset
  shards as ``img2dataset`` writes them (``.jpg`` + ``.txt``), streamed.

:class:`PretrainingMixture` is an infinite ``IterableDataset`` whose stream is cut into steps: step ``s`` holds
``batch_size * batches_per_step`` samples (the global batch of the processes) of objective ``schedule(s)``, so
accelerate's batch dispatching hands every process its slice of one objective. Each objective draws from its source
in an order that is a function of the seed alone (a permutation per pass over a file list; the shard order per pass
for webdataset), and every sample's masking and crop are seeded by its objective and position, so a run is
reproducible, two processes see the same global batches as one, and a resumed run repeats the same data.
Images that cannot be decoded (missing, corrupt) and empty captions are skipped and counted
(:attr:`PretrainingMixture.skipped_images`, :attr:`PretrainingMixture.skipped_texts`), never a crash mid-run.

Data-loader workers: worker ``w`` of ``W`` makes batches ``w, w + W, ...`` from its own share of the data (every
``W``-th draw of a file list, every ``W``-th shard), so the stream depends on ``W``, and a run resumes exactly with
the same number of workers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..training.objectives import OBJECTIVES, ObjectiveSchedule, mask_tokens, word_starts
from .loaders import load_caption_jsonl, load_karpathy_split, read_json_items, read_text
from .pretraining import DecodeFailures, TwoViewTransform

__all__ = ["PretrainingCollator", "PretrainingMixture", "load_caption_texts", "load_pairs"]

logger = logging.getLogger(__name__)

# Draws in a row that may fail (undecodable images) before the source counts as broken.
_MAX_FAILURES_IN_A_ROW = 100


def load_caption_texts(path: str | os.PathLike[str], skipped: DecodeFailures | None = None) -> list[str]:
    """The captions of a JSON list (``[{"caption": ...}, ...]`` or ``["...", ...]``) or JSON Lines file.

    Items with an empty, missing or non-string caption are skipped and recorded in ``skipped`` (named
    ``file:line`` or ``file: item i``); invalid JSON raises naming the file and line.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "captions.jsonl"
        >>> _ = path.write_text('{"caption": "a red circle"}\\n{"caption": "  "}\\n"a blue square"\\n')
        >>> skipped = DecodeFailures(what="an empty caption")
        >>> load_caption_texts(path, skipped), skipped.count
        (['a red circle', 'a blue square'], 1)
    """
    path = Path(path)
    items = read_json_items(path)
    captions = []
    for where, item in items:
        caption = item.get("caption", item.get("text")) if isinstance(item, dict) else item
        if isinstance(caption, str) and caption.strip():
            captions.append(caption.strip())
        elif skipped is not None:
            skipped.record(where, "empty caption" if isinstance(caption, str) else f"no caption in {item!r:.80}")
    if not captions:
        raise ValueError(f"{path}: no caption in the file (expected [{{'caption': text}}, ...] or JSON Lines).")
    return captions


def load_pairs(
    pair_file: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs of a Karpathy split file (its ``train`` and ``restval`` images) or of a
    ``{"image", "caption"}`` JSON / JSON Lines file. Images are not opened here: missing or undecodable ones are
    skipped and counted during training."""
    path = Path(pair_file)
    text = read_text(path)
    karpathy = False
    if text.lstrip().startswith("{"):
        try:
            karpathy = "images" in json.loads(text)
        except json.JSONDecodeError:
            karpathy = False  # JSON Lines
    if karpathy:
        if image_root is None:
            raise ValueError(f"--pair_file {path} is a Karpathy split file: pass --image_root (the images' folder).")
        records = load_karpathy_split(path, image_root, "train", check_images=False)
    else:
        records = load_caption_jsonl(path, image_root, check_images=False)
    return [(record.image_path, caption) for record in records for caption in record.captions]


class PretrainingMixture(torch.utils.data.IterableDataset):
    """An endless stream of pretraining samples, one objective per step (see the module docstring).

    A sample is a dict with ``objective`` (the id in `OBJECTIVES`) and that objective's inputs: ``input_ids``,
    ``attention_mask`` (padded to ``max_length``) and ``mlm_labels`` for ``text_mlm``; the same plus
    ``pixel_values`` for ``pair_mlm``; ``pixel_values``, ``bool_masked_pos`` (and ``tokenizer_pixel_values``) for
    ``image_mim``; ``pixel_values``, ``input_ids`` and ``attention_mask`` for ``itc``.

    Args:
        schedule: the objective of each step.
        batch_size: samples per batch of one process (``--per_device_train_batch_size``).
        batches_per_step: batches of one step: the number of processes (accelerate's dispatching reads one batch per
            process for each step).
        tokenizer: the text tokenizer (with a mask token for the MLM objectives).
        pair_transform: the image transform of ``pair_mlm`` / ``itc`` (a :class:`TwoViewTransform` without mask).
        mim_transform: the two-view transform with block masks of ``image_mim``.
        texts / images / pairs: file-based sources; ``webdataset`` (a shard pattern or list) streams pairs.
            ``text_mlm`` reads ``texts``, else the captions of the pairs; ``image_mim`` reads ``images``, else the
            pairs' images; ``pair_mlm`` and ``itc`` read the pairs (``pairs``, else ``webdataset``).
    """

    def __init__(
        self,
        schedule: ObjectiveSchedule,
        *,
        batch_size: int,
        batches_per_step: int = 1,
        tokenizer: Any,
        max_length: int = 64,
        mlm_probability: float = 0.15,
        pair_mlm_probability: float = 0.5,
        whole_word_masking: bool = False,
        pair_transform: TwoViewTransform | None = None,
        mim_transform: TwoViewTransform | None = None,
        texts: Sequence[str] | None = None,
        images: Sequence[str] | None = None,
        pairs: Sequence[tuple[str, str]] | None = None,
        webdataset: str | Sequence[str] | None = None,
        seed: int = 0,
        skipped_images: DecodeFailures | None = None,
        skipped_texts: DecodeFailures | None = None,
    ) -> None:
        self.schedule = schedule
        self.batch_size = batch_size
        self.batches_per_step = batches_per_step
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.probability = {"text_mlm": mlm_probability, "pair_mlm": pair_mlm_probability}
        self.whole_word_masking = whole_word_masking
        self.pair_transform, self.mim_transform = pair_transform, mim_transform
        self.texts, self.images, self.pairs = texts, images, pairs
        self.webdataset_urls = self._expand(webdataset)
        self.seed = seed
        self.skipped_images = skipped_images or DecodeFailures()
        self.skipped_texts = skipped_texts or DecodeFailures(what="an empty caption")
        self._special_ids = set(tokenizer.all_special_ids)
        self._check_sources()

    @staticmethod
    def _expand(webdataset: str | Sequence[str] | None) -> list[str] | None:
        if webdataset is None:
            return None
        import webdataset as wds

        urls = wds.shardlists.expand_urls(webdataset) if isinstance(webdataset, str) else list(webdataset)
        if not urls:
            raise ValueError(f"--webdataset {webdataset!r} names no shard.")
        return urls

    def _check_sources(self) -> None:
        has_pairs = bool(self.pairs) or self.webdataset_urls is not None
        needs = {
            "text_mlm": (bool(self.texts) or has_pairs, "--text_file, --pair_file or --webdataset"),
            "image_mim": (bool(self.images) or has_pairs, "--image_dir, --pair_file or --webdataset"),
            "pair_mlm": (has_pairs, "--pair_file (with --image_root) or --webdataset"),
            "itc": (has_pairs, "--pair_file (with --image_root) or --webdataset"),
        }
        for name in self.schedule.names:
            present, flags = needs[name]
            if not present:
                raise ValueError(f"--objectives {name} needs data: pass {flags}.")
        names = set(self.schedule.names)
        if names & {"text_mlm", "pair_mlm"} and self.tokenizer.mask_token_id is None:
            raise ValueError(f"The tokenizer ({type(self.tokenizer).__name__}) has no mask token, which MLM needs.")
        if "image_mim" in names and (self.mim_transform is None or self.mim_transform.mask_generator is None):
            raise ValueError("image_mim needs a mim_transform with a mask generator.")
        if names & {"pair_mlm", "itc"} and self.pair_transform is None:
            raise ValueError("pair_mlm and itc need a pair_transform.")

    # ---- the stream ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = _Draws(self, worker, num_workers)
        batch = worker
        while True:  # endless: the run's length is --max_steps
            objective = self.schedule(batch // self.batches_per_step)
            for _ in range(self.batch_size):
                yield stream.sample(objective)
            batch += num_workers

    # ---- one sample ------------------------------------------------------------------------------------------

    def _rng(self, objective: str, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, OBJECTIVES.index(objective), position])

    def text_sample(self, objective: str, text: str, position: int) -> dict[str, Any]:
        """``input_ids``, ``attention_mask`` and ``mlm_labels`` of one masked text (``text_mlm`` / ``pair_mlm``)
        or, for ``itc``, the unmasked text."""
        encoded = self.tokenizer(text, max_length=self.max_length, truncation=True, padding="max_length")
        ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        sample: dict[str, Any] = {"attention_mask": torch.tensor(attention_mask)}
        if objective == "itc":
            sample["input_ids"] = torch.tensor(ids)
            return sample
        starts = word_starts(self.tokenizer.convert_ids_to_tokens(ids)) if self.whole_word_masking else None
        masked, labels = mask_tokens(
            ids,
            special=[i in self._special_ids for i in ids],
            probability=self.probability[objective],
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            rng=self._rng(objective, position),
            starts=starts,
        )
        sample["input_ids"], sample["mlm_labels"] = torch.tensor(masked), torch.tensor(labels)
        return sample


class _Draws:
    """The draws of one data-loader worker: per objective, the next sample of its source."""

    def __init__(self, mixture: PretrainingMixture, worker: int, num_workers: int) -> None:
        self.mixture = mixture
        self.worker, self.num_workers = worker, num_workers
        self.counts = dict.fromkeys(OBJECTIVES, 0)  # draws so far, per objective
        self._webdataset = self._webdataset_pairs()  # a generator: nothing is read before the first draw
        self._permutations: dict[str, tuple[int, np.ndarray]] = {}  # objective -> (pass, order)

    def _position(self, objective: str) -> int:
        """The objective's next draw position (every worker has its own positions: w, w + W, ...)."""
        position = self.counts[objective] * self.num_workers + self.worker
        self.counts[objective] += 1
        return position

    def _from_list(self, objective: str, items: Sequence[Any], position: int) -> Any:
        epoch, index = divmod(position, len(items))  # a new permutation on every pass over the list
        cached_epoch, permutation = self._permutations.get(objective, (None, None))
        if cached_epoch != epoch:
            seed = [self.mixture.seed, OBJECTIVES.index(objective), epoch]
            permutation = np.random.default_rng(seed).permutation(len(items))
            self._permutations[objective] = (epoch, permutation)
        return items[permutation[index]]

    def _webdataset_pairs(self) -> Iterator[tuple[Image.Image, str]]:
        """Decoded (image, caption) of the shards, pass after pass; the shard order is seeded per pass."""
        import webdataset as wds

        urls = self.mixture.webdataset_urls
        if len(urls) < self.num_workers:
            raise ValueError(f"--webdataset has {len(urls)} shards for {self.num_workers} data-loader workers.")
        epoch = 0
        while True:
            order = list(urls)
            np.random.default_rng([self.mixture.seed, 0x5EED, epoch]).shuffle(order)
            shards = order[self.worker :: self.num_workers]
            pipeline = wds.WebDataset(
                shards, shardshuffle=False, nodesplitter=None, workersplitter=None, handler=self._shard_error,
                empty_check=False,
            )  # fmt: skip
            for sample in pipeline:
                name = f"{os.path.basename(str(sample.get('__url__', '')))}:{sample.get('__key__')}"
                data = next((sample[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in sample), None)
                caption = sample.get("txt", b"")
                caption = caption.decode("utf-8", "replace").strip() if isinstance(caption, bytes) else ""
                if not caption:
                    self.mixture.skipped_texts.record(name, "empty or missing .txt caption")
                    continue
                if data is None:
                    self.mixture.skipped_images.record(name, "no .jpg / .png / .webp image")
                    continue
                image = self.mixture.skipped_images.decode(data, name)
                if image is not None:
                    yield image, caption
            epoch += 1

    def _shard_error(self, error: Exception) -> bool:
        self.mixture.skipped_images.record("<a shard>", error)
        return True

    def _decodable(self, objective: str) -> tuple[Image.Image, str, int]:
        """The objective's next draw with a decodable image, ``(image, caption, position)``: from ``images`` (no
        caption) for ``image_mim`` when given, else from the pairs; a broken source raises."""
        mixture = self.mixture
        for _ in range(_MAX_FAILURES_IN_A_ROW):
            position = self._position(objective)
            if objective == "image_mim" and mixture.images:
                path, caption = self._from_list(objective, mixture.images, position), ""
            elif mixture.pairs:
                path, caption = self._from_list(objective, mixture.pairs, position)
            else:
                image, caption = next(self._webdataset)
                return image, caption, position
            image = mixture.skipped_images.decode(path, path)  # None: skipped, counted
            if image is not None:
                return image, caption, position
        raise RuntimeError(f"{_MAX_FAILURES_IN_A_ROW} images in a row could not be decoded: the data is broken.")

    def sample(self, objective: str) -> dict[str, Any]:
        mixture = self.mixture
        index = OBJECTIVES.index(objective)
        if objective == "text_mlm" and mixture.texts:
            position = self._position(objective)
            out = mixture.text_sample(objective, self._from_list(objective, mixture.texts, position), position)
        elif objective == "text_mlm":
            _, caption, position = self._decodable(objective)
            out = mixture.text_sample(objective, caption, position)
        elif objective == "image_mim":
            image, _, position = self._decodable(objective)
            out = mixture.mim_transform(image, key=(index, position))
        else:  # pair_mlm, itc
            image, caption, position = self._decodable(objective)
            out = mixture.text_sample(objective, caption, position)
            out["pixel_values"] = mixture.pair_transform(image, key=(index, position))["pixel_values"]
        out["objective"] = index
        return out


class PretrainingCollator:
    """Stacks the samples of one batch (all of one objective) into tensors; ``objective`` becomes a (batch,) tensor.

    Example:
        >>> batch = PretrainingCollator()([{"objective": 3, "input_ids": torch.tensor([0, 5, 2])}] * 2)
        >>> batch["objective"].tolist(), tuple(batch["input_ids"].shape)
        ([3, 3], (2, 3))
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        objectives = {example["objective"] for example in examples}
        if len(objectives) != 1:
            names = sorted(OBJECTIVES[i] for i in objectives)
            raise ValueError(f"A batch mixes objectives {names}: batches must not straddle steps of the stream.")
        return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}
