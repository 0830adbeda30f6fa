"""corpus -> byte-offset splits -> byte tokens -> packed windows, written atomically into the workdir.

Layout written (the seed's):
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
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import BinaryIO

import numpy as np

from carlos.config import SPLITS, CarlosError, PrepareConfig
from carlos.tokenizer import ByteTokenizer

FORMAT_VERSION = 1
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples", ".hydra", "wandb")


def write_stdlib_corpus(out: Path, max_bytes: int = 2_000_000) -> int:
    """A built-in corpus: this Python's standard library source, files in sorted order up to max_bytes.
    Every Python installation has it, so demos and benchmarks need no download and carlos ships no
    third-party text. Returns the number of bytes written."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(chunks), encoding="utf-8")
    return size


NON_ASCII = bytes(range(0x80, 0x100))
CHUNK = 16 << 20  # bytes read at a time: memory stays bounded whatever the corpus size


def check_input(path_str: str | None) -> Path:
    if not path_str:
        raise CarlosError("no input corpus given; pass --input corpus.txt (or input=corpus.txt)")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise CarlosError(f"input {path} does not exist; check the path given to --input")
    if path.is_dir():
        raise CarlosError(f"input {path} is a directory; pass a UTF-8 text file to --input")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CarlosError(f"input {path} cannot be read ({e.strerror}); check its permissions") from None
    if path.stat().st_size == 0:
        raise CarlosError(f"input {path} is empty; give a UTF-8 text corpus with some text in it")
    return path


def scan(path: Path, chunk: int = CHUNK) -> tuple[int, str]:
    """(size, sha256) of the input, checking on the way that it is UTF-8: one pass, bounded memory."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise CarlosError(
                    f"input {path} is not UTF-8: first bad byte 0x{(pending + block)[e.start]:02x} at offset "
                    f"{offset - len(pending) + e.start}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(block)
        pending = decoder.getstate()[0]
        if pending:
            raise CarlosError(
                f"input {path} is not UTF-8: it ends inside a character at offset {offset - len(pending)}; "
                "convert it to UTF-8"
            )
    return offset, digest.hexdigest()


def _line_boundary(f: BinaryIO, size: int, target: int, block: int = 1 << 16) -> int:
    """The offset just after the newline nearest to target (the end of the file counts as one)."""
    after, pos = size, target
    while pos < size:  # the first newline at or after target
        f.seek(pos)
        data = f.read(block)
        i = data.find(b"\n")
        if i >= 0:
            after = pos + i + 1
            break
        pos += len(data)
    candidates, pos = [after], target
    while pos > 0:  # the last newline before target
        lo = max(0, pos - block)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            candidates.append(lo + i + 1)
            break
        pos = lo
    return min(candidates, key=lambda c: abs(c - target))


def split_offsets(path: Path, size: int, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Contiguous train, val, test byte ranges, each cut just after a newline near its target size."""
    with open(path, "rb") as f:
        train_end = _line_boundary(f, size, round(size * (1 - val_fraction - test_fraction)))
        val_end = max(train_end, _line_boundary(f, size, round(size * (1 - test_fraction))))
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, size)}


class DocumentTokens:
    """Text -> token ids, fed in pieces of any size. Without BOS/EOS the ids are the UTF-8 bytes. With
    them, each non-empty document (text between separators) is wrapped in BOS/EOS, and the separator's
    own bytes stay between EOS and the next BOS, so dropping the specials gives the text back exactly.
    Only a possible start of a separator is held back between pieces, so a corpus with no separator at
    all still streams in bounded memory."""

    def __init__(self, tok: ByteTokenizer, separator: str) -> None:
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
    separator: str,
    nfkc: bool,
    out: BinaryIO,
    chunk: int = CHUNK,
) -> tuple[int, str]:
    """Stream input bytes [start, end) as token ids into out; returns (tokens written, sha256 of the bytes).
    Each chunk is cut after its last newline, so NFKC sees whole lines (a newline is a normalization
    boundary, so chunked NFKC equals NFKC of the whole split; tests/test_properties.py checks it)."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    docs = DocumentTokens(tok, separator)
    raw_bytes = not nfkc and not docs.wrap  # the tokens are the bytes themselves
    n, rest, pos = 0, b"", start
    src.seek(start)
    while pos < end:
        block = src.read(min(chunk, end - pos))
        pos += len(block)
        digest.update(block)
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


def workdir_has_run(workdir: Path) -> bool:
    """Checkpoints of a single run or of any sweep job trained on this workdir's data."""
    return any((workdir / "checkpoints").glob("*.pt")) or any(workdir.glob("sweeps/*/*/checkpoints/*.pt"))


