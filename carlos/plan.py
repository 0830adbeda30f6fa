"""Planning a training run: every check a run can fail, made before it writes anything or imports Lightning.

plan_run() decides whether the run resumes and from which checkpoint, the model, the precision, the
optimizer and schedule and W&B's settings, and refuses in one line whatever this workdir or this machine
cannot do. train builds the Trainer from the RunPlan it returns.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from carlos.checkpoint import PREFIX, check_checkpoint, device_type, load_checkpoint
from carlos.compose import set_by
from carlos.config import WANDB_MODES, ModelConfig, TrainConfig
from carlos.errors import CarlosError
from carlos.files import printable, read_regular
from carlos.manifest import Manifest
from carlos.memory import check_fits, num_params, training_bytes, validation_bytes
from carlos.model import GPTConfig, ModelConfigError
from carlos.optimization import check_optimization
from carlos.ownership import LOGGER_DIRS, Place, not_a_file, run_dir, step_of
from carlos.precision import resolve_precision
from carlos.sweep import in_multirun
from carlos.workdir import PreparedData


@dataclasses.dataclass
class RunPlan:
    """An accepted run: everything checked, nothing built or written yet."""

    composed: DictConfig  # the config Hydra composed, for the run's snapshot and its checkpoints
    config: TrainConfig  # the same, validated
    data: PreparedData
    run_dir: Path  # the workdir, or a sweep job's directory
    leader: bool  # rank 0 (or the only process): the one that writes the run directory
    manifest: Manifest
    resume: Path | None  # the checkpoint the run continues from
    resumed: dict | None  # that checkpoint's carlos record (step, model, precision ...)
    model: GPTConfig
    precision: str
    precision_reason: str
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    wandb: dict[str, Any] | None  # WandbLogger's arguments; None: W&B is off
    logger_dirs: list[Path]  # the directories the selected loggers write into (wandb/, csv/, tensorboard/)
    init: dict[str, torch.Tensor] | None = None  # --init_from: the weights a new run starts from
    made: list[Path] = dataclasses.field(default_factory=list)  # directories made for the run (runs/NAME)
    init_unused: str | None = None  # an --init_from given to a run that resumes instead

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def run_dir_for(config: TrainConfig) -> Path:
    """A single run writes into the workdir (or WORKDIR/runs/NAME with --run NAME); a multirun job into
    the directory Hydra made for it."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return run_dir(Path(os.path.expanduser(config.workdir)), config.run)
    config.check_in_sweep(ranks_started="SLURM_NTASKS" in os.environ)
    return Path(HydraConfig.get().runtime.output_dir)


def is_leader(config: TrainConfig) -> bool:
    """Whether this process checks and writes the run directory: the only process of a run on one device,
    or rank 0 of several. Before the Trainer exists, the rank comes from the environment: Lightning's DDP
    children get RANK or LOCAL_RANK and NODE_RANK, SLURM tasks SLURM_PROCID. (Lightning's
    rank_zero_only.rank would take a second node's LOCAL_RANK 0 for rank 0.)"""
    if str(config.trainer.devices) == "1" and config.trainer.num_nodes == 1:
        return True  # whatever RANK or LOCAL_RANK the environment holds
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID", "").isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("LOCAL_RANK", "0") or 0) == 0 and int(env.get("NODE_RANK", "0") or 0) == 0


