"""The optimizer and the lr schedule, built from conf/optimizer/*.yaml and conf/schedule/*.yaml, and the
schedules themselves. Without Lightning, so that train can refuse a wrong setting before importing it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate

from carlos.errors import CarlosError, first_line, nearest
from carlos.private import muon_parts

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


def weight_decay_for(epochs: float, points: list[float], values: list[float]) -> float:
    """optimizer.weight_decay=auto: the decay for a run that will see the train split `epochs` times,
    linear in log(epochs) between the points of the rule (conf/train.yaml), held beyond its ends."""
    if epochs <= points[0]:
        return values[0]
    for i in range(1, len(points)):
        if epochs <= points[i]:
            e0, e1, w0, w1 = points[i - 1], points[i], values[i - 1], values[i]
            return w0 + (w1 - w0) * math.log(epochs / e0) / math.log(e1 / e0)
    return values[-1]


# ---------------------------------------------------------------- Muon


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the groups marked `muon` (the blocks' weight matrices), AdamW for the rest
    (embeddings, norm gains, biases), stepped as one optimizer. Written here because torch's Muon refuses
    anything but 2-D weights, while Lightning's automatic optimization, the lr schedule and the
    checkpoint each expect a single optimizer. The two share this object's param_groups and state, so
    the schedule sets both lrs and the state dict is the standard one.

    adjust_lr_fn="match_rms_adamw" scales Muon's orthogonalized update to AdamW's RMS, so one peak lr,
    weight decay and schedule serve both (Moonshot's "Muon is Scalable for LLM Training")."""

    wants_muon_group = True  # GPT.param_groups(muon=True): the blocks' matrices in a group marked `muon`

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        split_qkv: bool = False,
    ) -> None:
        self.split_qkv = split_qkv
        params = list(params)
        if params and not isinstance(params[0], dict):  # a plain list of tensors: one group, all on AdamW
            params = [{"params": params}]
        groups = [{"muon": False, **group, "params": list(group["params"])} for group in params]
        muon = [g for g in groups if g["muon"]]
        rest = [g for g in groups if not g["muon"]]
        self.muon = torch.optim.Muon(
            muon or [torch.zeros(1, 1)],
            lr,
            weight_decay,
            momentum,
            nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self.adamw = torch.optim.AdamW(rest, lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(muon + rest, {"lr": lr, "weight_decay": weight_decay})
        self._share()

    def _share(self) -> None:
        n = sum(1 for g in self.param_groups if g["muon"])
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # makes new group dicts and state: share them again
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stacked = [(p, p.grad, g) for g in self.muon.param_groups for p in g["params"] if self._stacked(p)]
        for p, _, _ in stacked:  # torch's Muon skips a parameter without a gradient: these are stepped below
            p.grad = None
        if self.muon.param_groups:
            self.muon.step()
        for p, grad, group in stacked:
            p.grad = grad
            blockwise_muon(p, self.state[p], group)
        self.adamw.step()
        return loss

    def _stacked(self, p: torch.Tensor) -> bool:
        return self.split_qkv and p.grad is not None and getattr(p, "stacked", 1) > 1


def blockwise_muon(p: torch.Tensor, state: dict, group: dict) -> None:
    """torch's Muon step (torch.optim._muon._single_tensor_muon) for a matrix of p.stacked blocks stacked
    on its rows, each orthogonalized and lr-scaled on its own (modded-nanogpt's Q, K and V). Written here because
    torch's Muon takes whole parameters only; the momentum buffer is torch's, so checkpoints do not change."""
    orthogonalize, adjust_lr = muon_parts()
    lr, momentum, grad = group["lr"], group["momentum"], p.grad
    buf = state.setdefault("momentum_buffer", torch.zeros_like(grad, memory_format=torch.preserve_format))
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    p.mul_(1 - lr * group["weight_decay"])
    for block, u in zip(p.chunk(p.stacked), update.chunk(p.stacked), strict=True):
        u = orthogonalize(u, group["ns_coefficients"], group["ns_steps"], group["eps"])
        block.add_(u, alpha=-adjust_lr(lr, group["adjust_lr_fn"], block.shape))


# ---------------------------------------------------------------- building from config


def _instantiate(cfg: dict, what: str) -> Callable:
    """instantiate a `_partial_` config; a wrong key names the nearest argument of its target."""
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        raise CarlosError(f"{what} config is invalid: {str(e).splitlines()[-1].strip()}") from None
    except (TypeError, ValueError, AttributeError, ImportError) as e:  # e.g. _partial_=abc, a bad _target_
        raise CarlosError(f"{what} config is invalid: {first_line(e)}") from None


def _check_kwargs(fn: Callable, cfg: dict, what: str, supplied: tuple[str, ...] = ()) -> None:
    target = fn.func if hasattr(fn, "func") else fn
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in cfg:
        if not key.startswith("_") and key not in params:
            raise CarlosError(f"unknown key '{what}.{key}'{nearest(key, [p for p in params if p not in supplied])}")


def wants_muon_group(cfg: dict) -> bool:
    """Whether the optimizer cfg names takes the blocks' matrices as a group of their own (MuonWithAdamW)."""
    partial = _instantiate(cfg, "optimizer")
    return getattr(getattr(partial, "func", partial), "wants_muon_group", False)


def build_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    partial = _instantiate(cfg, "optimizer")
    _check_kwargs(partial, cfg, "optimizer", supplied=("params",))
    try:
        return partial(params)
    except Exception as e:  # noqa: BLE001 - torch checks its arguments with several exception types
        raise CarlosError(f"optimizer config is invalid: {first_line(e)}") from None


def check_optimization(optimizer: dict, schedule: dict, max_steps: int) -> None:
    """Build the optimizer and take one step with it on a stand-in weight, and compute the schedule's first
    lr: a setting that torch only rejects when it steps (betas='') is refused before the run writes."""
    matrix, vector = torch.ones(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    decay = optimizer.get("weight_decay", 0.0)  # a matrix marked for Muon too: other optimizers ignore the mark
    groups = [{"params": [matrix], "weight_decay": decay, "muon": True}, {"params": [vector], "weight_decay": 0.0}]
    opt = build_optimizer(optimizer, groups)
    matrix.grad, vector.grad = torch.eye(2), torch.ones(2)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - torch checks some settings only here, with several exception types
        raise CarlosError(f"optimizer config is invalid: {first_line(e)}") from None
    if not (torch.isfinite(matrix).all() and torch.isfinite(vector).all()):
        raise CarlosError("optimizer config is invalid: one step with it makes the weights NaN or inf")
    lr_at = build_schedule(schedule, optimizer["lr"])
    try:
        lr_at(0, max_steps if max_steps > 0 else math.inf)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CarlosError(f"schedule config is invalid: {first_line(e)}") from None


def build_schedule(cfg: dict, peak_lr: float) -> Callable[[int, float], float]:
    """lr as a function of the optimizer step and the run's length in steps. The target is resolved once
    and called directly: it runs every step, and Hydra's deferred call re-checks its target each time."""
    target = cfg.get("_target_")
    try:
        if not isinstance(target, str) or not target:
            raise ValueError(f"{target!r} is not the dotted name of a function")
        fn = get_method(target)
    except (ImportError, ValueError, AttributeError, IndexError) as e:
        raise CarlosError(f"schedule._target_ is invalid ({first_line(e)}); use one of conf/schedule/*.yaml") from None
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    _check_kwargs(fn, kwargs, "schedule", supplied=("step", "total_steps", "peak_lr"))

    def lr_at(step: int, total_steps: float) -> float:
        return fn(step, total_steps=total_steps, peak_lr=peak_lr, **kwargs)

    return lr_at
