"""Files read, written and directories made safely: only regular files are read (a FIFO or a device would
block or never end), files are replaced atomically, failures are one line that leads to the fix, and
directories a command made are removed again when it fails, only while they are empty (another process
may be using them by then)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from carlos.errors import CarlosError

FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def kind_of(st: os.stat_result) -> str:
    return "a file" if stat.S_ISREG(st.st_mode) else next((n for t, n in FILE_KINDS if t(st.st_mode)), "not a file")


def printable(path: Path | str) -> str:
    """A path as text that any output can take: the bytes of a name that are not UTF-8, which Python keeps
    as lone surrogates (and a strict UTF-8 stdout, or a library that encodes the name, refuses), as U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", str(path))


def path_problem(path: Path, e: OSError) -> str:
    """Why os.stat(path) failed, in words that lead to the fix ('does not exist' misleads for a symlink
    loop or a dangling link)."""
    if e.errno == errno.ELOOP:
        return "is a symlink loop (a link that leads back to itself)"
    if os.path.islink(path):
        return f"is a symlink to {os.readlink(path)}, which does not exist"
    if e.errno == errno.ENOTDIR:
        return "cannot exist: a part of that path is a file, not a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot be reached ({e.strerror})"
    if e.errno == errno.ENAMETOOLONG:
        return "is a name too long for this file system"
    return "does not exist"


def open_regular(path: Path, fix: str, follow: bool = True, label: str = "") -> int:
    """A descriptor of the regular file at path, opened for reading without ever blocking on a FIFO;
    anything else is refused in one line ending with fix. follow=False refuses a symlink too. label
    comes before the path in messages ("input ")."""
    name = f"{label}{path}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow and os.path.islink(path):
            raise CarlosError(f"{name} is a symlink; {fix}") from None
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise CarlosError(f"{name} {path_problem(path, e)}; {fix}") from None
        raise CarlosError(f"{name} cannot be read ({e.strerror}); {fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CarlosError(f"{name} is {kind_of(st)}, not a regular file; {fix}")
    if getattr(os, "O_NONBLOCK", 0):
        os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, fix: str, follow: bool = True) -> bytes:
    """The bytes of the regular file at path (see open_regular)."""
    with os.fdopen(open_regular(path, fix, follow), "rb") as f:
        return f.read()


def write_error(path: Path | str, e: OSError, where: str = "--workdir") -> CarlosError:
    """The one-line refusal for a failed write; the fix depends on why it failed (where: the flag that
    chooses the place)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space or choose another {where}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"choose a writable {where}"
    else:
        fix = f"check the path, or choose another {where}"
    return CarlosError(f"cannot write {path} ({e.strerror or e}); {fix}")


def os_error_behind(e: BaseException | None) -> OSError | None:
    """The OSError that caused e, if any: torch.save reports a full disk as a RuntimeError ('unexpected
    pos') raised while handling the write's ENOSPC."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomic(path: Path, write: Callable[[BinaryIO], object], where: str = "--workdir") -> None:
    """write(file) into a temporary file beside path, fsync, then rename over path: readers (and a crash
    at any moment) see the old file or the new one, never a partial one. On any failure the temporary
    goes and the old file stays; a failed write (a full disk included, however the writer reports it) is
    one line naming the flag that chooses the place (where)."""
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
            raise write_error(path, cause, where) from None
        raise


class MadeDirs:
    """Creates a directory and its missing parents. When the command fails, removes those it created
    itself (os.mkdir, not exist_ok: a directory another process made at the same moment is not ours),
    deepest first and only while empty: by then another command may have put its work there."""

    def __init__(self, path: Path, label: str = "") -> None:
        self.path, self.made = Path(path), []
        self.label = label or f"workdir {path}"  # names it in a refusal

    def __enter__(self) -> MadeDirs:
        missing, p = [], Path(os.path.abspath(self.path))
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise CarlosError(f"{self.label}: {p} is {kind_of(os.stat(p))}, not a directory; choose another")
        for d in reversed(missing):
            try:
                os.mkdir(d)
                self.made.append(d)
            except FileExistsError:
                pass
            except OSError as e:
                self.__exit__(OSError, e, None)
                raise write_error(d, e) from None
        return self

    def __exit__(self, kind, *rest: object) -> None:
        if kind is None:
            return
        for d in reversed(self.made):
            try:
                os.rmdir(d)
            except OSError:  # not empty: someone else's work is there now
                break
