"""Checkpoint files, shared by train, eval, sample and export (their names, and finding one by name, are
the layout's: carlos/ownership.py): their atomic writing, and reading one back safely: unpickled with
weights_only=True, its structure and weights checked against its own model settings before anything is
built, and the model built only when it fits the device, which is chosen here too. Every problem is a
one-line CarlosError naming the file. Imports neither Lightning nor Hydra, so `carlos sample` starts fast."""

from __future__ import annotations

import math
import pickle
import re
import typing
import zipfile
from pathlib import Path

import torch

from carlos.errors import CarlosError, short
from carlos.manifest import Manifest
from carlos.memory import check_fits, inference_bytes, num_params
from carlos.model import GPT, GPTConfig, ModelConfigError
from carlos.ownership import step_of
from carlos.tokenizer import ByteTokenizer

PREFIX = "model."  # CarlosLM keeps the GPT as self.model, so Lightning saves its weights as model.*


# ---------------------------------------------------------------- names and writing


def save_checkpoint(manifest: Manifest, path: Path, checkpoint: dict) -> None:
    """torch.save written atomically (a kill mid-write leaves the old file), recorded as carlos's."""
    manifest.write(Path(path), lambda f: torch.save(checkpoint, f))


# ---------------------------------------------------------------- loading the file


def _unpickler_reason(e: Exception) -> str:
    """The sentence of torch's weights_only refusal that names what was refused. Its other lines advise
    loading with weights_only=False or allow-listing the global, which carlos never does, so they are
    dropped; the names come from the file, so they are cut to printable text."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if not line or line.startswith(advice) or "weights_only" in line:
            continue
        line = line.split(". ")[0].rstrip(".")
        line = re.sub(r"[^\x20-\x7e]", "?", line)[:200]
        if "weights_only" not in line:
            return line
    return "unsupported content"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    try:
        # torch.save writes a zip archive; a file that is not a complete one (cut short by a full disk or
        # a copy, or not a checkpoint at all) would otherwise reach torch's legacy raw-pickle path
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
    except OSError as e:
        raise CarlosError(f"checkpoint {path} cannot be read ({e.strerror}); check its permissions") from None
    if not is_zip:
        raise CarlosError(
            f"checkpoint {path} is truncated or corrupt (not a complete torch archive); use another checkpoint"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CarlosError(
            f"checkpoint {path} was refused by the safe loader ({_unpickler_reason(e)}): it holds objects "
            "other than tensors and plain values, which could run code; use a carlos checkpoint"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged archive can fail anywhere inside torch.load
        raise CarlosError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); use another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or "carlos" not in ckpt or "state_dict" not in ckpt:
        raise CarlosError(f"{path} is not a carlos checkpoint (no model metadata); use one from workdir/checkpoints")
    return ckpt


# ---------------------------------------------------------------- the structure, before anything is built


def _is_int(value) -> bool:
    """An int and not a bool (True == 1 in Python), nor a tensor, whose == gives no plain answer."""
    return isinstance(value, int) and not isinstance(value, bool)


def _same_keys(what: str, after: str, want: list, have: list, odd: str, limit: int | None = None) -> None:
    """ValueError naming the keys missing from have and those it has beyond want."""
    have_set, want_set = set(have), set(want)
    missing = [k for k in want if k not in have_set][:limit]
    extra = [k for k in have if k not in want_set][:limit]
    if missing or extra:
        parts = [f"lack {', '.join(missing)}"] if missing else []
        parts += [f"have {odd} {', '.join(map(short, extra))}"] if extra else []
        raise ValueError(f"{what} {' and '.join(parts)}{after}")


# model settings added after checkpoints were first written, with the value that computes what those did
ADDED_MODEL_SETTINGS = {"qk_norm": False, "logit_softcap": None, "zero_init": False}


def _model_config(meta: dict) -> GPTConfig:
    """GPTConfig from the checkpoint's model settings; raises ValueError saying what is wrong. An older
    checkpoint's settings get the ones added since (in meta itself, so resume compares like with like)."""
    model = meta.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"its model settings are {'missing' if model is None else type(model).__name__}, not a dict")
    model = meta["model"] = {**model, **{k: v for k, v in ADDED_MODEL_SETTINGS.items() if k not in model}}
    _same_keys("its model settings", "", list(typing.get_type_hints(GPTConfig)), list(model), "unknown")
    try:
        return GPTConfig(**model)
    except ModelConfigError as e:
        raise ValueError(str(e).split("; pick n_heads")[0]) from None


