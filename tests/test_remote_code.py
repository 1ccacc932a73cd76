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


FSDP2_SAVE = """
import json, os, sys
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from beit3_hf import Beit3Config, Beit3ForMaskedImageModeling

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
model = Beit3ForMaskedImageModeling(Beit3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=48, image_size=32, patch_size=16, visual_vocab_size=8))
for layer in model.beit3.encoder.layers:
    fully_shard(layer)
fully_shard(model)  # the class is now torch's dynamic FSDPBeit3ForMaskedImageModeling
state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
model.save_pretrained(sys.argv[1], state_dict=state_dict)
print(json.dumps({"class": type(model).__name__, "files": sorted(os.listdir(sys.argv[1])),
                  "auto_map": json.load(open(os.path.join(sys.argv[1], "config.json")))["auto_map"]}))
dist.destroy_process_group()
"""


def test_a_model_sharded_by_fsdp2_saves_its_own_code(tmp_path):
    """`fully_shard` swaps the class for one defined in torch: the saved folder must still name and carry
    modeling_beit3.py (it named torch's `_fsdp_init` module and copied torch's files)."""
    import json
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-c", FSDP2_SAVE, str(tmp_path / "out"), str(port)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(result.stdout.strip().splitlines()[-1])
    assert saved["class"] == "FSDPBeit3ForMaskedImageModeling"  # still sharded after saving
    assert saved["files"] == ["config.json", "configuration_beit3.py", "model.safetensors", "modeling_beit3.py"]
    assert saved["auto_map"]["AutoModel"] == "modeling_beit3.Beit3ForMaskedImageModeling"
