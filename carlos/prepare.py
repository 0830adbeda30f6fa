"""corpus -> byte-offset splits -> byte tokens -> packed windows, written atomically into the workdir.

Layout written (the seed's):
  workdir/splits.json  tokenizer.json  rng_state.json  data/{train,val,test}.npy

Packing: a split of n tokens becomes windows of seq_len+1 tokens with stride seq_len, so window i
holds tokens[i*L : i*L+L+1] and every token but the first is predicted exactly once. The tail that
does not fill a window is kept as one more window, the split's last L+1 tokens; its first targets
overlap the previous window and are masked (target -1) when the data is read, so no token is scored
twice and none is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import unicodedata
from pathlib import Path

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


def read_corpus(path_str: str | None) -> tuple[Path, bytes]:
    if not path_str:
        raise CarlosError("no input corpus given; pass --input corpus.txt (or input=corpus.txt)")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise CarlosError(f"input {path} does not exist; check the path given to --input")
    if path.is_dir():
        raise CarlosError(f"input {path} is a directory; pass a UTF-8 text file to --input")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CarlosError(f"input {path} cannot be read ({e.strerror}); check its permissions") from None
    if not raw:
        raise CarlosError(f"input {path} is empty; give a UTF-8 text corpus with some text in it")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CarlosError(
            f"input {path} is not UTF-8: first bad byte 0x{raw[e.start]:02x} at offset {e.start}; "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return path, raw


def split_offsets(raw: bytes, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Contiguous train, val, test byte ranges, each cut just after a newline near its target size."""
    size = len(raw)

    def cut(target: int) -> int:
        # the line boundary (offset just after a b"\n") nearest to target; the end of file counts too
        after = raw.find(b"\n", target)
        before = raw.rfind(b"\n", 0, target)
        candidates = [size] if after < 0 else [after + 1]
        if before >= 0:
            candidates.append(before + 1)
        return min(candidates, key=lambda c: abs(c - target))

    train_end = cut(round(size * (1 - val_fraction - test_fraction)))
    val_end = cut(round(size * (1 - test_fraction)))
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, size)}


def tokenize(text: str, tok: ByteTokenizer, separator: str) -> np.ndarray:
    """Token ids of a split. With BOS/EOS, each document (text between separators) is wrapped in them and
    the separator's own bytes stay between EOS and the next BOS, so dropping the specials gives the text back."""
    if not (tok.add_bos or tok.add_eos):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(tok.dtype)
    ids: list[int] = []
    sep = tok.encode(separator)
    for i, doc in enumerate(text.split(separator)):
        if i:
            ids += sep
        if doc:
            ids += tok.encode_document(doc)
    return np.asarray(ids, dtype=tok.dtype)


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(n_windows, seq_len + 1) windows with stride seq_len; the tail becomes a last, right-aligned window."""
    n, L = len(tokens), seq_len
    full = (n - 1) // L
    starts = np.arange(full) * L
    if (n - 1) - full * L > 0:
        starts = np.append(starts, n - L - 1)
    return tokens[starts[:, None] + np.arange(L + 1)]


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


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare cfg.workdir from cfg.input; returns the splits.json record."""
    d = cfg.data
    path, raw = read_corpus(cfg.input)
    workdir = Path(cfg.workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise CarlosError(f"workdir {workdir} is a file; pass a directory to --workdir")
    if workdir_has_run(workdir) and not cfg.overwrite:
        raise CarlosError(
            f"workdir {workdir} already holds a trained run; use another --workdir, "
            "or pass --overwrite to replace its data and remove that run"
        )
    tok = ByteTokenizer(add_bos=d.add_bos, add_eos=d.add_eos)

    offsets = split_offsets(raw, d.val_fraction, d.test_fraction)
    splits, arrays, tokens = {}, {}, {}
    for name in SPLITS:
        start, end = offsets[name]
        chunk = raw[start:end]
        text = chunk.decode("utf-8")
        if d.normalize_nfkc:
            text = unicodedata.normalize("NFKC", text)
        ids = tokenize(text, tok, d.separator)
        if len(ids) < d.seq_len + 1:
            need = round((d.seq_len + 1) / min(d.val_fraction, d.test_fraction, 1 - d.val_fraction - d.test_fraction))
            raise CarlosError(
                f"the {name} split of {path} has {len(ids)} tokens, fewer than one window of seq_len+1 = "
                f"{d.seq_len + 1}; use a corpus of at least about {need} bytes or a smaller --seq_len"
            )
        splits[name] = {"start": start, "end": end, "bytes": end - start, "sha256": _sha256(chunk)}
        arrays[name] = pack(ids, d.seq_len)
        tokens[name] = int(len(ids))

    record = {
        "splits": splits,
        "input": str(path.resolve()),
        "size": len(raw),
        "sha256": _sha256(raw),
        "normalization": "NFKC" if d.normalize_nfkc else None,
        "add_bos": d.add_bos,
        "add_eos": d.add_eos,
        "seq_len": d.seq_len,
        "separator": d.separator,
        "tokens": tokens,
        "windows": {name: int(a.shape[0]) for name, a in arrays.items()},
        "dtype": tok.dtype.name,
        "format_version": FORMAT_VERSION,
    }
    _write_atomically(workdir, record, arrays, tok, cfg)
    return record


def _write_atomically(workdir: Path, record: dict, arrays: dict, tok: ByteTokenizer, cfg: PrepareConfig) -> None:
    """Build everything in a temporary directory inside workdir, then move it into place with splits.json
    last: a prepare killed midway leaves no splits.json, which train refuses as unprepared."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=workdir))
    except OSError as e:
        raise CarlosError(f"cannot write to workdir {workdir} ({e.strerror}); choose a writable --workdir") from None
    try:
        (tmp / "data").mkdir()
        for name, arr in arrays.items():
            np.save(tmp / "data" / f"{name}.npy", arr)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
