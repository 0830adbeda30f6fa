"""train(cfg): builds data, module, callbacks, loggers and the Lightning Trainer; returns the best val bpb.

Everything that can be refused is checked before anything is written, so a refused run leaves the
workdir as it was (not even a config snapshot).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from carlos.config import CarlosError, TrainConfig, parse, to_plain
from carlos.generate import load_checkpoint, prompt_ids
from carlos.model import GPTConfig, ModelConfigError
from carlos.prepare import remove_run_outputs
from carlos.workdir import PreparedData

log = logging.getLogger("carlos")


def device_type(accelerator: str) -> str:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator == "mps" or (accelerator in ("auto", "gpu") and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


# the narrowest model for which CPU bf16 autocast pays: below it the casts around every op cost more
# than the bf16 matmuls save (measured on an AMD EPYC with AVX512-BF16, batch 16 x 256, tokens/s
# fp32 vs bf16-mixed: d_model 64: 95K vs 80K; d_model 128: 18K vs 22K; d_model 256: 6.3K vs 10.6K)
CPU_BF16_MIN_WIDTH = 128


def cpu_has_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX), which make CPU bf16 matmuls faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(asked: str, device: str, d_model: int, stored: str | None = None) -> tuple[str, str]:
    """(Lightning precision, why). auto: bf16-mixed on GPUs with bf16, 16-mixed on older GPUs; on the CPU,
    bf16-mixed when it has bf16 instructions and the model is wide enough for them to pay, else 32-true.
    Decided from the hardware's features, never by timing; a resumed run keeps its stored choice."""
    if asked == "auto":
        if stored:
            return stored, "kept from the checkpoint being resumed"
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed", "GPU supports bf16"
            return "16-mixed", "GPU without bf16"
        if device != "cpu":
            return "32-true", f"{device.upper()}: mixed precision is not used there"
        if not cpu_has_bf16():
            return "32-true", "CPU without bf16 instructions"
        if d_model < CPU_BF16_MIN_WIDTH:
            return "32-true", f"CPU bf16 autocast is slower than fp32 below d_model={CPU_BF16_MIN_WIDTH}"
        return "bf16-mixed", f"CPU with bf16 instructions, d_model >= {CPU_BF16_MIN_WIDTH}"
    if device == "cpu" and asked in ("16-mixed", "16", "16-true"):
        raise CarlosError(
            f"trainer.precision={asked} needs a CUDA GPU and this run is on the CPU; use bf16-mixed, 32-true or auto"
        )
    return asked, "asked for"


def run_dir_for(workdir: Path) -> Path:
    """A single run writes into the workdir; a multirun job into the directory Hydra made for it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return workdir


def is_rank_zero() -> bool:
    """Whether this process is rank 0, before the Trainer exists: Lightning's DDP children get RANK or
    LOCAL_RANK and NODE_RANK, SLURM tasks SLURM_PROCID. Only rank 0 checks and changes the run
    directory; the others follow it. (Lightning's rank_zero_only.rank would take a second node's
    LOCAL_RANK 0 for rank 0.)"""
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID", "").isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("LOCAL_RANK", "0") or 0) == 0 and int(env.get("NODE_RANK", "0") or 0) == 0


def _check_ddp_in_sweep(t) -> None:
    """A multirun job is called as a function by Hydra's launcher: there is no command line for
    Lightning to re-run for the other ranks. Under SLURM each rank is a task of its own."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if t.several_processes and multirun and "SLURM_NTASKS" not in os.environ:
        t.refuse_in_sweep()


