"""`python -m beit3_hf.convert`: convert an original unilm BEiT-3 checkpoint (see `beit3_hf.conversion.checkpoint`)."""

import sys

from .conversion.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
