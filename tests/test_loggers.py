"""The logger group: Lightning's CSVLogger and TensorBoardLogger beside metrics.jsonl, their files read back
(TensorBoard's with TensorBoard's own reader), across a resume; W&B selected by logger=wandb."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from carlos.config import TrainConfig, parse
from carlos.errors import CarlosError
from carlos.train import train

from .conftest import run_cli, train_cfg


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def by_step(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def same(got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float) -> bool:
    """The same steps, and values equal within rel."""
    steps = [s for s, _ in got] == [s for s, _ in expected]
    return steps and [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel)


@pytest.mark.slow
def test_tensorboard_and_csv_receive_every_record_at_its_step_and_a_resume_repeats_none(workdir, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(train_cfg(workdir, "logger=[csv,tensorboard]"))  # 12 steps: train records every 3, validation every 6
    expected = records(workdir)
    scalars = tensorboard_scalars(workdir / "tensorboard")
    assert [s for s, _ in scalars["train_loss"]] == [3, 6, 9, 12]
    assert [s for s, _ in scalars["val_bpb"]] == [6, 12]
    for key in ("train_loss", "val_bpb", "lr"):
        assert same(scalars[key], by_step(expected, key), 1e-6)  # float32 in the event file
    rows = list(csv.DictReader((workdir / "csv" / "metrics.csv").open()))
    assert same(by_step(rows, "train_loss"), by_step(expected, "train_loss"), 1e-12)
    assert same(by_step(rows, "val_bpb"), by_step(expected, "val_bpb"), 1e-12)

    # resumed from last.pt (step 12) to step 18: no step twice, in any logger
    train(train_cfg(workdir, "logger=[csv,tensorboard]", "resume=true", "trainer.max_steps=18"))
    expected = records(workdir)
    scalars = tensorboard_scalars(workdir / "tensorboard")
    assert [s for s, _ in scalars["train_loss"]] == [3, 6, 9, 12, 15, 18]
    assert [s for s, _ in scalars["val_bpb"]] == [6, 12, 18]
    assert same(scalars["val_bpb"], by_step(expected, "val_bpb"), 1e-6)
    rows = list(csv.DictReader((workdir / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in expected]
    assert same(by_step(rows, "train_loss"), by_step(expected, "train_loss"), 1e-12)

    # --overwrite removes the loggers' directories with the rest of the run
    train(train_cfg(workdir, "overwrite=true", "trainer.max_steps=3"))
    assert not (workdir / "tensorboard").exists() and not (workdir / "csv").exists()


def test_logger_tensorboard_without_tensorboard_is_refused_in_one_line(workdir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "tensorboard" in name.lower() else real(name, *a)
    )
    with pytest.raises(CarlosError, match=r"logger=tensorboard needs TensorBoard, which is not installed; pip install"):
        train(train_cfg(workdir, "logger=tensorboard"))
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        [".carlos-files", "data", "rng_state.json", "splits.json", "tokenizer.json"]
    )


def test_logger_wandb_turns_wandb_on_without_a_project_and_disabled_still_wins(workdir, monkeypatch):
    from carlos.plan import wandb_settings

    for name in ("WANDB_PROJECT", "WANDB_MODE", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(workdir)  # no .env here
    off = parse(train_cfg(workdir), TrainConfig)
    assert wandb_settings(off, workdir) is None
    on = parse(train_cfg(workdir, "logger=wandb", "wandb.mode=offline"), TrainConfig)
    settings = wandb_settings(on, workdir)
    assert settings["project"] is None and settings["mode"] == "offline" and settings["log_model"] is False
    disabled = parse(train_cfg(workdir, "logger=wandb", "wandb.mode=disabled"), TrainConfig)
    assert wandb_settings(disabled, workdir) is None


def test_the_logger_group_composes_any_of_its_options():
    from carlos.compose import compose, group_options

    assert group_options("logger") == ["csv", "tensorboard", "wandb"]
    cfg = parse(compose("train", ["logger=[csv,tensorboard,wandb]"]), TrainConfig)
    assert cfg.logger.csv.flush_logs_every_n_steps == 100 and cfg.logger.tensorboard.log_graph is False
    assert cfg.logger.wandb.log_model is False
    cfg = parse(compose("train", []), TrainConfig)
    assert (cfg.logger.csv, cfg.logger.tensorboard, cfg.logger.wandb) == (None, None, None)


@pytest.mark.slow
def test_a_resume_refused_while_lightning_restores_it_leaves_no_logger_files(workdir, monkeypatch):
    """Lightning logs hyperparameters before it restores the training state; carlos gives them to the
    loggers once the run is accepted, so a refused resume writes no csv/ or tensorboard/."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(train_cfg(workdir))
    last = workdir / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["loops"] = {"fit_loop": 5}  # a training state that does not load
    torch.save(checkpoint, last)
    with pytest.raises(CarlosError, match="its training state does not load"):
        train(train_cfg(workdir, "logger=[csv,tensorboard]", "resume=true", "trainer.max_steps=18"))
    assert not (workdir / "csv").exists() and not (workdir / "tensorboard").exists()


@pytest.mark.slow
def test_tensorboard_in_a_workdir_whose_name_is_not_utf8_is_refused_before_anything_is_written(corpus, capfd):
    pytest.importorskip("tensorboard")  # capfd: the summary prints the name's bytes, which capsys cannot decode
    odd = corpus.parent / os.fsdecode(b"w\xff")  # TensorBoard encodes the path it writes to as UTF-8
    assert run_cli(["prepare", "--input", str(corpus), "--workdir", str(odd), "--seq_len", "32"], capfd)[0] == 0
    before = sorted(p.name for p in odd.iterdir())
    code, _, err = run_cli(["train", "--workdir", str(odd), "logger=tensorboard", "--max_steps", "2"], capfd)
    assert (code, err) == (
        2,
        f"carlos: error: logger=tensorboard cannot write into {corpus.parent}/w\ufffd: it takes paths that are valid "
        "UTF-8 only, and this one is not; use a --workdir whose path is UTF-8, or choose logger=csv\n",
    )
    assert sorted(p.name for p in odd.iterdir()) == before
