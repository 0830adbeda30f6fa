"""Whose directory this is (carlos/ownership.py): every directory carlos writes has one kind recorded in it,
a command writes only into a directory of its own kind or a new one and never among another directory's
outputs, whatever path or symlink names it; a run is locked on its directory, not on the name that
reached it; --overwrite never takes the new run's logger files; an export is installed whole or not at
all. Every refusal is one line, exit code 2, with every file and directory as it was."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carlos.cli import main
from carlos.errors import Stopped
from carlos.files import write_error
from carlos.lock import DirLock
from carlos.manifest import RECORD, Manifest
from carlos.ownership import RUN_LOCK, kinds_of, misplaced

from .conftest import copy_trained

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
TINY += ["--eval_interval", "2", "--ckpt_interval", "2", "--sample_tokens", "4", "--warmup_steps", "1"]
TINY += ["model.pos=learned"]  # the model of the session's trained fixture, which w's own run is
CARLOS = str(Path(sys.executable).parent / "carlos")


@pytest.fixture(scope="module")
def site(trained, tmp_path_factory) -> Path:
    """corpus.txt; w: prepared (seq_len 32), its own run (4 steps, checkpoints at 2 and 4: the session's
    trained fixture) and run A (2 steps); e: a safetensors export of w's best; job and bench: a sweep
    job's and a bench's directories, their records made by hand (a real sweep or bench takes far longer)."""
    root = copy_trained(trained, tmp_path_factory.mktemp("ownership"))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        main(["train", "--workdir", "w", "--run", "A", *TINY, "--max_steps", "2"])
        main(["export", "--workdir", "w", "--out", "e"])
    finally:
        os.chdir(cwd)
    for name, kind, file in (("job", "job", "job.json"), ("bench", "bench", "corpus.txt")):
        (root / name).mkdir()
        Manifest(root / name, kind=kind).write(root / name / file, lambda f: f.write(b"{}\n"))
    return root


@pytest.fixture
def d(site, tmp_path, monkeypatch) -> Path:
    """A copy of the site to change, as the current directory."""
    copy = tmp_path / "site"
    shutil.copytree(site, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return copy


def state(d: Path) -> dict[str, str]:
    """Every file's sha256 (the records included), every directory and every symlink's target, under d."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def refused(argv: list[str], capsys, expect: str, d: Path) -> str:
    """argv is refused in one line holding expect, and nothing under d changed."""
    before = state(d)
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("carlos: error: "), err
    assert expect in lines[0], lines[0]
    assert state(d) == before
    return lines[0]


# ---------------------------------------------------------------- one kind per directory

EXPORT = ["export", "--workdir", "w", "--out"]
PREPARE = ["prepare", "--input", "corpus.txt", "--workdir"]
ANOTHER_KIND = [
    (EXPORT, "w", "--out w is a workdir (prepared data and its run), not an exported model"),
    (EXPORT, "w/runs/A", "is a named run's directory, not an exported model"),
    (EXPORT, "job", "is a sweep job's directory, not an exported model"),
    (EXPORT, "bench", "is carlos bench's directory, not an exported model"),
    (PREPARE, "w/runs/A", "is a named run's directory, not a workdir"),
    (PREPARE, "e", "is an exported model, not a workdir"),
    (PREPARE, "job", "is a sweep job's directory, not a workdir"),
    (PREPARE, "bench", "is carlos bench's directory, not a workdir"),
    (["bench", "--workdir"], "w", "is a workdir (prepared data and its run), not carlos bench's"),
    (["bench", "--workdir"], "e", "is an exported model, not carlos bench's"),
]
AMONG_OUTPUTS = [
    (EXPORT, "w/checkpoints", "--out w/checkpoints is workdir w's checkpoints/, among its own outputs"),
    (EXPORT, "w/data", "is workdir w's data/, among its own outputs"),
    (EXPORT, "w/samples", "is workdir w's samples/"),
    (EXPORT, "w/.hydra", "is workdir w's .hydra/"),
    (EXPORT, "w/data/new", "is inside workdir w's data/"),
    (EXPORT, "w/runs", "is workdir w's runs/, which holds its named runs, each in runs/NAME"),
    (EXPORT, "w/runs/new", "is inside workdir w's runs/, which holds its named runs"),
    (EXPORT, "w/runs/A/checkpoints", "is named run w/runs/A's checkpoints/"),
    (EXPORT, "w/csv", "is workdir w's csv/"),  # a logger's, even before one wrote there
    (EXPORT, "w/./checkpoints", "is workdir w's checkpoints/"),  # other spellings of one place
    (EXPORT, "w/runs/../checkpoints", "is workdir w's checkpoints/"),
    (PREPARE, "w/checkpoints", "--workdir w/checkpoints is workdir w's checkpoints/"),
    (PREPARE, "w/runs/A/samples/x", "is inside named run w/runs/A's samples/"),
    (PREPARE, "w/runs/B", "is inside workdir w's runs/"),
]


