"""The corpora of `carlos bench suite=...`: text of different kinds that carlos makes from what the machine
already has, so that a default is judged on more than one corpus and nothing is downloaded.

- python: this Python's standard library source (code; every installation has it);
- docs: the plain-text documentation under /usr/share/doc (English prose, changelogs, licences);
- translations: the translated messages of /usr/share/locale (many languages and scripts, short lines);
- licences: the copyright files of /usr/share/doc, each text once (small and repetitive formal text, at most
  300 KB: licence boilerplate, as in many a user's own legal or configuration text).

Each is deterministic for a given machine: files in sorted order, cut at the first file past its size."""

from __future__ import annotations

import gzip
import json
import random
import statistics
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
    count, originals, translations = struct.unpack(order + "3I", data[8:20])
    messages = []
    for i in range(count):
        msgid_length = struct.unpack(order + "I", data[originals + 8 * i : originals + 8 * i + 4])[0]
        length, offset = struct.unpack(order + "2I", data[translations + 8 * i : translations + 8 * i + 8])
        if msgid_length:  # the empty msgid is the header (translators, charset), not a message
            text = data[offset : offset + length].decode("utf-8", errors="strict")
            messages.extend(part for part in text.split("\x00") if part)  # plural forms
    return messages


def _translations(root: Path) -> Iterator[str]:
    # runs of 16 messages from every catalog, in a fixed shuffled order: any stretch of the corpus, the
    # val and test splits at its end included, mixes programs and languages like the whole
    blocks = []
    for path in sorted(root.glob("*/LC_MESSAGES/*.mo")):
        try:
            messages = mo_messages(path.read_bytes())
        except (OSError, struct.error, UnicodeDecodeError):
            continue
        blocks += ["\n".join(messages[i : i + 16]) + "\n" for i in range(0, len(messages), 16)]
    random.Random(0).shuffle(blocks)
    yield from blocks


def _copyrights(root: Path) -> Iterator[str]:
    seen = set()
    for path in sorted(root.glob("*/copyright")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and text not in seen:  # packages of one source share a file: each text once
            seen.add(text)
            yield f"==== {path.parent.name}\n{text}\n"


def licences_corpus(max_bytes: int) -> str:
    return _until(_copyrights(DOCS), min(max_bytes, 300_000)) if DOCS.is_dir() else ""


def docs_corpus(max_bytes: int) -> str:
    return _until(_doc_texts(DOCS), max_bytes) if DOCS.is_dir() else ""


def translations_corpus(max_bytes: int) -> str:
    return _until(_translations(LOCALES), max_bytes) if LOCALES.is_dir() else ""


CORPORA: dict[str, Callable[[int], str]] = {
    "python": stdlib_corpus,
    "docs": docs_corpus,
    "translations": translations_corpus,
    "licences": licences_corpus,
}


# ---------------------------------------------------------------- the suite: the defaults against other settings


def suite_corpus(name: str, root: Path, corpus: str | None, size: int) -> Path | None:
    """The corpus file of one suite entry, built once under root; None when this machine lacks its source."""
    if name == "input":
        return Path(corpus) if corpus is not None else None
    path = root / "suite" / name / "corpus.txt"
    if not path.exists():
        text = CORPORA[name](size)
        if not text:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def suite_runs(cfg, train: Callable[[Path, list[str]], dict], prepare: Callable[[Path, Path], dict], root: Path):
    """Each corpus x budget x seed, `against` and the defaults alternating which goes first; every finished
    run is appended to suite/results.jsonl at once, and a run already there is not repeated (a suite of
    600 s runs takes hours: it can be stopped and continued)."""
    results = root / "suite" / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done[(r["corpus"], r["budget_s"], r["seed"], r["side"])] = r
    for name in cfg.suite:
        corpus = suite_corpus(name, root, cfg.input, cfg.suite_bytes)
        if corpus is None:
            print(f"suite: no {name} corpus on this machine, skipped", flush=True)
            continue
        workdir = root / "suite" / name / "w"
        info = prepare(corpus, workdir)
        for budget in cfg.suite_budgets:
            for seed in range(1, cfg.seeds + 1):
                sides = [("against", list(cfg.against)), ("defaults", [])]
                for side, overrides in sides if seed % 2 else sides[::-1]:
                    key = (name, budget, seed, side)
                    if key not in done:
                        run = f"{side}-{budget:g}s-seed{seed}"
                        args = [f"run={run}", f"trainer.max_time={budget}", f"seed={seed}", *overrides]
                        r = {"corpus": name, "budget_s": budget, "seed": seed, "side": side, **train(workdir, args)}
                        r["train_bytes"] = info["splits"]["train"]["end"] - info["splits"]["train"]["start"]
                        with results.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                        done[key] = r
                        print(f"suite {name} {budget:g} s seed {seed} {side}: test bpb {r['test_bpb']:.4f}", flush=True)
    return [done[k] for k in done if k[0] in cfg.suite]


def render_suite(head: list[str], against: list[str], rows: list[dict]) -> str:
    """One line per corpus and budget: medians over seeds of each side, and how many seeds the defaults won."""
    lines = [
        *head,
        f"Each cell: the median over seeds of `carlos train --max_time B` then `carlos eval --split test --adapt` of "
        f'its best checkpoint. "against": the defaults plus `{" ".join(against) or "(nothing)"}`. "adaptive": '
        "the defaults' `--adapt` score (dynamic evaluation mixed with the n-gram); xz and PPMd: the compressors "
        "of `carlos eval` on the same test split.",
        "",
        "| corpus | train bytes | budget | against: test bpb | defaults: test bpb | better by | seeds won "
        "| val bpb against / defaults | epochs (defaults) | adaptive | xz -9e | PPMd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["corpus"], r["budget_s"]), {}).setdefault(r["side"], []).append(r)
    for (name, budget), sides in cells.items():
        if len(sides) < 2:
            continue
        a, d = sorted(sides["against"], key=lambda r: r["seed"]), sorted(sides["defaults"], key=lambda r: r["seed"])
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        won = sum(x["test_bpb"] < y["test_bpb"] for x, y in zip(d, a, strict=False))
        lines.append(
            f"| {name} | {d[0]['train_bytes']:,} | {budget:g} s | {med(a, 'test_bpb'):.4f} | {med(d, 'test_bpb'):.4f} "
            f"| {med(a, 'test_bpb') - med(d, 'test_bpb'):+.4f} | {won} of {min(len(a), len(d))} "
            f"| {med(a, 'val_bpb'):.4f} / {med(d, 'val_bpb'):.4f} | {med(d, 'epochs'):.1f} "
            f"| {_cell(d, 'adaptive_bpb')} | {_compressor(d, 'xz -9e')} | {_compressor(d, 'PPMd order 6')} |"
        )
    return "\n".join(lines)


def _cell(rows: list[dict], key: str) -> str:
    """The median of a number the rows may lack (results.jsonl written before it was recorded): '-' then."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.median(values):.4f}" if values else "-"


def _compressor(rows: list[dict], name: str) -> str:
    return _cell([{"bpb": (r.get("compressors") or {}).get(name)} for r in rows], "bpb")
