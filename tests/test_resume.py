"""Resume equivalence: a run stopped by SIGTERM, or killed by SIGKILL after a checkpoint, then resumed,
ends with the same final validation loss as an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import make_corpus

CARLOS = str(Path(sys.executable).parent / "carlos")
RUN = [
    "--max_steps",
    "240",
    "--eval_interval",
    "80",
    "--ckpt_interval",
    "20",
    "--log_interval",
    "1",
    "--sample_tokens",
    "0",
    "--micro_batch_size",
    "4",
    "--grad_accum_steps",
    "2",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    return {**env, "WANDB_MODE": "disabled"}


def _prepare(tmp_path: Path, name: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        make_corpus(corpus)
    workdir = tmp_path / name
    subprocess.run(
        [CARLOS, "prepare", "--input", str(corpus), "--workdir", str(workdir), "--seq_len", "32"],
        check=True,
        capture_output=True,
        env=_env(),
    )
    return workdir


def _train(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CARLOS, "train", "--workdir", str(workdir), *RUN, *extra], capture_output=True, text=True, env=_env()
    )


def _final_val(workdir: Path) -> tuple[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), "a step repeats after resuming"
    return val[-1]["step"], val[-1]["val_loss"]


def _interrupt(workdir: Path, until, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Start a run, wait until until() holds, send sig, and wait for the process to end."""
    p = subprocess.Popen(
        [CARLOS, "train", "--workdir", str(workdir), *RUN, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.time() + 120
    while not until() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:
        return 0


def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(tmp_path):
    whole = _prepare(tmp_path, "whole")
    p = _train(whole)
    assert p.returncode == 0, p.stderr
    reference = _final_val(whole)
    assert reference[0] == 240

    # SIGTERM mid-run: the run writes a checkpoint where it stops, says so, and exits 143
    termed = _prepare(tmp_path, "termed")
    p = _interrupt(termed, lambda: _logged_step(termed) >= 30, signal.SIGTERM)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "stopped by SIGTERM at step" in p.stdout
    import torch

    stopped = torch.load(termed / "checkpoints" / "last.pt", weights_only=True)["carlos"]["step"]
    assert 30 <= stopped < 240
    assert (termed / "checkpoints" / f"step_{stopped:06d}.pt").exists()
    p = _train(termed, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"resuming from {termed / 'checkpoints' / 'last.pt'} at step {stopped}" in p.stdout
    step, loss = _final_val(termed)
    assert step == 240 and abs(loss - reference[1]) < 1e-6

    # SIGKILL right after a checkpoint: nothing can be written, the resume starts from that checkpoint
    killed = _prepare(tmp_path, "killed")
    p = _interrupt(killed, lambda: (killed / "checkpoints" / "step_000100.pt").exists(), signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    p = _train(killed, "--resume")
    assert p.returncode == 0, p.stderr
    step, loss = _final_val(killed)
    assert step == 240 and abs(loss - reference[1]) < 1e-6


def test_ctrl_c_stops_with_a_checkpoint(tmp_path):
    workdir = _prepare(tmp_path, "interrupted")
    p = _interrupt(workdir, lambda: _logged_step(workdir) >= 10, signal.SIGINT)
    assert p.returncode == 128 + signal.SIGINT, p.stderr
    assert "Ctrl+C: stopping after this step" in p.stdout and "stopped by SIGINT at step" in p.stdout
    import torch

    step = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["carlos"]["step"]
    assert 10 <= step < 240 and step == _logged_step(workdir)


def test_a_muon_run_resumes_exactly_and_only_with_muon(tmp_path):
    whole, split = _prepare(tmp_path, "whole"), _prepare(tmp_path, "split")
    tiny = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "optimizer=muon"]
    assert _train(whole, *tiny).returncode == 0
    stopped = _interrupt(split, lambda: _logged_step(split) >= 100, signal.SIGTERM, *tiny)
    assert stopped.returncode == 143, stopped.stderr
    other = _train(split, *tiny[:-1], "optimizer=adamw", "--resume")
    assert other.returncode == 2 and other.stderr == (
        "carlos: error: cannot resume: the checkpoint was trained with carlos.optimization.MuonWithAdamW, this run "
        "would use torch.optim.AdamW; pass optimizer=muon to continue it, or start over with --overwrite\n"
    )
    resumed = _train(split, *tiny, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _final_val(split) == pytest.approx(_final_val(whole), abs=1e-6)
