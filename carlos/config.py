"""Typed schemas for each command: Hydra composes the YAML under conf/, these validate it.

Defaults live in the YAML only; the dataclasses give types and check values (unknown keys are
refused by OmegaConf's structured merge, values in ``__post_init__``), the way litgpt's Config does.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from datetime import timedelta
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from carlos.errors import CarlosError, nearest

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def decode_escapes(text: str) -> str:
    r"""Interpret \n, \t, \r, \0, \\, \xNN and \uNNNN in prompts and separators; other text is kept."""

    def sub(m: re.Match) -> str:
        s = m.group(1)
        if s[0] in "xu":
            return chr(int(s[1:], 16))
        return _ESCAPES[s]

    return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[ntr0\\'\"])", sub, text)


MAX_LR = 10.0
MAX_INT = 2**53  # beyond it a whole number is not exact as a float, and counts overflow torch's 64-bit indices
SEED_MAX = 2**32 - 1  # the range Lightning's seed_everything and NumPy's legacy seeding accept


def check_seed(name: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise CarlosError(f"{name} must be an integer from 0 to {SEED_MAX}, got {value}")


def check_text(name: str, value: str) -> None:
    """Text that becomes bytes (prompts, separators) must be encodable: a lone surrogate such as \\ud800
    (from an escape, or an argument that was not valid UTF-8) is not a character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start : e.end].encode("unicode_escape").decode()
        raise CarlosError(
            f"{name} holds {bad}, which is not a character (a lone surrogate); give text that is valid UTF-8"
        ) from None


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run(run: str | None) -> None:
    """--run NAME names one directory, WORKDIR/runs/NAME: a plain name, never a path."""
    if run is not None and not RUN_NAME.fullmatch(run):
        shown = repr(run[:40] + ("..." if len(run) > 40 else ""))
        raise CarlosError(
            f"run name {shown} is not a plain name; use up to 100 letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (e.g. --run baseline)"
        )


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise CarlosError(f"{name} must be {bound}, got {value}")


# ---------------------------------------------------------------- prepare


@dataclass
class PrepareDataConfig:
    seq_len: int
    normalize_nfkc: bool
    add_bos: bool
    add_eos: bool
    val_fraction: float
    test_fraction: float
    separator: str

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise CarlosError(f"data.{name} must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise CarlosError("data.val_fraction + data.test_fraction must leave some text for training (< 1)")
        self.separator = decode_escapes(self.separator)
        check_text("data.separator (--separator)", self.separator)
        if not self.separator:
            raise CarlosError("data.separator must not be empty; the default is a blank line ('\\n\\n')")


@dataclass
class PrepareConfig:
    input: Any  # a file, a directory, a glob, or a list of them
    glob: str  # the files of a directory given to --input
    workdir: str
    seed: int
    overwrite: bool
    data: PrepareDataConfig

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)
        items = self.input if isinstance(self.input, list) else [self.input]
        if self.input is not None and (not items or not all(isinstance(i, str) and i for i in items)):
            raise CarlosError(f"input must be a path or a list of paths, got {self.input!r}")
        if not self.glob or "/" in self.glob.replace("**/", ""):
            raise CarlosError(f"glob must be a file name pattern such as '*.txt' or '**/*.md', got {self.glob!r}")


# ---------------------------------------------------------------- train


@dataclass
class ModelConfig:
    """The model group (conf/model/*.yaml): the architecture, the same whatever the data. GPTConfig
    (carlos/model.py) adds the vocabulary and context that the prepared data fixes, and checks the shape."""

    d_model: int  # width of the residual stream
    n_layers: int  # transformer blocks
    n_heads: int  # attention heads; must divide d_model
    d_ff: int  # hidden width of the MLP
    dropout: float  # on attention and MLP outputs; 0 turns it off
    bias: bool  # biases in the linear layers and norms
    norm: str  # layernorm or rmsnorm
    mlp: str  # gelu, swiglu or relu2 (ReLU squared)
    pos: str  # learned (a position table) or rope (rotary positions)
    rope_base: float  # the rotary positions' base (pos=rope)
    qk_norm: bool  # RMS-normalize each head's queries and keys before attention
    logit_softcap: float | None  # logits = cap * tanh(logits / cap); None: off
    zero_init: bool  # the blocks' output projections start at zero (each block starts as the identity)