def trainer_plugins() -> list:
    """Atomic checkpoint writes; under SLURM, its environment with Lightning's auto-requeue off: submitit
    requeues a job that reaches its time limit (its signal -> Preemption writes last.pt -> the requeued
    job resumes), and Lightning's own SLURM requeue would requeue it a second time."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from carlos.callbacks import AtomicCheckpointIO

    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def save_snapshot(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's snapshot (config, hydra, overrides), written only once the run is accepted: Hydra itself
    writes it before the task starts, so conf/ turns Hydra's own writing off (output_subdir: null)."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")
        OmegaConf.save(hc.overrides.task, out / "overrides.yaml")


def _requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _resume_from(tc: TrainConfig, ckpt_dir: Path) -> Path | None:
    last = ckpt_dir / "last.pt"
    if _requeued() and last.exists():
        # SLURM requeued this job (submitit does after its time-limit signal, when carlos wrote last.pt):
        # it continues its own run whatever resume and overwrite say
        return last
    if tc.resume != "false" and tc.overwrite:
        raise CarlosError("--resume and --overwrite contradict each other; pass one of them")
    if tc.resume == "true" and not last.exists():
        raise CarlosError(f"nothing to resume: {last} does not exist; start a new run without --resume")
    if tc.resume in ("true", "auto") and last.exists():
        return last
    if any(ckpt_dir.glob("*.pt")) and not tc.overwrite:
        raise CarlosError(
            f"{ckpt_dir.parent} already holds checkpoints of an earlier run; pass --resume to continue it "
            "or --overwrite to delete it and start over"
        )
    return None


def _wandb_logger(tc: TrainConfig, run_dir: Path):
    """W&B through Lightning's logger, on when a project comes from the config, the environment or a .env
    in the current directory; wandb is not even imported otherwise."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    project = tc.wandb.project or os.environ.get("WANDB_PROJECT")
    mode = tc.wandb.mode or os.environ.get("WANDB_MODE")
    if not project or mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=project,
        entity=tc.wandb.entity or os.environ.get("WANDB_ENTITY"),
        name=tc.wandb.run_name,
        tags=list(tc.wandb.tags) or None,
        mode=mode,
        save_dir=str(run_dir),
    )


