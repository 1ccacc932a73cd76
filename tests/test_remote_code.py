"""Remote-code files import only the standard library, torch, transformers and their sibling files.

Every file under `src/beit3_hf/models/<model>/` is copied into the checkpoint folders that `save_pretrained` writes,
and runs where only the folder and the user's transformers exist. The check parses the imports (no text matching),
including imports inside functions and `TYPE_CHECKING` blocks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "src" / "beit3_hf" / "models"
ALLOWED_TOP_LEVEL = {"torch", "transformers"} | set(sys.stdlib_module_names)
REMOTE_CODE_FILES = sorted(path for path in MODELS.glob("*/*.py") if path.name != "__init__.py")


def imports_of(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def disallowed_imports(path: Path) -> list[str]:
    siblings = {sibling.stem for sibling in path.parent.glob("*.py")}
    problems = []
    for line, module, level in imports_of(path):
        if level == 0 and module.split(".")[0] not in ALLOWED_TOP_LEVEL:
            problems.append(f"{path.name}:{line}: imports {module!r}")
        elif level == 1 and module.split(".")[0] not in siblings:
            problems.append(f"{path.name}:{line}: imports .{module}, which is not a sibling file")
        elif level > 1:
            problems.append(f"{path.name}:{line}: imports from outside its folder ({'.' * level}{module})")
    return problems


def test_there_are_remote_code_files():
    assert {path.parent.name for path in REMOTE_CODE_FILES} >= {"beit3"}
    assert len(REMOTE_CODE_FILES) >= 4


@pytest.mark.parametrize("path", REMOTE_CODE_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_remote_code_imports_only_stdlib_torch_transformers_and_siblings(path):
    assert disallowed_imports(path) == []


def test_the_check_catches_bad_imports(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sibling.py").write_text("")
    bad = folder / "modeling_bad.py"
    bad.write_text(
        "import os\nimport numpy as np\nfrom torch import nn\nfrom .sibling import x\nfrom .missing import y\n"
        "from ..conversion import z\n\ndef f():\n    import PIL.Image\n"
    )
    assert disallowed_imports(bad) == [
        "modeling_bad.py:2: imports 'numpy'",
        "modeling_bad.py:5: imports .missing, which is not a sibling file",
        "modeling_bad.py:6: imports from outside its folder (..conversion)",
        "modeling_bad.py:9: imports 'PIL.Image'",
    ]
