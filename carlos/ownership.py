"""The directories carlos writes: their layout (what prepare writes, what a run writes beside it, where
named runs and sweep jobs go), and whose each one is. Every directory carlos writes has one kind,
recorded in it (in its record of what carlos wrote, carlos/manifest.py); a command writes only into a
directory of its own kind or a new one, never among the outputs of another carlos directory; and one
process writes it at a time, locked on the directory itself, whatever path or name reached it.

    kind      what it holds                               written by
    workdir   the prepared data, and the workdir's run    carlos prepare, carlos train
    run       a named run: WORKDIR/runs/NAME              carlos train --run NAME
    job       a sweep job's run                           carlos train -m
    export    an exported model                           carlos export
    bench     carlos bench's corpora and workdirs         carlos bench

`Place` is the one door to a directory a command writes: checked here, made when missing (and removed
again, while empty, when the command fails), locked, and recorded with its kind by its first entry. An
export into a workdir, a prepare into a run, a run named through a symlink that leads into another
workdir are each one member of the same two refusals, made here once: another kind, or another
directory's outputs. Each is judged on the resolved path, so that no spelling of a path gets round it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from carlos.config import SPLITS
from carlos.errors import CarlosError
from carlos.files import MadeDirs, kind_of, path_problem
from carlos.lock import LOCK, DirLock
from carlos.manifest import RECORD, Manifest

# ---------------------------------------------------------------- the layout

PREPARED = ("splits.json", "tokenizer.json", "rng_state.json")  # beside data/{train,val,test}.npy
# the loggers' directories, each written whole by its library (removed only when a carlos run created it)
LOGGER_DIRS = ("wandb", "csv", "tensorboard")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples", ".hydra", *LOGGER_DIRS)  # what --overwrite removes


def prepared_paths(workdir: Path) -> list[Path]:
    return [workdir / name for name in PREPARED] + [workdir / "data" / f"{s}.npy" for s in SPLITS]


RUNS, SWEEPS = "runs", "sweeps"  # WORKDIR/runs/NAME: the runs named with --run; WORKDIR/sweeps/: sweep jobs


def run_dir(workdir: Path, run: str | None) -> Path:
    """Where a run writes: the workdir itself, or WORKDIR/runs/NAME for --run NAME."""
    return Path(workdir) / RUNS / run if run else Path(workdir)


def runs_outputs(workdir: Path) -> list[Path]:
    """The outputs of the runs trained on a workdir's data: its own run's, its named runs' and its sweeps'."""
    return [*(workdir / name for name in RUN_OUTPUTS), workdir / RUNS, workdir / SWEEPS]


def workdir_has_run(workdir: Path, manifest: Manifest) -> bool:
    """Checkpoints that carlos wrote there: of its own run, a named run or a sweep job trained on its data."""
    return any(
        p.suffix == ".pt" and p.parent.name == "checkpoints"
        for out in (workdir / "checkpoints", workdir / RUNS, workdir / SWEEPS)
        for p in manifest.owned_files(out)
    )


def trained_runs(workdir: Path) -> list[str]:
    """How to name each run of a workdir that has a checkpoint, for eval, sample and export: `--run NAME`
    for a named run, `--checkpoint PATH` for a sweep job's best (or last) checkpoint."""
    found = []
    if any((workdir / "checkpoints").glob("*.pt")):
        found.append("the workdir's own run (no --run)")
    for d in sorted((workdir / RUNS).glob("*/checkpoints")):
        if any(d.glob("*.pt")):
            found.append(f"--run {d.parent.name}")
    for d in sorted((workdir / SWEEPS).glob("*/*/checkpoints"), key=lambda p: (p.parts[-3], _number(p.parts[-2]))):
        best = next((d / n for n in ("best.pt", "last.pt") if (d / n).is_file()), None)
        if best is not None:
            found.append(f"--checkpoint {best}")
    return found


def _number(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 62, name)


# ---------------------------------------------------------------- kinds