def _tokenizer(meta: dict, cfg: GPTConfig) -> ByteTokenizer:
    """The tokenizer the checkpoint was trained with, checked against the model's vocabulary."""
    saved = meta.get("tokenizer")
    if not isinstance(saved, dict):
        raise ValueError(f"its tokenizer is {'missing' if saved is None else type(saved).__name__}, not a dict")
    for flag in ("add_bos", "add_eos"):
        if not isinstance(saved.get(flag, False), bool):
            raise ValueError(f"tokenizer.{flag} is {short(saved[flag])}, not true or false")
    tok = ByteTokenizer.from_dict(saved)
    if "vocab_size" in saved and not (_is_int(saved["vocab_size"]) and saved["vocab_size"] == tok.vocab_size):
        raise ValueError(
            f"tokenizer.vocab_size is {short(saved['vocab_size'])} but add_bos={tok.add_bos}, add_eos={tok.add_eos} "
            f"make {tok.vocab_size}"
        )
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"its tokenizer (add_bos={tok.add_bos}, add_eos={tok.add_eos}) has {tok.vocab_size} tokens but "
            f"model.vocab_size is {cfg.vocab_size}"
        )
    seq_len = meta.get("seq_len", cfg.block_size)
    if not (_is_int(seq_len) and seq_len == cfg.block_size):
        raise ValueError(f"it was trained with seq_len={short(seq_len)} but model.block_size={cfg.block_size}")
    return tok


def _tensors(state) -> dict[str, torch.Tensor]:
    """The model's entries of a state dict, each checked to be a dense floating-point tensor with data."""
    if not isinstance(state, dict):
        raise ValueError(f"its state_dict is a {type(state).__name__}, not a dict")
    out = {}
    for key, t in state.items():
        if not isinstance(key, str):
            raise ValueError(f"its state_dict has a key {short(key)} that is not a name")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict entry {short(key)} is a {type(t).__name__}, not a tensor")
        if key.startswith(PREFIX):
            if t.layout != torch.strided or t.device.type == "meta":
                raise ValueError(f"state_dict entry {short(key)} is a {t.layout} {t.device.type} tensor, not weights")
            if not t.is_floating_point():
                raise ValueError(f"state_dict entry {short(key)} holds {t.dtype}, not floating-point weights")
            out[key] = t
    return out


def _layers_held(tensors: dict[str, torch.Tensor]) -> int:
    return len({key.split(".")[2] for key in tensors if key.startswith(PREFIX + "blocks.")})


