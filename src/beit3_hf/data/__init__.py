"""Data loaders for the example scripts: image-text pairs, captions and ImageNet-style folders.

Library code (installed, never shipped in a checkpoint folder). Every loader names the file and line of bad input.
"""

from .loaders import *  # noqa: F403
from .loaders import __all__  # noqa: F401
