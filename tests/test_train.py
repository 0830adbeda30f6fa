"""End-to-end training runs in-process (train(cfg) with a composed config), with exact assertions."""

import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from carlos.callbacks import Checkpoints
from carlos.errors import CarlosError
from carlos.precision import resolve_precision
from carlos.train import train

from .conftest import record_as_carlos, train_cfg

TOKENS_PER_STEP = 32 * 4 * 2  # seq_len * micro_batch_size * accumulate


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_best_pt_is_written_at_a_validation_only_when_its_loss_is_the_lowest_yet(tmp_path):
    saved = []
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0)
    trainer.save_checkpoint = lambda path, weights_only: saved.append((trainer.global_step, Path(path).name))
    callback = Checkpoints(tmp_path, manifest=None, ckpt_interval=1000)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.5), (5, 1.5), (6, 1.7)]:
        trainer.global_step = step
        callback.on_validation_end(trainer, SimpleNamespace(val_metrics={"loss": loss, "bpb": loss / 2}, eval_share=1))
    assert saved == [(1, "best.pt"), (2, "best.pt"), (4, "best.pt")]  # a tie keeps the earlier step
    assert callback.state_dict() == {"best": 1.5, "best_bpb": 0.75, "best_step": 4, "part": False}


def test_validations_of_part_of_the_val_split_are_compared_only_with_each_other(tmp_path):
    saved = []
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0)
    trainer.save_checkpoint = lambda path, weights_only: saved.append(trainer.global_step)
    callback = Checkpoints(tmp_path, manifest=None, ckpt_interval=1000)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.2)]:  # the last scores all of it
        module = SimpleNamespace(val_metrics={"loss": loss, "bpb": loss}, eval_share=0.3 if step < 4 else 1.0)
        trainer.global_step = step
        callback.on_validation_end(trainer, module)
    assert saved == [1, 2, 4]  # the whole split's loss is not compared with a part's: the last one is best
    assert callback.state_dict() == {"best": 2.2, "best_bpb": 2.2, "best_step": 4, "part": False}


def test_train_writes_the_original_scripts_layout(workdir):
    best_bpb = train(train_cfg(workdir))

    ckpts = workdir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "best.pt",
        "last.pt",
        "step_000004.pt",
        "step_000008.pt",
        "step_000012.pt",
    ]
    last = torch.load(ckpts / "last.pt", weights_only=True)
    assert last["global_step"] == 12
    assert (ckpts / "last.pt").read_bytes() == (ckpts / "step_000012.pt").read_bytes()
    meta = last["carlos"]
    assert meta["model"]["block_size"] == 32 and meta["model"]["vocab_size"] == 256
    assert meta["precision"] == "32-true" and meta["step"] == 12
    for p in ckpts.iterdir():
        torch.load(p, weights_only=True)

    recs = records(workdir)
    assert [(r["step"], "val_loss" in r) for r in recs] == [
        (3, False),
        (6, False),
        (6, True),
        (9, False),
        (12, False),
        (12, True),
    ]
    for r in recs:
        assert r["tokens"] == r["step"] * TOKENS_PER_STEP
        if "val_loss" in r:
            assert set(r) == {"step", "tokens", "val_loss", "val_ppl", "val_bpb", "elapsed_s"}
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
            # byte-level, no BOS/EOS: every token is a byte, so bpb = loss / ln 2
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))
        else:
            assert set(r) == {"step", "tokens", "lr", "train_loss", "tokens_per_s", "elapsed_s"}
            assert r["tokens_per_s"] > 0 and math.isfinite(r["train_loss"])
    val = [r for r in recs if "val_loss" in r]
    assert best_bpb == pytest.approx(min(r["val_bpb"] for r in val))
    assert recs[0]["train_loss"] > recs[-2]["train_loss"]  # it learns

    samples = sorted(p.name for p in (workdir / "samples").iterdir())
    assert samples == ["step_000006.txt", "step_000012.txt"]
    assert (workdir / "samples" / "step_000006.txt").read_text().startswith("\n")
    assert (workdir / ".hydra" / "config.yaml").is_file()
    # the prepared data is untouched
    assert (workdir / "data" / "train.npy").is_file()


