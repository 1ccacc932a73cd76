"""Conversion of the original checkpoints and tokenizers (library code, never shipped in a checkpoint folder)."""
