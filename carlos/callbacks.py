"""What Lightning does not already do for a carlos run: train and validation records, text samples, the original
script's checkpoint layout (step_XXXXXX.pt, best.pt, last.pt) written atomically, and a progress bar that shows
loss and tokens/s."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import SIGTERMException

from carlos.checkpoint import save_checkpoint
from carlos.config import EVAL_INTERVAL, SampleConfig
from carlos.generate import generate, prompt_ids
from carlos.manifest import Manifest
from carlos.module import diverged, finite
from carlos.ownership import step_file
from carlos.private import set_stop_flag, stop_flag
from carlos.tokenizer import ByteTokenizer


class BeforeFirstStep(Callback):
    """Calls fn once Lightning has set up the run and restored the checkpoint it resumes, just before the
    first step."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.fn()


class StepCallback(Callback):
    """A callback that acts between optimizer steps. Lightning calls on_train_batch_end after every
    micro-batch, and under gradient accumulation most of them end mid-step: this calls on_step_end once
    an optimizer step, after the micro-batch that completed it (on_micro_batch_end sees them all)."""

    seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.seen_step = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        boundary, self.seen_step = step != self.seen_step, step
        self.on_micro_batch_end(trainer, pl_module, step, boundary)

    def on_micro_batch_end(self, trainer: L.Trainer, pl_module, step: int, boundary: bool) -> None:
        if boundary:
            self.on_step_end(trainer, pl_module, step)

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO writes straight into the target file, so a kill mid-write leaves a
    truncated checkpoint; this one writes atomically (checkpoint.save_checkpoint), recorded as carlos's."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        self.manifest = manifest

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_checkpoint(self.manifest, Path(path), checkpoint)


def log_record(trainer: L.Trainer, record: dict[str, float]) -> None:
    """Send one record to every logger (metrics.jsonl, W&B)."""
    step = record.pop("step")
    for logger in trainer.loggers:
        logger.log_metrics(record, step=step)


class TrainMetrics(StepCallback):
    """Train records every log_interval optimizer steps, validation records after each validation."""

    def __init__(self, log_interval: int, tokens_per_batch: int) -> None:
        self.log_interval = log_interval
        self.tokens_per_batch = tokens_per_batch  # one micro-batch on one rank
        self.last: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # all ranks together: the world size is known only once the Trainer has set up its strategy
        self.tokens_per_step = self.tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.mark_time = time.perf_counter()
        self.mark_step = trainer.global_step
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        self.lr = optimizer.param_groups[0]["lr"]  # the lr of the update about to happen

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        if step % self.log_interval:
            return
        now = time.perf_counter()
        record = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "lr": self.lr,
            "train_loss": pl_module.pop_train_loss(),
            "tokens_per_s": (step - self.mark_step) * self.tokens_per_step / max(now - self.mark_time, 1e-9),
            "elapsed_s": round(pl_module.elapsed_s(), 3),
        }
        self.mark_time, self.mark_step = now, step
        self.last.update(loss=record["train_loss"], tokens_per_s=record["tokens_per_s"])
        if record["train_loss"] is not None and not finite(record["train_loss"]):
            raise diverged(f"train loss is {record['train_loss']} at step {step}")
        log_record(trainer, record)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        val = pl_module.val_metrics
        step = trainer.global_step
        self.last.update(val_loss=val["loss"], val_bpb=val["bpb"])
        log_record(
            trainer,
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "val_loss": val["loss"],
                "val_ppl": val["ppl"],
                "val_bpb": val["bpb"],
                "elapsed_s": round(pl_module.elapsed_s(), 3),
            },
        )
        self.mark_time += pl_module.validation_seconds()  # time spent validating is not training throughput


