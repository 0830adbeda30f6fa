"""How much memory a model and a batch need, and how much the machine has: checked before anything is
allocated, so that a model or batch that cannot fit is refused in one line instead of being killed by
the kernel (or swapping) after the run has started writing.

The counts are exact for the weights (the same shapes as carlos/model.py, computed without building
the model) and a lower bound for activations, so a refusal never happens for a run that would fit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from carlos.errors import CarlosError
from carlos.model import GPTConfig

FLOAT = 4  # bytes: weights, gradients, optimizer state and activations are float32 (autocast aside)


def num_params(cfg: GPTConfig) -> int:
    """GPT(cfg).num_params(), from the shapes alone (the output head is tied to the embedding)."""
    d, ff = cfg.d_model, cfg.d_ff
    bias = 1 if cfg.bias else 0
    norm = d * (1 + bias) if cfg.norm == "layernorm" else d
    attn = 3 * d * d + 3 * d * bias + d * d + d * bias
    width = 2 * ff if cfg.mlp == "swiglu" else ff
    mlp = d * width + width * bias + ff * d + d * bias
    block = 2 * norm + attn + mlp
    pos = cfg.block_size * d if cfg.pos == "learned" else 0
    return cfg.vocab_size * d + pos + cfg.n_layers * block + norm


def buffer_bytes(cfg: GPTConfig) -> int:
    """Rotary tables: cos and sin, each (block_size, head_dim / 2) floats."""
    return cfg.block_size * (cfg.d_model // cfg.n_heads) * FLOAT if cfg.pos == "rope" else 0


def activation_bytes(cfg: GPTConfig, batch: int, length: int, training: bool) -> int:
    """At least what one forward pass keeps: per layer and token the block's inputs, q, k, v, the
    attention output and the MLP's hidden values (all layers when training, for the backward pass; one
    at a time otherwise), plus the logits and their float copy for the loss."""
    d, ff = cfg.d_model, cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    per_layer = batch * length * (6 * d + 2 * ff) * FLOAT
    logits = 2 * batch * length * cfg.vocab_size * FLOAT
    return per_layer * (cfg.n_layers if training else 1) + logits


def training_bytes(cfg: GPTConfig, micro_batch: int) -> int:
    """Weights, gradients and two AdamW moments (16 bytes a parameter), buffers and activations."""
    return 4 * FLOAT * num_params(cfg) + buffer_bytes(cfg) + activation_bytes(cfg, micro_batch, cfg.block_size, True)


def validation_bytes(cfg: GPTConfig, batch: int) -> int:
    """A validation batch during training: the training state stays, the batch's activations need no grads."""
    return 4 * FLOAT * num_params(cfg) + buffer_bytes(cfg) + activation_bytes(cfg, batch, cfg.block_size, False)


def inference_bytes(cfg: GPTConfig, batch: int, length: int, kv_cache: bool = False) -> int:
    """Weights and buffers, one batch's activations, and with kv_cache the keys and values of every layer."""
    cache = 2 * cfg.n_layers * batch * cfg.block_size * cfg.d_model * FLOAT if kv_cache else 0
    return FLOAT * num_params(cfg) + buffer_bytes(cfg) + activation_bytes(cfg, batch, length, False) + cache


def _cgroup_available() -> int | None:
    """What a container's memory limit (cgroup v2, else v1) leaves, when there is one."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                return int(text) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _windows_available() -> int | None:
    import ctypes

    class Status(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong)
            for name in ("total", "avail", "page_total", "page_avail", "virtual_total", "virtual_avail", "ext")
        ]

    status = Status()
    status.length = ctypes.sizeof(Status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.avail)


def host_available() -> int | None:
    """Bytes of RAM available to this process now (Linux: MemAvailable and the cgroup limit), or None
    where the platform does not say."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append(cgroup)
    if not found and sys.platform == "win32":
        try:
            avail = _windows_available()
        except (OSError, AttributeError, ValueError):
            avail = None
        if avail is not None:
            found.append(avail)
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def device_available(device: str) -> tuple[int | None, str]:
    """(bytes available, what they belong to) for a torch device type or name: free GPU memory on
    CUDA, RAM otherwise."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return int(free), f"GPU {index}"
    return host_available(), "this machine"


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_fits(need: int, device: str, what: str, fix: str) -> None:
    """Refuse when `need` bytes exceed what the device has available now."""
    have, where = device_available(device)
    if have is not None and need > have:
        raise CarlosError(f"{what} needs at least about {gb(need)} but {where} has {gb(have)} available; {fix}")
