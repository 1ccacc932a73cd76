"""The README's Python examples and the docstring examples run as written."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import beit3_hf.configuration_beit3
import beit3_hf.datasets
import beit3_hf.modeling_beit3
import beit3_hf.retrieval_metrics
import beit3_hf.synthetic_data

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "module",
    [
        beit3_hf.configuration_beit3,
        beit3_hf.modeling_beit3,
        beit3_hf.datasets,
        beit3_hf.retrieval_metrics,
        beit3_hf.synthetic_data,
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
