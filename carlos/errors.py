"""How carlos fails, in one place: CarlosError (a problem the user can fix), the one-line messages and the
exit codes (the failure policy), and the stop signals.

A problem the user can fix (CarlosError): one line, exit code 2. A stop asked for by a signal: one line,
exit code 128 + the signal, as a shell reports it. A closed stdout pipe: quiet, 141. Anything else is a
bug in carlos: one line saying so, exit code 1. CARLOS_DEBUG=1 adds the traceback to each.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any


class CarlosError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def nearest(word: str, choices, cutoff: float = 0.5) -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean '{match[0]}'?)" if match else ""


def short(value: Any) -> str:
    """A value read from a file, as one short piece of a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Stopped(BaseException):
    """SIGTERM asked the command to stop. A BaseException, like KeyboardInterrupt, so that no handler of
    ordinary errors swallows it while every `finally` (temporary files, locks) still runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum)


_stop.carlos_stop = True  # train hands these signals to Lightning's graceful stop, and only these handlers
# the signals whose default action ends the process without a word; SIGINT raises KeyboardInterrupt anyway
STOP_SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, n)]


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """The stop signals turned into Stopped for the length of a command, so that a stopped command cleans
    up after itself. Only where nobody installed a handler before (submitit's stays), and only from the
    main thread. When the command ends, however it ends, each signal carlos took is given back to its
    default: carlos called as a library (a notebook, a test) leaves SIGTERM ending the process."""
    taken = []
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _stop)
                taken.append(sig)
    try:
        yield
    finally:
        for sig in taken:  # whoever holds it now: carlos, or nobody since train released it
            signal.signal(sig, signal.SIG_DFL)


def release_stop_handlers() -> None:
    """Give the stop signals back to their default, where carlos's handler holds them: train does this
    before fit, so that Lightning's graceful stop (and Preemption's) is the only one while it trains."""
    for sig in STOP_SIGNALS:
        if getattr(signal.getsignal(sig), "carlos_stop", False):  # not submitit's
            signal.signal(sig, signal.SIG_DFL)


def report(e: BaseException) -> None:
    if os.environ.get("CARLOS_DEBUG"):
        traceback.print_exception(e)
    print(f"carlos: error: {e}", file=sys.stderr)


def fail(e: BaseException) -> None:
    """End the process under the failure policy (see the module's doc)."""
    if isinstance(e, CarlosError):
        report(e)
        sys.exit(2)
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        # the reader of stdout went away (carlos sample | head): stop quietly, as other command-line tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a process that SIGPIPE ended
    if os.environ.get("CARLOS_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, (KeyboardInterrupt, Stopped)):
        name = "Ctrl+C" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"carlos: stopped by {name}; nothing half-written was left", file=sys.stderr)
        sys.exit(128 + (signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signum))
    message = (str(e).strip().splitlines() or [""])[0]
    what = f"{type(e).__name__}: {message}" if message else type(e).__name__
    print(
        f"carlos: error: unexpected {what}; this is a bug in carlos, please report it with the output of "
        "CARLOS_DEBUG=1",
        file=sys.stderr,
    )
    sys.exit(1)


def guarded(fn: Callable, *args: Any) -> Any:
    """fn(*args) under the failure policy (SystemExit passes: it is already an exit code)."""
    try:
        return fn(*args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every way out goes through fail()
        fail(e)
