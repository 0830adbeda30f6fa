"""Several runs on one prepared workdir: --run NAME writes WORKDIR/runs/NAME; eval and sample read it back;
report tables every run; the refusals offer --run and list the runs that have checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from carlos.lock import DirLock
from carlos.ownership import RUN_LOCK

from .conftest import make_corpus
from .conftest import run_cli as run

TINY = ["--max_steps", "4", "--micro_batch_size", "4", "--eval_interval", "2", "--ckpt_interval", "2"]
TINY += ["--sample_tokens", "4", "--warmup_steps", "1", "--log_interval", "2"]


@pytest.fixture
def w(tmp_path, monkeypatch, capsys) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_corpus(tmp_path / "corpus.txt")
    assert run(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], capsys)[0] == 0
    return tmp_path / "w"


@pytest.mark.slow
def test_two_named_runs_of_different_models_share_one_workdir_and_report_together(w, capsys):
    for model in ("baseline", "modern"):
        code, _, err = run(["train", "--workdir", "w", "--run", model, f"model={model}", *TINY], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (w / "runs").iterdir()) == ["baseline", "modern"]
    for model in ("baseline", "modern"):
        d = w / "runs" / model
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
            "best.pt",
            "last.pt",
            "step_000002.pt",
            "step_000004.pt",
        ]
        assert (d / ".hydra" / "config.yaml").is_file() and (d / "metrics.jsonl").is_file()
        assert f"run: {model}" in (d / ".hydra" / "config.yaml").read_text()
    assert not (w / "checkpoints").exists() and not (w / "metrics.jsonl").exists()  # the workdir's own run: none

    code, out, _ = run(["report", "w"], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| runs/")]
    assert sorted(r.split(" | ")[0] for r in rows) == ["| runs/baseline", "| runs/modern"]
    head = out.splitlines()[0]
    # where the runs differ, each is one preset of the model group: named, not model.norm, model.mlp, ...
    assert head == "| run | model | steps | tokens | best val bpb | tokens/s |"
    assert {r.split(" | ")[1] for r in rows} == {"baseline", "modern"}

    scores = {}
    for model in ("baseline", "modern"):
        code, out, _ = run(["eval", "--workdir", "w", "--run", model, "--json"], capsys)
        assert code == 0
        result = json.loads(out.splitlines()[-1])
        assert result["checkpoint"] == str(Path("w") / "runs" / model / "checkpoints" / "best.pt")
        scores[model] = result["bpb"]
    assert scores["baseline"] != scores["modern"]
    code, out, _ = run(["sample", "--workdir", "w", "--run", "modern", "--max_new_tokens", "8"], capsys)
    assert code == 0 and out.strip()


@pytest.mark.slow
def test_a_second_run_is_offered_run_name_and_eval_lists_the_runs_that_have_checkpoints(w, capsys):
    assert run(["train", "--workdir", "w", *TINY], capsys)[0] == 0
    code, _, err = run(["train", "--workdir", "w", *TINY], capsys)
    assert code == 2
    assert err.strip().endswith(
        "carlos: error: w already holds checkpoints of an earlier run; pass --resume to continue it, --overwrite "
        "to delete it and start over, or train beside it with --run NAME"
    )
    assert run(["train", "--workdir", "w", "--run", "second", *TINY], capsys)[0] == 0
    code, _, err = run(["train", "--workdir", "w", "--run", "second", *TINY], capsys)
    assert code == 2 and "w/runs/second already holds checkpoints" in err.replace("\\", "/")
    assert "or choose another --run name" in err

    # a sweep job's checkpoint (copied here: a sweep's layout), and a run asked for that has none
    job = w / "sweeps" / "2026-11-30_10-00-00" / "0" / "checkpoints"
    job.mkdir(parents=True)
    shutil.copy(w / "checkpoints" / "best.pt", job / "best.pt")
    code, _, err = run(["eval", "--workdir", "w", "--run", "third"], capsys)
    assert code == 2
    expected = (
        f"carlos: error: checkpoint 'best' not found at {Path('w/runs/third/checkpoints/best.pt')}; no checkpoints "
        f"in {Path('w/runs/third/checkpoints')}; w has runs with checkpoints: the workdir's own run (no --run); "
        f"--run second; --checkpoint {job / 'best.pt'}"
    )
    assert err.strip() == expected.replace(str(w.parent) + "/", "")
    code, _, err = run(["sample", "--workdir", "w", "--run", "third"], capsys)
    assert code == 2 and "--run second" in err
    code, out, _ = run(["eval", "--workdir", "w", "--checkpoint", str(job / "best.pt")], capsys)
    assert code == 0


def test_a_workdir_without_its_own_run_points_eval_at_its_named_runs(w, capsys):
    (w / "runs" / "only" / "checkpoints").mkdir(parents=True)
    (w / "runs" / "only" / "checkpoints" / "best.pt").write_bytes(b"")
    code, _, err = run(["eval", "--workdir", "w"], capsys)
    assert code == 2 and err.strip().endswith("w has runs with checkpoints: --run only")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "-x", "a b", "x" * 101, ""])
def test_a_run_name_that_is_not_a_plain_name_is_refused(w, capsys, name):
    for command in ("train", "eval", "sample"):
        code, _, err = run([command, "--workdir", "w", f"run='{name}'"], capsys)
        assert code == 2 and "is not a plain name; use up to 100 letters, digits" in err, err
    assert not (w / "runs").exists()


def test_run_in_a_sweep_is_refused_before_hydra_makes_a_directory(w, capsys):
    code, _, err = run(["train", "-m", "--workdir", "w", "--run", "a", "seed=1,2"], capsys)
    assert code == 2 and "--run names one run, and each job of a sweep gets a directory of its own" in err
    assert not (w / "sweeps").exists()


@pytest.mark.slow
def test_one_run_trains_at_a_time_and_other_names_train_beside_it(w, capsys):
    (w / "runs" / "busy").mkdir(parents=True)
    busy = "train --run busy"
    held = [DirLock(w, busy, shared=True), DirLock(w / "runs" / "busy", busy, name=RUN_LOCK)]
    for lock in held:  # as a `carlos train --run busy` in another process holds them
        lock.acquire()
    try:
        code, _, err = run(["train", "--workdir", "w", "--run", "busy", *TINY], capsys)
        assert code == 2
        assert "run busy of w is in use by carlos train --run busy (pid" in err
        assert err.strip().endswith("wait for it to finish or stop it, or train under another --run name")
        assert run(["train", "--workdir", "w", "--run", "other", *TINY], capsys)[0] == 0
        assert run(["train", "--workdir", "w", *TINY], capsys)[0] == 0  # the workdir's own run too
        code, _, err = run(["prepare", "--input", "corpus.txt", "--workdir", "w", "--overwrite"], capsys)
        assert code == 2 and "w is in use by" in err  # replacing the data waits for every run
    finally:
        for lock in held:
            lock.release()


@pytest.mark.slow
def test_prepare_overwrite_removes_the_named_runs_and_refuses_without_it(w, capsys):
    assert run(["train", "--workdir", "w", "--run", "a", *TINY], capsys)[0] == 0
    (w / "runs" / "notes.md").write_text("mine")
    code, _, err = run(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], capsys)
    assert code == 2 and "already holds a trained run" in err
    assert run(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in (w / "runs").iterdir()) == ["notes.md"]  # the user's file stays


def test_wandb_names_the_run_after_run_unless_told(w):
    from carlos.config import TrainConfig, parse
    from carlos.plan import wandb_settings

    from .conftest import train_cfg

    config = parse(train_cfg(w, "run=lr3", "wandb.project=p", "wandb.mode=offline"), TrainConfig)
    assert wandb_settings(config, w / "runs" / "lr3")["name"] == "lr3"
    config = parse(train_cfg(w, "run=lr3", "wandb.project=p", "wandb.mode=offline", "wandb.run_name=x"), TrainConfig)
    assert wandb_settings(config, w / "runs" / "lr3")["name"] == "x"
