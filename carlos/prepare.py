"""corpus -> byte-offset splits -> byte tokens -> packed windows, written atomically into the workdir.

Layout written (the original script's):
  workdir/splits.json  tokenizer.json  rng_state.json  data/{train,val,test}.npy

Packing: a split of n tokens becomes windows of seq_len+1 tokens with stride seq_len, so window i
holds tokens[i*L : i*L+L+1] and every token but the first is predicted exactly once. The tail that
does not fill a window is kept as one more window, the split's last L+1 tokens; its first targets
overlap the previous window and are masked (target -1) when the data is read, so no token is scored
twice and none is dropped.

Everything streams in chunks of CHUNK bytes (cut after a newline, so NFKC and document boundaries see
whole lines), so memory stays bounded whatever the corpus size: a first pass hashes and validates the
input, a second tokenizes each split into a temporary token file, a third packs that into the .npy.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import time
import unicodedata
from pathlib import Path
from typing import BinaryIO

import numpy as np

from carlos.config import SPLITS, PrepareConfig
from carlos.corpus import CHUNK, Corpus, open_corpus
from carlos.errors import CarlosError
from carlos.files import printable, write_error
from carlos.lock import DirLock
from carlos.manifest import RECORD, Manifest
from carlos.ownership import PREPARED, Place, prepared_paths, runs_outputs, workdir_has_run
from carlos.tokenizer import ByteTokenizer

FORMAT_VERSION = 1


NON_ASCII = bytes(range(0x80, 0x100))


def _newline_after(source: Corpus, target: int, reach: int, block: int) -> int | None:
    """The offset just after the first newline at or after target, within reach (the end counts as one)."""
    pos, end = target, min(source.size, target + reach)
    while pos < end:
        data = source.read_at(pos, min(block, end - pos))
        i = data.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(data)
    return source.size if end == source.size else None


def _newline_before(source: Corpus, target: int, reach: int, block: int) -> int | None:
    """The offset just after the last newline before target, within reach."""
    pos, start = target, max(0, target - reach)
    while pos > start:
        lo = max(start, pos - block)
        i = source.read_at(lo, pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return None


def cut_near(source: Corpus, target: int, reach: int, block: int = 1 << 16) -> int:
    """A cut between splits near target: just after the nearest newline within reach bytes (the later
    one on a tie); failing that (a corpus with no newlines, one long line, CR-only line ends), before the
    nearest ASCII byte, which NFKC never joins to the character before it, or else at the nearest
    character. Reads blocks outward from target, so memory stays bounded."""
    found = [c for c in (_newline_after(source, target, reach, block), _newline_before(source, target, reach, block))]
    found = [c for c in found if c is not None]
    if found:
        return min(found, key=lambda c: (abs(c - target), -c))
    lo, hi = max(0, target - block), min(source.size, target + block)
    data = source.read_at(lo, hi - lo)
    for starts in (lambda b: b < 0x80, lambda b: b & 0xC0 != 0x80):  # ASCII; any UTF-8 lead byte
        cuts = [lo + i for i in range(len(data)) if starts(data[i])]
        if cuts:
            return min(cuts, key=lambda c: (abs(c - target), -c))
    return target


def split_offsets(source: Corpus, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Contiguous train, val, test byte ranges, each cut near its target size (see cut_near). A cut
    moves at most a quarter of the smallest split away from its target, so no split is emptied."""
    size = source.size
    reach = max(1, round(size * min(val_fraction, test_fraction, 1 - val_fraction - test_fraction) / 4))
    train_end = cut_near(source, round(size * (1 - val_fraction - test_fraction)), reach)
    val_end = max(train_end, cut_near(source, round(size * (1 - test_fraction)), reach))
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, size)}


