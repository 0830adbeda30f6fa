"""Sweep bookkeeping: each job of a multirun records its outcome in job.json, a failed job does not end
the sweep, and the end of the sweep lists its jobs (SweepSummary, a Hydra callback)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback as HydraCallback

from carlos.errors import CarlosError
from carlos.files import read_regular
from carlos.manifest import RECORD, Manifest
from carlos.slurm import sweep_starts


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (-m), which writes into a directory of its own."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class Objective(float):
    """What a job returns: its objective for the sweeper (Optuna records NaN as a failed trial), carrying
    the job's record for this process's SweepSummary."""

    record: dict[str, Any]

    def __new__(cls, value: float, record: dict[str, Any]) -> Objective:
        self = super().__new__(cls, value)
        self.record = record
        return self

    def __reduce__(self):  # submitit sends it back to the sweeping process by pickle
        return (Objective, (float(self), self.record))


def run_job(runner: Callable, cfg) -> Objective:
    """One job of a multirun: its outcome goes to job.json in its directory, and a failure does not end
    the sweep (Hydra's basic sweeper would stop at the first failed job's exception once the batch is
    done, and skip its end-of-sweep callbacks)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    record: dict[str, Any] = {"job": hc.job.num, "overrides": list(hc.overrides.task), "status": "ok"}
    earlier = _written(out)
    try:
        value = runner(cfg)
        if isinstance(value, float) and math.isfinite(value):
            record["objective"] = value
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded, the sweep goes on
        why = str(e) if isinstance(e, CarlosError) else f"{type(e).__name__}: {e}"
        record.update(status="failed", error=why.splitlines()[0] if why else type(e).__name__)
        print(f"carlos: job {hc.job.num} failed: {record['error']}", file=sys.stderr)
        if earlier is not None and _written(out) == earlier:
            # refused before it wrote anything, in the directory of an earlier sweep's job: its results stay
            return Objective(math.nan, record)
        log = "".join(traceback.format_exception(e)).encode("utf-8")
        with contextlib.suppress(CarlosError):  # the job's result matters more than its traceback
            Manifest(out, kind="job").write(out / "error.log", lambda f: f.write(log))
    try:
        text = (json.dumps(record) + "\n").encode("utf-8")
        Manifest(out, kind="job").write(out / "job.json", lambda f: f.write(text))
    except CarlosError as e:
        print(f"carlos: job {hc.job.num}: {e}", file=sys.stderr)
    return Objective(record.get("objective", math.nan), record)


def _written(job_dir: Path) -> tuple[int, int] | None:
    """(size, mtime) of a job directory's record of written files, None before its first job wrote there."""
    try:
        st = os.stat(job_dir / RECORD)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_job(job_dir: Path) -> dict[str, Any]:
    """A job's job.json, or a failed record when it has none (missing, or cut short by a kill)."""
    job = {"job": int(job_dir.name), "overrides": [], "status": "failed", "error": "no result"}
    with contextlib.suppress(CarlosError, ValueError):
        found = json.loads(read_regular(job_dir / "job.json", "skipped"))
        if isinstance(found, dict) and found.get("job") == job["job"]:
            job = {**job, **found}
    return job


class SweepSummary(HydraCallback):
    """Hydra callback (conf/train.yaml, hydra.callbacks): at the end of a multirun, one line a job from
    the job.json files, failed jobs with their reason, and the best objective; then exit code 1 if a job
    failed. Reads the files rather than Hydra's job returns, which a launcher like submitit runs in other
    processes; the jobs that ran in this process and were refused count as refused (their directory may
    keep an earlier sweep's job.json)."""

    def __init__(self) -> None:
        self.refused: dict[int, dict[str, Any]] = {}

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        """A new sweep directory inside the workdir is recorded as carlos's before Hydra creates it, so that
        `prepare --overwrite` can remove the runs trained on the old data."""
        sweep_starts(config)  # first: what a refused SLURM submission must leave as it found it
        sweep, workdir = Path(str(config.hydra.sweep.dir)), Path(os.path.expanduser(str(config.workdir)))
        if not workdir.is_dir() or os.path.lexists(sweep):
            return
        with contextlib.suppress(CarlosError):  # unrecorded, it is only left in place by a later prepare
            manifest = Manifest(workdir)
            if manifest.rel(sweep) not in (None, "."):
                # the directory, Hydra's multirun.yaml and submitit's logs; each job keeps its own record
                manifest.claim(sweep, kind="dir")
                manifest.claim(sweep / "multirun.yaml")
                manifest.claim(sweep / ".submitit", kind="tree")

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(value, Objective) and value.record["status"] != "ok":
            self.refused[value.record["job"]] = value.record

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        dirs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        jobs = [self.refused.get(int(d.name), _read_job(d)) for d in dirs]
        failed = [j for j in jobs if j["status"] != "ok"]
        count = f"{len(jobs)} job{'' if len(jobs) == 1 else 's'}"
        print(f"sweep {sweep}: {count}, {len(jobs) - len(failed)} finished, {len(failed)} failed")
        _print_jobs(jobs)
        if failed:
            sys.exit(1)


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    """One line a job, named by the overrides that differ between the jobs (the swept ones), and the best."""
    shared = set.intersection(*(set(j["overrides"]) for j in jobs if j["overrides"])) if jobs else set()

    def name(job: dict[str, Any]) -> str:
        return " ".join(o for o in job["overrides"] if o not in shared or len(jobs) == 1)

    for j in jobs:
        what = f"  job {j['job']} ({name(j) or 'no overrides'}): "
        if j["status"] != "ok":
            print(what + f"FAILED: {j['error']}")
        elif "objective" in j:
            print(what + f"best val bpb {j['objective']:.4f}")
        else:
            print(what + "done")
    scored = [j for j in jobs if "objective" in j]
    if scored:
        best = min(scored, key=lambda j: j["objective"])
        print(f"best: job {best['job']} ({name(best)}), val bpb {best['objective']:.4f}")
