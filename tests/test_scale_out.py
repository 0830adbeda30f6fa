"""Scaling out, for real on one machine: multirun sweeps with a failing job, the report, Optuna,
submitit's local launcher, the SLURM submission script and its signal path, and DDP on 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import make_corpus

CARLOS = str(Path(sys.executable).parent / "carlos")
QUICK = [
    "trainer.max_steps=8",
    "eval_interval=4",
    "ckpt_interval=4",
    "log_interval=2",
    "sample.tokens=8",
    "data.micro_batch_size=4",
    "schedule.warmup_steps=2",
]

pytestmark = pytest.mark.slow


def run(args, cwd, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    return subprocess.run(
        args,
        cwd=cwd,
        env={**e, "WANDB_MODE": "disabled", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def prepared(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    p = run([CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "W", "--seq_len", "32"], tmp_path)
    assert p.returncode == 0, p.stderr
    return tmp_path


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _sweep_dirs(workdir: Path) -> list[Path]:
    return sorted((workdir / "sweeps").iterdir())


def test_multirun_jobs_write_their_own_dirs_and_a_failure_does_not_stop_the_sweep(prepared):
    # the second value of the sweep is refused inside its job (the up-front check sees only the first)
    p = run([CARLOS, "train", "-m", "workdir=W", *QUICK, "optimizer.lr=3e-3,-1,1e-3"], prepared)
    assert p.returncode == 1, p.stderr
    (sweep,) = _sweep_dirs(prepared / "W")
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == ["0", "1", "2"]
    for job in ("0", "2"):
        d = sweep / job
        assert {"metrics.jsonl", "checkpoints", "samples", ".hydra", "job.json"} <= {x.name for x in d.iterdir()}
        steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 8
        assert json.loads((d / "job.json").read_text())["status"] == "ok"
        assert (d / "checkpoints" / "step_000008.pt").exists()
    failed = json.loads((sweep / "1" / "job.json").read_text())
    assert failed["status"] == "failed" and "optimizer.lr" in failed["error"]
    assert not (sweep / "1" / "checkpoints").exists()
    assert f"sweep W/sweeps/{sweep.name}: 3 jobs, 2 finished, 1 failed" in p.stdout
    assert "job 1 (optimizer.lr=-1): FAILED: optimizer.lr (--peak_lr) must be a number > 0" in p.stdout
    # nothing written beside the workdir, nothing of a run in the workdir itself
    assert sorted(x.name for x in prepared.iterdir()) == ["W", "corpus.txt"]
    assert not (prepared / "W" / "checkpoints").exists() and not (prepared / "W" / "metrics.jsonl").exists()

    # the report: one row a finished run, best first, the swept key as a column, and a plot
    p = run([CARLOS, "report", str(prepared / "W" / "sweeps")], prepared)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "| run | optimizer.lr | steps | tokens | best val bpb | tokens/s |"
    rows = [line.split(" | ") for line in lines[2:4]]
    bpbs = [float(r[4]) for r in rows]
    assert bpbs == sorted(bpbs) and {r[1] for r in rows} == {"0.003", "0.001"}
    assert rows[0][2] == "8" and rows[0][3] == "1,024"
    assert any(line.startswith("failed: 1 (") for line in lines)
    png = prepared / "W" / "sweeps" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a single run directory works too
    p = run([CARLOS, "report", str(sweep / "0"), "--output", "one.png"], prepared)
    assert p.returncode == 0 and "| 0 | 8 | 1,024 |" in p.stdout and (prepared / "one.png").exists()


def test_ddp_inside_a_multirun_job_is_refused_naming_the_launcher(prepared):
    args = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    p = run([CARLOS, "train", "-m", "workdir=W", *QUICK, *args], prepared)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "cannot run inside a multirun job" in p.stderr and "hydra/launcher=submitit_slurm" in p.stderr
    assert not (prepared / "W" / "sweeps").exists()


@pytest.mark.skipif(not _has("hydra_plugins.hydra_optuna_sweeper"), reason="needs the carlos[sweep] extra")
def test_optuna_sweep_stores_its_study_under_the_workdir_and_resumes_it(prepared):
    import optuna

    # the default search space (lr, warmup, micro-batch): keys given on the command line would be fixed
    quick = [a for a in QUICK if not a.startswith(("data.micro_batch_size", "schedule.warmup_steps"))]
    args = [CARLOS, "train", "-m", "hydra/sweeper=optuna", "workdir=W", *quick, "hydra.sweeper.sampler.seed=0"]
    p = run([*args, "hydra.sweeper.n_trials=2"], prepared)
    assert p.returncode == 0, p.stdout + p.stderr
    storage = f"sqlite:///{prepared / 'W' / 'optuna.db'}"
    study = optuna.load_study(study_name="carlos-train", storage=storage)
    assert len(study.trials) == 2 and set(study.best_params) == {
        "optimizer.lr",
        "schedule.warmup_steps",
        "data.micro_batch_size",
    }
    # the objective is the best val bpb the run wrote
    best_job = min(study.trials, key=lambda t: t.value).number
    (sweep,) = _sweep_dirs(prepared / "W")
    job = json.loads((sweep / str(best_job) / "job.json").read_text())
    assert job["objective"] == pytest.approx(study.best_value)
    # the same command again continues the same study
    p = run([*args, "hydra.sweeper.n_trials=1"], prepared)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(optuna.load_study(study_name="carlos-train", storage=storage).trials) == 3


@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"), reason="needs the carlos[sweep] extra")
def test_submitit_local_launcher_runs_two_jobs(prepared):
    p = run(
        [CARLOS, "train", "-m", "hydra/launcher=submitit_local", "workdir=W", *QUICK, "optimizer.lr=3e-3,1e-3"],
        prepared,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (sweep,) = _sweep_dirs(prepared / "W")
    for job in ("0", "1"):
        assert json.loads((sweep / job / "job.json").read_text())["status"] == "ok"
        assert (sweep / job / "checkpoints" / "last.pt").exists()
    assert (sweep / ".submitit").is_dir()
    assert "2 jobs, 2 finished, 0 failed" in p.stdout


@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"), reason="needs the carlos[sweep] extra")
def test_slurm_submission_script(tmp_path, monkeypatch):
    """The sbatch script submitit writes for conf/hydra/launcher/submitit_slurm.yaml, built the way the
    plugin's launcher builds its executor (no cluster needed)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    launcher = OmegaConf.to_container(compose_hydra_launcher(tmp_path), resolve=False)
    launcher.pop("_target_")
    launcher["submitit_folder"] = str(tmp_path / "%j")
    assert launcher["max_num_timeout"] >= 1 and launcher["signal_delay_s"] == 120
    executor = submitit.AutoExecutor(
        folder=launcher.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=launcher.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    launcher["name"] = "train"
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --mem=32GB",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, f"{line} not in:\n{script}"


def compose_hydra_launcher(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from carlos.compose import conf_dir, ready_hydra

    GlobalHydra.instance().clear()
    ready_hydra()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(
                config_name="train",
                overrides=[
                    "hydra/launcher=submitit_slurm",
                    "hydra.launcher.partition=gpu",
                    "hydra.launcher.tasks_per_node=2",
                    "hydra.launcher.gpus_per_node=2",
                    "trainer.devices=2",
                ],
                return_hydra_config=True,
            )
            assert cfg.trainer.devices == 2
            return cfg.hydra.launcher
    finally:
        GlobalHydra.instance().clear()


SUBMITIT_LIKE = """
import os, signal, sys
from pathlib import Path
import torch
WORKDIR = Path(sys.argv[1])
def requeue(signum, frame):
    # what submitit's handler does on rank 0: checkpoint the callable, requeue the job, exit
    last = WORKDIR / "checkpoints" / "last.pt"
    step = torch.load(last, weights_only=True)["carlos"]["step"] if last.exists() else None
    (WORKDIR / "requeued.json").write_text(str(step))
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)
from carlos.cli import main
main(["train", "--workdir", sys.argv[1], *sys.argv[2:]])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_time_limit_signal_writes_last_pt_then_requeue_resumes(prepared):
    """The SLURM path without a cluster: the job gets submitit's warning signal (USR2), carlos writes
    last.pt and hands over to the previous handler (submitit's requeue); the requeued job (SLURM sets
    SLURM_RESTART_COUNT) continues from last.pt without being told to resume."""
    workdir = prepared / "W"
    args = ["trainer.max_steps=400", "eval_interval=200", "ckpt_interval=200", "log_interval=1", "sample.tokens=0"]
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBMITIT_LIKE, str(workdir), *args],
        cwd=prepared,
        env={**e, "WANDB_MODE": "disabled"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert "stopped by SIGUSR2 at step" in out, out + err
    assert (workdir / "requeued.json").exists(), out + err
    step = int((workdir / "requeued.json").read_text())  # last.pt existed when the requeue handler ran
    assert 20 <= step < 400
    assert torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["carlos"]["step"] == step

    p = run([CARLOS, "train", "--workdir", "W", *args], prepared, env={"SLURM_RESTART_COUNT": "1"})
    assert p.returncode == 0, p.stderr
    assert f"at step {step}" in p.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 400


@pytest.mark.skipif(sys.platform == "win32", reason="DDP test uses POSIX process handling")
def test_ddp_two_cpu_processes(prepared):
    args = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *QUICK]
    p = run([CARLOS, "train", "--workdir", "W", *args], prepared, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    workdir = prepared / "W"
    # 2 ranks x 4 windows x 32 tokens a step, reported once for both ranks together
    assert "256 tokens per optimizer step" in p.stdout
    assert p.stdout.count("done: 8 steps, 2,048 tokens") == 1
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train_loss" in r]
    assert train_steps == [2, 4, 6, 8] and [r["tokens"] for r in records if "train_loss" in r][-1] == 2048
    assert sorted(x.name for x in (workdir / "samples").iterdir()) == ["step_000004.txt", "step_000008.txt"]
    assert sorted(x.name for x in (workdir / "checkpoints").iterdir()) == [
        "best.pt",
        "last.pt",
        "step_000004.pt",
        "step_000008.pt",
    ]
    # no Hydra output directories from the second rank, here or in the workdir
    assert sorted(x.name for x in prepared.iterdir()) == ["W", "corpus.txt"]
    assert not list(workdir.rglob(".pl_hydra*")) and not (workdir / "outputs").exists()
    assert sorted(x.name for x in (workdir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


@pytest.mark.skipif(sys.platform == "win32", reason="DDP test uses POSIX process handling")
def test_ddp_under_a_time_budget_stops_every_rank_at_the_same_step(prepared):
    # each rank keeps its own clock: unless they agree, one stops (and validates) while the other trains
    # on, and both wait for each other forever. The budget is the wall time from the command's start: the
    # ranks' start-up and their first step (17 s and 10 s here, under the other test worker's load) are in it
    args = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "--max_time", "40"]
    quiet = ["eval_interval=100000", "ckpt_interval=100000", "log_interval=5", "sample.tokens=0"]
    p = run([CARLOS, "train", "--workdir", "W", *args, *quiet, "data.micro_batch_size=4"], prepared, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done: ") == 1
    records = [json.loads(x) for x in (prepared / "W" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] > 20 and "val_loss" in records[-1]
