"""python scripts/export.py [--flag value ...] [key=value ...]: the same Hydra app as `carlos export`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a clone without installing

from carlos.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["export", *sys.argv[1:]])
