"""transformers' own common model tests (`ModelTesterMixin`) run against the BEiT-3 classes.

transformers tests every model it ships with `ModelTesterMixin` from `tests/test_modeling_common.py`, a file that is
in the transformers source distribution but not in the wheel. `common_tests_package()` finds it for the installed
transformers version, in this order:

1. `$TRANSFORMERS_TESTS_DIR`: a folder holding `test_modeling_common.py` (the `tests/` folder of a transformers
   source tree or unpacked sdist);
2. the cache `~/.cache/beit3-hf/transformers-<version>-tests` (`$XDG_CACHE_HOME` is honoured);
3. otherwise it downloads the sdist once with `python -m pip download --no-deps --no-binary :all:
   transformers==<version>` (the package registry, nothing else) and unpacks its `tests/*.py` into that cache.

If that fails, the module is skipped with the reason, except in CI (`$CI` set), where it fails. The file imports
`parameterized` (part of the `test` extra for this reason).

The mixin imports `ExportTesterMixin` and `GenerationTesterMixin` from sub-packages the sdist does not ship; they are
replaced by empty classes (export is not supported; `Beit3ForCaptioning.generate` is tested in tests/test_captioning.py).
Each head gets its own tester, as transformers does for models whose heads take different inputs. `COMMON_SKIPS` and
the `skipped_tests` of each test class list, with the reason, every common test that does not apply to BEiT-3.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
import transformers.modeling_outputs
import transformers.testing_utils

from beit3_hf import (
    Beit3Config,
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)

PACKAGE = "transformers_common_tests"
_STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def _cache_dir(version: str) -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "beit3-hf" / f"transformers-{version}-tests"


def _download_tests(version: str, destination: Path) -> None:
    """Unpack the `tests/*.py` files of the transformers `version` sdist into `destination`."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        subprocess.run(
            [*command, f"transformers=={version}", "-d", download],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        destination.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            prefix = f"{archive.name.removesuffix('.tar.gz')}/tests/"
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.isfile() and member.name.startswith(prefix) and "/" not in name and name.endswith(".py"):
                    (destination / name).write_bytes(tar.extractfile(member).read())


def common_tests_package(version: str = transformers.__version__) -> ModuleType:
    """Import transformers' `test_modeling_common` for `version` (see the module docstring for where it is found)."""
    source = os.environ.get("TRANSFORMERS_TESTS_DIR")
    cache = _cache_dir(version)
    if source is None:
        source = cache / "src"
        if not (source / "test_modeling_common.py").is_file():
            _download_tests(version, source)
    source = Path(source)
    if not (source / "test_modeling_common.py").is_file():
        raise FileNotFoundError(f"{source} holds no test_modeling_common.py")
    # An importable package: the mixin's file plus stand-ins for the two sub-packages it imports.
    package = cache / "package" / PACKAGE
    for relative, text in {"__init__.py": "", **_STUBS}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).parent.joinpath("__init__.py").touch()
        (package / relative).write_text(text)
    (package / "test_modeling_common.py").write_bytes((source / "test_modeling_common.py").read_bytes())
    sys.path.insert(0, str(package.parent))
    try:
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")
    finally:
        sys.path.remove(str(package.parent))


try:
    ModelTesterMixin = common_tests_package().ModelTesterMixin
    from parameterized import parameterized  # a requirement of the mixin's file, so present once it imports
except Exception as error:
    reason = f"transformers' common tests are unavailable: {type(error).__name__}: {error}"
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason} (CI must run them; set TRANSFORMERS_TESTS_DIR or allow pip download)") from error
    pytest.skip(reason, allow_module_level=True)


# ---------------------------------------------------------------------------------------------------------------------
# Skipped common tests
# ---------------------------------------------------------------------------------------------------------------------

#: Common tests that do not apply to any BEiT-3 class, with the reason (each test class adds its own in
#: `skipped_tests`; tests that need an accelerator, flash attention, DeepSpeed... skip themselves).
COMMON_SKIPS: dict[str, str] = {}


#: Common tests marked `slow` (deselected by `make test`; about 4 of the file's 5 minutes on a 2-core CPU): they
#: repeat what the fast ones and `test_modeling.py` cover, at other dtypes, kernels or checkpointing settings.
SLOW_TESTS = {
    "test_eager_matches_sdpa_inference",  # 25 dtype / padding / kernel variants per class
    "test_bc_torch_dtype",
    "test_model_outputs_equivalence",
    "test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_false",
    "test_training_gradient_checkpointing_use_reentrant_true",
    "test_enable_input_require_grads_with_gradient_checkpointing",
    # save / reload and determinism checks that test_modeling.py also makes
    "test_save_load",
    "test_determinism",
    "test_retain_grad_hidden_states_attentions",
    "test_all_tensors_are_parameter_or_buffer",
    "test_load_save_without_tied_weights",
    "test_from_pretrained_no_checkpoint",
}