class DocumentTokens:
    """Text -> token ids, fed in pieces of any size. Without BOS/EOS the ids are the UTF-8 bytes. With
    them, each non-empty document (text between separators) is wrapped in BOS/EOS, and the separator's
    own bytes stay between EOS and the next BOS, so dropping the specials gives the text back exactly.
    Only a possible start of a separator is held back between pieces, so a corpus with no separator at
    all still streams in bounded memory."""

    def __init__(self, tok: ByteTokenizer, separator: str | None) -> None:
        self.tok, self.sep = tok, separator
        self.wrap = tok.add_bos or tok.add_eos
        self.carry = ""  # the last len(sep) - 1 characters seen, which may begin a separator
        self.in_doc = False  # BOS of the current document has been emitted

    def _ids(self, *pieces: int | str) -> np.ndarray:
        arrays = [
            np.frombuffer(p.encode("utf-8"), dtype=np.uint8).astype(self.tok.dtype)
            if isinstance(p, str)
            else np.array([p], dtype=self.tok.dtype)
            for p in pieces
            if p != ""
        ]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=self.tok.dtype)

    def _text(self, text: str) -> list[int | str]:
        if not text:
            return []
        start = [] if self.in_doc or self.tok.bos_id is None else [self.tok.bos_id]
        self.in_doc = True
        return [*start, text]

    def _end_doc(self) -> list[int | str]:
        ended, self.in_doc = self.in_doc, False
        return [self.tok.eos_id] if ended and self.tok.eos_id is not None else []

    def feed(self, text: str) -> np.ndarray:
        if not self.wrap:
            return self._ids(text)
        if self.sep is None:  # the whole text is one document (a file of several)
            return self._ids(*self._text(text))
        *docs, rest = (self.carry + text).split(self.sep)
        out: list[int | str] = []
        for doc in docs:
            out += [*self._text(doc), *self._end_doc(), self.sep]
        keep = len(self.sep) - 1
        self.carry = rest[len(rest) - keep :] if keep else ""
        out += self._text(rest[: len(rest) - keep])
        return self._ids(*out)

    def finish(self) -> np.ndarray:
        out = [*self._text(self.carry), *self._end_doc()] if self.wrap else []
        self.carry = ""
        return self._ids(*out)


def tokenize(text: str, tok: ByteTokenizer, separator: str) -> np.ndarray:
    """All token ids of one text (what the streaming path writes for the same text)."""
    docs = DocumentTokens(tok, separator)
    return np.concatenate([docs.feed(text), docs.finish()])