@dataclass
class TrainDataConfig:
    micro_batch_size: int
    eval_batch_size: int
    num_workers: int
    random_offsets: bool
    context_schedule: list[int] | None

    def __post_init__(self) -> None:
        _positive("data.micro_batch_size", self.micro_batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        self.context_schedule = list(self.context_schedule or [])
        for n in self.context_schedule:
            _positive("data.context_schedule's lengths", n)
        if self.context_schedule != sorted(set(self.context_schedule)):
            raise CarlosError(f"data.context_schedule={self.context_schedule} must list lengths shortest first")


PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64")


MAX_TIME = timedelta(days=3650)  # a budget beyond ten years is a mistake (inf, 1e308), not a plan


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_max_time(value: str | None) -> timedelta | None:
    """Seconds ('600', '90.5'), units ('90s', '2m', '1h30m', '1d') or Lightning's 'DD:HH:MM:SS'."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    text = str(value).strip()
    units = DURATION.fullmatch(text.lower())
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) != 4:
                raise ValueError
            d, h, m, s = parts
            delta = timedelta(days=d, hours=h, minutes=m, seconds=s)
        elif units and any(units.groups()):
            d, h, m, s = (float(g or 0) for g in units.groups())
            delta = timedelta(days=d, hours=h, minutes=m, seconds=s)
        else:
            delta = timedelta(seconds=float(text))
    except ValueError:
        raise CarlosError(
            f"trainer.max_time={text!r} is not a duration; give seconds (600), units (90s, 10m, 1h30m) or "
            "DD:HH:MM:SS (00:00:10:00)"
        ) from None
    except OverflowError:  # inf, 1e308: beyond what a timedelta holds
        delta = timedelta.max
    if delta > MAX_TIME:
        raise CarlosError(f"trainer.max_time={text!r} is beyond {MAX_TIME.days} days; give a real time budget")
    if delta.total_seconds() <= 0:
        raise CarlosError(f"trainer.max_time must be positive, got {text!r}")
    return delta


@dataclass
class TrainerConfig:
    accelerator: str
    devices: Any
    num_nodes: int
    strategy: str
    precision: str
    max_steps: int | None
    default_steps: int
    max_time: str | None
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    deterministic: bool | None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CarlosError(
                f"trainer.precision={self.precision!r} is not known{nearest(self.precision, PRECISIONS)}; "
                f"choose one of {', '.join(PRECISIONS)}"
            )
        _positive("trainer.accumulate_grad_batches (--grad_accum_steps)", self.accumulate_grad_batches)
        _positive("trainer.num_nodes", self.num_nodes)
        budget = parse_max_time(self.max_time)
        _positive("trainer.default_steps", self.default_steps)
        if self.max_steps is None:  # default_steps, or as many as the time budget allows
            self.max_steps = -1 if budget else self.default_steps
        if self.max_steps <= 0 and budget is None:
            raise CarlosError("trainer.max_steps must be > 0 unless trainer.max_time (--max_time) bounds the run")
        if self.max_steps <= 0:
            self.max_steps = -1
        if self.gradient_clip_val is not None:
            _positive("trainer.gradient_clip_val", self.gradient_clip_val)

    @property
    def max_time_delta(self) -> timedelta | None:
        return parse_max_time(self.max_time)

    @property
    def several_processes(self) -> bool:
        """DDP over more than one device or node: Lightning starts the other ranks by re-running the
        command line, unless a cluster (SLURM) started them as tasks of their own."""
        many = str(self.devices) not in ("1", "auto") or self.num_nodes > 1
        return many and ("ddp" in str(self.strategy) or str(self.strategy) == "auto")


@dataclass
class SampleConfig:
    prompt: str
    tokens: int
    temperature: float
    top_k: int
    top_p: float

    def __post_init__(self) -> None:
        _positive("sample.tokens (--sample_tokens)", self.tokens, allow_zero=True)
        check_sampling(self.temperature, self.top_k, self.top_p, prefix="sample.")
        self.prompt = decode_escapes(self.prompt)
        check_text("sample.prompt (--sample_prompt)", self.prompt)


def check_sampling(temperature: float, top_k: int, top_p: float, prefix: str = "") -> None:
    if temperature < 0:
        raise CarlosError(f"{prefix}temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise CarlosError(f"{prefix}top_k must be >= 0 (0 turns it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise CarlosError(f"{prefix}top_p must be in (0, 1] (1 turns it off), got {top_p}")


# the first three are documented; wandb also accepts the others
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "shared", "run")


@dataclass
class WandbConfig:
    project: str | None
    entity: str | None
    run_name: str | None
    tags: list[str]
    mode: str | None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise CarlosError(f"wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")


@dataclass
class CsvLoggerConfig:
    """logger=csv: Lightning's CSVLogger, writing RUN/csv/metrics.csv."""

    flush_logs_every_n_steps: int  # records held in memory between writes to metrics.csv

    def __post_init__(self) -> None:
        _positive("logger.csv.flush_logs_every_n_steps", self.flush_logs_every_n_steps)


@dataclass
class TensorBoardLoggerConfig:
    """logger=tensorboard: Lightning's TensorBoardLogger, writing event files into RUN/tensorboard/."""

    log_graph: bool  # add the model's graph to TensorBoard


@dataclass
class WandbLoggerConfig:
    """logger=wandb: W&B on even without a project (W&B's default one), with the settings under wandb:."""

    log_model: bool  # upload the checkpoints as W&B artifacts at the end of the run


@dataclass
class LoggerConfig:
    """The Lightning loggers that receive every record beside metrics.jsonl (which is always written);
    a group that is not selected is None."""

    csv: CsvLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None


@dataclass
class RegularizationConfig:
    """optimizer.weight_decay=auto: the weight decay for the epochs (passes over the train split) that the
    run's budget will see, interpolated in log(epochs) between the points, held beyond the ends."""

    epochs: list[float]  # ascending
    weight_decay: list[float]  # one for each point of epochs

    def __post_init__(self) -> None:
        if not self.epochs or len(self.epochs) != len(self.weight_decay):
            raise CarlosError("regularization.epochs and regularization.weight_decay need one value each, same length")
        if any(e <= 0 for e in self.epochs) or list(self.epochs) != sorted(set(self.epochs)):
            raise CarlosError(f"regularization.epochs must be positive and ascending, got {list(self.epochs)}")
        if any(not 0 <= w < 10 for w in self.weight_decay):
            raise CarlosError(f"regularization.weight_decay values must be in [0, 10), got {list(self.weight_decay)}")


EVAL_INTERVAL = 250  # eval_interval=auto in a run bounded by steps alone


@dataclass
class TrainConfig:
    workdir: str
    run: str | None
    seed: int
    resume: Any  # false, true or auto
    overwrite: bool
    init_from: str | None
    eval_interval: Any  # optimizer steps, or auto
    eval_tokens: Any  # val tokens, or auto
    ckpt_interval: int
    log_interval: int
    ema_decay: float | None
    regularization: RegularizationConfig
    model: ModelConfig
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    data: TrainDataConfig
    trainer: TrainerConfig
    sample: SampleConfig
    wandb: WandbConfig
    logger: LoggerConfig

    def __post_init__(self) -> None:
        resume = str(self.resume).lower()
        if resume not in ("false", "true", "auto"):
            raise CarlosError(f"resume must be false, true or auto, got {self.resume!r}")
        self.resume = resume
        check_run(self.run)
        check_seed("seed (--seed)", self.seed)
        if self.init_from is not None and not self.init_from.strip():  # would train from scratch without a word
            raise CarlosError(
                "--init_from is empty; give a checkpoint path, or leave the flag out to train from scratch"
            )
        for name in ("eval_interval", "eval_tokens"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise CarlosError(f"{name} (--{name}) must be a whole number > 0 or auto, got {value!r}")
        for name in ("ckpt_interval", "log_interval"):
            _positive(name, getattr(self, name))
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise CarlosError(f"ema_decay must be between 0 and 1 (or null: off), got {self.ema_decay}")
        lr = self.optimizer.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise CarlosError(f"optimizer.lr (--peak_lr) must be a number > 0, got {lr!r}")
        if lr > MAX_LR:
            raise CarlosError(
                f"optimizer.lr (--peak_lr) is {lr}, above {MAX_LR}, where none of carlos's optimizers trains "
                "(the weights become NaN in a few steps); use a rate like 6e-3"
            )
        decay = self.optimizer.get("weight_decay", 0.0)
        if decay == "auto":
            decay = max(self.regularization.weight_decay)
        elif isinstance(decay, str):
            raise CarlosError(f"optimizer.weight_decay (--weight_decay) must be a number or auto, got {decay!r}")
        if isinstance(decay, (int, float)) and not isinstance(decay, bool) and lr * decay >= 1:
            raise CarlosError(
                f"optimizer.weight_decay={decay} with optimizer.lr={lr}: each step would scale the weights by "
                f"1 - lr x weight_decay = {1 - lr * decay:.3g}, which destroys them; use a weight decay "
                f"below {1 / lr:.3g}"
            )
        min_lr = self.schedule.get("min_lr", 0.0)
        if not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise CarlosError(f"schedule.min_lr must be a number >= 0, got {min_lr!r}")
        if min_lr > lr:
            raise CarlosError(f"schedule.min_lr={min_lr} is above the peak lr optimizer.lr={lr}; lower --min_lr")
        warmup = self.schedule.get("warmup_steps", 0)
        if not isinstance(warmup, int) or warmup < 0:
            raise CarlosError(f"schedule.warmup_steps must be an integer >= 0, got {warmup!r}")

    def check_in_sweep(self, ranks_started: bool) -> None:
        """A sweep's job: --run would give every job the same directory, and DDP needs each rank started
        for it (ranks_started: SLURM's tasks), since a job has no command line for Lightning to re-run."""
        if self.run:
            raise CarlosError(
                "--run names one run, and each job of a sweep gets a directory of its own under WORKDIR/sweeps/; "
                "drop --run (to name the sweep's directory, pass hydra.sweep.dir=WORKDIR/sweeps/NAME)"
            )
        if self.trainer.several_processes and not ranks_started:
            raise CarlosError(
                f"trainer.devices={self.trainer.devices} (DDP) cannot run inside a multirun job on this launcher: use "
                "hydra/launcher=submitit_slurm (or submitit_slurm_cpu) with hydra.launcher.tasks_per_node equal to "
                "trainer.devices, or run it on its own without -m"
            )


# ---------------------------------------------------------------- eval and sample

SPLITS = ("train", "val", "test")
SUITE_CORPORA = (
    "input",
    "python",
    "docs",
    "translations",
    "licences",
)  # input: --input; the rest: carlos/bench/suite.py


@dataclass
class EvalConfig:
    workdir: str
    run: str | None
    checkpoint: str
    split: str
    json: bool
    batch_size: int
    stride: int | None
    device: str
    compressors: bool
    compressor_context: int
    adapt: bool
    adapt_lr: float
    adapt_clip: float
    adapt_order: int

    def __post_init__(self) -> None:
        check_run(self.run)
        _positive("compressor_context", self.compressor_context, allow_zero=True)
        _positive("adapt_lr", self.adapt_lr)
        _positive("adapt_clip", self.adapt_clip)
        _positive("adapt_order", self.adapt_order, allow_zero=True)
        if self.split not in SPLITS:
            raise CarlosError(f"unknown split {self.split!r}{nearest(self.split, SPLITS)}; choose train, val or test")
        _positive("batch_size", self.batch_size)
        if self.stride is not None:
            _positive("stride", self.stride)


@dataclass
class GenerateConfig:
    workdir: str
    run: str | None
    checkpoint: str
    prompt: str | None
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    num_samples: int
    seed: int
    device: str

    def __post_init__(self) -> None:
        check_run(self.run)
        _positive("max_new_tokens", self.max_new_tokens, allow_zero=True)
        _positive("num_samples", self.num_samples)
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.prompt is not None:
            self.prompt = decode_escapes(self.prompt)
            check_text("prompt", self.prompt)
        check_seed("seed", self.seed)


EXPORT_FORMATS = ("safetensors", "hf")


@dataclass
class ExportConfig:
    workdir: str
    run: str | None
    checkpoint: str
    format: str
    out: str | None

    def __post_init__(self) -> None:
        check_run(self.run)
        if self.format not in EXPORT_FORMATS:
            hint = nearest(self.format, EXPORT_FORMATS)
            raise CarlosError(f"unknown export format {self.format!r}{hint}; choose safetensors or hf")
        if not self.out:
            raise CarlosError("export needs --out DIR: the directory to write the exported model into")


@dataclass
class BenchConfig:
    input: str | None
    workdir: str
    steps: int
    rounds: int
    log_interval: int
    seq_len: int
    batch: int
    kv_context: int
    train: list[str]
    ddp_processes: int
    budgets: list[float]
    suite: list[str]
    suite_bytes: int
    suite_budgets: list[float]
    seeds: int
    against: list[str]
    prepare_gb: float
    output: str | None

    def __post_init__(self) -> None:
        for name in ("steps", "log_interval", "seq_len", "batch", "kv_context"):
            _positive(name, getattr(self, name))
        _positive("rounds", self.rounds, allow_zero=True)
        _positive("ddp_processes", self.ddp_processes, allow_zero=True)
        _positive("prepare_gb", self.prepare_gb, allow_zero=True)
        for b in [*self.budgets, *self.suite_budgets]:
            _positive("budgets (seconds)", b)
        _positive("seeds", self.seeds)
        _positive("suite_bytes", self.suite_bytes)
        for name in self.suite:
            if name not in SUITE_CORPORA:
                raise CarlosError(
                    f"unknown suite corpus {name!r}{nearest(name, SUITE_CORPORA)}; "
                    f"choose among {', '.join(SUITE_CORPORA)}"
                )
        if self.rounds and self.steps < 3 * self.log_interval:
            raise CarlosError(
                f"steps must be at least 3 x log_interval ({3 * self.log_interval}) for steady-state rates"
            )


# ---------------------------------------------------------------- parsing

T = TypeVar("T")


def flatten(tree: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """{'a.b.c': value} for the leaves of nested dicts (and of lists, with lists=True): the keys a user types."""
    if isinstance(tree, dict) or (lists and isinstance(tree, list)):
        out: dict[str, Any] = {}
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            out.update(flatten(v, f"{prefix}{k}.", lists))
        return out
    return {prefix[:-1]: tree}


def config_keys(cfg: DictConfig) -> dict[str, Any]:
    """Every leaf key of a composed config with its value as written (interpolations unresolved)."""
    return flatten(OmegaConf.to_container(cfg, resolve=False))


def _all_keys(cfg: DictConfig) -> set[str]:
    """Every key of a config, the groups' (model, trainer ...) with the leaves'."""
    return {".".join(k.split(".")[:n]) for k in config_keys(cfg) for n in range(1, k.count(".") + 2)}


def unknown_key(key: str, keys) -> str:
    """The refusal of a key the config does not have. A key under trainer. that is none of carlos's (and
    no typo of one) is a Lightning Trainer setting: carlos passes none on, and says which it takes."""
    key = key.lstrip("+~")
    others = [k for k in keys if k != key]
    lightning = key.startswith("trainer.") and key.count(".") == 1
    hint = nearest(key, others, cutoff=0.85 if lightning else 0.5)  # a typo, not another Lightning setting
    if lightning and not hint:
        own = ", ".join(f.name for f in fields(TrainerConfig))
        return (
            f"{key} is not one of carlos's trainer keys ({own}); carlos builds the Lightning Trainer itself and "
            "passes no other setting on, because it runs validation, checkpoints and logging on its own schedule"
        )
    return f"unknown key '{key}'{hint}"


def parse(cfg: DictConfig, schema: type[T]) -> T:
    """Validate a composed config against its schema; every failure becomes a one-line CarlosError."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, cfg)
        for key, value in flatten(OmegaConf.to_container(merged, resolve=True), lists=True).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise CarlosError(f"{key} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise CarlosError(f"{key}={value} is beyond {MAX_INT:,} (2**53); give a smaller number")
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise CarlosError(unknown_key(key, sorted(_all_keys(cfg)))) from None
    except MissingMandatoryValue as e:
        raise CarlosError(f"missing value for '{e.full_key}'") from None
    except ValidationError as e:
        raise CarlosError(f"invalid value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that points nowhere
        msg = str(e).splitlines()[0]
        raise CarlosError(
            f"invalid value for '{getattr(e, 'full_key', '?')}': {msg}; write a literal $ as \\$"
        ) from None


def text_keys(schema: type, prefix: str = "") -> set[str]:
    """The keys of a schema whose values are text (str, str | None, list[str]), which a value given on the
    command line stays even when it looks like a number (a prompt of "42", a run named 7)."""
    keys: set[str] = set()
    for name, kind in typing.get_type_hints(schema).items():
        inner = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        if is_dataclass(inner[0]):
            keys |= text_keys(inner[0], f"{prefix}{name}.")
        elif str in inner and typing.get_origin(kind) is not dict:
            keys.add(prefix + name)
    return keys


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    """Resolved plain containers (dicts, lists, numbers, strings) for checkpoints and loggers."""
    return OmegaConf.to_container(cfg, resolve=True)


SCHEMAS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sample": GenerateConfig,
    "export": ExportConfig,
    "bench": BenchConfig,
}  # each command's schema