def _matches(attribute: str, name: str) -> bool:
    """`attribute` is the test `name` or one of its `parameterized.expand` variants (`name_0`, `name_1_fp32`...);
    a `name` with `*` is a pattern (`fnmatch`) for some of the variants."""
    if "*" in name:
        return fnmatch.fnmatchcase(attribute, name)
    return attribute == name or (attribute.startswith(name + "_") and attribute[len(name) + 1 :][:1].isdigit())


def _marked_slow(test: Callable) -> Callable:
    @functools.wraps(test)
    def slow_test(self: unittest.TestCase, *args: Any, **kwargs: Any) -> Any:
        return test(self, *args, **kwargs)

    return pytest.mark.slow(slow_test)


def _configure_tests(cls: type) -> type:
    """Skip each test named in `COMMON_SKIPS` or `cls.skipped_tests` and mark those of `SLOW_TESTS` slow."""
    skips = {**COMMON_SKIPS, **cls.skipped_tests}
    # (`parameterized.expand` leaves the undecorated name behind as None.)
    for attribute in [name for name in dir(cls) if name.startswith("test_") and callable(getattr(cls, name))]:
        reason = next((reason for name, reason in skips.items() if _matches(attribute, name)), None)
        if reason is not None:
            setattr(cls, attribute, unittest.skip(reason)(lambda self: None))
        elif any(_matches(attribute, name) for name in SLOW_TESTS):
            setattr(cls, attribute, _marked_slow(getattr(cls, attribute)))
    return cls


# ---------------------------------------------------------------------------------------------------------------------
# Model tester
# ---------------------------------------------------------------------------------------------------------------------


