"""--init_from: a new run starts from a checkpoint's weights only (fresh optimizer, step 0, the new workdir's
schedule and data); a model or vocabulary that does not fit is refused in one line naming both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint
from carlos.errors import CarlosError
from carlos.train import train

from .conftest import make_corpus, prepare_workdir, train_cfg

pytestmark = pytest.mark.slow
STILL = ["optimizer.lr=1e-12", "schedule.min_lr=0"]  # a learning rate too small to move the weights


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(checkpoint)["state_dict"].items() if k.startswith("model.")}


@pytest.fixture
def source(workdir, monkeypatch) -> Path:
    """A run trained 12 steps on `workdir` (seq_len 32); its best.pt."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(train_cfg(workdir, "sample.tokens=0"))
    return workdir / "checkpoints" / "last.pt"


def second(tmp_path: Path, *overrides: str) -> Path:
    corpus = make_corpus(tmp_path / "second.txt", seed=7)
    return prepare_workdir(corpus, tmp_path / f"second{len(list(tmp_path.glob('second*')))}", *overrides)


def test_a_new_run_starts_from_the_weights_with_a_fresh_optimizer_and_step_0(source, tmp_path):
    w2 = second(tmp_path)
    # with STILL's learning rate, what the run ends with is what it started from
    train(train_cfg(w2, f"init_from={source}", "trainer.max_steps=3", *STILL, "sample.tokens=0"))
    tuned = load_checkpoint(w2 / "checkpoints" / "last.pt")
    start = weights(source)
    assert tuned["global_step"] == 3 and tuned["carlos"]["step"] == 3  # counted from 0, not from 12
    assert all(torch.allclose(tuned["state_dict"][k], v, atol=1e-9) for k, v in start.items())
    adam = tuned["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in adam.values() if "step" in s} == {3}  # AdamW's moments began at this run
    assert tuned["carlos"]["init_from"] == str(source)
    steps = [json.loads(line)["step"] for line in (w2 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 3]  # its train record and its last validation, at its own step 3: none of the source
    assert tuned["carlos"]["data_sha256"] == json.loads((w2 / "splits.json").read_text())["sha256"]


def test_fine_tuning_lowers_the_loss_of_the_new_data_faster_than_a_new_model(source, tmp_path):
    w2, w3 = second(tmp_path), second(tmp_path)
    run = ["trainer.max_steps=6", "sample.tokens=0", "eval_interval=6"]
    tuned = train(train_cfg(w2, f"init_from={source}", *run))
    scratch = train(train_cfg(w3, *run))
    assert tuned < scratch  # best val bpb: the same corpus family, so the source's weights help


def test_learned_positions_fine_tune_on_a_shorter_context_and_refuse_a_longer_one(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    learned = "model.pos=learned"
    train(train_cfg(workdir, learned, "sample.tokens=0"))
    source = workdir / "checkpoints" / "last.pt"
    short = second(tmp_path, "data.seq_len=16")
    train(train_cfg(short, learned, f"init_from={source}", "trainer.max_steps=2", *STILL, "sample.tokens=0"))
    tuned = weights(short / "checkpoints" / "last.pt")["model.pos_emb.weight"]
    assert tuned.shape[0] == 16 and torch.allclose(tuned, weights(source)["model.pos_emb.weight"][:16], atol=1e-9)

    long = second(tmp_path, "data.seq_len=64")
    with pytest.raises(CarlosError) as refused:
        train(train_cfg(long, learned, f"init_from={source}"))
    assert str(refused.value) == (
        f"--init_from {source} learned positions for 32 tokens, and {long} is prepared with seq_len=64: "
        "positions 32 on were never trained; prepare it with --seq_len 32 or less (rotary positions, "
        "model.pos=rope, have no such limit)"
    )
    assert not (long / "checkpoints").exists()


def test_rotary_positions_fine_tune_on_a_longer_context(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(train_cfg(workdir, "model=modern", "sample.tokens=0"))
    long = second(tmp_path, "data.seq_len=64")
    source = workdir / "checkpoints" / "best.pt"
    train(train_cfg(long, "model=modern", f"init_from={source}", "trainer.max_steps=2", "sample.tokens=0"))
    assert load_checkpoint(long / "checkpoints" / "last.pt")["carlos"]["model"]["block_size"] == 64


def test_another_model_or_vocabulary_is_refused_naming_both(source, tmp_path):
    w2 = second(tmp_path)
    with pytest.raises(CarlosError) as refused:
        train(train_cfg(w2, "model=modern", f"init_from={source}"))
    assert str(refused.value).startswith(
        f"--init_from {source} holds another model than this run's (d_ff: 192 there, 176 here; bias: True there, "
        "False here; norm: layernorm there, rmsnorm here; mlp: gelu there, swiglu here); pass model=baseline to "
        "train the checkpoint's model"
    )
    with_bos = second(tmp_path, "data.add_bos=true")
    with pytest.raises(CarlosError, match=r"has vocabulary 256 \(add_bos=False, add_eos=False\) but .* is prepared "):
        train(train_cfg(with_bos, f"init_from={source}"))
    with pytest.raises(CarlosError, match="missing.pt does not exist; give the path of a .pt checkpoint"):
        train(train_cfg(w2, f"init_from={tmp_path / 'missing.pt'}"))
    assert not (w2 / "checkpoints").exists() and not (with_bos / "checkpoints").exists()


def test_dropout_may_change_and_a_resumed_run_keeps_its_own_weights(source, tmp_path):
    w2 = second(tmp_path)
    train(train_cfg(w2, f"init_from={source}", "model.dropout=0.1", "trainer.max_steps=2", "sample.tokens=0"))
    assert load_checkpoint(w2 / "checkpoints" / "last.pt")["carlos"]["init_from"] == str(source)
    # resuming continues the run's own weights and optimizer: --init_from is for a new run only
    tuned = [f"init_from={source}", "model.dropout=0.1", "sample.tokens=0"]
    train(train_cfg(w2, *tuned, "resume=true", "trainer.max_steps=3"))
    resumed = load_checkpoint(w2 / "checkpoints" / "last.pt")
    assert resumed["carlos"]["step"] == 3  # and its record still says what the run started from
    assert resumed["carlos"]["init_from"] == str(source)
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values() if "step" in s} == {3}
