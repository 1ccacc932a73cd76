"""The benchmarks run (tiny model, CPU) and print complete tables; their numbers are never asserted (speed targets
live in the benchmarks, not in tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines() if line[:2] == "| "]


def test_throughput_prints_every_workload_for_every_image_size():
    output = run("throughput.py", "--config-overrides", TINY, "--image-sizes", "32", "64", "--iters", "1")
    assert output.count("BEiT-3 base, ") == 2 and "32x32" in output and "64x64" in output
    rows = [row for row in table_rows(output) if row[0] != "workload"]
    assert [row[0] for row in rows[:4]] == [
        "image forward (img/s)", "text forward (texts/s)", "image+text forward (pairs/s)",
        "train step, image classifier (img/s)",
    ]  # fmt: skip
    header = table_rows(output)[0]
    for row in rows:
        assert len(row) == len(header)
        assert float(row[header.index("ours")].replace(",", "")) > 0
        assert float(row[header.index("GFLOPs/item")]) > 0  # counted by torch.utils.flop_counter


def test_retrieval_eval_encodes_each_image_once():
    output = run("retrieval_eval.py", "--config-overrides", TINY, "--image-size", "32", "--num-images", "6")
    rows = {row[0]: row for row in table_rows(output)}
    assert rows["ours: each image once"][1:3] == ["6", "30"]
    assert rows["ours, the original's pairwise scheme"][1:3] == ["30", "30"]
    assert re.search(r"6 images at 32x32, 30 captions", output)
