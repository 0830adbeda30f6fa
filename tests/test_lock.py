"""One writer per workdir (carlos/lock.py): a second prepare or train is refused naming the holder, a
lock left by kill -9 blocks nothing, sweep jobs share the prepared data, and a refused command leaves
no lock file behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carlos.errors import CarlosError
from carlos.lock import LOCK, DirLock

from .conftest import make_corpus

CARLOS = str(Path(sys.executable).parent / "carlos")
HOLD = "import sys, time; from carlos.lock import DirLock; DirLock(sys.argv[1], 'train', shared=sys.argv[2] == 'shared').acquire(); print('held', flush=True); time.sleep(60)"  # noqa: E501


def hold(directory: Path, shared: bool = False) -> subprocess.Popen:
    """Another process holding directory's lock until it is killed."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), "shared" if shared else "exclusive"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(CarlosError) as refused:
            DirLock(tmp_path, "prepare").acquire()
        assert f"is in use by carlos train (pid {holder.pid} on {socket.gethostname()}, since" in str(refused.value)
        with pytest.raises(CarlosError, match="is in use"):
            DirLock(tmp_path, "train", shared=True).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_kill_9_does_not_block(tmp_path):
    holder = hold(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK).exists()  # the file stays; the operating system's lock died with the process
    with DirLock(tmp_path, "prepare"):
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK).read_text()
    assert not (tmp_path / LOCK).exists()


def test_sweep_jobs_share_the_data_and_exclude_a_writer(tmp_path):
    other_job = hold(tmp_path, shared=True)
    try:
        with DirLock(tmp_path, "train (sweep job)", shared=True), pytest.raises(CarlosError, match="is in use"):
            DirLock(tmp_path, "prepare").acquire()
        assert (tmp_path / LOCK).exists()  # still held by the other job
    finally:
        other_job.kill()
        other_job.wait()
    with DirLock(tmp_path, "prepare"):
        pass
    assert not (tmp_path / LOCK).exists()


def test_the_other_ranks_of_a_ddp_run_take_no_lock(tmp_path, monkeypatch):
    """Rank 0 holds the run's lock; a rank started for it (LOCAL_RANK=1) works under it."""
    from carlos import train as train_module

    taken = []
    monkeypatch.setattr(train_module, "DirLock", lambda *a, **k: taken.append(a) or DirLock(*a, **k))
    monkeypatch.setattr(train_module, "plan_run", lambda *a: (_ for _ in ()).throw(CarlosError("stop here")))
    make_corpus(tmp_path / "c.txt")
    from .conftest import prepare_workdir, train_cfg

    prepare_workdir(tmp_path / "c.txt", tmp_path / "w")
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(CarlosError, match="stop here"):
        train_module.train(train_cfg(tmp_path / "w", *ddp))
    assert taken == []
    # one process is its own leader, whatever LOCAL_RANK the environment happens to hold
    with pytest.raises(CarlosError, match="stop here"):
        train_module.train(train_cfg(tmp_path / "w"))
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(CarlosError, match="stop here"):
        train_module.train(train_cfg(tmp_path / "w", *ddp))
    assert [a[0] for a in taken] == [tmp_path / "w"] * 4  # the data (shared) and the run, twice


def _carlos(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([CARLOS, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_no_second_writer_while_a_run_trains_and_none_blocked_after_kill_9(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    prep = ["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"]
    assert _carlos(prep, tmp_path).wait() == 0
    tiny = ["model.d_model=32", "model.n_heads=2", "--micro_batch_size", "4", "--sample_tokens", "4"]
    trainer = _carlos(["train", "--workdir", "w", *tiny, "--max_steps", "100000", "--ckpt_interval", "20"], tmp_path)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "w" / "checkpoints").glob("step_*.pt")):
            assert time.time() < deadline and trainer.poll() is None, trainer.stderr.read().decode()
            time.sleep(0.2)
        # the checkpoints written so far (not the temporary file of one being written, which comes and goes)
        names = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if not p.name.startswith("."))
        for second in (
            [*prep, "--overwrite"],
            ["train", "--workdir", "w", *tiny, "--overwrite"],
            ["train", "--workdir", "w", *tiny, "--resume"],
        ):
            p = _carlos(second, tmp_path)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 2, err
            assert err.decode().strip() == err.decode().strip().splitlines()[0]
            assert f"w is in use by carlos train (pid {trainer.pid} on {socket.gethostname()}" in err.decode()
        assert set(names) <= {p.name for p in (tmp_path / "w" / "checkpoints").iterdir()}  # nothing deleted
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    resumed = _carlos(["train", "--workdir", "w", *tiny, "--resume", "--max_steps", "3"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert not (tmp_path / "w" / LOCK).exists()