@pytest.mark.parametrize(("command", "where", "expect"), ANOTHER_KIND + AMONG_OUTPUTS)
def test_a_command_writes_only_into_a_directory_of_its_own_kind_or_a_new_one(d, capsys, command, where, expect):
    refused([*command, where], capsys, expect, d)


@pytest.mark.slow
def test_a_symlink_leads_where_it_points(d, capsys):
    (d / "ck").symlink_to("w/checkpoints")
    (d / "w" / "runs" / "self").symlink_to("..")
    (d / "w" / "runs" / "toexport").symlink_to("../../e")
    (d / "w" / "runs" / "tojob").symlink_to("../../job")
    at = os.path.realpath(d / "w" / "checkpoints")
    refused(
        [*EXPORT, "ck"], capsys, f"--out ck is workdir w's checkpoints/, among its own outputs (it leads to {at})", d
    )
    train = ["train", "--workdir", "w", *TINY, "--run"]
    refused([*train, "self"], capsys, "--run self: w/runs/self is a workdir (prepared data and its run), not a", d)
    refused([*train, "toexport"], capsys, "is an exported model, not a named run's directory", d)
    refused([*train, "tojob"], capsys, "is a sweep job's directory, not a named run's directory", d)


def test_beside_the_outputs_and_over_an_earlier_export_are_allowed(d, capsys):
    assert run([*EXPORT, "w/exports/hf"], capsys)[0] == 0  # inside a workdir, but not among its outputs
    assert kinds_of(Manifest(d / "w" / "exports" / "hf")) == {"export"}
    (d / "e" / "README.md").write_text("my model card")
    assert run([*EXPORT, "e", "--checkpoint", "last"], capsys)[0] == 0  # an earlier export's directory
    assert (d / "e" / "README.md").read_text() == "my model card"
    assert json.loads((d / "e" / "config.json").read_text())["step"] == 4
    assert run([*PREPARE, "w", "--seq_len", "32", "--overwrite"], capsys)[0] == 0
    assert (d / "w" / "exports" / "hf" / "model.safetensors").is_file()  # not the workdir's to remove
    assert not (d / "w" / "checkpoints").exists()


def test_each_directory_records_its_kind_with_its_first_entry(d, capsys):
    assert [kinds_of(Manifest(d / name)) for name in ("w", "w/runs/A", "e")] == [{"workdir"}, {"run"}, {"export"}]
    assert json.loads((d / "w" / RECORD).read_text().splitlines()[0]) == {"kind": "workdir"}
    # a record an older carlos wrote without its kind is read by the files it names
    (d / "old").mkdir()
    (d / "old" / RECORD).write_text('{"file": "config.json"}\n{"file": "model.safetensors"}\n')
    assert kinds_of(Manifest(d / "old")) == {"export"}
    refused([*PREPARE, "old"], capsys, "--workdir old is an exported model, not a workdir", d)
    assert misplaced(d / "somewhere" / "new", "export") is None


@pytest.mark.slow
def test_an_export_an_older_carlos_left_in_checkpoints_does_not_keep_the_earlier_runs_steps(d, capsys):
    """That export's own record in checkpoints/ used to answer for the directory, so train --overwrite
    left the earlier run's step files, and eval --checkpoint 4 scored the earlier run's step 4."""
    ck = d / "w" / "checkpoints"
    (ck / RECORD).write_text('{"file": "config.json"}\n{"file": "model.safetensors"}\n')
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes(b"x")
    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "2", "--overwrite"], capsys)[0] == 0
    kept = [RECORD, "config.json", "model.safetensors"]  # not the run's: left where they were
    assert sorted(p.name for p in ck.iterdir()) == sorted([*kept, "best.pt", "last.pt", "step_000002.pt"])
    code, _, err = run(["eval", "--workdir", "w", "--checkpoint", "4"], capsys)
    assert code == 2 and "not found" in err


# ---------------------------------------------------------------- one run, one lock, whatever its name


