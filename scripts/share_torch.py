"""Let a compatibility virtual environment use the torch stack of the main one instead of a second copy.

The locked torch / torchvision for Python 3.11 on x86_64 are CUDA builds: with triton and the nvidia-* / cuda-*
libraries they take about 5.5 GB per virtual environment. `make test-compat` builds two more environments (the
transformers floor and the newest 5.x); three copies ran a CI machine out of disk. This script, run by the main
environment's Python, links the torch stack's top-level entries into `<venv>/shared-torch/` and adds that folder to
`<venv>`'s `sys.path` with a `.pth` file. The folder comes *after* the environment's own site-packages, so whatever
pip installs there (transformers and everything it resolves) wins; pip sees torch as installed (its metadata is on
`sys.path`), and since it lies outside the environment pip never uninstalls it.

Usage: `.venv/bin/python scripts/share_torch.py .venv-floor`
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

SHARED = ("torch", "torchvision", "triton")
SHARED_PREFIXES = ("nvidia-", "cuda-")
PTH_NAME = "beit3_hf_shared_torch.pth"


def is_shared(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in SHARED or name.startswith(SHARED_PREFIXES)


def shared_entries() -> dict[str, Path]:
    """`{top-level name: path}` of every file or folder the shared distributions install into site-packages."""
    entries: dict[str, Path] = {}
    for dist in importlib.metadata.distributions():
        if not is_shared(dist.metadata["Name"]):
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top == "..":  # console scripts in bin/, not importable
                continue
            entries[top] = Path(dist.locate_file(top)).resolve()
    if "torch" not in entries:
        sys.exit(f"{sys.executable} has no torch installed: run `make test` (or the main environment's install) first")
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path, help="the virtual environment that should use this one's torch stack")
    venv = parser.parse_args(argv).venv.resolve()
    site_packages = sorted(venv.glob("lib/python*/site-packages"))
    if len(site_packages) != 1:
        sys.exit(f"{venv} is not a virtual environment with one site-packages folder (found {site_packages})")
    shared = venv / "shared-torch"
    shared.mkdir(exist_ok=True)
    for name, target in shared_entries().items():
        link = shared / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    (site_packages[0] / PTH_NAME).write_text(f"{shared}\n")
    print(f"{venv}: torch stack linked from {Path(sys.prefix)} ({len(list(shared.iterdir()))} entries)")


if __name__ == "__main__":
    main()