def test_refusals_leave_the_workdir_as_it_was(workdir):
    train(train_cfg(workdir, "trainer.max_steps=4"))
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    with pytest.raises(CarlosError, match="--resume.*--overwrite"):
        train(train_cfg(workdir, "trainer.max_steps=4"))
    with pytest.raises(CarlosError, match="contradict"):
        train(train_cfg(workdir, "resume=true", "overwrite=true"))
    with pytest.raises(CarlosError, match="n_heads"):
        train(train_cfg(workdir, "model.n_heads=3", "overwrite=true"))
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_resume_true_needs_a_checkpoint(workdir):
    with pytest.raises(CarlosError, match="nothing to resume"):
        train(train_cfg(workdir, "resume=true"))
    assert not (workdir / "checkpoints").exists() and not (workdir / ".hydra").exists()


def test_overwrite_removes_outputs_but_not_data(workdir):
    train(train_cfg(workdir, "trainer.max_steps=8"))
    train(train_cfg(workdir, "trainer.max_steps=4", "overwrite=true"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step_000004.pt"]
    assert [r["step"] for r in records(workdir)] == [3, 4]
    assert (workdir / "splits.json").is_file()


def test_resume_continues_exactly_where_the_checkpoint_left_off(workdir, tmp_path):
    """A run resumed from its step-8 checkpoint ends where the uninterrupted run ends."""
    full = tmp_path / "full"
    shutil.copytree(workdir, full)
    train(train_cfg(full, "ckpt_interval=8", "trainer.max_steps=16"))
    end_full = records(full)[-1]

    # the interrupted run: same config, but only its step-8 checkpoint survived
    part = tmp_path / "part"
    shutil.copytree(workdir, part)
    (part / "checkpoints").mkdir()
    shutil.copy(full / "checkpoints" / "step_000008.pt", part / "checkpoints" / "last.pt")
    lines = [json.dumps(r) for r in records(full) if r["step"] <= 8] + ['{"step": 9, "lr": 1}']  # past the ckpt
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    record_as_carlos(part, part / "checkpoints", part / "checkpoints" / "last.pt", part / "metrics.jsonl")
    train(train_cfg(part, "ckpt_interval=8", "trainer.max_steps=16", "resume=true"))

    recs = records(part)
    train_steps = [r["step"] for r in recs if "train_loss" in r]
    assert train_steps == sorted(set(train_steps)) == [3, 6, 9, 12, 15]
    assert recs[-1]["step"] == 16
    assert recs[-1]["val_loss"] == pytest.approx(end_full["val_loss"], abs=1e-6)
    # train losses of whole logging windows after the checkpoint (step 9's window began before it)
    assert [r["train_loss"] for r in recs if r["step"] > 9 and "train_loss" in r] == pytest.approx(
        [r["train_loss"] for r in records(full) if r["step"] > 9 and "train_loss" in r], abs=1e-6
    )


def test_resume_auto_starts_fresh_then_resumes(workdir):
    train(train_cfg(workdir, "resume=auto", "trainer.max_steps=4"))
    train(train_cfg(workdir, "resume=auto", "trainer.max_steps=8"))
    assert torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 8
    assert [r["step"] for r in records(workdir) if "train_loss" in r] == [3, 6]


def test_resume_with_another_model_is_refused(workdir):
    train(train_cfg(workdir, "trainer.max_steps=4"))
    with pytest.raises(CarlosError, match="model differs"):
        train(train_cfg(workdir, "resume=true", "model.d_model=32"))


def test_resume_on_other_data_is_refused(workdir):
    train(train_cfg(workdir, "trainer.max_steps=4"))
    splits = workdir / "splits.json"
    info = json.loads(splits.read_text())
    splits.write_text(json.dumps({**info, "sha256": "0" * 64}))
    with pytest.raises(CarlosError, match="prepared again from another corpus"):
        train(train_cfg(workdir, "resume=true", "trainer.max_steps=8"))


def test_a_warmup_longer_than_the_run_still_trains(workdir):
    train(
        train_cfg(workdir, "schedule.warmup_steps=2000", "trainer.max_steps=10", "log_interval=1", "optimizer.lr=3e-3")
    )
    lrs = [r["lr"] for r in records(workdir) if "lr" in r]
    assert max(lrs) == pytest.approx(3e-3)  # warmup clipped to 2 of 10 steps, then the peak


def test_precision_choice(monkeypatch):
    import carlos.precision as t

    monkeypatch.setattr(t, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu", 64)[0] == "32-true"  # too narrow for bf16 to pay
    assert resolve_precision("auto", "cpu", 128)[0] == "bf16-mixed"
    monkeypatch.setattr(t, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu", 512) == ("32-true", "CPU without bf16 instructions")
    assert resolve_precision("auto", "cpu", 64, stored="bf16-mixed")[0] == "bf16-mixed"
    assert resolve_precision("auto", "mps", 512)[0] == "32-true"
    assert resolve_precision("bf16-mixed", "cpu", 64)[0] == "bf16-mixed"
    assert resolve_precision("32-true", "cuda", 64)[0] == "32-true"
    with pytest.raises(CarlosError, match="needs a CUDA GPU"):
        resolve_precision("16-mixed", "cpu", 64)


def test_precision_auto_on_gpus_with_and_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda", 64)[0] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda", 64)[0] == "16-mixed"


def test_cpu_bf16_detection_reads_the_cpu_features():
    import carlos.precision as t

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert t.cpu_has_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def test_bf16_mixed_on_the_cpu_trains_with_clipping_and_the_fused_optimizer(workdir):
    bf16 = ["trainer.precision=bf16-mixed", "trainer.max_steps=4", "trainer.gradient_clip_val=0.5"]
    train(train_cfg(workdir, *bf16, "optimizer=adamw"))
    meta = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)
    assert meta["carlos"]["precision"] == "bf16-mixed" and meta["carlos"]["step"] == 4
    assert meta["carlos"]["config"]["optimizer"]["fused"] is True
    assert all(math.isfinite(r["train_loss"]) for r in records(workdir) if "train_loss" in r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_mixed_on_a_gpu_trains_with_clipping(workdir):
    train(train_cfg(workdir, "trainer.precision=16-mixed", "trainer.max_steps=4", "trainer.accelerator=gpu"))
    meta = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)
    assert meta["carlos"]["precision"] == "16-mixed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_auto_on_this_gpu():
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert resolve_precision("auto", "cuda", 64)[0] == expected


def test_time_budget_completes_the_schedule_and_the_final_checkpoint_by_the_deadline(workdir):
    budget = 4.0
    started = time.time()
    train(
        train_cfg(
            workdir,
            "trainer.max_steps=null",
            f"trainer.max_time={budget}",
            "eval_interval=50",
            "ckpt_interval=1000",
            "log_interval=5",
            "schedule.warmup_steps=20",
            "sample.tokens=0",
            "optimizer.lr=3e-3",
        )
    )
    wall = time.time() - started  # the budget is the wall time, from the start: set-up and the end included
    recs = records(workdir)
    train_recs = [r for r in recs if "lr" in r]
    last_val = recs[-1]
    assert "val_loss" in last_val and last_val["elapsed_s"] <= wall <= budget * 1.05
    val_steps = [r["step"] for r in recs if "val_loss" in r]
    assert len(val_steps) == len(set(val_steps))  # the final validation is not repeated
    last = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)
    # past warmup (20 steps) and into the cosine on a slow machine too (this one ran 81-105 steps, others 200+)
    assert last["global_step"] == last_val["step"] > 40
    assert last["carlos"]["elapsed_s"] <= budget
    # warmup reached the peak early on, and the cosine had nearly finished by the end
    peak = max(r["lr"] for r in train_recs)
    assert peak == pytest.approx(3e-3, rel=0.2)
    assert train_recs[-1]["lr"] < 0.1 * peak


def budget_at_start(accumulate: int = 1, **choose):
    from types import SimpleNamespace

    from carlos.callbacks import TimeBudget

    budget = TimeBudget(20.0, started=time.time() - 6.0, val_tokens=1_400_000, tokens_per_batch=4096, **choose)
    trainer = SimpleNamespace(global_step=30, accumulate_grad_batches=accumulate, world_size=1, is_global_zero=True)
    trainer.sanity_checking = False
    trainer.val_check_batch = 2**62
    module = SimpleNamespace(deadline_s=None, eval_share=1.0, total_steps=lambda step: 1234.0)
    budget.on_train_start(trainer, module)
    return budget, trainer, module


def test_time_budget_reserves_the_final_validation_from_the_val_split_and_says_when_it_is_large(capsys):
    budget, trainer, module = budget_at_start()
    assert budget.startup == pytest.approx(6.0, abs=0.5) and module.deadline_s == pytest.approx(13.0, abs=0.5)
    budget._estimate(trainer, module, 20, 1.2)  # 81,920 tokens in 1.2 s: scoring 1.4M takes 0.3 x 20.5 s, + 0.5 s
    validation = 0.3 * 1_400_000 * 1.2 / 81_920 + 0.5
    assert budget.reserve == pytest.approx(1.5 * validation + 0.5)
    assert trainer.val_check_batch == 2**62 and module.eval_share == 1.0  # eval_interval, eval_tokens: the user's
    out = capsys.readouterr().out
    assert out == (
        f"a validation will take about {validation:.0f} s, {validation / 20:.0%} of --max_time 20: prepare a smaller "
        "val split (--val_fraction), validate less often (--eval_interval) or give more time\n"
    )
    budget._estimate(trainer, module, 20, 0.12)  # ten times the pace: a small share, no word
    assert capsys.readouterr().out == ""


def test_time_budget_chooses_about_ten_validations_and_the_share_of_the_val_split_they_score(capsys):
    budget, trainer, module = budget_at_start(accumulate=2, interval=True, tokens=True)
    budget._estimate(trainer, module, 20, 0.12)
    validation = 0.3 * 1_400_000 * 0.12 / 163_840 + 0.5  # 0.81 s; ten of them within 10% of 20 s: 0.2 s each
    assert trainer.val_check_batch == 123 * 2  # 1,234 steps / 10, in micro-batches
    assert module.eval_share == pytest.approx(0.2 / validation)
    out = capsys.readouterr().out
    assert out.startswith("validating every 123 steps, about 10 times in this run, each on 25% of the 1,400,000 val ")
    assert f"the last on all of them (about {validation:.1f} s); --eval_interval N and --eval_tokens N choose" in out
    budget.on_validation_end(trainer, SimpleNamespace(validation_seconds=lambda: 0.2, eval_share=module.eval_share))
    assert budget.reserve == pytest.approx(1.5 * validation + 0.5)  # the last validation scores all of the split


def test_schedule_horizon_follows_elapsed_time(workdir):
    from carlos.module import CarlosLM
    from tests.conftest import gpt_config

    m = CarlosLM(gpt_config(block_size=32).to_dict(), {"lr": 1e-3}, {}, max_steps=-1, run={})
    assert m.total_steps(10) == math.inf  # no budget: unbounded
    m.deadline_s = 100.0
    assert m.total_steps(10) == math.inf  # no pace yet
    m.pace = (10, 25.0)  # a quarter of the budget used by step 10 (TimeBudget's clock, the same on every rank)
    m.elapsed_s = lambda: 99.0  # this rank's own clock is not what the schedule follows
    assert m.total_steps(11) == pytest.approx(40.0)
    m.hparams.max_steps = 30  # whichever limit comes first
    assert m.total_steps(11) == 30


def test_lightning_slurm_requeue_is_off_under_slurm(monkeypatch, tmp_path):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from carlos.manifest import Manifest
    from carlos.train import trainer_plugins

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins(Manifest(tmp_path)))
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "carlos")
    (slurm,) = [p for p in trainer_plugins(Manifest(tmp_path)) if isinstance(p, SLURMEnvironment)]
    assert slurm.auto_requeue is False


