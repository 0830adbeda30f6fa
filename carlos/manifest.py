"""The record of what carlos wrote into a directory, consulted before carlos replaces or removes anything.

carlos shares its workdir with whatever the user keeps there (`--workdir .` is the current directory),
so names alone cannot tell its files from the user's: a `data/` or `checkpoints/` may be the user's own.
Every file carlos writes, and every directory it creates, is recorded in `DIR/.carlos-files` before it
is created; a path is carlos's only if that record names it. A file of the user's where carlos needs
to write is refused in one line, and removal (--overwrite) takes only recorded paths, leaving a user's
file inside a carlos directory (and so that directory) in place.

The record is JSON lines, appended: {"kind": "workdir"} (what the directory is: carlos/ownership.py),
{"file": "checkpoints/best.pt"}, {"dir": "checkpoints"} (created by carlos, removed once empty),
{"tree": ".submitit"} (written whole by a library on carlos's behalf), {"plot": "report.png"} (a file
`carlos report` may replace) and {"gone": "..."} (removed since). A line cut short by a kill is
ignored. A path is recorded before it is created, so a kill between the two leaves a record of a file
that does not exist, which is harmless, never the reverse. A directory holding a record of its own
answers for what is inside it when it is a run's (a named run's or a sweep job's): a record of another
kind inside (an export someone made there) is not the directory's, and takes nothing with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from carlos.errors import CarlosError
from carlos.files import kind_of, read_regular, write_atomic, write_error

RECORD = ".carlos-files"
# names carlos gives its files: found unrecorded, the record was lost or the files copied without it
CARLOS_NAMES = re.compile(
    r"(step_\d+|best|last)\.pt|(train|val|test)\.npy|step_\d+\.txt|(config|hydra|overrides)\.yaml"
)
KINDS = ("file", "dir", "tree", "plot")
ASIDE = ".carlos-aside-"
SCRATCH = (ASIDE, ".carlos-tmp-", ".prepare-")  # carlos's temporary directories: a kill may leave one
RUN_KINDS = ("run", "job")  # the directory kinds whose record answers for them inside a workdir


def _valid(rel: object) -> bool:
    """A relative path inside the directory: never absolute, never through '..' (a record that says
    otherwise, edited or damaged, must not make carlos touch anything outside)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    pure = PurePosixPath(rel)
    canonical = pure.as_posix() == rel  # as rel() writes it: no "a/./b", no trailing slash
    return rel == "." or (canonical and not pure.is_absolute() and ".." not in pure.parts)


