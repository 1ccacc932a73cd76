"""The README's Python examples and the docstring examples run as written."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import beit3_hf.data.captioning
import beit3_hf.data.loaders
import beit3_hf.data.nlvr2
import beit3_hf.data.vqa
import beit3_hf.evaluation.captioning
import beit3_hf.evaluation.retrieval
import beit3_hf.evaluation.vqa
import beit3_hf.models.beit3.configuration_beit3
import beit3_hf.models.beit3.modeling_beit3
import beit3_hf.testing.synthetic_data
import beit3_hf.training.lora
import beit3_hf.training.scripts

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "module",
    [
        beit3_hf.models.beit3.configuration_beit3,
        beit3_hf.models.beit3.modeling_beit3,
        beit3_hf.data.loaders,
        beit3_hf.data.captioning,
        beit3_hf.data.nlvr2,
        beit3_hf.data.vqa,
        beit3_hf.evaluation.retrieval,
        beit3_hf.evaluation.captioning,
        beit3_hf.evaluation.vqa,
        beit3_hf.testing.synthetic_data,
        beit3_hf.training.lora,
        beit3_hf.training.scripts,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_python_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
