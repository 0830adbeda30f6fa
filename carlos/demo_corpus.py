"""The built-in corpus of `make demo` and `carlos bench`: this Python's standard library source."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_corpus(max_bytes: int = 2_000_000) -> str:
    """A built-in corpus: this Python's standard library source, files in sorted order up to max_bytes.
    Every Python installation has it, so demos and benchmarks need no download and carlos ships no
    third-party text."""
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
    return "".join(chunks)


def write_stdlib_corpus(out: Path, max_bytes: int = 2_000_000) -> int:
    """stdlib_corpus() written to out (scripts/demo_corpus.py); returns the number of bytes written."""
    data = stdlib_corpus(max_bytes).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return len(data)