RUN_LOCK = f"{LOCK}-run"  # in the directory of a run (the workdir's own, a named run's, a sweep job's)
WHAT = {
    "workdir": "a workdir (prepared data and its run)",
    "run": "a named run's directory",
    "job": "a sweep job's directory",
    "export": "an exported model",
    "bench": "carlos bench's directory",
}
SHORT = {"workdir": "workdir", "run": "named run", "job": "sweep job", "export": "export", "bench": "bench directory"}
# the names in a directory of each kind that hold its own outputs: no other directory goes there
LAYOUT = {
    "workdir": {"data", RUNS, *PREPARED, *RUN_OUTPUTS},
    "run": {*RUN_OUTPUTS, "job.json", "error.log"},
    "job": {*RUN_OUTPUTS, "job.json", "error.log"},
}


def kinds_of(record: Manifest) -> set[str]:
    """What a directory is, as its record says. A record an older carlos wrote without its kind is read
    by the files it names, and a run's files do not tell a named run from a sweep job's: either."""
    if record.kind:
        return {record.kind}
    if "splits.json" in record.entries:
        return {"workdir"}
    if "config.json" in record.entries:
        return {"export"}
    if {"metrics.jsonl", "checkpoints", "job.json"} & set(record.entries):
        return {"run", "job"}
    return set()


def _record(directory: str) -> Manifest | None:
    """The record in directory; None without one, or with one carlos cannot read (another refusal's)."""
    if not os.path.isfile(os.path.join(directory, RECORD)):
        return None
    try:
        return Manifest(Path(directory), writable=False)
    except (CarlosError, OSError):
        return None


def _holds(record: Manifest, kinds: set[str], parts: tuple[str, ...], inner: set[str]) -> bool:
    """Whether a directory of these kinds may hold, at parts below it, a directory of the inner kinds:
    not among its own outputs (nor anywhere in a temporary of carlos's); under a workdir's runs/ only
    a named run, as runs/NAME (or report's plot, of no kind, in runs/ itself)."""
    if record.entries.get(".") == "tree":
        return False
    if parts[0] == RUNS and "workdir" in kinds:
        return (len(parts) == 1 and not inner) or (len(parts) == 2 and "run" in inner)
    if parts[0] in set().union(*(LAYOUT.get(k, set()) for k in kinds)):
        return False
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return not any(record.entries.get(p) in ("file", "tree", "plot") for p in prefixes)


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the current directory when it is under it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # Windows: on another drive than the current directory
        return path
    return path if relative.startswith("..") else relative


def misplaced(path: Path, kind: str | None) -> str | None:
    """Why the directory at path cannot be written as a directory of this kind (None: a file of no kind
    beside another's, report's plot): it is one of another kind, or it lies among the outputs of a carlos
    directory above it. None when it can."""
    target = os.path.realpath(path)
    inner, inner_kinds = target, {kind} - {None}
    for d in [target, *map(str, Path(target).parents)]:
        record = _record(d)
        if record is None:
            continue
        kinds = kinds_of(record)
        if d == target:
            if record.entries.get(".") == "tree":
                return "is a temporary directory of carlos's, removed by the next command there"
            if kind and kinds and kind not in kinds:
                return f"is {' or '.join(WHAT[k] for k in sorted(kinds))}, not {WHAT[kind]}"
            inner_kinds = kinds or inner_kinds
            continue
        parts = Path(inner).relative_to(d).parts
        if not _holds(record, kinds, parts, inner_kinds):
            owner = f"{SHORT[sorted(kinds)[0]]} {_shown(d)}" if kinds else _shown(d)
            where = "which holds its named runs, each in runs/NAME" if parts[0] == RUNS else "among its own outputs"
            return f"is {'inside ' if len(parts) > 1 else ''}{owner}'s {parts[0]}{os.sep}, {where}"
        inner, inner_kinds = d, kinds
    return None