def tokenize_split(
    src: BinaryIO,
    start: int,
    end: int,
    tok: ByteTokenizer,
    separator: str | None,
    nfkc: bool,
    out: BinaryIO,
    chunk: int = CHUNK,
    whole=None,
) -> tuple[int, str]:
    """Stream input bytes [start, end) as token ids into out; returns (tokens written, sha256 of the bytes).
    Each chunk is cut after its last newline, so NFKC sees whole lines (a newline is a normalization
    boundary, so chunked NFKC equals NFKC of the whole split; tests/test_properties.py checks it).
    whole, a hashlib object, is fed the same bytes: the splits in order hash to the whole input."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    docs = DocumentTokens(tok, separator)
    raw_bytes = not nfkc and not docs.wrap  # the tokens are the bytes themselves
    n, rest, pos = 0, b"", start
    src.seek(start)
    while pos < end:
        block = src.read(min(chunk, end - pos))
        if not block:
            raise CarlosError(
                f"input {getattr(src, 'name', '')} changed while it was read (it is shorter now); let whatever "
                "writes it finish, or prepare a copy"
            )
        pos += len(block)
        digest.update(block)
        if whole is not None:
            whole.update(block)
        data = rest + block
        cut = data.rfind(b"\n") + 1 if pos < end else len(data)
        if cut == 0 and nfkc:
            # a line longer than the chunk: cut before its last ASCII character, which NFKC never joins
            # to the character before it (an "e" and a combining accent cut apart would stay apart);
            # with none, read on: the line continues in the next chunk
            cut = len(data.rstrip(NON_ASCII)) - 1
            if cut <= 0:
                rest = data
                continue
        elif cut == 0:  # a chunk without a newline: the decoder holds back a cut character
            cut = len(data)
        data, rest = data[:cut], data[cut:]
        if raw_bytes:
            ids = np.frombuffer(data, dtype=np.uint8)
        else:
            text = decoder.decode(data, final=pos >= end)
            ids = docs.feed(unicodedata.normalize("NFKC", text) if nfkc else text)
        out.write(ids.tobytes())
        n += len(ids)
    tail = docs.finish()
    out.write(tail.tobytes())
    return n + len(tail), digest.hexdigest()


class _Hashes:
    """Several hashlib objects fed the same bytes."""

    def __init__(self, *hashes) -> None:
        self.hashes = [h for h in hashes if h is not None]

    def update(self, data: bytes) -> None:
        for h in self.hashes:
            h.update(data)


def tokenize_range(source: Corpus, start: int, end: int, tok, cfg: PrepareConfig, out, whole):
    """tokenize_split over bytes [start, end) of the input: one file's documents are cut at the separator;
    of several, each file's part is one document (a separator inside a file is text) and the separators
    between files are as they are."""
    data = cfg.data
    digest = hashlib.sha256()
    both, n = _Hashes(digest, whole), 0
    for i, a, b in source.segments(start, end):
        if i is None:  # (a part of) the separator between two files: whole characters, see cut_near
            text = source.sep[a:b]
            both.update(text)
            normal = unicodedata.normalize("NFKC", text.decode("utf-8")) if data.normalize_nfkc else text.decode()
            ids = np.frombuffer(normal.encode("utf-8"), dtype=np.uint8).astype(tok.dtype)
            out.write(ids.tobytes())
            n += len(ids)
            continue
        separator = data.separator if source.one else None
        with source.open(i) as f:
            n += tokenize_split(f, a, b, tok, separator, data.normalize_nfkc, out, whole=both)[0]
    return n, digest.hexdigest()


def pack(tokens: Path, n: int, seq_len: int, dtype: np.dtype, out: Path, windows_per_block: int = 1 << 14) -> int:
    """Write out (.npy) holding (windows, seq_len + 1) windows with stride seq_len of the n token ids in the
    raw file tokens; the tail becomes a last, right-aligned window. Returns the number of windows."""
    L, itemsize = seq_len, dtype.itemsize
    full = (n - 1) // L
    tail = (n - 1) - full * L > 0
    with open(tokens, "rb") as src, open(out, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (full + tail, L + 1)}
        np.lib.format.write_array_header_1_0(f, header)
        for i0 in range(0, full, windows_per_block):
            k = min(windows_per_block, full - i0)
            src.seek(i0 * L * itemsize)
            flat = np.fromfile(src, dtype=dtype, count=k * L + 1)
            # row j is flat[j*L : j*L + L + 1]: overlapping rows over one buffer, copied out once
            rows = np.lib.stride_tricks.as_strided(flat, shape=(k, L + 1), strides=(L * itemsize, itemsize))
            f.write(np.ascontiguousarray(rows).tobytes())
        if tail:
            src.seek((n - L - 1) * itemsize)
            f.write(np.fromfile(src, dtype=dtype, count=L + 1).tobytes())
    return full + tail


def check_workdir(cfg: PrepareConfig, source: Corpus, workdir: Path, manifest: Manifest) -> None:
    """Everything in the way, refused before a byte is written."""
    if workdir_has_run(workdir, manifest) and not cfg.overwrite:
        raise CarlosError(
            f"workdir {workdir} already holds a trained run; use another --workdir, "
            "or pass --overwrite to replace its data and remove that run"
        )
    fix = (
        "move it away or choose another --workdir (carlos writes data/, splits.json, tokenizer.json and "
        "rng_state.json there; files an older carlos wrote, before it kept a record, go by hand)"
    )
    manifest.refuse_foreign(prepared_paths(workdir), [workdir / "data"], fix)
    replaced = [f for p in prepared_paths(workdir) for f in manifest.owned_files(p)]
    if cfg.overwrite:
        replaced += [f for out in runs_outputs(workdir) for f in manifest.owned_files(out)]
    for f in replaced:
        path = source.same_file(os.stat(f))
        if path is not None:
            same = "" if os.path.abspath(f) == os.path.abspath(path) else f" (the same file as {f})"
            raise CarlosError(
                f"input {path}{same} was written by carlos into workdir {workdir}, and this prepare "
                "replaces or removes it; copy it elsewhere first"
            )


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare cfg.workdir from cfg.input; returns the splits.json record (plus "seconds" it took).

    Refuses before writing anything when something of the user's is in the way. Everything is built in
    a temporary directory inside the workdir and moved into place at the end, splits.json last: a
    prepare killed midway leaves no splits.json, which train refuses as unprepared."""
    started = time.perf_counter()
    workdir = Path(os.path.expanduser(cfg.workdir))
    if workdir.is_file():
        raise CarlosError(f"workdir {workdir} is a file; pass a directory to --workdir")
    place = Place(workdir, "workdir", f"--workdir {workdir}", "choose another --workdir", DirLock(workdir, "prepare"))
    with open_corpus(cfg.input, cfg.glob, cfg.data.separator, workdir) as source, place:
        manifest = place.manifest
        try:
            check_workdir(cfg, source, workdir, manifest)
            size, sha256 = source.scan()
            record = build_and_install(cfg, source, workdir, manifest, size, sha256)
        except BaseException:
            if place.made:  # a workdir this prepare created: what it wrote there goes (its directories after)
                with contextlib.suppress(OSError, CarlosError):
                    manifest.remove([workdir / name for name in (*PREPARED, "data")])
                    (workdir / RECORD).unlink(missing_ok=True)
            raise
    record = {**record, "seconds": time.perf_counter() - started}
    if "files" in record:
        print(files_read(record["files"], source.left_out))
    print(summary(record, cfg.workdir))
    return record


def files_read(files: list[dict], left_out: dict[str, list[str]]) -> str:
    """The line prepare prints for several files: how many it read and their bytes, and what it left out
    and why (three named for each reason)."""
    line = f"read {len(files):,} file{'s' if len(files) != 1 else ''}, {sum(f['bytes'] for f in files):,} bytes"
    why = []
    for reason, paths in left_out.items():
        if paths:
            more = f" and {len(paths) - 3:,} more" if len(paths) > 3 else ""
            reason += "s" if reason == "duplicate" and len(paths) > 1 else ""  # the one reason that is a noun
            why.append(f"{len(paths):,} {reason} ({', '.join(printable(p) for p in paths[:3])}{more})")
    return line + ("; left out: " + "; ".join(why) if why else "")


