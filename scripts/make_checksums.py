"""(Re)generate lai/data/checksums.json from a data folder (default: ../shared/data).

    python scripts/make_checksums.py [/path/to/data]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lai.data.checksums import REGISTRY, make_registry

if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).resolve().parents[1].parent / "shared" / "data"
    reg = make_registry(root)
    REGISTRY.write_text(json.dumps(reg, indent=1, sort_keys=True) + "\n")
    print(f"{len(reg)} files from {root} -> {REGISTRY}")
