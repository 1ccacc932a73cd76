"""Evaluation metrics of the BEiT-3 tasks (library code, never shipped in a checkpoint folder)."""

from .retrieval import *  # noqa: F403
from .retrieval import __all__  # noqa: F401
