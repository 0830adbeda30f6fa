"""Write the demo corpus: this Python's own standard library source, chosen deterministically.

    python scripts/demo_corpus.py OUT.txt [MAX_BYTES]

Every Python installation has these files, so the demo needs no download and the project commits no
third-party text. Files are taken in sorted order of their names until MAX_BYTES (default 2 MB).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a clone without installing

from carlos.demo_corpus import write_stdlib_corpus  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    size = write_stdlib_corpus(out, int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000)
    print(f"wrote {out}: {size:,} bytes of this Python's standard library source")