class Manifest:
    """What carlos wrote under root. writable=False (a DDP rank other than 0) reads the record only."""

    def __init__(self, root: Path, writable: bool = True, where: str = "--workdir", kind: str | None = None) -> None:
        self.root = Path(root)
        self.record = self.root / RECORD
        self.writable = writable
        self.where = where  # the flag that chooses this place, for the fix a failed write suggests
        self.entries: dict[str, str] = {}
        self.kind: str | None = None  # what the directory is, as recorded (carlos/ownership.py)
        self.writes_kind = kind  # recorded with the first entry this writes, when the record has none
        self._read()

    def _read(self) -> None:
        self.entries.clear()
        self.kind = None
        if not os.path.lexists(self.record):
            return
        fix = "it is not carlos's record of its files: move it away"
        text = read_regular(self.record, fix, follow=False).decode("utf-8", errors="replace")
        valid = 0
        for line in text.splitlines():
            try:
                ((kind, rel),) = json.loads(line).items()
            except (ValueError, AttributeError, TypeError):  # a line cut short by a kill
                continue
            if kind == "kind" and isinstance(rel, str):
                self.kind = rel
            elif kind == "gone" and _valid(rel):
                self.entries.pop(rel, None)
            elif kind in KINDS and _valid(rel):
                self.entries[rel] = kind
            else:
                continue
            valid += 1
        if text.strip() and not valid:
            raise CarlosError(f"{self.record} holds no record carlos wrote; {fix}")

    def rel(self, path: Path) -> str | None:
        """path relative to root, POSIX-style, or None when it is not under root."""
        try:
            parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).parts
        except ValueError:
            return None
        return PurePosixPath(*parts).as_posix()

    def owns(self, path: Path) -> bool:
        rel = self.rel(path)
        if rel is None:
            return False
        if rel in self.entries:
            return True
        parts = PurePosixPath(rel).parts
        return any(self.entries.get("/".join(parts[:i])) == "tree" for i in range(1, len(parts)))

    def nested(self, path: Path) -> Manifest | None:
        """The record of a run's directory under root that keeps its own (a named run's, a sweep job's).
        One an older carlos wrote without its kind counts unless it is a workdir's or an export's."""
        path = Path(path)
        if os.path.abspath(path) == os.path.abspath(self.root) or not os.path.isfile(path / RECORD):
            return None
        inner = Manifest(path, self.writable)
        if inner.kind in RUN_KINDS or (inner.kind is None and not {"splits.json", "config.json"} & set(inner.entries)):
            return inner
        return None

    # -- recording
    def _append(self, lines: list[str]) -> os.stat_result | None:
        """Append lines to the record (never through a symlink); returns its state before, for _undo."""
        before = os.stat(self.record) if self.record.exists() else None
        if self.writes_kind and self.kind is None:  # the directory's kind comes with its first entry
            lines = [json.dumps({"kind": self.writes_kind}) + "\n", *lines]
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.record, flags, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(lines))
        except OSError as e:
            self._undo(before)
            raise write_error(self.record, e, self.where) from None
        self.kind = self.kind or self.writes_kind
        return before

    def _undo(self, before: os.stat_result | None) -> None:
        """The record as it was before an append whose writes then failed: a refused command leaves no trace."""
        with contextlib.suppress(OSError):
            if before is None:
                self.record.unlink(missing_ok=True)
            else:
                os.truncate(self.record, before.st_size)
                os.utime(self.record, ns=(before.st_atime_ns, before.st_mtime_ns))
        self._read()

    @contextlib.contextmanager
    def kept_on_failure(self) -> Iterator[None]:
        """What is recorded inside is taken back if it fails (a signal included): a command cut short leaves
        the record as it found it."""
        before = os.stat(self.record) if self.record.exists() else None
        try:
            yield
        except BaseException:
            self._undo(before)
            raise

    def forget(self, rels: list[str]) -> None:
        """Entries for paths carlos has removed: a user's file by that name later is the user's."""
        if self.writable and rels:
            self._append([json.dumps({"gone": rel}) + "\n" for rel in rels])
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
            while self.rel(parent) not in (None, ".") and not os.path.lexists(parent):
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
                raise write_error(d, e, self.where) from None

    def claim_dir(self, path: Path) -> None:
        """Create a directory as carlos's (recorded first); one that already exists stays as it is."""
        if not os.path.lexists(path):
            before = os.stat(self.record) if self.record.exists() else None
            self.claim(path, kind="dir")
            try:
                Path(path).mkdir(exist_ok=True)
            except OSError as e:
                self._undo(before)
                raise write_error(Path(path), e, self.where) from None

    def write(self, path: Path, write: Callable[[BinaryIO], object], kind: str = "file") -> None:
        """files.write_atomic, recorded first. A file carlos did not write is never replaced."""
        path = Path(path)
        if os.path.lexists(path) and (not self.owns(path) or path.is_symlink() or not path.is_file()):
            what = kind_of(os.lstat(path))
            raise CarlosError(f"{path} is {what} carlos did not write, and carlos would replace it; move it away")
        self.claim(path, kind=kind)
        write_atomic(path, write, self.where)

    # -- checking
    def foreign(self, path: Path) -> list[Path]:
        """The files at or under path that carlos did not write, when path is not carlos's: a directory
        carlos created may hold a user's files too, which it leaves alone (and an empty directory holds
        nothing to lose)."""
        path = Path(path)
        if not os.path.lexists(path) or self.owns(path):
            return []
        if path.is_dir() and not path.is_symlink():
            inner = self.nested(path)
            if inner is not None:
                return [f for child in sorted(path.iterdir()) if child.name != RECORD for f in inner.foreign(child)]
            return [f for child in sorted(path.iterdir()) for f in self.foreign(child)]
        return [path]

    def refuse_foreign(self, files: list[Path], dirs: list[Path], fix: str) -> None:
        """One line naming the first path in the way: where carlos writes a file, anything but its own
        file; where it keeps a directory, anything but a directory, or one holding what carlos did not write."""
        for path in map(Path, files):
            if os.path.lexists(path) and (not self.owns(path) or path.is_symlink() or not path.is_file()):
                what = kind_of(os.lstat(path))
                raise CarlosError(f"{path} is {what} carlos did not write, and carlos would write a file there; {fix}")
        for path in map(Path, dirs):
            if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
                what = kind_of(os.lstat(path))
                raise CarlosError(f"{path} is {what} carlos did not make, where carlos keeps a directory; {fix}")
            found = self.foreign(path)
            if found:
                names = ", ".join(f.relative_to(path).as_posix() for f in found[:3])
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                looks_ours = any(CARLOS_NAMES.fullmatch(f.name) for f in found)
                hint = f" (and {self.record} has no record of them)" if looks_ours else ""
                raise CarlosError(f"{path}{os.sep} holds {names}{more}, which carlos did not write{hint}; {fix}")

    def owned_files(self, path: Path) -> list[Path]:
        """The existing files at or under path that carlos wrote."""
        path = Path(path)
        if not os.path.lexists(path):
            return []
        if path.is_dir() and not path.is_symlink():
            if self.entries.get(self.rel(path)) == "tree":
                return [p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()]
            inner = self.nested(path)
            if inner is not None:
                return [path / RECORD] + [f for c in path.iterdir() if c.name != RECORD for f in inner.owned_files(c)]
            return [f for child in path.iterdir() for f in self.owned_files(child)]
        return [path] if self.owns(path) else []

    # -- removing: moved aside first, deleted once what replaces them is in place
    def aside(self, paths: list[Path]) -> Aside:
        return Aside(self, [Path(p) for p in paths])

    def remove(self, paths: list[Path]) -> None:
        """Remove what carlos wrote at or under paths (all of it, or, when something cannot go, none)."""
        with self.aside(paths) as gone:
            gone.commit()

    def _movable(self, path: Path, made: set[Path]) -> list[Path]:
        """What carlos wrote at or under path, as the paths to move: a tree whole, files one by one (with
        the temporaries of their interrupted writes), a directory with its own record through that record.
        Adds to made the directories carlos created there, to remove once they are empty."""
        if not os.path.lexists(path):
            return []
        kind = self.entries.get(self.rel(path))
        if kind == "tree" or (kind and not path.is_dir()) or path.is_symlink():
            return [path, *temporaries(path)] if self.owns(path) else []
        if not path.is_dir():
            return []
        inner = self.nested(path)
        if inner is not None:  # a sweep job's directory: its own record answers, and goes last
            made.add(path)
            moved = [m for c in sorted(path.iterdir()) if c.name != RECORD for m in inner._movable(c, made)]
            return [*moved, path / RECORD]
        if kind == "dir":
            made.add(path)
        return [m for child in sorted(path.iterdir()) for m in self._movable(child, made)]

    def scratch(self, prefix: str = ".carlos-tmp-") -> Path:
        """A new temporary directory in root, marked as carlos's, so that remove_stale takes it if a kill
        leaves it behind; built there, its files are renamed into place without a copy."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        try:
            Manifest(d).claim(d, kind="tree")
        except BaseException:  # a full disk refuses even the mark
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d

    def remove_stale(self, keep: Path | None = None) -> None:
        """What kills left behind: temporaries of recorded files, and carlos's temporary directories (but
        keep, this command's own)."""
        for rel, kind in list(self.entries.items()):
            if kind in ("file", "plot"):
                for tmp in temporaries(self.root / rel):
                    tmp.unlink(missing_ok=True)
        for stale in self.root.glob(".*"):
            with contextlib.suppress(CarlosError, OSError):
                if stale == keep or not stale.name.startswith(SCRATCH):
                    continue
                if Manifest(stale).entries.get(".") == "tree":
                    shutil.rmtree(stale, ignore_errors=True)


