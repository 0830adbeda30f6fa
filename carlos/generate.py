"""Generate text with a KV cache from a checkpoint read by carlos/checkpoint.py. Imports neither Lightning
nor Hydra's training pieces, and torch only in the functions that use it, so `carlos sample` starts fast
and refuses a checkpoint that is not there before torch has loaded."""

from __future__ import annotations

import codecs
import sys
import typing
from collections.abc import Callable

from carlos.config import GenerateConfig
from carlos.errors import CarlosError
from carlos.ownership import resolve_checkpoint
from carlos.tokenizer import ByteTokenizer

if typing.TYPE_CHECKING:
    import torch

    from carlos.model import GPT


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits with everything outside top-k and the top-p nucleus set to -inf."""
    import torch

    if top_k and top_k < logits.size(-1):  # on the raw logits: scaling keeps the order but can create ties
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    raw = logits  # ranked for top-p as given: shifting and scaling below can round near-ties together
    # shifted so the largest is 0 before scaling: a tiny temperature then sends the others to -inf (greedy)
    # instead of overflowing the largest to +inf, which would make softmax NaN
    logits = logits - logits.max(dim=-1, keepdim=True).values
    finfo = torch.finfo(logits.dtype)
    if not finfo.tiny <= temperature <= finfo.max:
        # 1e-300 is 0 in float32, and 0 / 0 is NaN; 1e308 is inf, and -inf / inf is NaN: divide in float64,
        # where 1e-300 sends all but the largest to -inf (the greedy limit) and 1e308 flattens them all
        # (normal temperatures keep the float32 path)
        logits = (logits.double() / temperature).to(logits.dtype)
    else:
        logits = logits / temperature
    if top_p < 1.0:
        # stable: among tied tokens the first ones are kept, so the argmax (the greedy token) always is
        order = torch.sort(raw, descending=True, dim=-1, stable=True).indices
        sorted_logits = logits.gather(-1, order)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False  # even when top_p is 0 in float32 (1e-300)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


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
    import torch

    from carlos.model import KVCache

    with torch.inference_mode():
        block = model.cfg.block_size
        device = next(model.parameters()).device
        cache = KVCache(model, 1, device, next(model.parameters()).dtype)
        keep = max(1, block - block // 4)
        context = list(prompt[-block:])
        out: list[int] = []
        logits = model(torch.tensor([context], device=device), cache)[0, -1]
        for _ in range(max_new_tokens):
            if not bool(torch.isfinite(logits).all()):  # finite weights can still overflow (a gain of 3e38)
                raise CarlosError("the model's outputs are NaN or inf (its weights overflow); use another checkpoint")
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
    path = resolve_checkpoint(cfg.workdir, cfg.checkpoint, cfg.run)
    import torch

    from carlos.checkpoint import load_checkpoint, model_from_checkpoint, pick_device

    device = pick_device(cfg.device)
    model, tok = model_from_checkpoint(load_checkpoint(path), path, device)
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