@pytest.mark.slow
def test_a_run_is_locked_on_its_directory_whatever_name_reaches_it(d, capsys):
    (d / "w" / "runs" / "latest").symlink_to("A")
    (d / "wlink").symlink_to("w")
    train = ["train", *TINY]
    with DirLock(d / "w" / "runs" / "A", "train --run A", name=RUN_LOCK):  # as a run of A in another process
        for argv in (
            ["--workdir", "w", "--run", "latest", "--overwrite"],
            ["--workdir", "wlink", "--run", "A", "--resume"],
            ["--workdir", "wlink", "--run", "latest", "--resume"],
        ):
            refused([*train, *argv], capsys, "is in use by carlos train --run A (pid", d)
    with DirLock(d / "w", "train", name=RUN_LOCK):  # the workdir's own run
        for argv in (["--workdir", "wlink", "--resume"], ["--workdir", "./w/../w", "--overwrite"]):
            refused([*train, *argv], capsys, "is in use by carlos train (pid", d)
    # a name for a run that does not exist yet: the first run makes its directory and locks it there
    (d / "w" / "runs" / "alias").symlink_to("fresh")
    (d / "w" / "runs" / "fresh").mkdir()
    with DirLock(d / "w" / "runs" / "fresh", "train --run fresh", name=RUN_LOCK):
        refused([*train, "--workdir", "w", "--run", "alias"], capsys, "is in use by carlos train --run fresh", d)


