"""sbatch's refusal of a sweep's jobs (hydra/launcher=submitit_slurm) as one line naming the launcher keys
that fix it, with what the sweep's start wrote taken back.

Left alone, the refusal travels like this: Hydra's SLURM launcher hands the jobs to submitit, which runs
sbatch through its CommandFunction; on a non-zero exit that prints sbatch's stderr, then raises
FailedJobError carrying the same text. Neither the launcher nor Hydra's sweepers catch it, and Hydra's
run_and_report prints it as a traceback, exit code 1. By then the sweep has started: SweepSummary
recorded the sweep directory in the workdir's .carlos-files, Hydra made that directory and its
multirun.yaml, submitit its folder with the jobs' pickles and the sbatch script (and Optuna its study).

So, while `refusals()` holds (cli.run_hydra, around the Hydra app), `sweep_starts(config)` (called by
SweepSummary.on_multirun_start before it records anything) notes what is there, and watches submitit's
sbatch call: quiet, and its failure raised past Hydra's handler to `refusals()`, which takes back what
the sweep wrote and raises a CarlosError; carlos.errors.fail does the rest (one line, exit code 2).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from carlos.errors import CarlosError
from carlos.manifest import RECORD

GPU_KEYS = ("gpus_per_node", "gres", "gpus_per_task", "cpus_per_gpu", "mem_per_gpu")
MEMORY_KEYS = ("mem_gb", "mem_per_cpu", "mem_per_gpu")
SIZE_KEYS = ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "mem_per_cpu", "gpus_per_node", "gres")
OTHER_KEYS = ("partition", "timeout_min", "constraint", "account", "qos", "array_parallelism")
NO_SLURM = (
    "there is no SLURM here (no sbatch or srun on PATH): hydra/launcher=submitit_slurm submits from a cluster's "
    "login node; run it there, or here with hydra/launcher=submitit_local"
)
# squeue's reasons, set as a job is submitted, for one that waits until the partition is configured again
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints")
CFG = "carlos train hydra/launcher=submitit_slurm --cfg hydra --package hydra.launcher"
# what submitit writes into its folder before sbatch answers, moved into the job's folder once it has
SUBMITIT_TEMPORARY = re.compile(r"[0-9a-f]{32}\.pkl|\.submission_file_[0-9a-f]{32}\.sh")
# sbatch's message (all its lines) -> what it is about. The first match wins: the specific messages come
# before "Requested node configuration is not available", which several causes end with
TOPICS = [
    (r"PartitionConfig", "size"),  # squeue's reasons for a job SLURM took but will never start
    (r"PartitionNodeLimit", "nodes"),
    (r"PartitionTimeLimit", "time"),
    (r"BadConstraints", "constraint"),
    (r"accounting/qos policy", "policy"),
    (r"--mem\b.*mutually exclusive", "memories"),
    (r"generic resource|\bgres\b", "gpus"),
    (r"memory", "memory"),
    (r"account", "account"),
    (r"partition", "partition"),
    (r"time limit|--time\b|time specification", "time"),
    (r"processors|\bcpus?\b", "cpus"),
    (r"node count", "nodes"),
    (r"feature", "constraint"),
    (r"\bqos\b", "qos"),
    (r"job array", "array"),
    (r"contact slurm controller|timed out", "controller"),
    (r"node configuration", "size"),
]


def _key(name: str, value: Any) -> str:
    return f"hydra.launcher.{name}={'null' if value is None else value}"


def _asked(launcher: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The keys among `keys` that ask for something (set, and not 0), as the overrides that set them."""
    return ", ".join(_key(k, launcher[k]) for k in keys if launcher.get(k) not in (None, 0, "", {}))


