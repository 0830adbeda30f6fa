"""A real full disk: a small tmpfs mounted for the test (root on Linux; skipped elsewhere), filled to leave
a few bytes to a few hundred KB free, so that a different write runs out each time (the config snapshot,
metrics.jsonl, a sample, torch.save of a checkpoint, the copy to last.pt, prepare's data). Each time:
one line naming the file and "No space left on device", exit code 2, no temporary file left, the lock
released, and every checkpoint that is there loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint
from carlos.cli import main
from carlos.lock import LOCK
from carlos.workdir import PreparedData

from .conftest import make_corpus

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="tmpfs")]
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
RUN = [*TINY, "--eval_interval", "2", "--ckpt_interval", "2", "--log_interval", "1", "--sample_tokens", "64"]


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 32 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """A file that takes all but `leave` bytes of the disk."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def no_temporaries(d: Path) -> None:
    left = [p.relative_to(d).as_posix() for p in d.rglob("*") if ".tmp-" in p.name or p.name.startswith(".prepare-")]
    assert not left, f"temporary files left behind: {left}"
    assert not (d / LOCK).exists()


def refused_for_space(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("carlos:")]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "(No space left on device); free some space" in lines[0], err
    return lines[0]


@pytest.mark.parametrize("leave", [0, 8 << 10, 16 << 10, 24 << 10, 40 << 10, 200 << 10, 400 << 10, 600 << 10])
def test_train_on_a_full_disk_stops_in_one_line_and_keeps_what_was_written(disk, leave, monkeypatch, capsys):
    make_corpus(disk.parent / "corpus.txt")
    monkeypatch.chdir(disk)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["prepare", "--input", str(disk.parent / "corpus.txt"), "--workdir", "w", "--seq_len", "32"])
    fill(disk, leave)
    message = refused_for_space(["train", "--workdir", "w", *RUN, "--max_steps", "40"], capsys)
    no_temporaries(disk / "w")
    for ckpt in (disk / "w" / "checkpoints").glob("*.pt") if (disk / "w" / "checkpoints").exists() else []:
        weights = load_checkpoint(ckpt)["state_dict"].values()
        assert all(torch.isfinite(t).all() for t in weights), ckpt.name
    PreparedData.load(disk / "w")  # the prepared data is untouched
    # space again: the run resumes (or starts over, when no checkpoint was written) and finishes
    (disk / "filler").unlink()
    resume = "--resume" if (disk / "w" / "checkpoints" / "last.pt").exists() else "--overwrite"
    main(["train", "--workdir", "w", *RUN, "--max_steps", "40", resume])
    assert load_checkpoint(disk / "w" / "checkpoints" / "last.pt")["carlos"]["step"] == 40, message


@pytest.mark.parametrize("leave", [0, 20 << 10, 60 << 10, 120 << 10])
@pytest.mark.parametrize("again", [False, True], ids=["new-workdir", "prepared-before"])
def test_prepare_on_a_full_disk_stops_in_one_line_and_leaves_no_trace(disk, leave, again, monkeypatch, capsys):
    make_corpus(disk.parent / "corpus.txt", n_lines=3000)  # ~120 KB
    make_corpus(disk.parent / "other.txt", n_lines=3000, seed=1)
    monkeypatch.chdir(disk)
    prep = ["prepare", "--workdir", "w", "--seq_len", "32", "--overwrite"]
    if again:
        main([*prep, "--input", str(disk.parent / "corpus.txt")])
        before = {p: p.read_bytes() for p in (disk / "w").rglob("*") if p.is_file()}
    fill(disk, leave)
    refused_for_space([*prep, "--input", str(disk.parent / "other.txt")], capsys)
    if again:
        assert {p: p.read_bytes() for p in (disk / "w").rglob("*") if p.is_file()} == before
        no_temporaries(disk / "w")
    else:
        assert not (disk / "w").exists()
    shutil.rmtree(disk / "w", ignore_errors=True)
