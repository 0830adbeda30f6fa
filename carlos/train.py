"""train(cfg): builds data, module, callbacks, loggers and the Lightning Trainer; returns the best val bpb.

Everything that can be refused is checked before anything is written, so a refused run leaves the
workdir as it was (not even a config snapshot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from carlos.checkpoint import check_checkpoint, load_checkpoint
from carlos.config import WANDB_MODES, TrainConfig, parse, to_plain
from carlos.errors import CarlosError
from carlos.files import read_regular
from carlos.generate import prompt_ids
from carlos.lock import DirLock
from carlos.manifest import Manifest
from carlos.memory import check_fits, num_params, training_bytes, validation_bytes
from carlos.model import GPTConfig, ModelConfigError
from carlos.prepare import RUN_OUTPUTS
from carlos.workdir import PreparedData

if TYPE_CHECKING:  # Lightning takes seconds to import: train imports it only once the workdir is accepted
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from carlos.callbacks import Checkpoints, JsonlLogger, Preemption, TrainMetrics

log = logging.getLogger("carlos")
LONGEST = 2**62  # micro-batches: what a run may count to without overflowing a 64-bit length


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


def _requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def newest_checkpoint(ckpt_dir: Path, manifest: Manifest) -> Path | None:
    """last.pt, or when it is missing the highest-numbered step file (a kill cannot lose last.pt, but a
    user's rm can); only checkpoints this run wrote."""
    last = ckpt_dir / "last.pt"
    if last.is_file() and manifest.owns(last):
        return last
    steps = [p for p in ckpt_dir.glob("step_*.pt") if p.is_file() and p.stem[5:].isdigit() and manifest.owns(p)]
    return max(steps, key=lambda p: int(p.stem[5:]), default=None)


def _resume_from(tc: TrainConfig, ckpt_dir: Path, manifest: Manifest) -> Path | None:
    newest = newest_checkpoint(ckpt_dir, manifest)
    if _requeued() and newest is not None:
        # SLURM requeued this job (submitit does after its time-limit signal, when carlos wrote last.pt):
        # it continues its own run whatever resume and overwrite say
        return newest
    if tc.resume != "false" and tc.overwrite:
        raise CarlosError("--resume and --overwrite contradict each other; pass one of them")
    earlier = sorted(p.name for p in ckpt_dir.glob("*.pt") if manifest.owns(p))
    if tc.resume == "true" and newest is None:
        if earlier:
            raise CarlosError(
                f"nothing to resume: {ckpt_dir} has no last.pt or step_*.pt, only {', '.join(earlier)}; "
                "pass --overwrite to start over"
            )
        raise CarlosError(f"nothing to resume: no checkpoints in {ckpt_dir}; start a new run without --resume")
    if tc.resume in ("true", "auto") and newest is not None:
        return newest
    if earlier and not tc.overwrite:
        how = "pass --resume to continue it or --overwrite" if newest else "pass --overwrite"
        raise CarlosError(
            f"{ckpt_dir.parent} already holds checkpoints of an earlier run; {how} to delete it and start over"
        )
    return None


def _wandb_logger(tc: TrainConfig, run_dir: Path):
    """W&B through Lightning's logger, on when a project comes from the config, the environment or a .env
    in the current directory; wandb is not even imported otherwise. Built (and its settings checked)
    before the run writes anything; W&B itself starts with the run."""
    from dotenv import load_dotenv

    env = Path.cwd() / ".env"
    if os.path.lexists(env):  # read as a regular file only: a FIFO there would block the run
        try:
            load_dotenv(stream=io.StringIO(read_regular(env, "fix or remove it").decode("utf-8")), override=False)
        except UnicodeDecodeError:
            raise CarlosError(f"cannot read {env} (it is not UTF-8 text); fix or remove it") from None
    project = tc.wandb.project or os.environ.get("WANDB_PROJECT")
    mode = tc.wandb.mode or os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise CarlosError(
            f"WANDB_MODE={mode!r} (from the environment or .env) is not a W&B mode; use one of "
            f"{', '.join(WANDB_MODES[:3])}"
        )
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
    # validation sums are reduced across ranks by CarlosLM itself before they are logged
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


@dataclasses.dataclass
class Run:
    """An accepted run: everything checked and built, nothing written yet."""

    cfg: DictConfig
    tc: TrainConfig
    data: PreparedData
    run_dir: Path
    leader: bool
    manifest: Manifest
    resume: Path | None
    prev: dict | None
    model_cfg: GPTConfig
    precision: str
    why: str
    optimizer: dict
    schedule: dict
    # built by _build_trainer
    trainer: L.Trainer | None = None
    metrics: TrainMetrics | None = None
    checkpoints: Checkpoints | None = None
    preemption: Preemption | None = None
    jsonl: JsonlLogger | None = None
    wandb: WandbLogger | None = None
    begun: bool = False  # begin() has run: the run has started writing
    wandb_new: bool = False  # W&B's directory is this run's to make: recorded as carlos's, whole

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def train(cfg: DictConfig) -> float:
    """Train on a prepared workdir; returns the best validation bits-per-byte. Checks everything, then
    writes: a refused run leaves the workdir as it was (not even a config snapshot)."""
    tc = parse(cfg, TrainConfig)
    workdir = Path(tc.workdir).expanduser()
    data = PreparedData.load(workdir)
    run_dir = run_dir_for(workdir)
    # one process (devices 1, one node) is its own leader, whatever RANK or LOCAL_RANK the environment holds
    leader = (str(tc.trainer.devices) == "1" and tc.trainer.num_nodes == 1) or is_rank_zero()
    with contextlib.ExitStack() as locks:
        if leader:  # the other ranks of a DDP run work under rank 0's lock
            if run_dir != workdir:  # a sweep job: the prepared data is shared with the other jobs
                locks.enter_context(DirLock(workdir, "train (sweep job)", shared=True))
            locks.enter_context(DirLock(run_dir, "train"))
        run = accept(cfg, tc, data, run_dir, leader)
        return fit(run)  # begin(run) comes in it, once Lightning has restored what the run resumes


def accept(cfg: DictConfig, tc: TrainConfig, data: PreparedData, run_dir: Path, leader: bool) -> Run:
    """Every check a run can fail, in order: resume, files in the way, model, memory, optimizer, trainer."""
    _check_ddp_in_sweep(tc.trainer)
    manifest = Manifest(run_dir, writable=leader)
    ckpt_dir = run_dir / "checkpoints"
    if leader:
        fix = "move it away, or choose another --workdir"
        dirs = [run_dir / name for name in ("checkpoints", "samples", ".hydra")]
        manifest.refuse_foreign([run_dir / "metrics.jsonl", run_dir / "job.json", run_dir / "error.log"], dirs, fix)
        resume = _resume_from(tc, ckpt_dir, manifest)
    else:  # rank 0 already accepted the run (and may be writing checkpoints into it)
        newest = newest_checkpoint(ckpt_dir, manifest)
        resume = newest if tc.resume != "false" or _requeued() else None
    prev = _resume_state(resume) if resume else None
    model_cfg = _model_config(tc, data, prev)
    device = device_type(tc.trainer.accelerator)
    stored = prev.get("precision") if prev else None
    precision, why = resolve_precision(tc.trainer.precision, device, model_cfg.d_model, stored)
    _check_machine(tc, model_cfg, device, int(data.info["windows"]["val"]))
    optimizer_cfg, schedule_cfg = dict(tc.optimizer), dict(tc.schedule)
    if precision in ("16-mixed", "16") and optimizer_cfg.get("fused"):
        # fp16's GradScaler must unscale the gradients before clipping, which a fused step does too late
        optimizer_cfg["fused"] = False
    # Lightning takes seconds to import: the checks above refuse a wrong workdir or model before it
    from carlos.module import check_optimization

    check_optimization(optimizer_cfg, schedule_cfg, tc.trainer.max_steps)
    run = Run(
        cfg, tc, data, run_dir, leader, manifest, resume, prev, model_cfg, precision, why, optimizer_cfg, schedule_cfg
    )
    _build_trainer(run)
    return run


def _resume_state(path: Path) -> dict:
    """The carlos metadata of the checkpoint to resume, once its weights and the shapes of its optimizer
    state are known to be whole. The rest of Lightning's training state is checked by loading it: a
    failure before the run writes anything is a refusal (fit), not a crash after it wrote."""
    ckpt = load_checkpoint(path)
    model_cfg, _ = check_checkpoint(ckpt, path)
    try:
        if not isinstance(ckpt["carlos"].get("step"), int) or not isinstance(ckpt.get("global_step"), int):
            raise ValueError("no step")
        _check_optimizer_state(ckpt.get("optimizer_states"), model_cfg)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CarlosError(
            f"cannot resume from {path}: its training state is damaged ({e}); resume from another checkpoint, "
            "or start over with --overwrite"
        ) from None
    return ckpt["carlos"]


def _check_optimizer_state(states, model_cfg: GPTConfig) -> None:
    """Every tensor of the optimizer's state has its parameter's shape: torch does not check when it loads
    one, and a fused step over a wrong shape reads out of bounds (a segmentation fault, not an error)."""
    from carlos.model import GPT

    with torch.device("meta"):
        groups = GPT(model_cfg).param_groups(0.0)
    shapes = [tuple(p.shape) for g in groups for p in g["params"]]
    if not isinstance(states, list) or len(states) != 1 or not isinstance(states[0], dict):
        raise ValueError("optimizer_states is not one optimizer's state")
    state, param_groups = states[0]["state"], states[0]["param_groups"]
    indices = [i for g in param_groups for i in g["params"]]
    if sorted(indices) != list(range(len(shapes))):
        raise ValueError(f"its optimizer holds {len(indices)} parameters, the model {len(shapes)}")
    for i, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[i]:
                raise ValueError(f"optimizer state {name} of parameter {i} has shape {tuple(value.shape)}")


def _model_config(tc: TrainConfig, data: PreparedData, prev: dict | None) -> GPTConfig:
    try:  # the model group's keys are GPTConfig's; vocabulary and context come from the prepared data
        model_cfg = GPTConfig(
            vocab_size=data.tokenizer.vocab_size, block_size=data.seq_len, **dataclasses.asdict(tc.model)
        )
    except ModelConfigError as e:
        raise CarlosError(str(e)) from None
    if prev is not None and prev["model"] != model_cfg.to_dict():
        diff = [
            f"{k}: {prev['model'].get(k)} -> {v}" for k, v in model_cfg.to_dict().items() if prev["model"].get(k) != v
        ]
        raise CarlosError(
            f"cannot resume: the model differs from the checkpoint ({'; '.join(diff)}); "
            "resume with the same model and prepared data, or start over with --overwrite"
        )
    if prev is not None and prev.get("data_sha256") not in (None, data.info["sha256"]):
        raise CarlosError(
            f"cannot resume: {data.workdir} was prepared again from another corpus since the checkpoint; "
            "start over with --overwrite, or prepare the original corpus again"
        )
    return model_cfg


def _check_machine(tc: TrainConfig, model_cfg: GPTConfig, device: str, val_windows: int) -> None:
    """What this machine cannot do: a GPU it lacks, more CPU processes or workers than cores, a model and
    batch beyond its memory (checked before anything is allocated)."""
    t, cores = tc.trainer, os.cpu_count() or 1
    if any(word in str(t.strategy) for word in ("spawn", "fork", "notebook")):
        raise CarlosError(
            f"trainer.strategy={t.strategy} runs training in processes it starts anew, where carlos's metrics and "
            "checkpoint records would be lost to this one; use trainer.strategy=ddp"
        )
    if t.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise CarlosError(
            f"trainer.accelerator={t.accelerator}: this machine has no CUDA GPU (torch sees none); "
            "use trainer.accelerator=cpu or auto"
        )
    cluster = any(k in os.environ for k in ("SLURM_NTASKS", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"))
    if t.num_nodes > 1 and not cluster:
        raise CarlosError(
            f"trainer.num_nodes={t.num_nodes} needs a cluster that starts the other nodes' processes (SLURM, "
            "torchrun); on one machine use trainer.devices, or launch with hydra/launcher=submitit_slurm"
        )
    processes = int(t.devices) if device == "cpu" and str(t.devices).isdigit() else 1
    if processes > cores:
        raise CarlosError(
            f"trainer.devices={t.devices} CPU processes exceed this machine's {cores} cores; use at most {cores}"
        )
    if tc.data.num_workers > 4 * cores:
        raise CarlosError(
            f"data.num_workers={tc.data.num_workers} is far beyond this machine's {cores} cores; use 0 (the default)"
        )
    d = tc.data
    val_batch = min(d.eval_batch_size, val_windows)
    need = max(training_bytes(model_cfg, d.micro_batch_size), validation_bytes(model_cfg, val_batch)) * processes
    check_fits(
        need,
        device,
        f"the model ({num_params(model_cfg):,} parameters) with micro-batch {d.micro_batch_size} and validation "
        f"batch {val_batch} x {model_cfg.block_size}",
        "use a smaller model, --micro_batch_size or data.eval_batch_size",
    )


def _callbacks(run: Run) -> list:
    """carlos's callbacks (metrics, samples, checkpoints, preemption, progress, time budget), kept on run."""
    from carlos.callbacks import (
        BeforeFirstStep,
        Checkpoints,
        Preemption,
        ProgressBar,
        SampleText,
        TimeBudget,
        TrainMetrics,
    )

    tc, s, tok = run.tc, run.tc.sample, run.data.tokenizer
    run.metrics = TrainMetrics(tc.log_interval, run.data.seq_len * tc.data.micro_batch_size)
    run.checkpoints = Checkpoints(run.ckpt_dir, run.manifest, tc.ckpt_interval, tc.eval_interval)
    run.preemption = Preemption(run.checkpoints)
    prompt = prompt_ids(tok, s.prompt)
    sample = SampleText(
        run.run_dir / "samples", run.manifest, prompt, s.prompt, s.tokens, s.temperature, s.top_k, s.top_p,
        tc.seed, tok.eos_id,
    )  # fmt: skip
    # first: begin() writes nothing until Lightning has set up and restored the run, so a checkpoint whose
    # training state does not load is refused before anything is written
    first = BeforeFirstStep(lambda: begin(run))
    callbacks = [first, run.metrics, sample, run.checkpoints, run.preemption, ProgressBar(run.metrics)]
    budget = tc.trainer.max_time_delta
    if budget is not None:
        callbacks.append(TimeBudget(budget.total_seconds()))  # last: it times the others' validation work
    return callbacks


def _build_trainer(run: Run) -> None:
    """The callbacks, loggers and Lightning Trainer; Lightning checks accelerator, devices, strategy and
    num_nodes here, before anything is written."""
    import lightning as L

    from carlos.callbacks import JsonlLogger

    tc, run_dir, manifest = run.tc, run.run_dir, run.manifest
    t, budget = tc.trainer, tc.trainer.max_time_delta
    callbacks = _callbacks(run)
    run.jsonl = JsonlLogger(run_dir / "metrics.jsonl", manifest, resume_step=run.prev["step"] if run.prev else None)
    loggers = [run.jsonl]
    run.wandb = _wandb_logger(tc, run_dir) if run.leader else None
    if run.wandb is not None:
        loggers.append(run.wandb)
        run.wandb_new = not os.path.lexists(run_dir / "wandb")  # W&B makes it before begin() runs
    _quiet_lightning()
    try:
        run.trainer = L.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            precision=run.precision,
            max_steps=t.max_steps,
            max_epochs=-1,
            max_time=budget,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val,
            # validation every eval_interval optimizer steps; Lightning counts micro-batches here
            val_check_interval=min(tc.eval_interval * t.accumulate_grad_batches, LONGEST),
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            logger=loggers,
            callbacks=callbacks,
            plugins=trainer_plugins(manifest),
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=str(run_dir),
            use_distributed_sampler=False,
            deterministic=t.deterministic,
            log_every_n_steps=tc.log_interval,  # silences a warning; carlos logs through its own callback
        )
    except Exception as e:  # noqa: BLE001 - Lightning refuses settings with several exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CarlosError(f"Lightning refused the trainer settings: {first}") from None


def begin(run: Run) -> None:
    """The run is accepted and Lightning has restored what it resumes: from here on it writes into run_dir
    (rank 0 only). With --overwrite the earlier run's files are moved aside first and deleted once the new
    run's first files are written, so a refusal here leaves the earlier run as it was."""
    run.begun = True
    if not run.leader:
        return
    manifest, run_dir = run.manifest, run.run_dir
    manifest.remove_stale()
    earlier = [run_dir / name for name in RUN_OUTPUTS] if run.tc.overwrite and run.resume is None else []
    with manifest.aside(earlier) as old:
        if run_dir != run.data.workdir:  # a sweep job's directory, made by Hydra for this run
            manifest.claim(run_dir, kind="dir")
        save_snapshot(run.cfg, run_dir, manifest)
        if run.wandb_new:  # a wandb/ that was there before stays the user's
            manifest.claim(run_dir / "wandb", kind="tree")
        if run.resume:  # the samples past the checkpoint came from the run that continued after it
            for p in (run_dir / "samples").glob("step_*.txt"):
                if p.stem[5:].isdigit() and int(p.stem[5:]) > run.prev["step"] and manifest.owns(p):
                    p.unlink()
        run.jsonl.begin()
        old.commit()


def fit(run: Run) -> float:
    """Seed, build the module and the data, train, and say how it went."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from carlos.data import ByteDataModule
    from carlos.module import CarlosLM

    tc, data, trainer = run.tc, run.data, run.trainer
    L.seed_everything(tc.seed, workers=True, verbose=False)
    info = {
        "tokenizer": data.tokenizer.to_dict(),
        "seq_len": data.seq_len,
        "precision": run.precision,
        "seed": tc.seed,
        "workdir": str(data.workdir),
        "data_sha256": data.info["sha256"],
        "config": to_plain(run.cfg),
    }
    module = CarlosLM(run.model_cfg.to_dict(), run.optimizer, run.schedule, tc.trainer.max_steps, info)
    d = tc.data
    dm = ByteDataModule(data, d.micro_batch_size, d.eval_batch_size, tc.seed, d.num_workers, d.random_offsets)
    if trainer.is_global_zero:
        print(f"model: {module.model.num_params():,} parameters ({_shape(run.model_cfg)})")
        per_step = data.seq_len * d.micro_batch_size * tc.trainer.accumulate_grad_batches * trainer.world_size
        print(f"precision: {run.precision} ({run.why}); {per_step:,} tokens per optimizer step")
        if run.resume:
            print(f"resuming from {run.resume} at step {run.prev['step']}")
    # Lightning chains a SIGTERM handler it finds into its own, and Preemption the others: their graceful
    # stop must be the only one during fit (carlos.cli's handlers stop commands that do not train)
    for name in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        sig = getattr(signal, name, None)
        if sig is not None and getattr(signal.getsignal(sig), "carlos_stop", False):  # not submitit's
            signal.signal(sig, signal.SIG_DFL)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(run.resume) if run.resume else None, weights_only=True)
    except SIGTERMException:
        # stopped by a signal after writing its checkpoint (Preemption); 128 + signal is the shell's code
        signum = run.preemption.signum or signal.SIGTERM
        raise SystemExit(128 + int(signum)) from None
    except Exception as e:
        if run.begun or not run.resume or isinstance(e, CarlosError):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise CarlosError(
            f"cannot resume from {run.resume}: its training state does not load ({type(e).__name__}: {first}); "
            "resume from another checkpoint, or start over with --overwrite"
        ) from None
    ck = run.checkpoints
    if trainer.is_global_zero:
        step, secs = trainer.global_step, time.perf_counter() - started
        print(
            f"done: {step} steps, {step * run.metrics.tokens_per_step:,} tokens, {secs:.1f} s this session "
            f"({module.eval_seconds / max(secs, 1e-9):.1%} of it validating, sampling and checkpointing); "
            f"best val_loss {ck.best:.4f} (bpb {ck.best_bpb:.4f}) at step {ck.best_step}; checkpoints in {run.ckpt_dir}"
        )
    return ck.best_bpb


def _shape(c: GPTConfig) -> str:
    return (
        f"d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, d_ff={c.d_ff}, "
        f"vocab={c.vocab_size}, context={c.block_size}"
    )
