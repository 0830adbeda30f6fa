"""Load a checkpoint safely and generate text with a KV cache. Imports neither Lightning nor Hydra's
training pieces, so `carlos sample` starts fast."""

from __future__ import annotations

import codecs
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from carlos.config import CarlosError, GenerateConfig
from carlos.model import GPT, GPTConfig, KVCache
from carlos.tokenizer import ByteTokenizer


def resolve_checkpoint(workdir: str | Path, spec: str) -> Path:
    """best, last, a step number (1000 -> checkpoints/step_001000.pt) or a path."""
    ckpts = Path(workdir).expanduser() / "checkpoints"
    spec = str(spec)
    if spec in ("best", "last"):
        path = ckpts / f"{spec}.pt"
    elif spec.isdigit():
        path = ckpts / f"step_{int(spec):06d}.pt"
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        have = sorted(p.stem for p in ckpts.glob("*.pt")) if ckpts.is_dir() else []
        hint = f"available: {', '.join(have)}" if have else f"no checkpoints in {ckpts}; train first (carlos train)"
        raise CarlosError(f"checkpoint '{spec}' not found at {path}; {hint}")
    return path


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused (its other lines are advice
    about weights_only=False, which carlos never takes)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler")
    lines = [line.strip() for line in str(e).splitlines()]
    reasons = [line for line in lines if line and not line.startswith(boilerplate)]
    return reasons[0].rstrip(".") if reasons else "unsupported content"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    # torch.save writes a zip archive; a file that is not a complete one (cut short by a full disk or
    # a copy, or not a checkpoint at all) would otherwise reach torch's legacy raw-pickle path
    if not zipfile.is_zipfile(path):
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CarlosError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); use another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or "carlos" not in ckpt or "state_dict" not in ckpt:
        raise CarlosError(f"{path} is not a carlos checkpoint (no model metadata); use one from workdir/checkpoints")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> tuple[GPT, ByteTokenizer]:
    meta = ckpt["carlos"]
    model = GPT(GPTConfig(**meta["model"]))
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(device).eval()
    return model, ByteTokenizer.from_dict(meta["tokenizer"])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CarlosError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.size(-1):  # on the raw logits: scaling keeps the order but can create ties
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shifted so the largest is 0 before scaling: a tiny temperature then sends the others to -inf (greedy)
    # instead of overflowing the largest to +inf, which would make softmax NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """New token ids after prompt. Uses a KV cache; when the context fills up, the window slides: the
    cache is rebuilt from the last three quarters of the context and decoding goes on."""
    block = model.cfg.block_size
    device = next(model.parameters()).device
    cache = KVCache(model, 1, device, next(model.parameters()).dtype)
    keep = max(1, block - block // 4)
    context = list(prompt[-block:])
    out: list[int] = []
    logits = model(torch.tensor([context], device=device), cache)[0, -1]
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id:
            break
        context.append(token)
        if cache.length == block:  # full: slide the window
            context = context[-keep:]
            cache.reset()
            logits = model(torch.tensor([context], device=device), cache)[0, -1]
        else:
            logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return out


class Utf8Stream:
    """Writes token bytes as text, holding back a UTF-8 character until all its bytes have arrived."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> None:
        if token < 256:
            self.out.write(self.decoder.decode(bytes([token])))
            self.out.flush()

    def close(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True))
        self.out.flush()


def prompt_ids(tok: ByteTokenizer, prompt: str | None) -> list[int]:
    """The default prompt is BOS when the model has it, else a newline; a given prompt starts a document
    (after BOS when the model has it)."""
    if prompt is None:
        return [tok.bos_id] if tok.bos_id is not None else tok.encode("\n")
    ids = tok.encode(prompt)
    return ([tok.bos_id] + ids) if tok.bos_id is not None else (ids or tok.encode("\n"))


def sample(cfg: GenerateConfig) -> list[str]:
    """`carlos sample`: stream num_samples generations to stdout; returns their texts."""
    path = resolve_checkpoint(cfg.workdir, cfg.checkpoint)
    device = pick_device(cfg.device)
    model, tok = model_from_checkpoint(load_checkpoint(path), device)
    ids = prompt_ids(tok, cfg.prompt)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            sys.stdout.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} of {cfg.num_samples} ---\n")
        stream = Utf8Stream()
        if cfg.prompt is not None:
            sys.stdout.write(cfg.prompt)
        new = generate(
            model,
            ids,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            generator,
            tok.eos_id,
            on_token=stream,
        )
        stream.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        texts.append(tok.decode(new))
    return texts
