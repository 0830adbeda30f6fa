"""Every key of every command's config, given values of the wrong type, out of range and at the extremes:
each is either refused in one line (exit code 2, no traceback) before anything is written, so that every
file keeps its name and its bytes, or accepted and run without a traceback.

The commands run in-process (carlos.cli.main) in a copy of a template: a corpus and a workdir `w`
prepared and trained 2 steps. train runs with --overwrite on `w`, the most sensitive case: a value
refused late would already have deleted the old run. An accepted value runs for real with tiny
settings; one that makes a command run on (sample 10**23 tokens) is stopped by a timer and counts as
accepted. bench's real work is minutes of measurements in subprocesses: an accepted bench value stops
where that work begins."""

from __future__ import annotations

import hashlib
import shutil
import signal
import sys
from pathlib import Path

import pytest

from carlos.cli import main
from carlos.compose import compose
from carlos.config import config_keys

from .conftest import make_corpus

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM stops long runs")]

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64"]
TINY_RUN = [*TINY, "--micro_batch_size", "4", "--eval_interval", "2", "--ckpt_interval", "2"]
TINY_RUN += ["--log_interval", "1", "--sample_tokens", "4", "--warmup_steps", "1"]
BASE = {
    "prepare": ["--input", "corpus.txt", "--workdir", "w", "--seq_len", "32", "--overwrite"],
    "train": ["--workdir", "w", *TINY_RUN, "--max_steps", "2", "--max_time", "6", "--overwrite"],
    "eval": ["--workdir", "w"],
    "sample": ["--workdir", "w", "--max_new_tokens", "4"],
    "export": ["--workdir", "w", "--out", "exported"],
    "bench": ["--workdir", "b", "output=null", "rounds=0"],
}
VALUES = [
    "abc",
    "''",
    "[1,2]",
    "{a: 1}",
    "null",
    "true",
    "-1",
    "0",
    "2.5",
    "1e-300",
    "1e308",
    "-1e308",
    "inf",
    "-inf",
    "nan",
    "99999999999999999999999",
    "-99999999999999999999999",
    "'\\ud800'",
    "'${x}'",
]
LONG_RUN = 99  # the exit code of a run the timer stopped: it was accepted and still running


def keys(command: str) -> list[str]:
    return list(config_keys(compose(command, [])))


CASES = [(command, key, value) for command in BASE for key in keys(command) for value in VALUES]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("values")
    make_corpus(root / "corpus.txt")
    cwd = Path.cwd()
    try:
        import os

        os.chdir(root)
        main(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"])
        main(["train", "--workdir", "w", *TINY_RUN, "--max_steps", "2"])
    finally:
        os.chdir(cwd)
    return root


def files(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def _stop(signum, frame):
    raise SystemExit(LONG_RUN)


@pytest.mark.parametrize("command, key, value", CASES, ids=[f"{c}-{k}={v}" for c, k, v in CASES])
def test_a_value_is_refused_in_one_line_before_writing_or_runs(
    command, key, value, template, tmp_path, monkeypatch, capsys
):
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("CARLOS_DEBUG", raising=False)
    if command == "bench":  # its work is measurements in subprocesses: an accepted value stops there
        import carlos.bench

        monkeypatch.setattr(carlos.bench, "_prepare", lambda *a, **k: sys.exit(0))
    before = files(tmp_path)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with pytest.raises(SystemExit) as exit_:
            main([command, *BASE[command], f"{key}={value}"])
            raise SystemExit(0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    code = exit_.value.code
    assert code in (0, 2, LONG_RUN), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("carlos: error: "), err
        assert files(tmp_path) == before, f"refused after writing: {lines[0]}"
    else:
        assert "carlos: error" not in err, err


HYDRA = [
    (["train", "hydra.run.dir=/proc/nope"], "cannot be created"),
    (["train", "hydra.run.dir=corpus.txt"], "is a file, not a directory"),
    (["eval", "hydra.run.dir=corpus.txt/inside"], "cannot be created"),
    (["sample", "hydra.run.dir=/dev/null/x"], "cannot be created"),
    (["train", "-m", "hydra.sweep.dir=corpus.txt"], "is a file, not a directory"),
    (["train", "-m", "hydra.sweep.dir=/proc/nope/sweep"], "cannot be created"),
    (["train", "hydra.foo=1"], "unknown key 'hydra.foo'"),
    (["prepare", "hydra.job.nme=x"], "unknown key 'hydra.job.nme'"),
    (["train", "-m", "hydra/launcher=nope"], "choose hydra/launcher=basic"),
    (["train", "-m", "hydra/sweeper=optuan"], "did you mean 'optuna'"),
    (["train", "hydra.run.dir='${nowhere}'"], "hydra.run.dir"),
]


@pytest.mark.parametrize("argv, expect", HYDRA, ids=[" ".join(a) for a, _ in HYDRA])
def test_hydras_own_keys_are_refused_in_one_line_before_writing(argv, expect, template, tmp_path, monkeypatch, capsys):
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], *BASE[argv[0]], *argv[1:]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("carlos: error: "), lines
    assert expect in lines[0], lines[0]
    assert files(tmp_path) == before