def remove_run_outputs(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare cfg.workdir from cfg.input; returns the splits.json record (plus "seconds" it took).

    Everything is built in a temporary directory inside the workdir and moved into place at the end,
    splits.json last: a prepare killed midway leaves no splits.json, which train refuses as unprepared."""
    d = cfg.data
    started = time.perf_counter()
    path = check_input(cfg.input)
    workdir = Path(cfg.workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise CarlosError(f"workdir {workdir} is a file; pass a directory to --workdir")
    if workdir_has_run(workdir) and not cfg.overwrite:
        raise CarlosError(
            f"workdir {workdir} already holds a trained run; use another --workdir, "
            "or pass --overwrite to replace its data and remove that run"
        )
    size, sha256 = scan(path)
    for stale in workdir.glob(".prepare-*"):  # left by a prepare that was killed (kill -9) midway
        shutil.rmtree(stale, ignore_errors=True)
    for stale in workdir.glob(".old-data-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tok = ByteTokenizer(add_bos=d.add_bos, add_eos=d.add_eos)
    offsets = split_offsets(path, size, d.val_fraction, d.test_fraction)
    created = None  # the outermost directory this prepare creates: removed again if it fails
    if not workdir.exists():
        created = workdir
        while not created.parent.exists():
            created = created.parent
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=workdir))
    except OSError as e:
        raise CarlosError(f"cannot write to workdir {workdir} ({e.strerror}); choose a writable --workdir") from None
    try:
        (tmp / "data").mkdir()
        splits, tokens, windows = {}, {}, {}
        with open(path, "rb") as src:
            for name in SPLITS:
                start, end = offsets[name]
                flat = tmp / f"{name}.tokens"
                with open(flat, "wb") as out:
                    n, digest = tokenize_split(src, start, end, tok, d.separator, d.normalize_nfkc, out)
                if n < d.seq_len + 1:
                    smallest = min(d.val_fraction, d.test_fraction, 1 - d.val_fraction - d.test_fraction)
                    raise CarlosError(
                        f"the {name} split of {path} has {n} tokens, fewer than one window of seq_len+1 = "
                        f"{d.seq_len + 1}; use a corpus of at least about {round((d.seq_len + 1) / smallest)} "
                        "bytes or a smaller --seq_len"
                    )
                splits[name] = {"start": start, "end": end, "bytes": end - start, "sha256": digest}
                windows[name] = pack(flat, n, d.seq_len, tok.dtype, tmp / "data" / f"{name}.npy")
                tokens[name] = n
                flat.unlink()
        record = {
            "splits": splits,
            "input": str(path.resolve()),
            "size": size,
            "sha256": sha256,
            "normalization": "NFKC" if d.normalize_nfkc else None,
            "add_bos": d.add_bos,
            "add_eos": d.add_eos,
            "seq_len": d.seq_len,
            "separator": d.separator,
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

        (workdir / "splits.json").unlink(missing_ok=True)
        if cfg.overwrite:  # the runs were trained on the old data
            remove_run_outputs(workdir)
            shutil.rmtree(workdir / "sweeps", ignore_errors=True)
        old = workdir / "data"
        if old.exists():
            trash = Path(tempfile.mkdtemp(prefix=".old-data-", dir=workdir))
            os.replace(old, trash / "data")
            shutil.rmtree(trash)
        os.replace(tmp / "data", workdir / "data")
        for name in ("tokenizer.json", "rng_state.json", "splits.json"):
            os.replace(tmp / name, workdir / name)
    except OSError as e:
        raise CarlosError(
            f"cannot write to workdir {workdir} ({e.strerror}); free some space or choose another --workdir"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and not (workdir / "splits.json").exists():
            shutil.rmtree(created, ignore_errors=True)
    return {**record, "seconds": time.perf_counter() - started}
