"""The input of `carlos prepare`: one file, or several (files, a directory searched recursively for
--glob, *.txt by default, or a glob pattern).

Several files, in sorted path order, are read as one corpus: each file is one document, and the files are
joined with the separator, so `carlos prepare` splits, tokenizes and packs them exactly as it does one
file (carlos/prepare.py), reading one file at a time in bounded memory. One plain file is read the same
way, with the separator splitting it into documents.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from carlos.errors import CarlosError
from carlos.files import kind_of, open_regular, path_problem

CHUNK = 16 << 20  # bytes read at a time: memory stays bounded whatever the corpus size
MAGIC = set("*?[")


def scan(src: BinaryIO, chunk: int = CHUNK, also=None) -> tuple[int, str]:
    """(size, sha256) of a file, checking on the way that it is UTF-8: one pass, bounded memory. also, a
    hashlib object, is fed the same bytes."""
    name = getattr(src, "name", "the input")
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    src.seek(0)
    while block := src.read(chunk):
        digest.update(block)
        if also is not None:
            also.update(block)
        pending = decoder.getstate()[0]  # the start of a character cut by the previous block
        try:
            decoder.decode(block)
        except UnicodeDecodeError as e:
            raise CarlosError(
                f"input {name} is not UTF-8: first bad byte 0x{(pending + block)[e.start]:02x} at offset "
                f"{offset - len(pending) + e.start}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        offset += len(block)
    pending = decoder.getstate()[0]
    if pending:
        raise CarlosError(
            f"input {name} is not UTF-8: it ends inside a character at offset {offset - len(pending)}; "
            "convert it to UTF-8"
        )
    return offset, digest.hexdigest()


# ---------------------------------------------------------------- which files


class Listing:
    """What a search of --input's paths has met: the directories it has been in (each once), and what it
    left out, {why: [path, ...]}, for prepare to say."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.seen = workdir, set()
        self.left_out: dict[str, list[str]] = {}

    def leave_out(self, why: str, path: Path | str) -> None:
        paths = self.left_out.setdefault(why, [])
        if str(path) not in paths:  # met again through another of the paths given
            paths.append(str(path))


def input_files(spec: str | list[str], pattern: str, listing: Listing) -> list[Path] | None:
    """The files of --input in sorted path order, or None for one plain file path (read as it always was).
    A directory is searched recursively for pattern, hidden files and directories and the workdir left out."""
    if isinstance(spec, str) and not (MAGIC & set(spec)) and not os.path.isdir(Path(os.path.expanduser(spec))):
        return None
    found: dict[str, Path] = {}
    for item in [spec] if isinstance(spec, str) else spec:
        for path in _expand(str(item), pattern, listing):
            first = found.setdefault(os.path.realpath(path), path)  # a file given twice is read once
            if first != path:
                listing.leave_out("duplicate", f"{path} (the same file as {first})")
    shown = spec if isinstance(spec, str) else " ".join(spec)
    if not found:  # only a pattern matches nothing: a plain path is refused by Sources, a directory above
        raise CarlosError(
            f"input {shown} matches no file; check the pattern (a relative one is matched from {Path.cwd()})"
        )
    return sorted(found.values(), key=lambda p: p.as_posix())


def _expand(item: str, pattern: str, listing: Listing) -> list[Path]:
    path, workdir = Path(os.path.expanduser(item)), listing.workdir
    if os.path.isdir(path):  # False, not an error, for a path it cannot reach: Sources names why
        name = pattern.replace("**/", "")  # a directory is searched at every depth anyway
        inside = []
        for found in _glob(path, ("**", name), listing):
            if _hidden(found, path):
                listing.leave_out("hidden", found)
            elif _under(found, workdir):
                listing.leave_out("inside the workdir", found)
            else:
                inside.append(found)
        if not inside:
            raise CarlosError(f"input {path} holds no file matching {pattern!r}; pass --glob PATTERN (e.g. '*.md')")
        return sorted((p for p in inside if not os.path.isdir(p)), key=lambda p: p.as_posix())
    if MAGIC & set(item) and not os.path.lexists(path):
        matched = [p for p in _glob(Path(), Path(os.path.expanduser(item)).parts, listing) if not os.path.isdir(p)]
        for p in matched:
            if _under(p, workdir):
                listing.leave_out("inside the workdir", p)
        return sorted((p for p in matched if not _under(p, workdir)), key=lambda p: p.as_posix())
    return [path]  # a file; Sources refuses it when it is missing or not a regular file


