"""One writer per directory: `prepare` and `train` hold DIR/.carlos-lock for the whole command.

A second writer is refused in one line naming the holder. The lock is the operating system's
(flock on POSIX, a byte-range lock on Windows), so it dies with its process: a lock left by
`kill -9` or a node that went down does not block the next command. The file only tells who holds it.

Written here rather than with the filelock package (a dependency of torch) because filelock's locks on a
file are exclusive only (its ReadWriteLock is a SQLite database, not a lock on this file), and the jobs of
a sweep need a shared lock to read one prepared workdir side by side; filelock 3 also truncated the file on
every attempt, so a refused second writer could not read who holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from carlos.errors import CarlosError
from carlos.files import kind_of, write_error

LOCK = ".carlos-lock"

if sys.platform == "win32":  # no shared mode there: every holder is exclusive
    import msvcrt

    def _try_lock(fd: int, shared: bool) -> bool:
        os.lseek(fd, 1 << 30, os.SEEK_SET)  # lock a byte far past the text, which stays readable
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 1 << 30, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int, shared: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _is_note(text: bytes) -> bool:
    try:
        return set(json.loads(text)) == {"command", "pid", "host", "since"}
    except (ValueError, TypeError):
        return False


def _pid(path: Path) -> int | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"carlos {h['command']} (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another carlos command"


def preparing(directory: Path) -> str | None:
    """Who holds directory's lock alone, as prepare does while it swaps the data in; None when nobody does.
    Reads only, creating and locking nothing (a reader's workdir may be read-only)."""
    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if _try_lock(fd, shared=True):
            _unlock(fd)
            return None
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)


class DirLock:
    """Exclusive (a writer) or shared (a run reading the prepared data beside the workdir's other runs).
    name: the lock file's, for a lock on something other than the whole directory (one run of a workdir);
    what: that thing, as the refusal names it; fix: the alternative the refusal offers."""

    def __init__(
        self, directory: Path, command: str, shared: bool = False, name: str = LOCK, what: str = "",
        fix: str = "use another --workdir",
    ) -> None:  # fmt: skip
        self.path = Path(directory) / name
        self.command, self.shared = command, shared
        self.what, self.fix = what or str(self.path.parent), fix
        self.fd: int | None = None

    def _open(self) -> int:
        """The lock file, never through a symlink, and only a file that is empty or carlos's note."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fix = "it is not carlos's lock file: move it away"
        if os.path.lexists(self.path) and not stat.S_ISREG(os.lstat(self.path).st_mode):
            raise CarlosError(f"{self.path} is {kind_of(os.lstat(self.path))}; {fix}")
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise write_error(f"to {self.path.parent}", e) from None
        text = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        if text.strip() and not _is_note(text):
            os.close(fd)
            raise CarlosError(f"{self.path} holds something else; {fix}")
        return fd

    def acquire(self) -> DirLock:
        for _ in range(10):  # retried when the file was removed between our open and our lock
            fd = self._open()
            if not _try_lock(fd, self.shared):
                os.close(fd)
                raise CarlosError(
                    f"{self.what} is in use by {_holder(self.path)}; wait for it to finish or stop it, or {self.fix}"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                self.fd = fd
                if not (self.shared and os.fstat(fd).st_size):  # a shared lock keeps the note of who came first
                    self._write_holder()
                return self
            _unlock(fd)
            os.close(fd)
        raise CarlosError(f"cannot lock {self.path}: it keeps being replaced; check what else writes there")

    def _write_holder(self) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        text = json.dumps({"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "since": since})
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, text.encode("utf-8") + b"\n")
        except OSError:
            pass  # the lock holds without the note of who holds it

    def release(self) -> None:
        """Remove the file while it is still ours (shared: only when no other job holds it), then unlock."""
        if self.fd is None:
            return
        if not self.shared or _try_lock(self.fd, shared=False):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        elif _pid(self.path) == os.getpid():  # others still hold it: a note naming this process would be stale
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
        _unlock(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