def test_same_seed_and_config_give_identical_metrics_on_cpu(workdir):
    """Bounded by max_steps, two runs write the same metrics.jsonl apart from its timing fields."""

    def records() -> list[dict]:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "elapsed_s")} for x in lines]

    train(train_cfg(workdir))
    first = records()
    train(train_cfg(workdir, "overwrite=true"))
    assert records() == first and any("val_loss" in r for r in first) and any("train_loss" in r for r in first)


def test_resume_without_last_pt_continues_from_the_newest_step_file(workdir, capsys):
    train(train_cfg(workdir, "ckpt_interval=4", "trainer.max_steps=8"))
    (workdir / "checkpoints" / "last.pt").unlink()
    capsys.readouterr()
    train(train_cfg(workdir, "ckpt_interval=4", "trainer.max_steps=12", "resume=true"))
    assert f"resuming from {workdir / 'checkpoints' / 'step_000008.pt'} at step 8" in capsys.readouterr().out
    assert torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 12


def test_weight_decay_auto_follows_the_epochs_of_the_budget(workdir, capsys):
    train(train_cfg(workdir, "regularization.epochs=[0.01,100]", "regularization.weight_decay=[0.0,0.9]"))
    train_tokens = json.loads((workdir / "splits.json").read_text())["tokens"]["train"]
    epochs = 12 * TOKENS_PER_STEP / train_tokens
    decay = 0.9 * math.log(epochs / 0.01) / math.log(100 / 0.01)
    out = capsys.readouterr().out
    assert f"weight decay {decay:.2f}: about {epochs:,.1f} epochs in this budget (12 steps of 256 tokens" in out
    groups = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["optimizer_states"][0]["param_groups"]
    # Muon's matrices, AdamW's matrices and embeddings, then biases and gains
    assert [g["weight_decay"] for g in groups] == [pytest.approx(decay), pytest.approx(decay), 0.0]
    # a number is kept as given, and nothing is said
    train(train_cfg(workdir, "optimizer.weight_decay=0.05", "overwrite=true"))
    assert "weight decay" not in capsys.readouterr().out
    groups = torch.load(workdir / "checkpoints" / "last.pt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05, 0.0]


def test_context_schedule_trains_on_shorter_windows_first_with_the_same_tokens(workdir, monkeypatch):
    from carlos.module import CarlosLM
    from tests.conftest import gpt_config

    m = CarlosLM(gpt_config(block_size=32).to_dict(), {"lr": 1e-3}, {}, max_steps=30, run={}, context=[8, 16])
    assert [m.context_at(s, 32) for s in (0, 9, 10, 19, 20, 29)] == [8, 8, 16, 16, 32, 32]
    shapes = []
    real = CarlosLM.training_step

    def training_step(self, batch, batch_idx):
        real_loss = self.model.loss
        self.model.loss = lambda x, y: (shapes.append((self.global_step, tuple(x.shape))), real_loss(x, y))[1]
        try:
            return real(self, batch, batch_idx)
        finally:
            del self.model.loss

    monkeypatch.setattr(CarlosLM, "training_step", training_step)
    train(train_cfg(workdir, "data.context_schedule=[8,16]"))
    # 12 steps of 2 micro-batches of 4 x 32 tokens: steps 0-3 as 16 x 8, 4-7 as 8 x 16, 8-11 whole
    assert [s for _, s in shapes] == [(16, 8)] * 8 + [(8, 16)] * 8 + [(4, 32)] * 8
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records if "train_loss" in r][-1] == 12 * TOKENS_PER_STEP


@pytest.mark.parametrize("lengths", ["[32]", "[12]", "[16,8]"])
def test_context_schedule_of_lengths_that_do_not_divide_seq_len_is_refused(workdir, lengths):
    with pytest.raises(CarlosError, match=r"data.context_schedule"):
        train(train_cfg(workdir, f"data.context_schedule={lengths}"))
