"""BEiT-3 remote code: configuration, modeling, image processing and processing (see `beit3_hf.models`)."""
