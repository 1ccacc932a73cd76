"""Remote-code model folders, one per model, each flat and self-contained.

Every file in `models/<name>/` is copied into the checkpoint folders that `save_pretrained` writes and imports only
the standard library, torch, transformers and its siblings, so a saved folder loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` where `beit3_hf` is not installed.
"""