class Place:
    """The directory a command writes (see the module's doc), as `with Place(...) as place:`. label names
    it in a refusal ("--out hf"), fix ends one; lock is taken in it once it exists (None: a DDP rank
    other than 0, which only reads what rank 0 checked, made, locked and writes)."""

    def __init__(self, path: Path, kind: str, label: str, fix: str, lock: DirLock | None) -> None:
        self.path, self.kind, self.label, self.fix, self.lock = Path(path), kind, label, fix, lock
        self.made: list[Path] = []  # the directories this command created, parents first
        self.where = label.split()[0] if label.startswith("--") else "--workdir"  # the flag a write error names
        self.manifest = Manifest(self.path, writable=False, where=self.where)
        self._stack = contextlib.ExitStack()

    def refuse_misplaced(self) -> None:
        why = misplaced(self.path, self.kind)
        if why:
            resolved = os.path.realpath(self.path)
            via = "" if resolved == os.path.abspath(self.path) else f" (it leads to {resolved})"
            raise CarlosError(f"{self.label} {why}{via}; {self.fix}")

    def __enter__(self) -> Place:
        self.refuse_misplaced()
        if self.lock is None:
            return self
        with contextlib.ExitStack() as stack:
            self.made = stack.enter_context(MadeDirs(Path(os.path.realpath(self.path)), self.label)).made
            stack.enter_context(self.lock)  # the lock file is in the directory: any path to it finds the same
            self.refuse_misplaced()  # again, now that no other carlos command can be writing it
            self.manifest = Manifest(self.path, where=self.where, kind=self.kind)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)


# ---------------------------------------------------------------- checkpoints: their names, found by name


def step_file(directory: Path, step: int, suffix: str = ".pt") -> Path:
    """directory/step_XXXXXX<suffix>: a step's checkpoint (.pt), or its text sample (.txt)."""
    return Path(directory) / f"step_{step:06d}{suffix}"


def step_of(path: Path) -> int | None:
    """The step of a step_XXXXXX file, None for any other name."""
    number = path.stem.removeprefix("step_")
    return int(number) if path.stem.startswith("step_") and number.isdigit() else None


def _available(ckpts: Path) -> list[str]:
    """Names of the regular checkpoint files (symlinks to one included) in a checkpoints directory."""
    try:
        return sorted(p.stem for p in ckpts.glob("*.pt") if not p.name.startswith(".") and p.is_file())
    except OSError:
        return []


def not_a_file(path: Path) -> str | None:
    """Why path is not a checkpoint file ("is a directory, not a checkpoint file", "is a symlink loop ..."),
    or None when it is a regular file or nothing is there."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and not os.path.islink(path):
            return None
        return path_problem(path, e)
    return None if stat.S_ISREG(st.st_mode) else f"is {kind_of(st)}, not a checkpoint file"


def resolve_checkpoint(workdir: str | Path, spec: str, run: str | None = None) -> Path:
    """best, last, a step number (1000 -> checkpoints/step_001000.pt) or a path; of the workdir's own run,
    or of the run named with --run."""
    ckpts = run_dir(Path(os.path.expanduser(workdir)), run) / "checkpoints"
    spec = str(spec)
    if spec in ("best", "last"):
        path = ckpts / f"{spec}.pt"
    elif spec.isdigit():
        path = step_file(ckpts, int(spec))
    else:
        path = Path(os.path.expanduser(spec))  # ~user of a user that does not exist stays as it is
    why, home = not_a_file(path), Path(os.path.expanduser(workdir))
    if why:
        raise CarlosError(f"checkpoint '{spec}' at {path} {why}; {_elsewhere(ckpts, home)}")
    if not path.is_file():
        raise CarlosError(f"checkpoint '{spec}' not found at {path}; {_elsewhere(ckpts, home)}")
    return path


def _elsewhere(ckpts: Path, workdir: Path) -> str:
    """Where checkpoints are: the others in the directory looked in, or the workdir's runs that have some."""
    have = _available(ckpts) if ckpts.is_dir() else []
    if have:
        return f"available: {', '.join(have)}"
    runs = [r for r in trained_runs(workdir) if not (ckpts.parent == workdir and r.startswith("the workdir"))]
    if runs:
        return f"no checkpoints in {ckpts}; {workdir} has runs with checkpoints: {'; '.join(runs[:6])}"
    return f"no checkpoints in {ckpts}; train first (carlos train)"
