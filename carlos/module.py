"""CarlosLM: the LightningModule around GPT (steps, optimizer groups, lr schedule, val loss/ppl/bpb)
and the lr schedules that conf/schedule/*.yaml point at."""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from torch.optim.lr_scheduler import LambdaLR

from carlos.errors import CarlosError, nearest
from carlos.evaluate import score_batch, summarize
from carlos.model import GPT, GPTConfig

# ---------------------------------------------------------------- lr schedules
# Written as closed-form functions of the step rather than chained torch schedulers: one formula is
# easy to test value by value and needs no scheduler state beyond the step that Lightning restores.

WARMUP_CAP = 0.2  # a warmup longer than this fraction of the run is clipped to it


def clip_warmup(warmup_steps: int, total_steps: float) -> int:
    if not math.isfinite(total_steps):  # a time budget whose pace is not known yet
        return warmup_steps
    return min(warmup_steps, int(WARMUP_CAP * total_steps))


def _warmup(step: int, warmup: int, peak_lr: float) -> float | None:
    """Linear warmup: the update at step s (0-based) uses peak * (s + 1) / warmup."""
    return peak_lr * (step + 1) / warmup if step < warmup else None


def warmup_cosine(step: int, *, total_steps: float, peak_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup, then cosine from peak_lr at the end of warmup to min_lr at total_steps."""
    warmup = clip_warmup(warmup_steps, total_steps)
    lr = _warmup(step, warmup, peak_lr)
    if lr is not None:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, *, total_steps: float, peak_lr: float, warmup_steps: int, min_lr: float, decay_fraction: float
) -> float:
    """Warmup-stable-decay: linear warmup, peak_lr held, then a linear decay to min_lr over the last
    decay_fraction of the run."""
    if not 0 < decay_fraction <= 1:
        raise CarlosError(f"schedule.decay_fraction must be in (0, 1], got {decay_fraction}")
    warmup = clip_warmup(warmup_steps, total_steps)
    lr = _warmup(step, warmup, peak_lr)
    if lr is not None:
        return lr
    if not math.isfinite(total_steps):
        return peak_lr
    decay_start = max(warmup, total_steps - int(decay_fraction * total_steps))
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return peak_lr + (min_lr - peak_lr) * progress


def warmup_constant(step: int, *, total_steps: float, peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then peak_lr to the end (min_lr is unused)."""
    lr = _warmup(step, clip_warmup(warmup_steps, total_steps), peak_lr)
    return peak_lr if lr is None else lr


# ---------------------------------------------------------------- building from config


def _instantiate(cfg: dict, what: str) -> Callable:
    """instantiate a `_partial_` config; a wrong key names the nearest argument of its target."""
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        raise CarlosError(f"{what} config is invalid: {str(e).splitlines()[-1].strip()}") from None
    except (TypeError, ValueError, AttributeError, ImportError) as e:  # e.g. _partial_=abc, a bad _target_
        raise CarlosError(f"{what} config is invalid: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_kwargs(fn: Callable, cfg: dict, what: str, supplied: tuple[str, ...] = ()) -> None:
    target = fn.func if hasattr(fn, "func") else fn
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in cfg:
        if not key.startswith("_") and key not in params:
            raise CarlosError(f"unknown key '{what}.{key}'{nearest(key, [p for p in params if p not in supplied])}")


def build_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    partial = _instantiate(cfg, "optimizer")
    _check_kwargs(partial, cfg, "optimizer", supplied=("params",))
    try:
        return partial(params)
    except Exception as e:  # noqa: BLE001 - torch checks its arguments with several exception types
        raise CarlosError(f"optimizer config is invalid: {_first_line(e)}") from None


def check_optimization(optimizer: dict, schedule: dict, max_steps: int) -> None:
    """Build the optimizer and take one step with it on a stand-in weight, and compute the schedule's first
    lr: a setting that torch only rejects when it steps (betas='') is refused before the run writes."""
    weight = torch.zeros(2, requires_grad=True)
    opt = build_optimizer(optimizer, [{"params": [weight], "weight_decay": optimizer.get("weight_decay", 0.0)}])
    weight.grad = torch.ones(2)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - torch checks some settings only here, with several exception types
        raise CarlosError(f"optimizer config is invalid: {_first_line(e)}") from None
    lr_at = build_schedule(schedule, optimizer["lr"])
    try:
        lr_at(0, max_steps if max_steps > 0 else math.inf)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CarlosError(f"schedule config is invalid: {_first_line(e)}") from None


def build_schedule(cfg: dict, peak_lr: float) -> Callable[[int, float], float]:
    """lr as a function of the optimizer step and the run's length in steps. The target is resolved once
    and called directly: it runs every step, and Hydra's deferred call re-checks its target each time."""
    target = cfg.get("_target_")
    try:
        if not isinstance(target, str) or not target:
            raise ValueError(f"{target!r} is not the dotted name of a function")
        fn = get_method(target)
    except (ImportError, ValueError, AttributeError, IndexError) as e:
        raise CarlosError(f"schedule._target_ is invalid ({_first_line(e)}); use one of conf/schedule/*.yaml") from None
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    _check_kwargs(fn, kwargs, "schedule", supplied=("step", "total_steps", "peak_lr"))

    def lr_at(step: int, total_steps: float) -> float:
        return fn(step, total_steps=total_steps, peak_lr=peak_lr, **kwargs)

    return lr_at


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

    def __init__(self, model: dict, optimizer: dict, schedule: dict, max_steps: int, run: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model))
        self.elapsed_before = 0.0  # training seconds of earlier sessions of a resumed run
        self.val_metrics: dict[str, float] = {}
        self.deadline_s: float | None = None  # set by the TimeBudget callback under --max_time
        self.eval_seconds = 0.0  # this session's validations, with their samples and checkpoints

    def total_steps(self, step: int) -> float:
        """The run's length in optimizer steps, as the lr schedule sees it: max_steps, or under a time
        budget the steps the run will reach by its deadline at the pace so far, whichever is smaller.
        So warmup and decay complete by the deadline; a run bounded by steps alone stays deterministic."""
        total = self.hparams.max_steps if self.hparams.max_steps > 0 else math.inf
        if self.deadline_s is not None and step > 0:
            elapsed = self.elapsed_s()
            if elapsed > 0:
                total = min(total, step * self.deadline_s / elapsed)
        return total

    # -- training
    def on_train_start(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training seconds so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - getattr(self, "started", time.perf_counter())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        # summed on the device; read (one host sync) only when a train record is logged
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return loss

    def pop_train_loss(self) -> float | None:
        if not self.loss_count:
            return None
        value = (self.loss_sum / self.loss_count).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        return value

    # -- validation: sums over the whole split, reduced across ranks, then loss/ppl/bpb
    def on_validation_start(self) -> None:
        self.validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        # Lightning calls the module's hook after every callback's: this interval also holds the text
        # sample and the checkpoints written after a validation
        self.eval_seconds += time.perf_counter() - self.validation_started

    def on_validation_epoch_start(self) -> None:
        self.val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_sums += score_batch(self.model, x, y)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        self.val_metrics = summarize(*sums.tolist())
        if not math.isfinite(self.val_metrics["loss"]) and not self.trainer.sanity_checking:
            # before the callbacks' on_validation_end: no sample from NaN weights, no checkpoint of them
            raise CarlosError(
                f"validation loss is {self.val_metrics['loss']} at step {self.global_step} (the weights became "
                "NaN or inf), so the run stops; the checkpoints written before it are kept. Lower --peak_lr or "
                "raise --warmup_steps, and start over with --overwrite"
            )
        self.log("val_loss", self.val_metrics["loss"], prog_bar=True, logger=False)
        self.log("val_bpb", self.val_metrics["bpb"], logger=False)

    # -- optimizer and schedule
    def configure_optimizers(self):
        hp = self.hparams
        groups = self.model.param_groups(hp.optimizer.get("weight_decay", 0.0))
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
        if "rng" in extra:
            _set_rng_state(extra["rng"])