def _rows(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """sinfo's rows of the partition the jobs ask for (the default one when they name none)."""
    asked = str(launcher.get("partition") or "")
    rows = [r for r in nodes if (r["partition"] in asked.split(",") if asked else r["default"])]
    return rows or nodes


def _gpus(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    asked = _asked(launcher, GPU_KEYS) or "GPUs"
    asking = [k for k in GPU_KEYS if launcher.get(k) not in (None, 0, "")] or ["gpus_per_node"]
    off = " ".join(_key(k, 0 if k == "gpus_per_node" else None) for k in asking)
    rows = _rows(launcher, nodes)
    have = sorted({r["gres"] for r in rows if r["gres"] not in ("", "(null)")})
    if rows and not have:
        return f"the jobs ask for {asked}, and the nodes here have no GPUs: pass {off}"
    if have:
        return f"the jobs ask for {asked}, and the nodes have {', '.join(have)}: ask for those, or pass {off}"
    return f"the jobs ask for {asked}: ask for GPUs the nodes have (sinfo -o '%P %G' lists them), or pass {off}"


def _memory(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    asked = _asked(launcher, MEMORY_KEYS) or "memory"
    most = max((r["mem_mb"] for r in _rows(launcher, nodes)), default=0)
    if most and launcher.get("mem_per_cpu") and not launcher.get("mem_gb"):  # per CPU, in MB
        cpus = int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1)
        fix = f"hydra.launcher.mem_per_cpu={most // max(cpus, 1)} or less"
        return f"the jobs ask for {asked}, and a node here has {most} MB: pass {fix}"
    if most >= 1024:  # mem_gb is in GiB: SLURM's GB are 1024 MB
        return (
            f"the jobs ask for {asked}, and a node here has {most} MB: pass hydra.launcher.mem_gb={most // 1024} "
            "or less (or hydra.launcher.mem_gb=null hydra.launcher.mem_per_cpu=MB)"
        )
    return (
        f"the jobs ask for {asked}: ask for at most a node's memory with hydra.launcher.mem_gb "
        "(sinfo -o '%P %m' lists it in MB), or per CPU with hydra.launcher.mem_gb=null hydra.launcher.mem_per_cpu=MB"
    )


def _partition(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    asked = _key("partition", launcher.get("partition"))
    names = sorted({r["partition"] for r in nodes})
    default = next((r["partition"] for r in nodes if r["default"]), None)
    if not names:
        return f"the jobs ask for {asked}: pass hydra.launcher.partition=NAME, one that sinfo lists"
    also = f", or hydra.launcher.partition=null for the default ({default})" if default else ""
    return (
        f"the jobs ask for {asked}; the partitions here: {', '.join(names)}: pass hydra.launcher.partition=NAME{also}"
    )


def _time(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    limits = sorted({r["time"] for r in _rows(launcher, nodes) if r["time"]})
    limit = f"the partition's limit: {', '.join(limits)}" if limits else "sinfo -o '%P %l' lists the limits"
    return f"the jobs ask for {_key('timeout_min', launcher.get('timeout_min'))} ({limit}): pass one within it"


def _cpus(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    asked = _asked(launcher, ("tasks_per_node", "cpus_per_task"))
    most = max((r["cpus"] for r in _rows(launcher, nodes)), default=0)
    if most:
        per_task = max(most // max(int(launcher.get("tasks_per_node") or 1), 1), 1)
        fix = f"hydra.launcher.cpus_per_task={per_task} or less"
        return f"the jobs ask for {asked}, and a node here has {most} CPUs: pass {fix}"
    return f"the jobs ask for {asked}: ask for at most a node's CPUs (sinfo -o '%P %c' lists them)"


def _size(launcher: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    """More than a node of the partition has: the keys that ask for too much, when sinfo says what a node has."""
    rows = _rows(launcher, nodes)
    if not rows:
        asked = _asked(launcher, SIZE_KEYS)
        return f"no node has what the jobs ask for ({asked}): ask for no more (sinfo -o '%P %c %m %G' lists it)"
    cpus, mb = max(r["cpus"] for r in rows), max(r["mem_mb"] for r in rows)
    gres = ", ".join(sorted({r["gres"] for r in rows if r["gres"] not in ("", "(null)")})) or "no GPUs"
    tasks = int(launcher.get("tasks_per_node") or 1)
    need = {  # key -> (asked too much, what fits)
        "nodes": (int(launcher.get("nodes") or 1) > len(rows), len(rows)),
        "cpus_per_task": (tasks * int(launcher.get("cpus_per_task") or 1) > cpus, max(cpus // tasks, 1)),
        "mem_gb": (float(launcher.get("mem_gb") or 0) * 1024 > mb, mb // 1024),
        "mem_per_cpu": (float(launcher.get("mem_per_cpu") or 0) * tasks > mb, mb // tasks),
        "gpus_per_node": (gres == "no GPUs" and bool(_asked(launcher, GPU_KEYS)), 0),
    }
    over = [k for k, (too_much, _) in need.items() if too_much]
    asked = _asked(launcher, tuple(over) or SIZE_KEYS)
    fix = " ".join(_key(k, need[k][1]) for k in over) or "what a node has"
    here = f"{len(rows)} node{'s' if len(rows) > 1 else ''} of at most {cpus} CPUs, {mb} MB and {gres}"
    return f"the jobs ask for {asked}; the partition has {here}: pass {fix}"


def _fixed(text: str) -> Callable[[dict[str, Any], list[dict[str, Any]]], str]:
    return lambda launcher, nodes: text


FIXES: dict[str, Callable[[dict[str, Any], list[dict[str, Any]]], str]] = {
    "gpus": _gpus,
    "memory": _memory,
    "partition": _partition,
    "time": _time,
    "cpus": _cpus,
    "size": _size,
    "memories": lambda launcher, nodes: (
        f"the jobs set {_asked(launcher, MEMORY_KEYS)}: keep one, the others null (the default asks for mem_gb: "
        "hydra.launcher.mem_gb=null to ask per CPU or per GPU)"
    ),
    "policy": _fixed(
        "the site's limits for your account or QOS (sacctmgr show assoc, qos) refuse it: fewer jobs at a time "
        "(hydra.launcher.array_parallelism), a shorter hydra.launcher.timeout_min, or another hydra.launcher.qos"
    ),
    "account": _fixed("pass hydra.launcher.account=NAME, one of yours (sacctmgr show assoc user=$USER lists them)"),
    "nodes": _fixed("pass hydra.launcher.nodes=N, at most the partition's nodes (sinfo lists them)"),
    "constraint": _fixed("pass hydra.launcher.constraint with features the nodes have (sinfo -o '%P %f'), or null"),
    "qos": _fixed("pass hydra.launcher.qos=NAME, one the site has (sacctmgr show qos), or null"),
    "array": _fixed(
        "sweep fewer jobs in one invocation (scontrol show config | grep MaxArraySize), or set "
        "hydra.launcher.array_parallelism=N"
    ),
    "controller": _fixed("the SLURM controller did not answer: try again (scontrol ping says whether it is up)"),
}


def explain(stderr: str, launcher: dict[str, Any], nodes: list[dict[str, Any]], what: str = "") -> str:
    """The one line for sbatch's refusal: sbatch's own message and the launcher keys that fix it. launcher
    holds the hydra.launcher settings, nodes sinfo's rows (_sinfo; [] when unknown)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = next((line for line in lines if re.search("error|fatal", line, re.I)), lines[0] if lines else "")
    said = re.sub(r"^sbatch: (error|fatal): ", "", said).rstrip(".") or "no message"
    topic = next((t for pattern, t in TOPICS if re.search(pattern, stderr, re.IGNORECASE)), None)
    if topic is None:
        fix = f"check the launcher's settings, hydra.launcher.KEY=VALUE (`{CFG}` lists them)"
    else:
        fix = FIXES[topic](launcher, nodes)
    return f"{what or 'sbatch refused the jobs'}: {said}; {fix}"


def _sinfo() -> list[dict[str, Any]]:
    """The cluster's nodes as sinfo lists them, one row a node and partition; [] when it cannot say."""
    try:
        command = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        part, cpus, mem, gres, limit = (line.split("|") + [""] * 5)[:5]
        with contextlib.suppress(ValueError):
            row = {"partition": part.rstrip("*"), "default": part.endswith("*"), "gres": gres, "time": limit}
            rows.append({**row, "cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+"))})
    return rows


def _missing(path: Path) -> list[Path]:
    """path and its parents that do not exist yet, deepest first."""
    missing, p = [], Path(os.path.abspath(path))
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    return missing


def _saved(path: Path | None) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes and times, None when there is none."""
    if path is None or path.is_symlink() or not path.is_file():
        return None
    with contextlib.suppress(OSError):
        return path.read_bytes(), os.stat(path)
    return None


class _Start:
    """What the start of a sweep is about to write, noted before it writes, to take back when sbatch refuses
    the jobs: submitit's pickles and script, multirun.yaml, the directories made, the record of them, a new
    Optuna study. Each only while nothing else came of the sweep (a batch that was submitted keeps them)."""

    def __init__(self, config: Any) -> None:
        from omegaconf import OmegaConf
        from submitit.core.utils import JobPaths

        keys = GPU_KEYS + MEMORY_KEYS + SIZE_KEYS + OTHER_KEYS
        self.launcher = {k: OmegaConf.select(config, f"hydra.launcher.{k}", default=None) for k in keys}
        self.sweep = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        self.folder = JobPaths.get_first_id_independent_folder(str(config.hydra.launcher.submitit_folder))
        self.multirun = _saved(self.sweep / "multirun.yaml")
        storage = str(OmegaConf.select(config, "hydra.sweeper.storage", default=None) or "")
        sqlite = storage.startswith("sqlite:///")
        self.study = Path(os.path.abspath(storage[len("sqlite:///") :])) if sqlite else None
        self.new_study = self.study is not None and not os.path.lexists(self.study)
        self.record = Path(os.path.expanduser(str(config.workdir))) / RECORD
        self.record_before = os.stat(self.record) if self.record.is_file() and not self.record.is_symlink() else None
        self.missing = sorted({*_missing(self.sweep), *_missing(self.folder)}, key=lambda p: -len(p.parts))
        # the directories whose entries the sweep changes: their times are put back when their entries are
        around = {self.sweep, self.folder, *(p.parent for p in self.missing)}
        if self.study is not None and self.new_study:
            around.add(self.study.parent)
        self.dirs = {d: (set(os.listdir(d)), os.stat(d)) for d in around if d.is_dir() and not d.is_symlink()}

    def undo(self, submitted: bool) -> None:
        """Put back what the sweep's start changed; submitted: some batch of it was submitted before sbatch
        refused another (Optuna's next trials), so its multirun.yaml and study stay."""
        folder_before = self.dirs.get(self.folder, (set(), None))[0]
        for name in set(_listdir(self.folder)) - folder_before:
            path = self.folder / name
            if SUBMITIT_TEMPORARY.fullmatch(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        if not submitted:
            self._take_back_files()
        for d in self.missing:  # deepest first, each only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._take_back_record()
        for d, (names, st) in self.dirs.items():
            with contextlib.suppress(OSError):
                if set(os.listdir(d)) == names:
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _take_back_files(self) -> None:
        """multirun.yaml as it was (Hydra wrote it again for the refused jobs), and a study made for them."""
        yaml = self.sweep / "multirun.yaml"
        with contextlib.suppress(OSError):
            if self.multirun is None:
                yaml.unlink(missing_ok=True)
            elif _saved(yaml) is None or _saved(yaml)[0] != self.multirun[0]:
                yaml.write_bytes(self.multirun[0])
                os.utime(yaml, ns=(self.multirun[1].st_atime_ns, self.multirun[1].st_mtime_ns))
            if self.new_study:
                for path in (self.study, self.study.with_name(self.study.name + "-journal")):
                    path.unlink(missing_ok=True)

    def _take_back_record(self) -> None:
        """The lines the sweep's start added to the workdir's record, when every path they name is gone."""
        if self.record.is_symlink() or not self.record.is_file():
            return
        size = self.record_before.st_size if self.record_before else 0
        with contextlib.suppress(OSError):
            added = self.record.read_bytes()[size:]
            for line in added.decode("utf-8", errors="replace").splitlines():
                try:
                    ((_, rel),) = json.loads(line).items()
                except (ValueError, AttributeError, TypeError):
                    return
                if not isinstance(rel, str) or os.path.lexists(self.record.parent / rel):
                    return
            if not added:
                return
            if self.record_before is None:
                self.record.unlink()
            else:
                os.truncate(self.record, size)
                os.utime(self.record, ns=(self.record_before.st_atime_ns, self.record_before.st_mtime_ns))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _held_for_good(sbatch_out: str) -> str | None:
    """squeue's reason for the job sbatch just took when SLURM will never start it, which is then cancelled:
    a site with EnforcePartLimits=NO (SLURM's default) takes a job that asks for more than the partition's
    nodes have, and holds it, while the launcher would wait for it without end."""
    job = re.search(r"job (\d+)", sbatch_out)
    if job is None:
        return None
    try:
        command = ["squeue", "-h", "-j", job.group(1), "-o", "%r"]
        reasons = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    held = next((r for r in reasons if r in NEVER_STARTS), None)
    if held:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", job.group(1)], capture_output=True, timeout=30)
    return held


class _Refused(BaseException):
    """sbatch's refusal on its way out of Hydra's multirun to `refusals()`: a BaseException, as Hydra's
    run_and_report turns every Exception into a traceback."""

    def __init__(self, stderr: str, message: str = "", what: str = "") -> None:
        super().__init__(stderr)
        self.stderr, self.message, self.what = stderr, message, what


class _Watch:
    """The sweep being started under `refusals()`, and submitit's CommandFunction while it is watched."""

    def __init__(self) -> None:
        self.start: _Start | None = None
        self.submitted = False  # a batch of jobs that sbatch took
        self.restore: Callable[[], None] = lambda: None

    def watch_sbatch(self) -> None:
        """submitit's sbatch call, quiet (submitit prints sbatch's stderr, then raises with the same text)
        and its failure raised as _Refused."""
        from submitit.core import utils

        original, watch = utils.CommandFunction, self

        class Sbatch(original):
            def __call__(self, *args: Any, **kwargs: Any) -> str:
                if self.command[:1] != ["sbatch"]:
                    return super().__call__(*args, **kwargs)
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        out = super().__call__(*args, **kwargs)
                except utils.FailedJobError as e:
                    raise _Refused(str(e)) from e
                held = _held_for_good(out)
                if held:
                    raise _Refused(f"reason {held}", what="SLURM took the jobs but can never start them (cancelled)")
                watch.submitted = True
                return out

        utils.CommandFunction = Sbatch
        self.restore = lambda: setattr(utils, "CommandFunction", original)


_WATCH: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("carlos_sbatch_watch", default=None)


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Within: a SLURM sweep's refused submission becomes a CarlosError, with what its start wrote taken back."""
    watch = _Watch()
    token = _WATCH.set(watch)
    try:
        yield
    except _Refused as refused:
        launcher = watch.start.launcher if watch.start else {}
        if watch.start is not None:
            watch.start.undo(watch.submitted)
        message = refused.message or explain(refused.stderr, launcher, _sinfo(), refused.what)
        raise CarlosError(message) from refused.__cause__
    finally:
        _WATCH.reset(token)
        watch.restore()


def sweep_starts(config: Any) -> None:
    """Called as a multirun starts, before anything of it is written: under `refusals()` and the SLURM
    launcher, note what is there and watch sbatch."""
    watch = _WATCH.get()
    target = str(config.hydra.launcher.get("_target_", ""))
    if watch is None or watch.start is not None or not target.endswith(".SlurmLauncher"):
        return
    try:
        watch.start = _Start(config)
    except ImportError:  # no submitit: Hydra says so when it instantiates the launcher
        return
    if shutil.which("sbatch") is None or shutil.which("srun") is None:  # submitit would raise RuntimeError
        raise _Refused("", NO_SLURM)
    watch.watch_sbatch()
