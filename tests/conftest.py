import sys
from pathlib import Path

# Test helpers (oracle_utils) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
