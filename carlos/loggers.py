"""The loggers of a run. metrics.jsonl is always written (JsonlLogger, carlos's own: it drops the records
past a resumed checkpoint, which no Lightning logger does); the logger group adds Lightning's CSVLogger,
TensorBoardLogger and WandbLogger. Every logger receives the same records (callbacks.log_record)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from carlos.files import write_error
from carlos.manifest import Manifest
from carlos.ownership import LOGGER_DIRS
from carlos.private import drop_anonymous

if TYPE_CHECKING:
    from carlos.plan import RunPlan

CSV_DIR, TENSORBOARD_DIR = LOGGER_DIRS[1:]  # under the run directory, beside metrics.jsonl


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object a line. On resume, records past the checkpoint's step are dropped
    so steps never repeat."""

    def __init__(self, path: Path, manifest: Manifest, resume_step: int | None = None) -> None:
        super().__init__()
        self.path, self.manifest, self.resume_step = path, manifest, resume_step

    def begin(self) -> list[dict]:
        """Once the run is accepted: a new file, or on resume the records up to the checkpoint's step,
        which it returns."""
        if rank_zero_only.rank != 0:
            return []
        kept = []
        if self.resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("step", 0) <= self.resume_step:
                        kept.append(line + "\n")
                except (ValueError, TypeError):  # a line cut short by a crash
                    continue
        self.manifest.write(self.path, lambda f: f.write("".join(kept).encode("utf-8")))
        return [json.loads(line) for line in kept]

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the config snapshot is .hydra/config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record = {"step": step, **metrics}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a line cut short here is skipped when the run resumes
            raise write_error(self.path, e) from None


class LineLogger(Logger):
    """One plain line a record on stdout, when stdout is a file or a pipe (`> log.txt`, a SLURM job's
    output): there a progress bar is hundreds of carriage-return redraws on one line, which grep cannot
    read. A terminal gets the bar instead (callbacks.ProgressBar)."""

    def __init__(self, max_steps: int | None) -> None:
        super().__init__()
        self.of = f"/{max_steps:,}" if max_steps and max_steps > 0 else ""

    @property
    def name(self) -> str:
        return "lines"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        at = f"step {step:,}{self.of}"
        if "val_bpb" in metrics:
            print(f"{at}: val loss {metrics['val_loss']:.4f}, val bpb {metrics['val_bpb']:.4f}", flush=True)
        elif "train_loss" in metrics:
            loss = metrics["train_loss"]
            shown = f"{loss:.4f}" if loss is not None else "-"
            rate = f"{metrics['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in metrics else ""
            print(f"{at}: loss {shown}, lr {metrics.get('lr', 0.0):.2e}, {rate}".rstrip(", "), flush=True)


def lightning_loggers(plan: RunPlan) -> list[Logger]:
    """The loggers the logger group selects, writing into the run directory. A resumed run's TensorBoard
    hides the events past the checkpoint (purge_step); its CSV is written again from metrics.jsonl
    (replay_history), since Lightning's CSVLogger starts metrics.csv over."""
    selected, run_dir = plan.config.logger, plan.run_dir
    loggers: list[Logger] = []
    if selected.csv is not None:
        from lightning.pytorch.loggers import CSVLogger

        flush = selected.csv.flush_logs_every_n_steps
        loggers.append(CSVLogger(run_dir, name=CSV_DIR, version="", flush_logs_every_n_steps=flush))
    if selected.tensorboard is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        options: dict[str, Any] = {"log_graph": selected.tensorboard.log_graph, "default_hp_metric": False}
        if plan.resumed:
            options["purge_step"] = plan.resumed["step"] + 1
        loggers.append(TensorBoardLogger(run_dir, name=TENSORBOARD_DIR, version="", **options))
    if plan.wandb is not None:
        from lightning.pytorch.loggers import WandbLogger

        wandb = WandbLogger(**plan.wandb)
        drop_anonymous(wandb)
        loggers.append(wandb)
    return loggers


def replay_history(loggers: list[Logger], records: list[dict]) -> None:
    """A resumed run's records up to its checkpoint, into the CSV file Lightning's CSVLogger starts over."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, CSVLogger):
            for record in records:
                logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=record["step"])
