"""The record of what carlos wrote into a directory, consulted before carlos replaces or removes anything.

carlos shares its workdir with whatever the user keeps there (`--workdir .` is the current directory),
so names alone cannot tell its files from the user's: a `data/` or `checkpoints/` may be the user's own.
Every file carlos writes, and every directory it creates, is recorded in `DIR/.carlos-files` before it
is created; a path is carlos's only if that record names it. A file of the user's where carlos needs
to write is refused in one line, and removal (--overwrite) takes only recorded paths, leaving a user's
file inside a carlos directory (and so that directory) in place.

The record is JSON lines, appended: {"file": "checkpoints/best.pt"}, {"dir": "checkpoints"} (created by
carlos, removed once empty), {"tree": "wandb"} (written by a library on carlos's behalf: the whole tree
is carlos's). A line cut short by a kill is ignored. A path is recorded before it is created, so a kill
between the two leaves a record of a file that does not exist, which is harmless, never the reverse.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from carlos.config import CarlosError

RECORD = ".carlos-files"
KINDS = ("file", "dir", "tree")


def write_error(path: Path | str, e: OSError) -> CarlosError:
    """The one-line refusal for a failed write; the fix depends on why it failed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or choose another --workdir"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable --workdir"
    else:
        fix = "check the path, or choose another --workdir"
    return CarlosError(f"cannot write {path} ({e.strerror or e}); {fix}")


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError that caused e, if any: torch.save reports a full disk as a RuntimeError ('unexpected
    pos') raised while handling the write's ENOSPC."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class Manifest:
    """What carlos wrote under root. writable=False (a DDP rank other than 0) reads the record only."""

    def __init__(self, root: Path, writable: bool = True) -> None:
        self.root = Path(root)
        self.writable = writable
        self.entries: dict[str, str] = {}
        self._read()

    def _read(self) -> None:
        try:
            text = (self.root / RECORD).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                (kind, rel), *rest = entry.items()
            except (ValueError, AttributeError):  # a line cut short by a kill, or not one of ours
                continue
            if not rest and kind in KINDS and isinstance(rel, str):
                self.entries[rel] = kind

    def rel(self, path: Path) -> str | None:
        """path relative to root, POSIX-style, or None when it is not under root."""
        try:
            return PurePosixPath(*Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).parts).as_posix()
        except ValueError:
            return None

    def owns(self, path: Path) -> bool:
        rel = self.rel(path)
        if rel is None:
            return False
        if rel in self.entries:
            return True
        parts = PurePosixPath(rel).parts
        return any(self.entries.get("/".join(parts[:i])) == "tree" for i in range(1, len(parts)))

    # -- recording
    def _append(self, lines: list[str]) -> os.stat_result | None:
        """Append lines to the record; returns its state before, for _undo."""
        record = self.root / RECORD
        before = os.stat(record) if record.exists() else None
        try:
            with open(record, "a", encoding="utf-8") as f:
                f.write("".join(lines))
        except OSError as e:
            self._undo(before)
            raise write_error(record, e) from None
        return before

    def _undo(self, before: os.stat_result | None) -> None:
        """The record as it was before an append whose writes then failed: a refused command leaves no trace."""
        record = self.root / RECORD
        with contextlib.suppress(OSError):
            if before is None:
                record.unlink(missing_ok=True)
            else:
                os.truncate(record, before.st_size)
                os.utime(record, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.entries.clear()
        self._read()

    def claim(self, *paths: Path, kind: str = "file") -> None:
        """Record paths (and each missing parent directory under root, which this creates) before
        they are written."""
        if not self.writable:
            return
        lines, make = [], []
        for path in paths:
            rel = self.rel(path)
            if rel is None:
                continue
            parent, missing = Path(path).parent, []
            while self.rel(parent) not in (None, ".") and not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                if not self.owns(d):
                    lines.append(json.dumps({"dir": self.rel(d)}) + "\n")
                    self.entries[self.rel(d)] = "dir"
                make.append(d)
            if not (self.owns(path) and self.entries.get(rel, kind) == kind):
                lines.append(json.dumps({kind: rel}) + "\n")
                self.entries[rel] = kind
        before = self._append(lines) if lines else None
        for d in make:
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                if lines:
                    self._undo(before)
                raise write_error(d, e) from None

    def claim_dir(self, path: Path) -> None:
        """Create a directory as carlos's (recorded first); one that already exists stays as it is."""
        if not Path(path).exists():
            record = self.root / RECORD
            before = os.stat(record) if record.exists() else None
            self.claim(path, kind="dir")
            try:
                Path(path).mkdir(exist_ok=True)
            except OSError as e:
                self._undo(before)
                raise write_error(Path(path), e) from None

    def write(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """write(file) into a temporary file beside path, fsync, then rename over path: readers (and a crash
        at any moment) see the old file or the new one, never a partial one. Recorded first; on any
        failure the temporary goes, the old file stays, and a failed write (a full disk included, however
        the writer reports it) is one line."""
        path = Path(path)
        if os.path.lexists(path) and not self.owns(path):  # a user's file by a name carlos writes
            raise CarlosError(f"{path} is a file carlos did not write, and carlos would replace it; move it away")
        self.claim(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            cause = os_error_behind(e)
            if cause is not None and isinstance(e, (OSError, RuntimeError)):
                raise write_error(path, cause) from None
            raise

    # -- checking and removing
    def foreign(self, path: Path) -> list[Path]:
        """The files at or under path that carlos did not write, when path is not carlos's: a directory
        carlos created may hold a user's files too, which it leaves alone (and an empty directory holds
        nothing to lose)."""
        path = Path(path)
        if not os.path.lexists(path) or self.owns(path):
            return []
        if path.is_dir() and not path.is_symlink():
            return [f for child in sorted(path.iterdir()) for f in self.foreign(child)]
        return [path]

    def refuse_foreign(self, paths: list[Path], fix: str) -> None:
        """One line naming the first of paths that holds something carlos did not write."""
        for path in map(Path, paths):
            found = self.foreign(path)
            if found == [path]:
                raise CarlosError(f"{path} is a file carlos did not write, and carlos would replace it; {fix}")
            if found:
                names = ", ".join(f.relative_to(path).as_posix() for f in found[:3])
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                raise CarlosError(f"{path}{os.sep} holds {names}{more}, which carlos did not write; {fix}")

    def owned_files(self, path: Path) -> list[Path]:
        """The existing files under path (or path itself) that carlos wrote."""
        path = Path(path)
        if not os.path.lexists(path):
            return []
        if path.is_dir() and not path.is_symlink():
            if self.owns(path) and self.entries.get(self.rel(path)) == "tree":
                return [p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()]
            return [f for child in path.iterdir() for f in self.owned_files(child)]
        return [path] if self.owns(path) else []

    def remove(self, path: Path) -> None:
        """Remove what carlos wrote at path: recorded files (and their temporaries), recorded trees,
        then the directories carlos created that are empty now."""
        path = Path(path)
        if not os.path.lexists(path):
            return
        if path.is_dir() and not path.is_symlink():
            if self.entries.get(self.rel(path)) == "tree":
                shutil.rmtree(path)
                return
            for child in list(path.iterdir()):
                self.remove(child)
            if self.entries.get(self.rel(path)) == "dir" and not any(path.iterdir()):
                path.rmdir()
        elif self.owns(path):
            path.unlink()
            self.remove_temporaries(path)

    def remove_temporaries(self, path: Path) -> None:
        """The temporary files of atomic writes of path (.NAME.tmp-PID) that a kill left behind."""
        for tmp in Path(path).parent.glob(f".{glob_escape(Path(path).name)}.tmp-*"):
            tmp.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        for rel, kind in list(self.entries.items()):
            if kind == "file":
                self.remove_temporaries(self.root / rel)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
