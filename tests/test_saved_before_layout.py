"""A folder saved by the code before the package layout change (commit 40cccdf, flat `beit3_hf/modeling_beit3.py`)
still loads, with this package and as remote code in a fresh process, and gives the outputs it gave then."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from beit3_hf import Beit3ForImageTextRetrieval

from oracle_utils import assert_parity, run_fresh_python

FIXTURE = Path(__file__).parent / "fixtures" / "saved_before_layout"
REFERENCE = "outputs saved with the pre-layout code"


def fixture_io() -> tuple[dict, dict]:
    tensors = load_file(FIXTURE / "io.safetensors")
    inputs = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("inputs/")}
    outputs = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("outputs/")}
    return inputs, outputs


def test_old_folder_loads_with_the_package():
    inputs, outputs = fixture_io()
    model = Beit3ForImageTextRetrieval.from_pretrained(FIXTURE / "retrieval").eval()
    assert_parity(model(**inputs), outputs, REFERENCE, "package classes")


def test_old_folder_loads_as_remote_code_in_a_fresh_process(tmp_path):
    inputs, outputs = fixture_io()
    save_file({key: value.contiguous() for key, value in inputs.items()}, tmp_path / "inputs.safetensors")
    result = run_fresh_python(
        f"""
        import json, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(FIXTURE / "retrieval")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**load_file("inputs.safetensors"))
        save_file({{k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}}, "out.safetensors")
        print(json.dumps({{"class": type(model).__name__}}))
        """,
        tmp_path,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"class": "Beit3ForImageTextRetrieval"}
    assert_parity(load_file(tmp_path / "out.safetensors"), outputs, REFERENCE, "fresh process")
