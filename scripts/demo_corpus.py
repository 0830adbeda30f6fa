"""Write the demo corpus: this Python's own standard library source, chosen deterministically.

    python scripts/demo_corpus.py OUT.txt [MAX_BYTES]

Every Python installation has these files, so the demo needs no download and the project commits no
third-party text. Files are taken in sorted order of their paths until MAX_BYTES (default 2 MB).
"""

import sys
import sysconfig
from pathlib import Path


def main(out: str, max_bytes: int = 2_000_000) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        data = f"# ---- {path.name}\n{text}\n"
        chunks.append(data)
        size += len(data.encode("utf-8"))
        if size >= max_bytes:
            break
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(chunks), encoding="utf-8")
    print(f"wrote {out}: {size:,} bytes from {len(chunks)} files of {stdlib}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000)
