"""The corpora of `carlos bench suite=...`: text of different kinds that carlos makes from what the machine
already has, so that a default is judged on more than one corpus and nothing is downloaded.

- python: this Python's standard library source (code; every installation has it);
- docs: the plain-text documentation under /usr/share/doc (English prose, changelogs, licences);
- translations: the translated messages of /usr/share/locale (many languages and scripts, short lines).

Each is deterministic for a given machine: files in sorted order, cut at the first file past its size."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from carlos.demo_corpus import stdlib_corpus

DOCS = Path("/usr/share/doc")
LOCALES = Path("/usr/share/locale")


def _until(pieces: Iterator[str], max_bytes: int) -> str:
    """The pieces joined, stopping after the first one that reaches max_bytes."""
    chunks, size = [], 0
    for piece in pieces:
        chunks.append(piece)
        size += len(piece.encode("utf-8"))
        if size >= max_bytes:
            break
    return "".join(chunks)


def _doc_texts(root: Path) -> Iterator[str]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
            continue  # binary files, other encodings
        if "\x00" not in text and text.strip():
            yield f"==== {path.relative_to(root)}\n{text}\n"


def mo_messages(data: bytes) -> list[str]:
    """The translated strings of a GNU gettext .mo file (its header entry left out). Read by hand because
    Python's gettext gives a catalog to look messages up in, not the list of them."""
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    count, _, translations = struct.unpack(order + "3I", data[8:20])
    messages = []
    for i in range(count):
        length, offset = struct.unpack(order + "2I", data[translations + 8 * i : translations + 8 * i + 8])
        text = data[offset : offset + length].decode("utf-8", errors="strict")
        if text and not text.startswith("Project-Id-Version"):
            messages.extend(part for part in text.split("\x00") if part)  # plural forms
    return messages


def _translations(root: Path) -> Iterator[str]:
    # one message catalog in every language before the next: each cut of the corpus has all the scripts
    for path in sorted(root.glob("*/LC_MESSAGES/*.mo"), key=lambda p: (p.name, p.parts[-3])):
        try:
            messages = mo_messages(path.read_bytes())
        except (OSError, struct.error, UnicodeDecodeError):
            continue
        if messages:
            yield "\n".join(messages) + "\n"


def docs_corpus(max_bytes: int) -> str:
    return _until(_doc_texts(DOCS), max_bytes) if DOCS.is_dir() else ""


def translations_corpus(max_bytes: int) -> str:
    return _until(_translations(LOCALES), max_bytes) if LOCALES.is_dir() else ""


CORPORA: dict[str, Callable[[int], str]] = {
    "python": stdlib_corpus,
    "docs": docs_corpus,
    "translations": translations_corpus,
}
