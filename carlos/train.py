"""carlos train: a prepared workdir -> checkpoints, metrics.jsonl, samples and a config snapshot.

    train(cfg): parse -> lock -> plan the run (carlos.plan: every refusal, before Lightning is imported)
                -> build the callbacks, loggers and Trainer -> fit (the run directory opens in it)
                -> summarize

A refused run leaves the workdir as it was (not even a config snapshot): everything that can be refused
is checked before anything is written, and the run directory opens only once Lightning has restored
the checkpoint the run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from carlos.config import EVAL_INTERVAL, TrainConfig, parse, to_plain
from carlos.errors import CarlosError, first_line, release_stop_handlers
from carlos.lock import DirLock
from carlos.manifest import Aside, Manifest
from carlos.ownership import RUN_LOCK, RUN_OUTPUTS, Place, step_of
from carlos.plan import RunPlan, is_leader, plan_run, run_dir_for
from carlos.sweep import in_multirun
from carlos.workdir import PreparedData

if TYPE_CHECKING:  # Lightning takes seconds to import: train imports it only once the run is planned
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from carlos.callbacks import Checkpoints, Preemption, TrainMetrics
    from carlos.loggers import JsonlLogger
    from carlos.module import CarlosLM

LONGEST = 2**62  # micro-batches: what a run may count to without overflowing a 64-bit length


@dataclasses.dataclass
class Run:
    """A planned run with its Trainer, and the callbacks and loggers that train reads back."""

    plan: RunPlan
    trainer: L.Trainer
    metrics: TrainMetrics
    checkpoints: Checkpoints
    preemption: Preemption
    jsonl: JsonlLogger
    loggers: list[Logger]  # Lightning's, as the logger group and W&B's settings select
    opened: bool = False  # open_run_dir has run: the run has started writing
    earlier: Aside | None = None  # --overwrite: the earlier run's outputs, aside until the run opens
    new_dirs: list[Path] = dataclasses.field(default_factory=list)  # the loggers' that did not exist before


def train(cfg: DictConfig) -> float:
    """Train on a prepared workdir; returns the best validation bits-per-byte."""
    started = job_started()
    config = parse(cfg, TrainConfig)
    workdir, leader = Path(os.path.expanduser(config.workdir)), is_leader(config)
    command = f"train --run {config.run}" if config.run else "train"
    with contextlib.ExitStack() as held:
        if leader and workdir.is_dir():  # the data, shared with the workdir's other runs; prepare takes it alone
            held.enter_context(DirLock(workdir, command, shared=True))
        data = PreparedData.load(workdir)
        place = held.enter_context(run_place(config, data.workdir, command, leader))
        plan = plan_run(cfg, config, data, place, leader)
        run = build_run(plan, started)
        module, seconds = fit(run)
        return summarize(run, module, seconds)


def job_started() -> float:
    """When --max_time's clock started: when the command did (carlos.cli.main), or this sweep job."""
    if in_multirun() or "CARLOS_STARTED" not in os.environ:
        return time.time()
    return float(os.environ["CARLOS_STARTED"])


def run_place(config: TrainConfig, workdir: Path, command: str, leader: bool) -> Place:
    """The run's directory, which one process trains at a time (other ranks: rank 0's lock): the workdir
    itself, WORKDIR/runs/NAME (made now, so that its lock is in it whatever name reaches it), or the
    directory Hydra made for a sweep job."""
    run_dir = run_dir_for(config)
    if in_multirun():
        kind, label, fix, what, busy = "job", f"sweep job {run_dir}", "choose another hydra.sweep.dir", run_dir, ""
    elif config.run:
        kind, label, what = "run", f"--run {config.run}: {run_dir}", f"run {config.run} of {workdir}"
        fix = busy = "train under another --run name"
    else:
        kind, label, fix, what = "workdir", f"--workdir {workdir}", "choose another --workdir", workdir
        busy = "use another --workdir, or train beside it with --run NAME"
    lock = DirLock(run_dir, command, name=RUN_LOCK, what=str(what), fix=busy or fix) if leader else None
    return Place(run_dir, kind, label, fix, lock)


# ---------------------------------------------------------------- callbacks, loggers, Trainer