# glob and Path.rglob skip a directory they cannot list without a word, which would leave its files out
# of the corpus: these list directories themselves and refuse one they cannot list
LEFT_OUT = "name the files to read instead (several paths, or a glob that leaves it out)"


def _glob(base: Path, parts: tuple[str, ...], listing: Listing) -> Iterator[Path]:
    """The paths under base that match parts, as glob matches them: '**' any depth of directories (those
    reached through a symlink too, each directory once, so a link back up the tree ends), a wildcard no
    name starting with '.' unless it starts with '.' itself; the workdir is never searched. What it leaves
    out that would have matched, it tells the listing."""
    if not parts:
        yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        try:
            st = os.stat(base)
        except OSError:
            return
        if (st.st_dev, st.st_ino, len(parts)) in listing.seen or not stat.S_ISDIR(st.st_mode):
            return
        listing.seen.add((st.st_dev, st.st_ino, len(parts)))
        yield from _glob(base, rest, listing)
        for sub in _subdirs(base, listing):
            yield from _glob(sub, parts, listing)
    elif MAGIC & set(head):
        for entry in _entries(base):
            if not fnmatch.fnmatch(entry.name, head):
                continue
            if head.startswith(".") or not entry.name.startswith("."):
                yield from _glob(base / entry.name, rest, listing)
            elif not rest:
                listing.leave_out("hidden", base / entry.name)
    elif _lexists(base / head):
        yield from _glob(base / head, rest, listing)


def _entries(directory: Path) -> list[os.DirEntry]:
    """The entries of a directory in name order (nothing for a path that is not one); refused when it
    cannot be listed."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise CarlosError(
            f"input {directory} cannot be listed ({e.strerror}), so its files would be left out; make it "
            f"readable, or {LEFT_OUT}"
        ) from None


def _subdirs(directory: Path, listing: Listing) -> Iterator[Path]:
    """The directories in directory, symlinks to one included, hidden ones and the workdir left out. A
    link that cannot be followed (a loop, a target that cannot be reached) is refused: it may lead to a
    directory of the corpus; a dangling one leads to nothing."""
    for entry in _entries(directory):
        path = directory / entry.name
        if entry.name.startswith("."):
            if entry.is_dir():
                listing.leave_out("hidden", f"{path}{os.sep} (not searched)")
            continue
        try:
            is_dir = stat.S_ISDIR(entry.stat().st_mode)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CarlosError(f"input {path} {path_problem(path, e)}; fix or remove it, or {LEFT_OUT}") from None
        if is_dir and _under(path, listing.workdir):
            listing.leave_out("inside the workdir", f"{path}{os.sep} (not searched)")
        elif is_dir:
            yield path


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise CarlosError(f"input {path} {path_problem(path, e)}; check the path given to --input") from None
    return True


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _under(path: Path, workdir: Path) -> bool:
    """Inside the workdir, or a link into it: its samples and data are carlos's outputs, never its input."""
    return any(Path(f(path)).is_relative_to(f(workdir)) for f in (os.path.abspath, os.path.realpath))


# ---------------------------------------------------------------- the corpus


def open_corpus(spec: str | list[str] | None, pattern: str, separator: str, workdir: Path) -> Corpus:
    """--input opened: one plain file, or the files of several paths, a directory or a glob."""
    if not spec:
        raise CarlosError("no input corpus given; pass --input corpus.txt (or input=corpus.txt)")
    listing = Listing(workdir)
    files = input_files(spec, pattern, listing)
    shown = spec if isinstance(spec, str) else " ".join(spec)
    corpus = Corpus(files or [Path(os.path.expanduser(spec))], separator, shown, one=files is None)
    corpus.left_out = {**listing.left_out, **corpus.left_out}
    return corpus


def _change(before: os.stat_result, now: os.stat_result) -> str | None:
    if now.st_size != before.st_size:
        return f"{before.st_size:,} bytes when opened, {now.st_size:,} now"
    if now.st_mtime_ns != before.st_mtime_ns:
        return "its modification time changed"
    return None if now.st_ino == before.st_ino else "it was replaced"