def summary(record: dict, workdir: str) -> str:
    """The line prepare prints: each split's bytes and windows, the size and the speed."""
    mb = record["size"] / 1e6
    splits = ", ".join(
        f"{s} {record['splits'][s]['bytes']:,} bytes -> {record['windows'][s]:,} windows"
        for s in ("train", "val", "test")
    )
    return (
        f"prepared {workdir}: {splits} of {record['seq_len'] + 1} tokens ({record['dtype']}); "
        f"{mb:,.1f} MB in {record['seconds']:.1f} s ({mb / record['seconds']:,.1f} MB/s)"
    )


def build_and_install(cfg: PrepareConfig, source: Corpus, workdir: Path, manifest: Manifest, size, sha256) -> dict:
    """Build in a temporary directory inside the workdir, then install; the temporary goes either way."""
    manifest.remove_stale()  # what a prepare killed midway (kill -9) left
    tmp = None
    try:
        tmp = manifest.scratch(".prepare-")
        record = build(cfg, source, tmp, size, sha256)
        install(cfg, workdir, tmp, manifest)
        return record
    except OSError as e:
        where = Path(e.filename) if e.filename else f"the prepared data into {workdir}"
        raise write_error(where, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def build(cfg: PrepareConfig, source: Corpus, tmp: Path, size: int, sha256: str) -> dict:
    """Every prepared file, in tmp: tokens and windows of each split, then tokenizer.json, rng_state.json
    and splits.json; returns the splits.json record."""
    data = cfg.data
    tok = ByteTokenizer(add_bos=data.add_bos, add_eos=data.add_eos)
    offsets = split_offsets(source, data.val_fraction, data.test_fraction)
    (tmp / "data").mkdir()
    splits, tokens, windows, whole = {}, {}, {}, hashlib.sha256()
    for name in SPLITS:
        start, end = offsets[name]
        flat = tmp / f"{name}.tokens"
        with open(flat, "wb") as out:
            n, digest = tokenize_range(source, start, end, tok, cfg, out, whole)
        if n < data.seq_len + 1:
            smallest = min(data.val_fraction, data.test_fraction, 1 - data.val_fraction - data.test_fraction)
            raise CarlosError(
                f"the {name} split of {source.path} has {n} tokens, fewer than one window of seq_len+1 = "
                f"{data.seq_len + 1}; use a corpus of at least about {round((data.seq_len + 1) / smallest)} "
                "bytes or a smaller --seq_len"
            )
        splits[name] = {"start": start, "end": end, "bytes": end - start, "sha256": digest}
        windows[name] = pack(flat, n, data.seq_len, tok.dtype, tmp / "data" / f"{name}.npy")
        tokens[name] = n
        flat.unlink()
    source.check_unchanged(sha256, whole.hexdigest())
    record = {
        "splits": splits,
        **source.record(),
        "size": size,
        "sha256": sha256,
        "normalization": "NFKC" if data.normalize_nfkc else None,
        "add_bos": data.add_bos,
        "add_eos": data.add_eos,
        "seq_len": data.seq_len,
        "separator": data.separator,
        "tokens": tokens,
        "windows": windows,
        "dtype": tok.dtype.name,
        "format_version": FORMAT_VERSION,
    }
    tok.save(tmp / "tokenizer.json")
    rng = {
        "seed": cfg.seed,
        "prepare": "deterministic, no random numbers drawn",
        "train": "windows are shuffled by torch.Generator(seed + epoch) with the train seed",
    }
    (tmp / "rng_state.json").write_text(json.dumps(rng, indent=2) + "\n", encoding="utf-8")
    (tmp / "splits.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def install(cfg: PrepareConfig, workdir: Path, tmp: Path, manifest: Manifest) -> None:
    """Move the built files into place, recorded first, splits.json last: a kill midway leaves no
    splits.json, which every command refuses as not prepared. What they replace (and with overwrite,
    what the runs trained on the old data wrote) is moved aside first and deleted only once the new
    files are in place, so a file that cannot be moved or replaced refuses the whole install with
    everything as it was."""
    replaced = prepared_paths(workdir) + (runs_outputs(workdir) if cfg.overwrite else [])
    with manifest.aside(replaced) as old:
        manifest.claim_dir(workdir / "data")
        manifest.claim(*prepared_paths(workdir))
        for split in SPLITS:
            os.replace(tmp / "data" / f"{split}.npy", workdir / "data" / f"{split}.npy")
        for name in PREPARED:
            os.replace(tmp / name, workdir / name)
        old.commit()
