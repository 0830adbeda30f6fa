"""CarlosLM: the LightningModule around GPT (steps, optimizer groups, lr schedule, val loss/ppl/bpb), and
the check that stops a run whose loss or weights became NaN or inf."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from carlos.errors import CarlosError
from carlos.evaluate import score_batch, summarize
from carlos.model import GPT, GPTConfig
from carlos.optimization import build_optimizer, build_schedule, wants_muon_group

# ---------------------------------------------------------------- divergence


def finite(*values: float | torch.Tensor) -> bool:
    """Whether every value (numbers, tensors) is finite: checked before a loss is logged or weights saved."""
    # a logged loss is a float: no tensor for it (the train record is written every log_interval steps)
    return all(math.isfinite(v) if isinstance(v, float) else bool(torch.isfinite(v).all()) for v in values)


def diverged(what: str) -> CarlosError:
    """The one-line stop for a run whose loss or weights became NaN or inf; what: what was seen, and when."""
    return CarlosError(
        f"{what}, so the run stops; the checkpoints written before it are kept. Lower --peak_lr or raise "
        "--warmup_steps, and start over with --overwrite"
    )


# ---------------------------------------------------------------- the module


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CarlosLM(L.LightningModule):
    """Holds only plain hyperparameters (dicts, numbers, strings), so checkpoints load with weights_only."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        schedule: dict,
        max_steps: int,
        run: dict[str, Any],
        context: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model))
        self.elapsed_before = 0.0  # training seconds of earlier sessions of a resumed run
        self.val_metrics: dict[str, float] = {}
        self.deadline_s: float | None = None  # set by the TimeBudget callback under --max_time
        self.pace: tuple[int, float] | None = None  # (step, training seconds) at a step's end, as TimeBudget saw it
        self.eval_seconds = 0.0  # this session's validations, with their samples and checkpoints
        self.eval_share = 1.0  # of the val batches, scored by each validation but the last (--eval_tokens)

    def total_steps(self, step: int) -> float:
        """The run's length in optimizer steps, as the lr schedule sees it: max_steps, or under a time
        budget the steps the run will reach by its deadline at the pace so far, whichever is smaller.
        So warmup and decay complete by the deadline; a run bounded by steps alone stays deterministic.
        The pace is TimeBudget's, never this rank's own clock: under DDP every rank must use the same lr."""
        total = self.hparams.max_steps if self.hparams.max_steps > 0 else math.inf
        if self.deadline_s is not None and self.pace is not None:
            steps, seconds = self.pace
            if steps > 0 and seconds > 0:
                total = min(total, steps * self.deadline_s / seconds)
        return total

    # -- training
    def on_train_start(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training seconds so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - getattr(self, "started", time.perf_counter())

    def context_at(self, step: int, seq_len: int) -> int:
        """data.context_schedule: the window length at this step. [32, 64] trains on 32-token windows in
        the first third of the run (by total_steps), 64-token ones in the second and whole ones after."""
        lengths = self.hparams.context
        if not lengths:
            return seq_len
        total = self.total_steps(step)
        part = int((len(lengths) + 1) * step / total) if math.isfinite(total) else 0
        return lengths[part] if part < len(lengths) else seq_len

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        length = self.context_at(self.global_step, x.size(1))
        if length < x.size(1):  # (B, seq_len) -> (B * seq_len / length, length): the same tokens, shorter windows
            x, y = x.reshape(-1, length), y.reshape(-1, length)
        loss = self.model.loss(x, y)
        # summed on the device; read (one host sync) only when a train record is logged
        self.loss_sum.add_(loss.detach())  # in place: `+=` on a Module attribute goes through its __setattr__
        self.loss_count += 1
        return loss

    def pop_train_loss(self) -> float | None:
        if not self.loss_count:
            return None
        # the mean over every rank's batches (under DDP each rank summed only its own)
        value = self.trainer.strategy.reduce(self.loss_sum / self.loss_count, reduce_op="mean").item()
        self.loss_sum.zero_()
        self.loss_count = 0
        return value

    # -- validation: sums over the whole split, reduced across ranks, then loss/ppl/bpb
    def on_validation_start(self) -> None:
        self.validation_started = time.perf_counter()

    def validation_seconds(self) -> float:
        """Seconds since this validation started. Lightning calls the callbacks' on_validation_end before
        the module's, in their order: read there, it holds the work of the callbacks before (the text
        sample, the checkpoints)."""
        return time.perf_counter() - self.validation_started

    def on_validation_end(self) -> None:
        self.eval_seconds += self.validation_seconds()

    def on_validation_epoch_start(self) -> None:
        self.val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # the last validation (should_stop) scores the whole split; the others every k-th batch, eval_share of
        # it spread over the whole split (its first part alone can differ from the rest: the end of a corpus)
        if batch_idx % max(round(1 / self.eval_share), 1) and not self.trainer.should_stop:
            return
        x, y = batch
        self.val_sums += score_batch(self.model, x, y)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        self.val_metrics = summarize(*sums.tolist())
        if not finite(self.val_metrics["loss"]) and not self.trainer.sanity_checking:
            # before the callbacks' on_validation_end: no sample from NaN weights, no checkpoint of them
            loss = self.val_metrics["loss"]
            raise diverged(f"validation loss is {loss} at step {self.global_step} (the weights became NaN or inf)")
        self.log("val_loss", self.val_metrics["loss"], prog_bar=True, logger=False)
        self.log("val_bpb", self.val_metrics["bpb"], logger=False)

    # -- optimizer and schedule
    def configure_optimizers(self):
        hp = self.hparams
        groups = self.model.param_groups(hp.optimizer.get("weight_decay", 0.0), muon=wants_muon_group(hp.optimizer))
        optimizer = build_optimizer(hp.optimizer, groups)
        peak = hp.optimizer["lr"]
        lr_at = build_schedule(hp.schedule, peak)
        scheduler = LambdaLR(optimizer, lambda step: lr_at(step, self.total_steps(step)) / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning refuses to clip for a fused optimizer under any mixed precision, because under fp16 its
        # GradScaler leaves the gradients scaled until the fused step. bf16 has no scaler: the gradients
        # are already true, so clip them directly and keep the fused step (train.py turns fused off for fp16).
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoint extras: what eval and sample need without this class, plus RNG and time
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["carlos"] = {
            "model": self.model.cfg.to_dict(),
            **self.hparams.run,
            "step": self.global_step,
            "elapsed_s": self.elapsed_s(),
            "val": dict(self.val_metrics),
            "rng": _rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("carlos", {})
        self.elapsed_before = float(extra.get("elapsed_s", 0.0))
        self.pace = (int(extra.get("step", 0)), self.elapsed_before)  # a resumed run keeps its schedule
        if "rng" in extra:
            _set_rng_state(extra["rng"])
