"""The README's Python examples and the docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import beit3_hf

README = Path(__file__).resolve().parents[1] / "README.md"
#: Every module of the package (doctest runs the examples of those that have some).
MODULES = sorted(info.name for info in pkgutil.walk_packages(beit3_hf.__path__, "beit3_hf."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if ">>> " in Path(module.__file__).read_text() and "doctest: +SKIP" not in Path(module.__file__).read_text():
        assert result.attempted > 0  # examples that doctest would not find are a defect


def test_readme_python_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