def _check_weights(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> None:
    """The weights are exactly what the settings describe: layers, parameter count, names and shapes."""
    held = _layers_held(tensors)
    if held != cfg.n_layers:
        layers = f"{held} layer{'' if held == 1 else 's'}"
        raise ValueError(f"its model settings say n_layers={cfg.n_layers} but its weights hold {layers}")
    try:
        with torch.device("meta"):  # names and shapes only: nothing is allocated
            shapes = {PREFIX + k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    except (RuntimeError, OverflowError, TypeError) as e:  # e.g. rotary tables for a block_size beyond int64
        raise ValueError(f"its model settings cannot be built ({str(e).splitlines()[0][:100]})") from None
    expected = sum(math.prod(shape) for shape in shapes.values())  # the tied head counted twice, as saved
    have = sum(t.numel() for t in tensors.values())
    if expected > 2 * have:  # an absurd claim (block_size 1e9): refused before any of it is compared
        raise ValueError(f"its model settings describe {expected:,} parameters but its weights hold {have:,}")
    _same_keys("its weights", " for its model settings", list(shapes), list(tensors), "unexpected", limit=3)
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(tensors[key].shape)} but its model settings need {shape}")


def _earlier_step(path: Path, step) -> str:
    """The newest step checkpoint beside path that is older than it, as a --checkpoint value."""
    steps, here = [], path.resolve()
    for p in path.parent.glob("step_*.pt"):
        if step_of(p) is not None and p.is_file() and p.resolve() != here:
            steps.append(step_of(p))
    if isinstance(step, int) and not isinstance(step, bool):
        steps = [s for s in steps if s < step]
    return f"--checkpoint {max(steps)}" if steps else "--checkpoint <a step>"


def check_checkpoint(ckpt: dict, path: Path) -> tuple[GPTConfig, ByteTokenizer]:
    """The model settings and tokenizer of a loaded checkpoint, after checking that its weights are
    exactly what those settings describe, and finite. Nothing is allocated for the model."""
    meta = ckpt.get("carlos")
    try:
        if not isinstance(meta, dict):
            raise ValueError(f"its carlos metadata is a {type(meta).__name__}, not a dict")
        cfg = _model_config(meta)
        tok = _tokenizer(meta, cfg)
        tensors = _tensors(ckpt.get("state_dict"))
        _check_weights(tensors, cfg)
    except ValueError as e:
        raise CarlosError(f"checkpoint {path} is damaged: {e}; use another checkpoint") from None
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise CarlosError(
            f"checkpoint {path} holds NaN or inf weights (the run diverged); use an earlier checkpoint, "
            f"e.g. {_earlier_step(path, meta.get('step'))}"
        )
    if not torch.equal(tensors[PREFIX + "head.weight"], tensors[PREFIX + "tok_emb.weight"]):
        raise CarlosError(
            f"checkpoint {path} is damaged: model.head.weight differs from model.tok_emb.weight, which it is "
            "tied to; use another checkpoint"
        )
    return cfg, tok


# ---------------------------------------------------------------- the model, when it fits


def build_model(
    ckpt: dict, cfg: GPTConfig, device: torch.device, what: str, fix: str, batch: int, length: int, kv_cache: bool
) -> GPT:
    """GPT(cfg) with the checkpoint's weights, on device, after checking that the weights, buffers, a
    batch's activations and (kv_cache) the keys and values fit there."""
    check_fits(inference_bytes(cfg, batch, length, kv_cache), str(device), what, fix)
    state = {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    try:
        model = GPT(cfg)
        model.load_state_dict(state)
        return model.to(device).eval()
    except torch.OutOfMemoryError:  # the check above is a lower bound; the allocator has the last word
        raise CarlosError(f"{what} ran out of memory on {device}; {fix}") from None


def model_from_checkpoint(ckpt: dict, path: Path, device: str | torch.device = "cpu") -> tuple[GPT, ByteTokenizer]:
    """The checked model and tokenizer for sampling: batch 1, the whole context, with a KV cache."""
    cfg, tok = check_checkpoint(ckpt, path)
    what = f"sampling from checkpoint {path} ({num_params(cfg):,} parameters, context {cfg.block_size})"
    fix = "free some memory or use another --device"
    return build_model(ckpt, cfg, torch.device(device), what, fix, 1, cfg.block_size, True), tok


def device_type(accelerator: str) -> str:
    """The device a Trainer(accelerator=...) trains on, the way Lightning chooses it: auto takes a CUDA GPU,
    then an Apple GPU (MPS), then the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator == "mps" or (accelerator in ("auto", "gpu") and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def pick_device(name: str) -> torch.device:
    """eval's and sample's --device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or
    mps, refused in one line when this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CarlosError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CarlosError(
                f"--device {name}: this machine has no CUDA GPU (torch sees none); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = "1 CUDA GPU (cuda:0)" if count == 1 else f"{count} CUDA GPUs (cuda:0 to cuda:{count - 1})"
            raise CarlosError(f"--device {name}: this machine has {have}; use one of them, or --device cuda")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CarlosError(f"--device {name}: this machine has no Apple GPU (MPS); use --device cpu or auto")
        return device
    raise CarlosError(f"--device {name}: carlos runs on cpu, cuda or mps, not {device.type}; use --device cpu or auto")