class SampleText(Callback):
    """After each validation, sample.tokens tokens from sample.prompt into samples/step_XXXXXX.txt (and W&B)."""

    def __init__(self, samples_dir: Path, manifest: Manifest, sample: SampleConfig, seed: int, tok: ByteTokenizer):
        self.dir, self.manifest, self.sample, self.seed = samples_dir, manifest, sample, seed
        self.prompt_ids, self.eos_id = prompt_ids(tok, sample.prompt), tok.eos_id

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.sample.tokens <= 0 or not trainer.is_global_zero:
            return
        step = trainer.global_step
        model = pl_module.model
        was_training = model.training
        model.eval()
        # a private generator: sampling must not move the training RNG
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed + step)
        s = self.sample
        ids = generate(model, self.prompt_ids, s.tokens, s.temperature, s.top_k, s.top_p, gen, self.eos_id)
        model.train(was_training)
        text = s.prompt + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        self.manifest.write(step_file(self.dir, step, ".txt"), lambda f: f.write(text.encode("utf-8")))
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=[[step, text]], step=step)


class Checkpoints(StepCallback):
    """checkpoints/step_XXXXXX.pt every ckpt_interval optimizer steps and at the end, best.pt at the lowest
    val loss, last.pt a copy of the newest step file.

    Written here rather than by two ModelCheckpoint callbacks because the order matters for resuming:
    at a step that both validates and checkpoints, best.pt must be written first and last.pt after it,
    so that last.pt's record of the best loss includes that validation. ModelCheckpoint saves its step
    files before validation runs.

    A validation of part of the val split (--eval_tokens) is compared only with others of that part: the
    first validation of the whole split (the last one) replaces their best, whatever its loss."""

    def __init__(self, dirpath: Path, manifest: Manifest, ckpt_interval: int) -> None:
        self.dir, self.manifest = dirpath, manifest
        self.every = ckpt_interval
        self.best = self.best_bpb = math.inf
        self.best_step = -1
        self.best_of_part = False  # the best so far scored part of the val split
        self.saved_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_bpb": self.best_bpb, "best_step": self.best_step, "part": self.best_of_part}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_bpb, self.best_step = (
            float(state["best"]),
            float(state["best_bpb"]),
            int(state["best_step"]),
        )
        self.best_of_part = bool(state.get("part", False))  # absent from the checkpoints of earlier versions

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.saved_step = trainer.global_step

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        if 0 < trainer.max_steps <= step:
            trainer.should_stop = True  # makes Lightning validate now; on_validation_end saves
        elif step % self.every == 0 and not _validates_after(trainer, step):
            self.save(trainer, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        loss, part = pl_module.val_metrics["loss"], pl_module.eval_share < 1 and not trainer.should_stop
        if part:
            better = loss < self.best and (self.best_of_part or math.isinf(self.best))
        else:
            better = self.best_of_part or loss < self.best
        if better:
            self.best, self.best_bpb, self.best_step = loss, pl_module.val_metrics["bpb"], step
            self.best_of_part = part
            trainer.save_checkpoint(self.dir / "best.pt", weights_only=False)
        if step % self.every == 0 or trainer.should_stop:
            self.save(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self.saved_step:
            self.save(trainer, trainer.global_step)

    def save(self, trainer: L.Trainer, step: int) -> None:
        if step == self.saved_step and (self.dir / "last.pt").exists():
            return
        module = trainer.lightning_module
        loss_sum = getattr(module, "loss_sum", None)
        # an inf gradient can leave NaN weights behind a still-finite loss: check the weights too
        # (one pass over a tiny model's parameters, far cheaper than the write itself)
        weights_finite = finite(*module.parameters())
        if not weights_finite or (loss_sum is not None and not finite(loss_sum)):
            what = f"train loss became {loss_sum.item()}" if weights_finite else "the weights became NaN or inf"
            raise diverged(f"{what} before step {step} (not checkpointed)")
        path = step_file(self.dir, step)
        trainer.save_checkpoint(path, weights_only=False)  # False: full training state
        if trainer.is_global_zero:
            self.manifest.write(self.dir / "last.pt", lambda f: f.write(path.read_bytes()))
        self.saved_step = step


class Preemption(StepCallback):
    """Nothing lost to a stop. On SIGTERM (Lightning's own handler notes it), on SIGUSR1/SIGUSR2 (the
    warning that submitit and SLURM send before a time limit) and on a first Ctrl+C (SIGINT; a second
    one aborts at once), the run writes its checkpoint and last.pt at the next optimizer-step boundary,
    then stops. If another handler owned the signal before (submitit's, which requeues the job), it is
    called afterwards; the requeued job continues from last.pt.

    Lightning's SIGTERM path is reused rather than a flag of our own because it already stops every rank
    of a DDP run at the same batch (rank 0's flag is broadcast each step): the checkpoint, a collective
    operation, is then written in on_exception by all ranks together."""

    NAMES = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")  # all but SIGINT are POSIX only; SIGHUP: a lost terminal

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.NAMES:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._notice)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _notice(self, signum: int, frame: Any) -> None:
        self.signum = signum
        set_stop_flag(self.trainer, True)  # Lightning's stop flag (see the class doc)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C aborts at once
            if self.trainer.is_global_zero:
                print("\nCtrl+C: stopping after this step, with a checkpoint (press again to abort)", flush=True)

    def on_micro_batch_end(self, trainer: L.Trainer, pl_module, step: int, boundary: bool) -> None:
        # Lightning stops right after this batch; mid-accumulation, hold the flag back to the step's end,
        # or the resumed run would count its micro-batches from a shifted boundary
        if stop_flag(trainer) and not boundary:
            set_stop_flag(trainer, False)
            self.pending = True
        elif self.pending and boundary:
            set_stop_flag(trainer, True)
            self.pending = False

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        step = trainer.global_step
        self.checkpoints.save(trainer, step)
        name = signal.Signals(self.signum).name if self.signum else "SIGTERM"
        if trainer.is_global_zero:
            print(
                f"\nstopped by {name} at step {step}: wrote {self.checkpoints.dir / 'last.pt'}; "
                "continue with --resume (resume=auto does it by itself)",
                flush=True,
            )
        previous = self.previous.get(self.signum) if self.signum else None
        if callable(previous) and self.signum != signal.SIGINT:  # Python's SIGINT handler would abort
            previous(self.signum, None)  # submitit's handler: requeues the job (on rank 0) and exits


class WeightDecayByEpochs(StepCallback):
    """optimizer.weight_decay=auto: sets the weight decay of the decayed groups from the epochs the run
    will see, and says so. A run bounded by steps knows them at its start; under --max_time they are
    estimated from the pace of the first `after` steps of this session (till then the rule's first value)."""

    def __init__(self, train_tokens: int, tokens_per_batch: int, rule: Any, timed: bool) -> None:
        self.train_tokens, self.tokens_per_batch = train_tokens, tokens_per_batch
        self.points, self.values = rule.epochs, rule.weight_decay
        self.timed = timed
        self.decide_at: int | None = None
        self.after = 50

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.decide_at = trainer.global_step + self.after if self.timed else None
        if not self.timed:
            self._decide(trainer, pl_module, trainer.global_step, "")

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        if step == self.decide_at:
            self._decide(trainer, pl_module, step, " at the pace so far")

    def _decide(self, trainer: L.Trainer, pl_module, step: int, how: str) -> None:
        from carlos.model import decays
        from carlos.optimization import weight_decay_for

        tokens_per_step = self.tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size
        steps = pl_module.total_steps(step)
        if not math.isfinite(steps):
            return  # unbounded: nothing to go by
        epochs = steps * tokens_per_step / self.train_tokens
        decay = weight_decay_for(epochs, self.points, self.values)
        for group in trainer.optimizers[0].param_groups:
            if any(decays(p) for p in group["params"]):
                group["weight_decay"] = decay
        if trainer.is_global_zero:
            print(
                f"weight decay {decay:.2f}: about {epochs:,.1f} epochs in this budget{how} ({steps:,.0f} steps of "
                f"{tokens_per_step:,} tokens, {self.train_tokens:,} train tokens); optimizer.weight_decay=auto, "
                "--weight_decay N to choose",
                flush=True,
            )


def _validates_after(trainer: L.Trainer, step: int) -> bool:
    """Whether Lightning validates after this optimizer step: every val_check_batch micro-batches, which is
    eval_interval's steps, or the interval TimeBudget chose under --max_time."""
    every = trainer.val_check_batch
    return math.isfinite(every) and step % max(int(every) // trainer.accumulate_grad_batches, 1) == 0


class TimeBudget(StepCallback):
    """--max_time: the run's wall time, counted from the moment the command started (a sweep's job: the job):
    training stops early enough that the final validation, sample and checkpoints also end by then, and
    CarlosLM gets the deadline its lr schedule aims at (in training seconds: the start-up is taken off).

    The reserve kept for the end is 1.5 times the longest validation (its callbacks' sampling and
    checkpointing included) plus half a second. At step 30 it is estimated from the validation split's
    size and the training pace: scoring a token costs about VAL_COST of training on one (measured:
    docs/PERFORMANCE.md, "The time budget"); before that, 5% of the budget. Then too, with eval_interval
    and eval_tokens auto, it chooses how often to validate (VALIDATIONS a run) and how much of the val
    split the validations before the last score (those all together within VAL_SHARE of the budget), and
    says so: the run's validation curve and what it costs."""

    VAL_COST = 0.3
    LARGE_SHARE = 0.25  # a final validation that would take more of a run than this is worth a word
    VALIDATIONS = 10  # enough points for a curve
    VAL_SHARE = 0.1

    def __init__(
        self, max_time_s: float, started: float, val_tokens: int, tokens_per_batch: int, *, interval=False, tokens=False
    ) -> None:
        self.max_time, self.started = max_time_s, started
        self.val_tokens, self.tokens_per_batch = val_tokens, tokens_per_batch
        self.choose_interval, self.choose_tokens = interval, tokens  # eval_interval, eval_tokens: auto
        self.reserve = self.final_reserve = 0.05 * max_time_s
        self.startup = 0.0
        self.longest_val = 0.0
        self.pace_from: tuple[int, float] | None = None  # (step, seconds) the pace is measured from
        self.measure_at = 0

    def _deadline(self) -> float:
        return max(self.max_time - self.startup - self.reserve, 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.startup = time.time() - self.started  # imports, data, model: the clock has been running
        self.pace_from, self.measure_at = None, trainer.global_step + 10
        pl_module.deadline_s = self._deadline()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.longest_val = max(self.longest_val, pl_module.validation_seconds())  # last callback: all of it
        # the final validation scores the whole split, which the earlier ones may not have
        self.reserve = max(1.5 * self.longest_val + 0.5, self.final_reserve if pl_module.eval_share < 1 else 0)

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        seconds, deadline = _agreed(trainer, pl_module.elapsed_s(), self._deadline())
        pl_module.pace, pl_module.deadline_s = (step, seconds), deadline
        if step == self.measure_at and not self.longest_val:
            if self.pace_from is None:  # the first steps are slower: the pace is measured after them
                self.pace_from, self.measure_at = (step, seconds), step + 20
            else:
                self._estimate(trainer, pl_module, step - self.pace_from[0], seconds - self.pace_from[1])
        if seconds >= deadline:  # only between optimizer steps, never mid-accumulation
            trainer.should_stop = True  # Lightning validates now; Checkpoints saves the final state

    def _estimate(self, trainer: L.Trainer, pl_module, steps: int, seconds: float) -> None:
        """The reserve from the pace of `steps` steps in `seconds`; the validations chosen where auto; a
        word when the final validation takes a large share of the run."""
        tokens = steps * self.tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size
        validation = self.VAL_COST * self.val_tokens * seconds / max(tokens, 1) + 0.5  # + sample, checkpoints
        self.reserve = self.final_reserve = 1.5 * validation + 0.5
        pl_module.deadline_s = self._deadline()
        if self.choose_tokens:
            pl_module.eval_share = min(1.0, self.VAL_SHARE * self.max_time / self.VALIDATIONS / validation)
        total = pl_module.total_steps(trainer.global_step)
        if self.choose_interval:
            interval = max(int(total / self.VALIDATIONS), 1) if math.isfinite(total) else EVAL_INTERVAL
            trainer.val_check_batch = interval * trainer.accumulate_grad_batches
        if trainer.is_global_zero:
            self._say(trainer, pl_module.eval_share, validation, total)

    def _say(self, trainer: L.Trainer, share: float, validation: float, total: float) -> None:
        interval = int(trainer.val_check_batch) // trainer.accumulate_grad_batches
        if self.choose_interval or self.choose_tokens:
            times = f", about {total / interval:,.0f} times in this run" if math.isfinite(total) else ""
            what = f"each on all {self.val_tokens:,} val tokens (about {validation:.1f} s)"
            if share < 1:
                what = (
                    f"each on {share:.0%} of the {self.val_tokens:,} val tokens (about {share * validation:.1f} s), "
                    f"the last on all of them (about {validation:.1f} s)"
                )
            print(
                f"validating every {interval:,} steps{times}, {what}; --eval_interval N and --eval_tokens N choose, "
                "and a smaller --val_fraction at prepare shrinks every validation",
                flush=True,
            )
        if validation > self.LARGE_SHARE * self.max_time:
            print(
                f"a validation will take about {validation:.0f} s, {validation / self.max_time:.0%} of --max_time "
                f"{self.max_time:g}: prepare a smaller val split (--val_fraction), validate less often "
                "(--eval_interval) or give more time",
                flush=True,
            )


def _agreed(trainer: L.Trainer, seconds: float, deadline: float) -> tuple[float, float]:
    """The slowest rank's clock and the earliest deadline, the same on every rank. Each DDP rank keeps its
    own clock: if they each decided, one would stop and validate while another trains on, and both would
    wait for each other forever; their lr schedules, and so their weights, would drift apart."""
    if trainer.world_size == 1:
        return seconds, deadline
    both = torch.tensor([seconds, -deadline], dtype=torch.float64, device=trainer.strategy.root_device)
    # by hand: Lightning's strategy.reduce puts a barrier before its all_reduce, two collectives on every
    # step where this one, which already waits for every rank, does the job
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return both[0].item(), -both[1].item()


def _terminal_shape(file) -> tuple[int, int]:
    """The terminal's columns and lines as the terminal reports them; where it reports 0 (some CI
    terminals, `script`), which tqdm reads as -1 x -1 and then draws nothing, the standard library's
    fallback: $COLUMNS and $LINES, or 80 x 24. The terminal comes first because a $COLUMNS left in the
    environment is often stale."""
    try:
        columns, lines = os.get_terminal_size(file.fileno())
    except (AttributeError, ValueError, OSError):  # not a file, closed, or not a terminal
        columns = lines = 0
    fallback = shutil.get_terminal_size()
    return columns or fallback.columns, lines or fallback.lines


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps (Lightning counts micro-batches) and showing the
    latest train loss, tokens/s and val bpb: one bar for the whole run, which starts where a resumed run
    left off. Only on a terminal: into a file or a pipe, loggers.LineLogger writes plain lines instead."""

    def __init__(self, metrics: TrainMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)  # validation takes a fraction of a second; its result shows on the train bar

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        bar = Tqdm(
            desc="train",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )
        bar.dynamic_ncols = _terminal_shape
        bar.ncols, bar.nrows = _terminal_shape(sys.stdout)
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # Lightning's resets the bar to count the epoch's micro-batches, under "Epoch N"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.is_disabled:  # DDP ranks other than 0: a disabled tqdm never counts, so the check would always pass
            return
        bar = self.train_progress_bar
        if trainer.global_step != bar.n:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.update(trainer.global_step - bar.n)  # tqdm redraws at most every mininterval seconds

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict[str, str]:
        last = self.metrics.last
        shown = {}
        if last.get("loss") is not None:
            shown["loss"] = f"{last['loss']:.3f}"
        if "tokens_per_s" in last:
            shown["tok/s"] = f"{last['tokens_per_s']:,.0f}"
        if "val_bpb" in last:
            shown["val_bpb"] = f"{last['val_bpb']:.3f}"
        return shown