def build_run(plan: RunPlan, started: float) -> Run:
    """The callbacks, loggers and Lightning Trainer. Lightning checks accelerator, devices, strategy and
    num_nodes here, still before anything is written."""
    import lightning as L

    from carlos.callbacks import BeforeFirstStep, Checkpoints, Preemption, ProgressBar, SampleText, TrainMetrics
    from carlos.loggers import JsonlLogger, LineLogger, lightning_loggers

    config, run_dir = plan.config, plan.run_dir
    metrics = TrainMetrics(config.log_interval, plan.data.seq_len * config.data.micro_batch_size)
    checkpoints = Checkpoints(plan.checkpoint_dir, plan.manifest, config.ckpt_interval)
    preemption = Preemption(checkpoints)
    jsonl = JsonlLogger(run_dir / "metrics.jsonl", plan.manifest, plan.resumed["step"] if plan.resumed else None)
    loggers = lightning_loggers(plan)
    _quiet_lightning()
    # first: opening the run directory waits until Lightning has set up and restored the run, so a
    # checkpoint whose training state does not load is refused before anything is written
    first = BeforeFirstStep(lambda: open_run_dir(run))
    text = SampleText(run_dir / "samples", plan.manifest, config.sample, config.seed, plan.data.tokenizer)
    callbacks = [first, metrics, text, checkpoints, preemption]
    terminal = sys.stdout.isatty()
    if terminal:
        callbacks.append(ProgressBar(metrics))
    else:  # a log file or a pipe: plain lines, not a bar's redraws, and no bar's hooks called on every step
        loggers.append(LineLogger(config.trainer.max_steps))
    if config.optimizer.get("weight_decay") == "auto":
        from carlos.callbacks import WeightDecayByEpochs

        tokens, timed = int(plan.data.info["tokens"]["train"]), config.trainer.max_time_delta is not None
        callbacks.append(WeightDecayByEpochs(tokens, metrics.tokens_per_batch, config.regularization, timed))
    if config.ema_decay is not None:  # Lightning's: validation, checkpoints' state_dict and the end use the average
        callbacks.insert(1, L.pytorch.callbacks.EMAWeightAveraging(decay=config.ema_decay))
    if config.trainer.max_time_delta is not None:
        from carlos.callbacks import TimeBudget

        budget, val_tokens = config.trainer.max_time_delta.total_seconds(), int(plan.data.info["tokens"]["val"])
        choose = {"interval": config.eval_interval == "auto", "tokens": config.eval_tokens == "auto"}
        callbacks.append(TimeBudget(budget, started, val_tokens, metrics.tokens_per_batch, **choose))  # last: times all
    try:
        trainer = L.Trainer(
            **_trainer_arguments(plan), enable_progress_bar=terminal, logger=[jsonl, *loggers], callbacks=callbacks
        )
    except Exception as e:  # noqa: BLE001 - Lightning refuses settings with several exception types
        raise CarlosError(f"Lightning refused the trainer settings: {first_line(e)}") from None
    run = Run(plan, trainer, metrics, checkpoints, preemption, jsonl, loggers)
    return run  # open_run_dir(run), above, runs once Lightning has restored the run


def _trainer_arguments(plan: RunPlan) -> dict:
    """lightning.Trainer's arguments, from conf/train.yaml's trainer group and what carlos does itself."""
    trainer, run_dir = plan.config.trainer, plan.run_dir
    return {
        "accelerator": trainer.accelerator,
        "devices": trainer.devices,
        "num_nodes": trainer.num_nodes,
        "strategy": trainer.strategy,
        "precision": plan.precision,
        "max_steps": trainer.max_steps,
        "max_epochs": -1,
        "max_time": trainer.max_time_delta,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "deterministic": trainer.deterministic,
        # validation every eval_interval optimizer steps; Lightning counts micro-batches here
        "val_check_interval": min(_eval_interval(plan.config) * trainer.accumulate_grad_batches, LONGEST),
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "plugins": trainer_plugins(plan.manifest),
        "enable_checkpointing": False,  # carlos's Checkpoints callback writes them
        "enable_model_summary": False,
        "default_root_dir": str(run_dir),
        "use_distributed_sampler": False,  # carlos's samplers split the batches between ranks
        "log_every_n_steps": plan.config.log_interval,  # silences a warning; carlos logs through TrainMetrics
    }


def _eval_interval(config: TrainConfig) -> int:
    """Optimizer steps between validations: eval_interval, or for auto EVAL_INTERVAL, or under --max_time
    none until TimeBudget has measured the pace and chosen (at step 30)."""
    if config.eval_interval != "auto":
        return config.eval_interval
    return LONGEST if config.trainer.max_time_delta is not None else EVAL_INTERVAL