def _quiet_lightning() -> None:
    # Lightning's start-up chatter (GPU/TPU availability, tips) is not useful for a tiny model on one box
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # the sampler resumes from trainer.global_step itself, so this Lightning warning does not apply
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # carlos logs by itself
    # validation sums are reduced across ranks by LitGPT itself before they are logged
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def train(cfg: DictConfig) -> float:
    """Train on a prepared workdir; returns the best validation bits-per-byte."""
    tc = parse(cfg, TrainConfig)
    workdir = Path(tc.workdir).expanduser()
    data = PreparedData.load(workdir)
    run_dir = run_dir_for(workdir)
    ckpt_dir = run_dir / "checkpoints"
    _check_ddp_in_sweep(tc.trainer)
    leader = is_rank_zero()
    if leader:
        resume = _resume_from(tc, ckpt_dir)
    else:  # rank 0 already accepted the run (and may be writing checkpoints into it)
        last = ckpt_dir / "last.pt"
        resume = last if (tc.resume != "false" or _requeued()) and last.exists() else None
    prev = load_checkpoint(resume)["carlos"] if resume else None

    tok = data.tokenizer
    m = tc.model
    try:
        model_cfg = GPTConfig(
            vocab_size=tok.vocab_size,
            block_size=data.seq_len,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            d_ff=m.d_ff,
            dropout=m.dropout,
            bias=m.bias,
            norm=m.norm,
            mlp=m.mlp,
            pos=m.pos,
        )
    except ModelConfigError as e:
        raise CarlosError(str(e)) from None
    if prev is not None and prev["model"] != model_cfg.to_dict():
        diff = [f"{k}: {prev['model'][k]} -> {v}" for k, v in model_cfg.to_dict().items() if prev["model"].get(k) != v]
        raise CarlosError(
            f"cannot resume: the model differs from the checkpoint ({'; '.join(diff)}); "
            "resume with the same model and prepared data, or start over with --overwrite"
        )
    if prev is not None and prev.get("data_sha256") not in (None, data.info["sha256"]):
        raise CarlosError(
            f"cannot resume: {workdir} was prepared again from another corpus since the checkpoint; "
            "start over with --overwrite, or prepare the original corpus again"
        )
    device = device_type(tc.trainer.accelerator)
    precision, why = resolve_precision(
        tc.trainer.precision, device, model_cfg.d_model, prev.get("precision") if prev else None
    )
    # Lightning takes seconds to import: the checks above refuse a wrong workdir or model before it
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from carlos.callbacks import (
        Checkpoints,
        JsonlLogger,
        Preemption,
        ProgressBar,
        SampleText,
        TimeBudget,
        TrainMetrics,
        remove_stale_temporaries,
    )
    from carlos.data import ByteDataModule
    from carlos.module import LitGPT, build_optimizer, build_schedule

    max_steps = tc.trainer.max_steps
    budget = tc.trainer.max_time_delta
    optimizer_cfg, schedule_cfg = dict(tc.optimizer), dict(tc.schedule)
    if precision in ("16-mixed", "16") and optimizer_cfg.get("fused"):
        # fp16's GradScaler must unscale the gradients before clipping, which a fused step does too late
        optimizer_cfg["fused"] = False
    build_optimizer(optimizer_cfg, [torch.zeros(1, requires_grad=True)])
    build_schedule(schedule_cfg, optimizer_cfg["lr"])(0, max_steps if max_steps > 0 else math.inf)

    # -------- accepted: from here on the run writes into run_dir (rank 0 only)
    if tc.overwrite and leader and resume is None:
        remove_run_outputs(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if leader:
            save_snapshot(cfg, run_dir)
    except OSError as e:
        raise CarlosError(f"cannot write to {run_dir} ({e.strerror}); choose a writable --workdir") from None
    if leader:
        remove_stale_temporaries(run_dir)
    if resume and leader:
        for p in (run_dir / "samples").glob("step_*.txt"):
            if int(p.stem.split("_")[1]) > prev["step"]:
                p.unlink()

    _quiet_lightning()
    L.seed_everything(tc.seed, workers=True, verbose=False)
    run = {
        "tokenizer": tok.to_dict(),
        "seq_len": data.seq_len,
        "precision": precision,
        "seed": tc.seed,
        "workdir": str(workdir),
        "data_sha256": data.info["sha256"],
        "config": to_plain(cfg),
    }
    module = LitGPT(model_cfg.to_dict(), optimizer_cfg, schedule_cfg, max_steps, run)
    d = tc.data
    dm = ByteDataModule(data, d.micro_batch_size, d.eval_batch_size, tc.seed, d.num_workers, d.random_offsets)

    metrics = TrainMetrics(tc.log_interval, data.seq_len * tc.data.micro_batch_size)
    s = tc.sample
    checkpoints = Checkpoints(ckpt_dir, tc.ckpt_interval, tc.eval_interval)
    preemption = Preemption(checkpoints)
    callbacks = [
        metrics,
        SampleText(
            run_dir / "samples",
            prompt_ids(tok, s.prefix),
            s.prefix,
            s.tokens,
            s.temperature,
            s.top_k,
            s.top_p,
            tc.seed,
            tok.eos_id,
        ),
        checkpoints,
        preemption,
        ProgressBar(metrics),
    ]
    if budget is not None:
        callbacks.append(TimeBudget(budget.total_seconds()))  # last: it times the others' validation work
    loggers = [JsonlLogger(run_dir / "metrics.jsonl", resume_step=prev["step"] if prev else None)]
    wandb = _wandb_logger(tc, run_dir) if leader else None
    if wandb is not None:
        loggers.append(wandb)

    t = tc.trainer
    plugins = trainer_plugins()
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        max_time=budget,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        # validation every eval_interval optimizer steps; Lightning counts micro-batches here
        val_check_interval=tc.eval_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=callbacks,
        plugins=plugins,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
        deterministic=t.deterministic,
        log_every_n_steps=tc.log_interval,  # silences a warning; carlos logs through its own callback
    )
    if trainer.is_global_zero:
        print(f"model: {module.model.num_params():,} parameters ({_shape(model_cfg)})")
        per_step = data.seq_len * tc.data.micro_batch_size * t.accumulate_grad_batches * trainer.world_size
        print(f"precision: {precision} ({why}); {per_step:,} tokens per optimizer step")
        if resume:
            print(f"resuming from {resume} at step {prev['step']}")
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SIGTERMException:
        # stopped by a signal after writing its checkpoint (Preemption); 128 + signal is the shell's code
        signum = preemption.signum or signal.SIGTERM
        raise SystemExit(128 + int(signum)) from None
    ck = checkpoints
    best_bpb = ck.best_bpb
    if trainer.is_global_zero:
        step = trainer.global_step
        secs = time.perf_counter() - started
        print(
            f"done: {step} steps, {step * metrics.tokens_per_step:,} tokens, {secs:.1f} s this session "
            f"({module.eval_seconds / max(secs, 1e-9):.1%} of it validating, sampling and checkpointing); "
            f"best val_loss {ck.best:.4f} (bpb {best_bpb:.4f}) at step {ck.best_step}; checkpoints in {ckpt_dir}"
        )
    return best_bpb


def _shape(c: GPTConfig) -> str:
    return (
        f"d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, d_ff={c.d_ff}, "
        f"vocab={c.vocab_size}, context={c.block_size}"
    )