def plan_run(composed: DictConfig, config: TrainConfig, data: PreparedData, place: Place, leader: bool) -> RunPlan:
    """Every check a run can fail, in order: resume, files in the way, model, precision, machine, optimizer,
    W&B. Imports neither Lightning nor wandb."""
    manifest, run_dir = place.manifest, place.path
    resume = _resume_from(config, run_dir, manifest, leader)
    resumed = _resume_state(resume) if resume else None
    init_unused = _origin_of_resumed(composed, config, resumed)
    _check_same_optimizer(config, resumed)
    model = _model_config(config, data, resumed)
    _check_context(config.data.context_schedule, data.seq_len)
    device = device_type(config.trainer.accelerator)
    stored = resumed.get("precision") if resumed else None
    precision, reason = resolve_precision(config.trainer.precision, device, model.d_model, stored)
    _check_machine(config, model, device, int(data.info["windows"]["val"]))
    optimizer, schedule = dict(config.optimizer), dict(config.schedule)
    if optimizer.get("weight_decay") == "auto":  # the optimizer starts with the rule's first value; the
        optimizer["weight_decay"] = config.regularization.weight_decay[0]  # WeightDecayByEpochs sets it
    if precision in ("16-mixed", "16") and optimizer.get("fused"):
        # fp16's GradScaler must unscale the gradients before clipping, which a fused step does too late
        optimizer["fused"] = False
    check_optimization(optimizer, schedule, config.trainer.max_steps)
    _check_loggers(config, run_dir)
    wandb = wandb_settings(config, run_dir) if leader else None
    logger_dirs = _logger_dirs(config, run_dir, wandb, manifest)
    init = initial_weights(config, data, model) if config.init_from and resume is None else None
    return RunPlan(
        composed, config, data, run_dir, leader, manifest, resume, resumed, model, precision, reason, optimizer,
        schedule, wandb, logger_dirs, init, place.made, init_unused,
    )  # fmt: skip


def _check_context(lengths: list[int], seq_len: int) -> None:
    for n in lengths:
        if n >= seq_len or seq_len % n:
            raise CarlosError(
                f"data.context_schedule={lengths}: {n} does not divide the prepared seq_len {seq_len} into shorter "
                "windows; give divisors of it below it"
            )


# ---------------------------------------------------------------- resuming