def trainer_plugins(manifest: Manifest) -> list:
    """Atomic checkpoint writes; under SLURM, its environment with Lightning's auto-requeue off: submitit
    requeues a job that reaches its time limit (its signal -> Preemption writes last.pt -> the requeued
    job resumes), and Lightning's own SLURM requeue would requeue it a second time."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from carlos.callbacks import AtomicCheckpointIO

    plugins: list = [AtomicCheckpointIO(manifest)]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _quiet_lightning() -> None:
    # Lightning's start-up chatter (GPU/TPU availability, tips) is not useful for a tiny model on one box
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # the sampler resumes from trainer.global_step itself, so this Lightning warning does not apply
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # carlos logs by itself
    # a resumed run's metrics.csv: CSVLogger starts it over, and carlos writes its history back (replay_history)
    warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted.*")
    # carlos runs where it is started: under SLURM, srun starts the tasks (docs/SCALING_OUT.md)
    warnings.filterwarnings("ignore", message=".*The .srun. command is available on your system but is not used.*")
    # validation sums are reduced across ranks by CarlosLM itself before they are logged
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


# ---------------------------------------------------------------- the run directory


def set_aside_earlier(run: Run) -> None:
    """--overwrite: the earlier run's outputs (its loggers' directories included) move aside before any
    logger of the new run writes where they were; deleted once the run opens, put back if it fails before."""
    plan = run.plan
    if plan.leader and plan.config.overwrite and plan.resume is None:
        run.earlier = plan.manifest.aside([plan.run_dir / name for name in RUN_OUTPUTS]).__enter__()
    run.new_dirs = [d for d in plan.logger_dirs if not os.path.lexists(d)]


def undo_unopened(run: Run) -> None:
    """A run that failed before it opened: what its loggers began goes, the earlier run comes back."""
    for d in run.new_dirs:
        shutil.rmtree(d, ignore_errors=True)
    if run.earlier is not None:
        run.earlier.rollback()


def open_run_dir(run: Run) -> None:
    """The run is accepted and Lightning has restored what it resumes: from here on it writes into the run
    directory (rank 0 only), and the earlier run that --overwrite set aside is deleted once the new run's
    first files are written (put back if they cannot be)."""
    run.opened = True
    if not run.plan.leader:
        return
    try:
        _write_first_files(run)
    except BaseException:
        undo_unopened(run)
        raise
    if run.earlier is not None:
        run.earlier.commit()


def _write_first_files(run: Run) -> None:
    """The run's records: its directories in the workdir's record, the config snapshot, its loggers'
    directories, metrics.jsonl up to the checkpoint it resumes (and no sample past it)."""
    plan = run.plan
    manifest, run_dir = plan.manifest, plan.run_dir
    manifest.remove_stale(keep=run.earlier.dir if run.earlier else None)
    if plan.made:  # runs/ and runs/NAME, made for the run's lock: the workdir's, removed with its runs
        Manifest(Path(os.path.realpath(plan.data.workdir))).claim(*plan.made, kind="dir")
    save_snapshot(plan.composed, run_dir, manifest)
    for d in plan.logger_dirs:  # recorded whole: what the logger's library writes there is the run's
        manifest.claim(d, kind="tree")
    if plan.resume:  # the samples past the checkpoint came from the run that continued after it
        for p in (run_dir / "samples").glob("step_*.txt"):
            if (step_of(p) or 0) > plan.resumed["step"] and manifest.owns(p):
                p.unlink()
    from carlos.loggers import replay_history

    replay_history(run.loggers, run.jsonl.begin())


def save_snapshot(cfg: DictConfig, run_dir: Path, manifest: Manifest) -> None:
    """Hydra's snapshot (config, hydra, overrides), written only once the run is accepted: Hydra itself
    writes it before the task starts, so conf/ turns Hydra's own writing off (output_subdir: null)."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    manifest.claim_dir(out)
    files = {"config.yaml": cfg}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        files.update({"hydra.yaml": OmegaConf.create({"hydra": hc}), "overrides.yaml": hc.overrides.task})
    for name, node in files.items():
        text = OmegaConf.to_yaml(node)
        manifest.write(out / name, lambda f, text=text: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------- fit and summarize


def fit(run: Run) -> tuple[CarlosLM, float]:
    """Seed, build the module and the data, and train; returns the module and the seconds it trained."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from carlos.data import ByteDataModule
    from carlos.module import CarlosLM

    plan, trainer = run.plan, run.trainer
    config, data = plan.config, plan.data
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = CarlosLM(
        plan.model.to_dict(), plan.optimizer, plan.schedule, config.trainer.max_steps, _record(plan),
        config.data.context_schedule,
    )  # fmt: skip
    if config.eval_tokens != "auto":  # the share of the val split each validation but the last scores
        module.eval_share = min(1.0, config.eval_tokens / max(int(data.info["tokens"]["val"]), 1))
    if plan.init is not None:  # fine-tuning: the weights only; the optimizer, step and schedule start anew
        module.model.load_state_dict(plan.init)
    datamodule = ByteDataModule(data, config.data, config.seed)
    if trainer.is_global_zero:
        _print_start(run, module)
    release_stop_handlers()  # Lightning's graceful stop (and Preemption's) is the only one while it trains
    started = time.perf_counter()
    set_aside_earlier(run)
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(plan.resume) if plan.resume else None, weights_only=True
        )
    except BaseException as e:
        if not run.opened:  # Lightning's loggers start writing before a resumed run is restored
            undo_unopened(run)
        if isinstance(e, SIGTERMException):
            # stopped by a signal after writing its checkpoint (Preemption); 128 + signal is the shell's code
            raise SystemExit(128 + int(run.preemption.signum or signal.SIGTERM)) from None
        if run.opened or not plan.resume or not isinstance(e, Exception) or isinstance(e, CarlosError):
            raise
        raise CarlosError(
            f"cannot resume from {plan.resume}: its training state does not load ({type(e).__name__}: "
            f"{first_line(e)}); resume from another checkpoint, or start over with --overwrite"
        ) from None
    return module, time.perf_counter() - started


def _record(plan: RunPlan) -> dict:
    """What each checkpoint records beside the weights, for eval, sample and resuming."""
    return {
        "tokenizer": plan.data.tokenizer.to_dict(),
        "seq_len": plan.data.seq_len,
        "precision": plan.precision,
        "seed": plan.config.seed,
        "workdir": str(plan.data.workdir),
        "data_sha256": plan.data.info["sha256"],
        "init_from": plan.config.init_from,  # on resume, what the run started from (plan._origin_of_resumed)
        "max_steps": plan.config.trainer.max_steps,  # -1: bounded by max_time only
        "config": to_plain(plan.composed),
    }


def _print_start(run: Run, module: CarlosLM) -> None:
    plan, model = run.plan, run.plan.model
    shape = (
        f"d_model={model.d_model}, n_layers={model.n_layers}, n_heads={model.n_heads}, d_ff={model.d_ff}, "
        f"vocab={model.vocab_size}, context={model.block_size}"
    )
    print(f"model: {module.model.num_params():,} parameters ({shape})")
    batch = plan.data.seq_len * plan.config.data.micro_batch_size * plan.config.trainer.accumulate_grad_batches
    per_step = batch * run.trainer.world_size
    print(f"precision: {plan.precision} ({plan.precision_reason}); {per_step:,} tokens per optimizer step")
    if plan.resume:
        print(f"resuming from {plan.resume} at step {plan.resumed['step']:,}")
        note = schedule_change(plan)
        if note:
            print(note)
    if plan.init is not None:
        print(f"fine-tuning from {plan.config.init_from}: its weights; the optimizer, step and schedule start anew")
    if plan.init_unused:
        began = f"started from {plan.config.init_from}" if plan.config.init_from else "started from scratch"
        print(f"--init_from {plan.init_unused} is not used: the run resumes its own checkpoint (it {began})")


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when it is under it (a sweep
    job's directory comes from Hydra as an absolute path, a single run's as given), else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def schedule_change(plan: RunPlan) -> str | None:
    """What a resume with another max_steps does to the lr: the schedule is a function of the step and the
    run's length, so a longer run stretches it (the lr goes back up from where the shorter run had it)."""
    from carlos.optimization import build_schedule

    before, now, step = plan.resumed.get("max_steps"), plan.config.trainer.max_steps, plan.resumed["step"]
    if not isinstance(before, int) or before <= 0 or now <= 0 or before == now:
        return None
    lr_at = build_schedule(plan.schedule, plan.optimizer["lr"])
    return (
        f"schedule: max_steps {before:,} -> {now:,}, so the lr schedule is stretched over {now:,} steps: at "
        f"step {step:,} the lr is now {lr_at(step, now):.2e} (it was {lr_at(step, before):.2e})"
    )


def _finish_wandb(run: Run) -> None:
    """End the W&B run now, before carlos's last line: left to its exit handler, W&B prints its closing
    lines after it, with colour codes even into a file."""
    if run.plan.wandb is not None:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def summarize(run: Run, module: CarlosLM, seconds: float) -> float:
    """Say how the run went (rank 0); returns its best validation bits-per-byte."""
    checkpoints, trainer = run.checkpoints, run.trainer
    if trainer.is_global_zero:
        _finish_wandb(run)
        step = trainer.global_step
        print(
            f"done: {step:,} steps, {step * run.metrics.tokens_per_step:,} tokens, {seconds:.1f} s this session "
            f"({module.eval_seconds / max(seconds, 1e-9):.1%} of it validating, sampling and checkpointing); "
            f"best val_loss {checkpoints.best:.4f} (bpb {checkpoints.best_bpb:.4f}) at step "
            f"{checkpoints.best_step:,}; checkpoints in {shown_path(run.plan.checkpoint_dir)}"
        )
    return checkpoints.best_bpb