class Corpus:
    """The input, read as one text: one file, or file 1, separator, file 2, ... (offsets are in that joined
    text). One plain file (one=True) is opened once and read from that descriptor, so a file renamed over
    it meanwhile is not read; of several, each is opened when it is read and checked against its listing.
    A file that changes while it is read (size, modification time or, at the end, its bytes) is refused,
    never read half old, half new."""

    def __init__(self, paths: list[Path], separator: str, shown: str, one: bool = False) -> None:
        self.one, self.sep = one, separator.encode("utf-8")
        self.path = paths[0] if one else Path(shown)  # for messages
        self.held = self._open(paths[0]) if one else None  # one file: its one descriptor
        listed = [(paths[0], os.fstat(self.held.fileno()))] if one else [(p, self._stat(p)) for p in paths]
        self.files = [(p, st) for p, st in listed if st.st_size > 0]  # an empty file adds no document
        self.left_out = {"empty": [str(p) for p, st in listed if st.st_size == 0]} if not one else {}
        if not self.files:
            self.close()
            empty = f"{self.path} is empty" if one else f"{shown}: every file is empty"
            raise CarlosError(f"input {empty}; give a UTF-8 text corpus with some text in it")
        self.starts, pos = [], 0
        for _, st in self.files:
            self.starts.append(pos)
            pos += st.st_size + len(self.sep)
        self.size = pos - len(self.sep)
        self.hashes: list[str] = []

    @staticmethod
    def _stat(path: Path) -> os.stat_result:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CarlosError(f"input {path} {path_problem(path, e)}; check the path given to --input") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise CarlosError(f"input {path} is {kind_of(st)}; save the text to a file and pass that to --input")
        return st

    def _open(self, path: Path) -> BinaryIO:
        self._stat(path)
        # open_regular checks again on the open file: a path swapped for a FIFO in between cannot hang it
        f = os.fdopen(open_regular(path, "check its permissions", label="input "), "rb")
        f.raw.name = str(path)  # messages name the path, not the descriptor
        return f

    def open(self, i: int) -> contextlib.AbstractContextManager[BinaryIO]:
        """File i, checked to be the file that was listed."""
        if self.held is not None:
            return contextlib.nullcontext(self.held)
        path, listed = self.files[i]
        f = self._open(path)
        how = _change(listed, os.fstat(f.fileno()))
        if how:
            f.close()
            raise self.changed(path, how)
        return f

    def changed(self, path: Path, how: str) -> CarlosError:
        return CarlosError(
            f"input {path} changed while it was read ({how}); let whatever writes it finish, or prepare a copy"
        )

    def scan(self) -> tuple[int, str]:
        """(size, sha256) of the joined corpus; each file checked to be UTF-8 (its path and the offset of
        its first bad byte named) and hashed on its own."""
        whole = hashlib.sha256()
        self.hashes = []
        for i in range(len(self.files)):
            if i:
                whole.update(self.sep)
            with self.open(i) as f:
                self.hashes.append(scan(f, also=whole)[1])
        return self.size, whole.hexdigest()

    def segments(self, start: int, end: int) -> Iterator[tuple[int | None, int, int]]:
        """The parts of [start, end): (i, a, b) for bytes a..b of file i, (None, a, b) for bytes a..b of
        a separator between two files."""
        for i, first in enumerate(self.starts):
            size = self.files[i][1].st_size
            a, b = max(start, first), min(end, first + size)
            if a < b:
                yield i, a - first, b - first
            if i + 1 < len(self.files):
                a, b = max(start, first + size), min(end, self.starts[i + 1])
                if a < b:
                    yield None, a - first - size, b - first - size

    def read_at(self, start: int, n: int) -> bytes:
        parts = []
        for i, a, b in self.segments(start, start + n):
            if i is None:
                parts.append(self.sep[a:b])
                continue
            with self.open(i) as f:
                f.seek(a)
                parts.append(f.read(b - a))
        data = b"".join(parts)
        if len(data) != n:
            raise self.changed(self.path, "it is shorter now")
        return data

    def check_unchanged(self, sha256: str, digest_now: str) -> None:
        for path, listed in self.files:
            how = _change(listed, os.fstat(self.held.fileno()) if self.held else os.stat(path))
            if how:
                raise self.changed(path, how)
        if digest_now != sha256:
            raise self.changed(self.path, "its bytes differ between two reads")

    def same_file(self, other: os.stat_result) -> Path | None:
        """The input file that is other, if one is."""
        return next((p for p, st in self.files if os.path.samestat(st, other)), None)

    def record(self) -> dict:
        """The input for splits.json: one file's path, or the paths as given with each file's path, bytes
        and sha256, in the order they were read."""
        if self.one:
            return {"input": str(self.path.resolve())}
        files = zip(self.files, self.hashes, strict=True)
        listed = [{"path": str(p.resolve()), "bytes": st.st_size, "sha256": h} for (p, st), h in files]
        return {"input": str(self.path), "files": listed}

    def close(self) -> None:
        if self.held is not None:
            self.held.close()

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