def _requeued() -> bool:
    """SLURM requeued this job (submitit does, after its time-limit signal, once carlos wrote last.pt)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def newest_checkpoint(checkpoint_dir: Path, manifest: Manifest) -> Path | None:
    """last.pt, or when it is missing the highest-numbered step file (a kill cannot lose last.pt, but a
    user's rm can); only checkpoints this run wrote."""
    last = checkpoint_dir / "last.pt"
    if last.is_file() and manifest.owns(last):
        return last
    steps = [p for p in checkpoint_dir.glob("step_*.pt") if p.is_file() and step_of(p) is not None]
    return max((p for p in steps if manifest.owns(p)), key=step_of, default=None)


def _resume_from(config: TrainConfig, run_dir: Path, manifest: Manifest, leader: bool) -> Path | None:
    """The checkpoint the run continues from, None for a new run; refuses files of the user's in the way
    and an earlier run that neither --resume nor --overwrite says what to do with."""
    checkpoint_dir = run_dir / "checkpoints"
    newest = newest_checkpoint(checkpoint_dir, manifest)
    if not leader:  # rank 0 already accepted the run (and may be writing checkpoints into it)
        return newest if config.resume != "false" or _requeued() else None
    files = [run_dir / name for name in ("metrics.jsonl", "job.json", "error.log")]
    dirs = [run_dir / name for name in ("checkpoints", "samples", ".hydra")]
    manifest.refuse_foreign(files, dirs, "move it away, or choose another --workdir")
    if _requeued() and newest is not None:  # a requeued job continues its own run, whatever the flags say
        return newest
    if config.resume != "false" and config.overwrite:
        raise CarlosError("--resume and --overwrite contradict each other; pass one of them")
    earlier = sorted(p.name for p in checkpoint_dir.glob("*.pt") if manifest.owns(p))
    if config.resume == "true" and newest is None:
        if earlier:
            raise CarlosError(
                f"nothing to resume: {checkpoint_dir} has no last.pt or step_*.pt, only {', '.join(earlier)}; "
                "pass --overwrite to start over"
            )
        raise CarlosError(f"nothing to resume: no checkpoints in {checkpoint_dir}; start a new run without --resume")
    if config.resume in ("true", "auto") and newest is not None:
        return newest
    if earlier and not config.overwrite:
        how = "pass --resume to continue it, --overwrite" if newest else "pass --overwrite"
        other = "choose another --run name" if config.run else "train beside it with --run NAME"
        raise CarlosError(
            f"{run_dir} already holds checkpoints of an earlier run; {how} to delete it and start over, or {other}"
        )
    return None


def _origin_of_resumed(composed: DictConfig, config: TrainConfig, resumed: dict | None) -> str | None:
    """A resumed run continues from its own checkpoint, so an --init_from given now is not used, and the
    run's records (its config snapshot, its checkpoints, carlos report) keep what it started from.
    Returns the --init_from not used, for the start lines."""
    if resumed is None or not config.init_from or config.init_from == resumed.get("init_from"):
        return None
    unused, config.init_from = config.init_from, resumed.get("init_from")
    composed.init_from = config.init_from
    return unused


def _resume_state(path: Path) -> dict:
    """The carlos record of the checkpoint to resume, once its weights and the shapes of its optimizer
    state are known to be whole. The rest of Lightning's training state is checked by loading it: a
    failure before the run writes anything is a refusal (train.fit), not a crash after it wrote."""
    checkpoint = load_checkpoint(path)
    model, _ = check_checkpoint(checkpoint, path)
    try:
        if not isinstance(checkpoint["carlos"].get("step"), int) or not isinstance(checkpoint.get("global_step"), int):
            raise ValueError("no step")
        _check_optimizer_state(checkpoint.get("optimizer_states"), model)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CarlosError(
            f"cannot resume from {path}: its training state is damaged ({e}); resume from another checkpoint, "
            "or start over with --overwrite"
        ) from None
    optimizer = (checkpoint.get("hyper_parameters") or {}).get("optimizer") or {}
    return {**checkpoint["carlos"], "optimizer_target": optimizer.get("_target_")}


def _check_same_optimizer(config: TrainConfig, resumed: dict | None) -> None:
    """A run continues with the optimizer whose state it saved (the default may have changed since)."""
    before, now = (resumed or {}).get("optimizer_target"), config.optimizer.get("_target_")
    if before and now and before != now:
        from omegaconf import OmegaConf

        from carlos.compose import conf_dir

        options = {OmegaConf.load(p).get("_target_"): p.stem for p in (conf_dir() / "optimizer").glob("*.yaml")}
        name = options.get(before, "<the one you trained with>")
        raise CarlosError(
            f"cannot resume: the checkpoint was trained with {before}, this run would use {now}; "
            f"pass optimizer={name} to continue it, or start over with --overwrite"
        )


def _check_optimizer_state(states, model: GPTConfig) -> None:
    """Every tensor of the optimizer's state has its parameter's shape: torch does not check when it loads
    one, and a fused step over a wrong shape reads out of bounds (a segmentation fault, not an error)."""
    from carlos.model import GPT

    if not isinstance(states, list) or len(states) != 1 or not isinstance(states[0], dict):
        raise ValueError("optimizer_states is not one optimizer's state")
    state, param_groups = states[0]["state"], states[0]["param_groups"]
    muon = bool(param_groups) and param_groups[0].get("muon") is True  # optimizer=muon orders its groups so
    with torch.device("meta"):
        groups = GPT(model).param_groups(0.0, muon=muon)
    shapes = [tuple(p.shape) for g in groups for p in g["params"]]
    indices = [i for g in param_groups for i in g["params"]]
    if sorted(indices) != list(range(len(shapes))):
        raise ValueError(f"its optimizer holds {len(indices)} parameters, the model {len(shapes)}")
    for i, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[i]:
                raise ValueError(f"optimizer state {name} of parameter {i} has shape {tuple(value.shape)}")


def _model_config(config: TrainConfig, data: PreparedData, resumed: dict | None) -> GPTConfig:
    """The model group's settings with the vocabulary and context of the prepared data; on resume, the
    checkpoint's model and data must be the same."""
    try:
        model = GPTConfig.for_data(config.model, data.tokenizer.vocab_size, data.seq_len)
    except ModelConfigError as e:
        raise CarlosError(str(e)) from None
    if resumed is not None and resumed["model"] != model.to_dict():
        before = resumed["model"]
        diff = [f"{k}: {before.get(k)} -> {v}" for k, v in model.to_dict().items() if before.get(k) != v]
        raise CarlosError(
            f"cannot resume: the model differs from the checkpoint ({'; '.join(diff)}); "
            "resume with the same model and prepared data, or start over with --overwrite"
        )
    if resumed is not None and resumed.get("data_sha256") not in (None, data.info["sha256"]):
        raise CarlosError(
            f"cannot resume: {data.workdir} was prepared again from another corpus since the checkpoint; "
            "start over with --overwrite, or prepare the original corpus again"
        )
    return model


# ---------------------------------------------------------------- fine-tuning


def initial_weights(config: TrainConfig, data: PreparedData, model: GPTConfig) -> dict[str, torch.Tensor]:
    """--init_from: a checkpoint's weights for a new run (its optimizer, step and schedule are not taken),
    once its model is this run's and its vocabulary this workdir's. Rotary positions work at any context;
    learned ones only up to the context they were trained for, so a longer one is refused."""
    path = Path(os.path.expanduser(config.init_from))
    why = not_a_file(path)
    if why or not path.is_file():
        raise CarlosError(f"--init_from {path} {why or 'does not exist'}; give the path of a .pt checkpoint")
    checkpoint = load_checkpoint(path)
    theirs, tokenizer = check_checkpoint(checkpoint, path)
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "dropout"]  # dropout may change
    differ = [k for k in fields if getattr(theirs, k) != getattr(model, k)]
    if differ:
        shown = "; ".join(f"{k}: {getattr(theirs, k)} there, {getattr(model, k)} here" for k in differ)
        how = _preset(theirs) or " ".join(f"model.{k}={getattr(theirs, k)}" for k in differ)
        raise CarlosError(
            f"--init_from {path} holds another model than this run's ({shown}); pass {how} to train the "
            "checkpoint's model, or use another checkpoint"
        )
    if tokenizer != data.tokenizer:
        raise CarlosError(
            f"--init_from {path} has vocabulary {tokenizer.vocab_size} (add_bos={tokenizer.add_bos}, add_eos="
            f"{tokenizer.add_eos}) but {data.workdir} is prepared with {data.tokenizer.vocab_size} (add_bos="
            f"{data.tokenizer.add_bos}, add_eos={data.tokenizer.add_eos}); prepare it with the checkpoint's "
            "--add_bos / --add_eos"
        )
    weights = {k.removeprefix(PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    if theirs.pos == "learned" and data.seq_len > theirs.block_size:
        raise CarlosError(
            f"--init_from {path} learned positions for {theirs.block_size} tokens, and {data.workdir} is prepared "
            f"with seq_len={data.seq_len}: positions {theirs.block_size} on were never trained; prepare it "
            f"with --seq_len {theirs.block_size} or less (rotary positions, model.pos=rope, have no such limit)"
        )
    if theirs.pos == "learned":  # the positions this context uses, all of them trained
        weights["pos_emb.weight"] = weights["pos_emb.weight"][: data.seq_len].clone()
    return weights


def _preset(model: GPTConfig) -> str:
    """': model=NAME' when one of conf/model/ describes the checkpoint's model exactly."""
    from omegaconf import OmegaConf

    from carlos.compose import conf_dir

    for preset in sorted((conf_dir() / "model").glob("*.yaml")):
        settings = OmegaConf.to_container(OmegaConf.load(preset))
        if all(getattr(model, k) == v for k, v in settings.items() if k != "dropout"):
            return f"model={preset.stem}"
    return ""


# ---------------------------------------------------------------- the machine


def _check_machine(config: TrainConfig, model: GPTConfig, device: str, val_windows: int) -> None:
    """What this machine cannot do: a GPU it lacks, more CPU processes or workers than cores, a model and
    batch beyond its memory (checked before anything is allocated)."""
    trainer, cores = config.trainer, os.cpu_count() or 1
    if any(word in str(trainer.strategy) for word in ("spawn", "fork", "notebook")):
        raise CarlosError(
            f"trainer.strategy={trainer.strategy} runs training in processes it starts anew, where carlos's "
            "metrics and checkpoint records would be lost to this one; use trainer.strategy=ddp"
        )
    if trainer.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise CarlosError(
            f"{set_by('trainer.accelerator', trainer.accelerator)}: this machine has no CUDA GPU (torch sees none); "
            "use trainer.accelerator=cpu or auto"
        )
    cluster = any(k in os.environ for k in ("SLURM_NTASKS", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"))
    if trainer.num_nodes > 1 and not cluster:
        raise CarlosError(
            f"trainer.num_nodes={trainer.num_nodes} needs a cluster that starts the other nodes' processes "
            "(SLURM, torchrun); on one machine use trainer.devices, or launch with hydra/launcher=submitit_slurm"
        )
    processes = int(trainer.devices) if device == "cpu" and str(trainer.devices).isdigit() else 1
    if processes > cores:
        raise CarlosError(
            f"trainer.devices={trainer.devices} CPU processes exceed this machine's {cores} cores; use at most {cores}"
        )
    if config.data.num_workers > 4 * cores:
        raise CarlosError(
            f"data.num_workers={config.data.num_workers} is far beyond this machine's {cores} cores; "
            "use 0 (the default)"
        )
    _check_memory(config, model, device, val_windows, processes)


def _check_memory(config: TrainConfig, model: GPTConfig, device: str, val_windows: int, processes: int) -> None:
    batch = config.data.micro_batch_size
    val_batch = min(config.data.eval_batch_size, val_windows)
    need = max(training_bytes(model, batch), validation_bytes(model, val_batch)) * processes
    check_fits(
        need,
        device,
        f"the model ({num_params(model):,} parameters) with micro-batch {batch} and validation "
        f"batch {val_batch} x {model.block_size}",
        "use a smaller model, --micro_batch_size or data.eval_batch_size",
    )


# ---------------------------------------------------------------- loggers and W&B


def _check_loggers(config: TrainConfig, run_dir: Path) -> None:
    """The selected loggers' libraries are installed (Lightning's TensorBoardLogger writes with tensorboard
    or tensorboardX; wandb is one of carlos's own requirements)."""
    import importlib.util

    if config.logger.tensorboard is None:
        return
    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise CarlosError(
            "logger=tensorboard needs TensorBoard, which is not installed; pip install 'carlos[tensorboard]' "
            "(or tensorboard), or choose logger=csv"
        )
    _check_utf8_path("logger=tensorboard", run_dir, "or choose logger=csv")


def _check_utf8_path(who: str, run_dir: Path, other: str) -> None:
    """TensorBoard's and W&B's writers encode the path they write to as UTF-8, so a directory name that is
    not UTF-8 (Python keeps its bytes as lone surrogates) fails there, mid-run, in their own code."""
    path = os.path.abspath(run_dir)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise CarlosError(
            f"{who} cannot write into {printable(path)}: it takes paths that are valid UTF-8 only, and this "
            f"one is not; use a --workdir whose path is UTF-8, {other}"
        ) from None


def _logger_dirs(config: TrainConfig, run_dir: Path, wandb: dict | None, manifest: Manifest) -> list[Path]:
    """The directories the selected loggers write into: carlos's, or new (a file or a directory of the
    user's there is refused: carlos would write into it, and later remove it as its own)."""
    on = (wandb is not None, config.logger.csv is not None, config.logger.tensorboard is not None)
    dirs = [run_dir / name for name, used in zip(LOGGER_DIRS, on, strict=True) if used]
    if manifest.writable:
        manifest.refuse_foreign([], dirs, "move it away, or choose another --workdir")
    return dirs


def wandb_settings(config: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """WandbLogger's arguments, or None when W&B is off. On with logger=wandb, or when a project comes from
    the config, the environment or a .env in the current directory (read here, without importing wandb)."""
    from dotenv import load_dotenv

    env = Path.cwd() / ".env"
    if os.path.lexists(env):  # read as a regular file only: a FIFO there would block the run
        try:
            load_dotenv(stream=io.StringIO(read_regular(env, "fix or remove it").decode("utf-8")), override=False)
        except UnicodeDecodeError:
            raise CarlosError(f"cannot read {env} (it is not UTF-8 text); fix or remove it") from None
    project = config.wandb.project or os.environ.get("WANDB_PROJECT")
    mode = config.wandb.mode or os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise CarlosError(
            f"WANDB_MODE={mode!r} (from the environment or .env) is not a W&B mode; use one of "
            f"{', '.join(WANDB_MODES[:3])}"
        )
    selected = config.logger.wandb
    if not (project or selected) or mode == "disabled":
        return None
    _check_utf8_path("W&B", run_dir, "or turn W&B off (wandb.mode=disabled)")
    return {
        "log_model": bool(selected and selected.log_model),
        "project": project,
        "entity": config.wandb.entity or os.environ.get("WANDB_ENTITY"),
        "name": config.wandb.run_name or config.run,
        "tags": list(config.wandb.tags) or None,
        "mode": mode,
        "save_dir": str(run_dir),
    }