def _carlos(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([CARLOS, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_second_process_cannot_overwrite_a_training_run_through_another_name(d):
    (d / "w" / "runs" / "latest").symlink_to("A")
    steps = sorted(p.name for p in (d / "w" / "runs" / "A" / "checkpoints").iterdir())
    first = _carlos(["train", "--workdir", "w", "--run", "A", "--resume", *TINY, "--max_steps", "100000"], d)
    try:
        deadline = time.time() + 120
        while (
            not (d / "w" / "runs" / "A" / RUN_LOCK).exists() or not (d / "w" / "runs" / "A" / RUN_LOCK).stat().st_size
        ):
            assert time.time() < deadline and first.poll() is None, first.stderr.read().decode()
            time.sleep(0.1)
        second = _carlos(["train", "--workdir", "w", "--run", "latest", "--overwrite", *TINY, "--max_steps", "2"], d)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err.decode()
        assert f"run latest of w is in use by carlos train --run A (pid {first.pid}" in err.decode()
        assert set(steps) <= {p.name for p in (d / "w" / "runs" / "A" / "checkpoints").iterdir()}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# ---------------------------------------------------------------- the loggers' directories


def tensorboard_steps(log_dir: Path) -> list[int]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return sorted({e.step for tag in events.Tags()["scalars"] for e in events.Scalars(tag)})


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_overwrite_keeps_the_new_runs_logger_files_and_only_them(d, capsys, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train = ["train", "--workdir", "w", *TINY, f"logger={logger}"]
    assert run([*train, "--max_steps", "4", "--overwrite"], capsys)[0] == 0
    assert run([*train, "--max_steps", "2", "--overwrite"], capsys)[0] == 0
    out = d / "w" / logger
    assert Manifest(d / "w").entries[logger] == "tree"
    if logger == "csv":
        with open(out / "metrics.csv", newline="") as f:
            assert max(int(row["step"]) for row in csv.DictReader(f)) == 2
    elif logger == "tensorboard":
        assert len(list(out.glob("events.out.tfevents.*"))) == 1 and tensorboard_steps(out)[-1] == 2
    else:
        (offline,) = out.glob("offline-run-*")  # the earlier run's went with it
        assert list(offline.glob("*.wandb"))


@pytest.mark.parametrize(
    ("logger", "setup", "expect"),
    [
        ("csv", lambda w: (w / "csv").write_text("mine"), "w/csv is a file carlos did not make, where carlos keeps a"),
        ("wandb", lambda w: (w / "wandb").write_text("mine"), "w/wandb is a file carlos did not make"),
        ("tensorboard", lambda w: (w / "tensorboard").mkdir() or (w / "tensorboard" / "notes.txt").write_text("x"),
         "w/tensorboard/ holds notes.txt, which carlos did not write"),
    ],
)  # fmt: skip
def test_a_users_file_or_directory_where_a_logger_writes_is_refused(d, capsys, monkeypatch, logger, setup, expect):
    monkeypatch.setenv("WANDB_MODE", "offline")
    setup(d / "w")
    refused(["train", "--workdir", "w", *TINY, f"logger={logger}", "--overwrite"], capsys, expect, d)


@pytest.mark.slow
def test_an_overwrite_that_fails_before_the_run_opens_puts_the_earlier_run_back(d, capsys, monkeypatch):
    from carlos.module import CarlosLM

    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "2", "--overwrite", "logger=csv"], capsys)[0] == 0
    before = state(d)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # Lightning ignores Ctrl+C after one: not in pytest
    for failure in (RuntimeError("boom"), KeyboardInterrupt()):

        def fail(self, failure=failure):
            raise failure

        monkeypatch.setattr(CarlosLM, "configure_optimizers", fail)  # Lightning calls it before the run opens
        code, _, _ = run(["train", "--workdir", "w", *TINY, "--max_steps", "4", "--overwrite", "logger=csv"], capsys)
        assert code != 0
        assert state(d) == before


# ---------------------------------------------------------------- an export, whole or not at all


def exported(d: Path) -> dict[str, str]:
    """The files of an export directory (carlos's record, lock and temporaries aside): their sha256."""
    files = [p for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".carlos-")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
@pytest.mark.parametrize("failure", [Stopped(signal.SIGTERM), KeyboardInterrupt(), OSError(28, "No space left")])
def test_an_export_cut_at_each_rename_leaves_the_earlier_export_as_it_was(d, capsys, monkeypatch, failure):
    """An hf export over a safetensors one, each rename of its install failing in turn (a signal, Ctrl+C,
    a full disk): the earlier export stays whole and nothing else is left."""
    pytest.importorskip("transformers")
    before, states, replace = state(d), [], os.replace
    for k in range(20):
        calls: list[str] = []

        def cut(src, dst, k=k, calls=calls):
            if Path(src).parent.name.startswith(".carlos-tmp-"):  # into or out of the temporary directory
                calls.append(dst)
                if len(calls) == k + 1:
                    raise failure
            replace(src, dst)

        monkeypatch.setattr(os, "replace", cut)
        code, _, err = run([*EXPORT, "e", "--format", "hf"], capsys)
        if len(calls) <= k:  # every rename done: the new export is in place
            break
        assert code != 0 and state(d) == before, (k, err)
        states.append(k)
    # each file was cut once as it was written into the temporary directory, once as it was renamed in
    assert code == 0 and "tokenizer.json" in exported(d / "e") and len(states) == 2 * len(exported(d / "e"))


def test_an_export_refused_for_space_while_writing_changes_nothing(d, capsys, monkeypatch):
    import carlos.export

    def full(path, write, where):
        raise write_error(path, OSError(28, "No space left on device"), where)

    before = state(d)
    monkeypatch.setattr(carlos.export, "write_atomic", full)
    code, _, err = run([*EXPORT, "e"], capsys)
    assert code == 2 and "No space left on device" in err and "free some space or choose another --out" in err
    assert state(d) == before


@pytest.mark.slow
def test_a_signal_or_kill_9_at_any_moment_of_an_export_never_leaves_a_mixture(d):
    """A real export process stopped at random moments: the directory holds the earlier export whole, the
    new one whole, or (kill -9 among the renames) no config.json, which transformers refuses to load."""
    transformers = pytest.importorskip("transformers")
    old = exported(d / "e")
    started = time.perf_counter()
    assert run_ok(["export", "--workdir", "w", "--out", "new", "--format", "hf"], d)
    whole, new = time.perf_counter() - started, exported(d / "new")
    trials = [(signal.SIGTERM, 0.9), (signal.SIGTERM, 0.97), (signal.SIGKILL, 0.95), (signal.SIGKILL, 0.99)]
    for sig, moment in trials:  # the install comes at the very end
        p = _carlos(["export", "--workdir", "w", "--out", "e", "--format", "hf"], d)
        time.sleep(whole * moment)
        p.send_signal(sig)
        p.wait()
        now = exported(d / "e")
        if now not in (old, new):
            assert sig == signal.SIGKILL and "config.json" not in now, (sig, moment, sorted(now))
            with pytest.raises(OSError):
                transformers.AutoModelForCausalLM.from_pretrained(d / "e")
        if now != old:  # the next export installs whole, over whatever was left
            assert run_ok(["export", "--workdir", "w", "--out", "e"], d)
            assert exported(d / "e") == old


def run_ok(args: list[str], cwd: Path) -> bool:
    p = _carlos(args, cwd)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    return True


# ---------------------------------------------------------------- records and messages


def test_while_prepare_swaps_the_data_eval_and_train_name_it(d, capsys):
    with DirLock(d / "w", "prepare"):  # as a prepare --overwrite in another process holds it
        (d / "w" / "splits.json").rename(d / "splits.json.aside")  # the moment its files are moved
        code, _, err = run(["eval", "--workdir", "w"], capsys)
        assert code == 2 and "carlos: error: workdir w is being prepared by carlos prepare (pid" in err
        assert err.strip().endswith("wait for it to finish")
        code, _, err = run(["train", "--workdir", "w", *TINY], capsys)
        assert code == 2 and "w is in use by carlos prepare (pid" in err


@pytest.mark.slow
def test_a_resumed_run_keeps_the_record_of_what_it_started_from(d, capsys):
    other = d / "w" / "runs" / "A" / "checkpoints" / "best.pt"
    code, out, _ = run(
        ["train", "--workdir", "w", *TINY, "--resume", "--max_steps", "6", "--init_from", str(other)], capsys
    )
    assert code == 0
    assert f"--init_from {other} is not used: the run resumes its own checkpoint (it started from scratch)" in out
    assert "init_from: null" in (d / "w" / ".hydra" / "config.yaml").read_text()
    import torch

    assert torch.load(d / "w" / "checkpoints" / "last.pt", weights_only=True)["carlos"]["init_from"] is None
