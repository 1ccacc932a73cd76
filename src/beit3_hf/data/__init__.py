"""Data loaders for the example scripts: image-text pairs, captions and ImageNet-style folders.

Masked-image-modelling data (two views, block masks, image folders and webdataset shards) is in
`beit3_hf.data.pretraining`, imported on its own (it needs torchvision and the `train` extra).

Library code (installed, never shipped in a checkpoint folder). Every loader names the file and line of bad input.
"""

from .loaders import *  # noqa: F403
from .loaders import __all__  # noqa: F401