class Aside:
    """Removal as a transaction: what carlos wrote under some paths is moved (renamed: same file system,
    nothing copied) into ROOT/.carlos-aside-XXXX. A path that cannot be moved refuses the whole removal
    with everything put back; commit() deletes what was moved once its replacement is in place, and
    rollback() puts it back. So a refusal never comes after a deletion."""

    def __init__(self, manifest: Manifest, paths: list[Path]) -> None:
        self.m, self.paths = manifest, paths
        self.moves: list[tuple[Path, Path]] = []
        self.dir: Path | None = None
        self.made: set[Path] = set()  # directories carlos created under the paths: removed once empty

    def __enter__(self) -> Aside:
        items = [m for p in self.paths for m in self.m._movable(p, self.made)]
        if not items or not self.m.writable:
            return self
        try:
            self.dir = self.m.scratch(ASIDE)
            for item in items:
                target = self.dir / "moved" / os.path.relpath(item, self.m.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(item, target)
                self.moves.append((item, target))
        except (OSError, CarlosError) as e:
            self.rollback()
            what = f"{e.strerror} moving {e.filename}" if isinstance(e, OSError) else str(e)
            raise CarlosError(f"cannot remove what carlos wrote there before ({what}); nothing was changed") from None
        return self

    def __exit__(self, kind, *rest: object) -> None:
        if kind is not None:
            self.rollback()

    def rollback(self) -> None:
        for item, target in reversed(self.moves):
            with contextlib.suppress(OSError):
                os.replace(target, item)
        self.moves = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def commit(self) -> None:
        """Delete what was moved, then the directories carlos made that are empty now, and forget them."""
        if self.dir is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        gone = [self.m.rel(item) for item, _ in self.moves]
        for d in sorted(self.made, key=lambda p: -len(p.parts)):  # deepest first
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                gone.append(self.m.rel(d))
        self.moves, self.dir = [], None
        # forgotten unless written again since (the new run's config.yaml where the old one was)
        self.m.forget([g for g in gone if g in self.m.entries and not os.path.lexists(self.m.root / g)])


def temporaries(path: Path) -> list[Path]:
    """The temporary files of atomic writes of path (.NAME.tmp-PID) that a kill left behind."""
    name = "".join(f"[{c}]" if c in "*?[" else c for c in Path(path).name)
    return sorted(Path(path).parent.glob(f".{name}.tmp-*"))
