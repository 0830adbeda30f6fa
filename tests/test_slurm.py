"""carlos's cluster path on a real SLURM controller (slurmctld and slurmd, not a simulation): start one on
this machine with `scripts/local_slurm.sh up`. Without `sbatch` on PATH these tests skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import make_corpus

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM here (scripts/local_slurm.sh up starts one)"),
]
CARLOS = str(Path(sys.executable).parent / "carlos")
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
TINY += ["--sample_tokens", "4", "--warmup_steps", "1", "--eval_interval", "5"]
# what a job may ask of this one node: no GPU, one CPU, a little memory, minutes
LOCAL = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"]
LOCAL += ["hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]


def squeue_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def squeue_names() -> list[str]:
    p = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True)
    return p.stdout.split()


def _prepared(tmp_path: Path) -> dict[str, str]:
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.skip("sbatch is here but no controller answers (scripts/local_slurm.sh up)")
    make_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run(
        [CARLOS, "prepare", "corpus.txt", "--workdir", "w", "--seq_len", "32"], cwd=tmp_path, env=env, check=True
    )
    return env


def test_a_sweep_runs_as_slurm_jobs_and_report_tables_them(tmp_path):
    env = _prepared(tmp_path)
    argv = [CARLOS, "train", "-m", *LOCAL, "--workdir", "w", *TINY, "--max_steps", "10", "seed=1,2"]
    sweep = subprocess.Popen(
        [*argv, "hydra.sweep.dir=w/sweeps/slurm"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[str] = set()
    while sweep.poll() is None:  # the launcher waits for its jobs; squeue shows them meanwhile
        seen.update(squeue_names())
        time.sleep(0.2)
    out, err = sweep.communicate()
    assert sweep.returncode == 0, err
    assert "train" in seen  # the jobs' name is the command's (hydra.job.name)
    assert "sweep w/sweeps/slurm: 2 jobs, 2 finished, 0 failed" in out
    for job in ("0", "1"):
        d = tmp_path / "w" / "sweeps" / "slurm" / job
        assert json.loads((d / "job.json").read_text())["status"] == "ok"
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 10 and (d / "checkpoints" / "last.pt").is_file()
    assert any((tmp_path / "w" / "sweeps" / "slurm" / ".submitit").rglob("*_log.out"))  # SLURM's own logs
    report = subprocess.run(
        [CARLOS, "report", "w/sweeps/slurm"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    rows = [line for line in report.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and all("| 10 |" in row for row in rows)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(0.2)


def test_scancel_leaves_a_loadable_checkpoint_and_resume_auto_continues_the_sweep(tmp_path):
    import torch

    env = _prepared(tmp_path)
    argv = [CARLOS, "train", "-m", *LOCAL, "--workdir", "w", *TINY, "--max_steps", "400", "--ckpt_interval", "50"]
    argv += ["seed=1", "hydra.sweep.dir=w/sweeps/cancel"]
    checkpoints = tmp_path / "w" / "sweeps" / "cancel" / "0" / "checkpoints"
    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(checkpoints.glob("step_*.pt")), 120, "the job's first checkpoint")
        jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.split("\n")
        subprocess.run(["scancel", *[j.split()[0] for j in jobs if j.endswith(" train")]], check=True)
        _wait_for(lambda: not [n for n in squeue_names() if n == "train"], 60, "the cancelled job to end")
    finally:  # without accounting, submitit never learns that the job was cancelled: it would poll forever
        first.kill()
        first.wait()
    stopped = torch.load(checkpoints / "last.pt", weights_only=True)["carlos"]["step"]
    assert 0 < stopped < 400
    p = subprocess.run([*argv, "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert torch.load(checkpoints / "last.pt", weights_only=True)["carlos"]["step"] == 400
    records = [json.loads(line) for line in (checkpoints.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # every step once, across the cancel


def test_a_second_job_on_a_training_workdir_is_refused_by_its_lock(tmp_path):
    env = _prepared(tmp_path)
    train = f"{CARLOS} train --workdir w {' '.join(TINY)} --max_steps 100000 --ckpt_interval 50"
    sbatch = ["sbatch", "--parsable", "-c", "1", "--mem=1G", "-t", "5", "-D", str(tmp_path)]
    first = subprocess.run(
        [*sbatch, "-o", "first.log", "--wrap", train], env=env, capture_output=True, text=True, check=True
    )
    try:
        _wait_for(lambda: any((tmp_path / "w" / "checkpoints").glob("step_*.pt")), 120, "the first job's checkpoint")
        short = train.replace("--max_steps 100000", "--max_steps 5")
        second = subprocess.run([*sbatch, "-o", "second.log", "--wrap", short], env=env, capture_output=True, text=True)
        job = second.stdout.strip()
        _wait_for(lambda: job not in " ".join(squeue_ids()), 120, "the second job to end")
    finally:
        subprocess.run(["scancel", first.stdout.strip()], check=False)
    lines = (tmp_path / "second.log").read_text().strip().splitlines()
    assert lines[-1].startswith("carlos: error: w is in use by carlos train (pid "), lines
    assert "wait for it to finish or stop it, or use another --workdir, or train beside it with --run NAME" in lines[-1]