class Beit3ModelTester:
    """Tiny configs and inputs for one BEiT-3 class, in the shape `ModelTesterMixin` expects of a model tester."""

    def __init__(
        self,
        parent: unittest.TestCase,
        images: bool = True,
        text: bool = True,
        image_pairs: bool = False,
        vision_only: bool = False,
        num_labels: int = 3,
    ) -> None:
        self.parent = parent
        self.images, self.text, self.image_pairs, self.vision_only = images, text, image_pairs, vision_only
        self.batch_size = 3
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.image_size = 32
        self.patch_size = 16
        self.num_channels = 3
        self.vocab_size = 99
        self.text_length = 7
        self.num_labels = num_labels
        self.vision_length = (self.image_size // self.patch_size) ** 2 + 1
        # `bool_masked_pos` of the eager/SDPA comparison: the first `num_masks` of the `mask_length` patches.
        self.num_masks, self.mask_length = 2, self.vision_length - 1
        # The encoder sequence of one forward: [vision tokens; text tokens] (the retrieval towers run one each).
        self.seq_length = self.vision_length * images + self.text_length * text

    def get_config(self) -> Beit3Config:
        return Beit3Config(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            vocab_size=self.vocab_size,
            max_position_embeddings=20,
            num_labels=self.num_labels,
            mask_token_id=self.vocab_size - 1,
            vision_only=self.vision_only,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[Beit3Config, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        inputs = {}
        if self.images:
            pairs = (2,) if self.image_pairs else ()
            shape = (self.batch_size, *pairs, self.num_channels, self.image_size, self.image_size)
            inputs["pixel_values"] = torch.randn(shape, generator=generator)
        if self.text:
            input_ids = torch.randint(3, self.vocab_size - 1, (self.batch_size, self.text_length), generator=generator)
            attention_mask = torch.ones_like(input_ids)
            input_ids[:, 0] = 0
            attention_mask[1, -2:] = 0  # one padded row
            input_ids[1, -2:] = 1
            inputs.update(input_ids=input_ids, attention_mask=attention_mask)
        device = transformers.testing_utils.torch_device
        return self.get_config(), {key: value.to(device) for key, value in inputs.items()}


class Beit3CommonTest(ModelTesterMixin):
    """Shared set-up of the per-head test classes below."""

    tester_kwargs: dict = {}
    skipped_tests: dict[str, str] = {}

    def setUp(self) -> None:
        self.model_tester = Beit3ModelTester(self, **self.tester_kwargs)

    def _prepare_for_class(self, inputs_dict: dict, model_class: type, return_labels: bool = False) -> dict:
        inputs_dict = copy.deepcopy(inputs_dict)
        if return_labels:
            inputs_dict.update(self._labels(model_class, inputs_dict))
        return inputs_dict

    def _labels(self, model_class: type, inputs: dict) -> dict:
        tester, device = self.model_tester, transformers.testing_utils.torch_device
        batch = tester.batch_size
        if model_class in (Beit3ForImageClassification, Beit3ForVisualReasoning):
            return {"labels": torch.arange(batch, device=device) % tester.num_labels}
        if model_class is Beit3ForVisualQuestionAnswering:  # soft scores, the same on every call
            scores = torch.arange(batch * tester.num_labels, device=device).view(batch, -1) % 4 / 3
            return {"labels": scores.float()}
        if model_class is Beit3ForImageTextRetrieval:
            return {"return_loss": True}
        if model_class is Beit3ForCaptioning:
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[:, 1] = inputs["input_ids"][:, 1]
            return {"labels": labels}
        return {}


@_configure_tests
class Beit3ModelTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3Model,)
    additional_model_inputs = ["input_ids"]
    skipped_tests = {
        name: "the base model has no loss"
        for name in (
            "test_training",
            "test_training_gradient_checkpointing",
            "test_training_gradient_checkpointing_use_reentrant_false",
            "test_training_gradient_checkpointing_use_reentrant_true",
        )
    }


@_configure_tests
class Beit3VisionOnlyImageClassificationTest(Beit3CommonTest, unittest.TestCase):
    """`config.vision_only=True`: every parameter gets a gradient (`test_all_params_have_gradient`)."""

    all_model_classes = (Beit3ForImageClassification,)
    tester_kwargs = {"text": False, "vision_only": True}
    test_resize_embeddings = False  # no text input (as ViT's tests)
    skipped_tests = {
        "test_model_get_set_embeddings": "vision-only: the input embedding is the patch Conv2d (as ViT's), not an "
        "nn.Embedding",
    }


@_configure_tests
class Beit3ForImageClassificationTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3ForImageClassification,)
    tester_kwargs = {"text": False}
    test_resize_embeddings = False  # no text input (as ViT's tests)
    # The full classifier leaves its text experts unused (Beit3VisionOnlyModelTest runs the all-gradients check).
    test_all_params_have_gradient = False


@_configure_tests
class Beit3ForImageTextRetrievalTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3ForImageTextRetrieval,)
    additional_model_inputs = ["input_ids"]
    test_all_params_have_gradient = False  # the mask token is for masked image modelling only
    skipped_tests = {
        # As CLIP: the two towers run separately, so their hidden states and attentions are in
        # `vision_model_output` / `text_model_output` (tested through get_image_features / get_text_features).
        "test_attention_outputs": "two towers: attentions are in vision_model_output / text_model_output",
        "test_hidden_states_output": "two towers: hidden states are in vision_model_output / text_model_output",
        "test_retain_grad_hidden_states_attentions": "two towers: no single hidden_states / attentions",
        "test_get_text_features_output": "reads config.text_config.hidden_size; BEiT-3's config is flat: "
        "test_get_text_features_output_flat_config runs the same checks",
    }

    @parameterized.expand([True, False, None])
    def test_get_text_features_output_flat_config(self, return_dict: bool | None) -> None:
        """The mixin's `test_get_text_features_output`, with the text width read from the flat config."""
        config, inputs = self._text_features_prepare_config_and_inputs()
        if return_dict is not None:
            config.return_dict = return_dict
        model = Beit3ForImageTextRetrieval(config).eval().to(transformers.testing_utils.torch_device)
        with torch.no_grad():
            outputs = model.get_text_features(**inputs)
        if return_dict is False:
            self.assertIsInstance(outputs, tuple)
            return
        self.assertIsInstance(outputs, transformers.modeling_outputs.BaseModelOutputWithPooling)
        self.assertEqual(outputs.last_hidden_state.shape, (*inputs["input_ids"].shape, config.hidden_size))
        self.assertEqual(outputs.pooler_output.shape, (inputs["input_ids"].shape[0], config.hidden_size))


@_configure_tests
class Beit3ForVisualQuestionAnsweringTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3ForVisualQuestionAnswering,)
    additional_model_inputs = ["input_ids"]
    test_all_params_have_gradient = False  # the mask token is for masked image modelling only


@_configure_tests
class Beit3ForVisualReasoningTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3ForVisualReasoning,)
    tester_kwargs = {"image_pairs": True, "num_labels": 2}
    additional_model_inputs = ["input_ids"]
    test_all_params_have_gradient = False  # the mask token is for masked image modelling only


@_configure_tests
class Beit3ForCaptioningTest(Beit3CommonTest, unittest.TestCase):
    all_model_classes = (Beit3ForCaptioning,)
    additional_model_inputs = ["pixel_values"]  # the main input is the prompt, `input_ids`, as for GenerationMixin
    # `GenerationTesterMixin` is stubbed (see the module docstring): generation is tested in tests/test_captioning.py.
    all_generative_model_classes = ()
    skipped_tests = {
        "test_eager_matches_sdpa_inference_*_pad_left*": "left padding of `input_ids`, the main input: BEiT-3 text "
        "starts with `<s>` right after the image, so its attention mask may not mask the first text token (refused "
        "by design, tests/test_model_inputs.py); the right-padding variants run",
    }
    test_all_params_have_gradient = False  # the mask token is for masked image modelling only
