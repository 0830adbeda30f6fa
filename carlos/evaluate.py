"""Loss, perplexity and bits-per-byte: the sums of one batch, their summary, and `carlos eval`.

torch is imported by the functions that use it, so that `carlos eval` refuses a workdir or checkpoint
that is not there before torch has loaded (about 2 s)."""

from __future__ import annotations

import json
import math
import typing

from carlos.config import EvalConfig
from carlos.errors import CarlosError
from carlos.ownership import resolve_checkpoint
from carlos.tokenizer import BYTES
from carlos.workdir import PreparedData

if typing.TYPE_CHECKING:
    import numpy as np
    import torch

    from carlos.model import GPT


def score_batch(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[total nats, scored tokens, bytes of text among them] of one batch, as float64 on x's device.
    Targets of -1 are not scored; BOS/EOS targets count as tokens but not as bytes."""
    import torch

    nats = model.loss(x, y, reduction="sum")
    scored = y >= 0
    text = scored & (y < BYTES)
    return torch.stack([nats.double(), scored.sum().double(), text.sum().double()])


def summarize(nats: float, tokens: float, n_bytes: float) -> dict[str, float]:
    """loss in nats per token, perplexity, and bits per byte = total nats / ln 2 / bytes predicted."""
    loss = nats / max(tokens, 1.0)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / math.log(2) / max(n_bytes, 1.0),
        "tokens": int(tokens),
        "bytes": int(n_bytes),
    }


def score_split(model: GPT, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """A deterministic full pass: every window once, in order."""
    import torch

    with torch.inference_mode():
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for start in range(0, len(dataset), batch_size):
            x, y = dataset[list(range(start, min(start + batch_size, len(dataset))))]
            sums += score_batch(model, x.to(device), y.to(device))
    return summarize(*sums.tolist())


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored target) of the windows of `context` tokens that score each of the n_tokens - 1
    targets once: a window starts every `stride` tokens, the last one right-aligned on the end, and each
    scores only the targets after the previous window's, so all but the first have context - stride or
    more tokens before them."""
    context = min(context, n_tokens - 1)
    last = n_tokens - 1 - context  # the start of a window that ends on the last target
    starts = [*range(0, last, stride), last]
    scored_to = 0  # targets 0 .. scored_to - 1 (relative to the stream's second token) are done
    windows = []
    for start in starts:
        windows.append((start, scored_to - start))
        scored_to = start + context
    return windows


def score_sliding(model: GPT, tokens, context: int, stride: int, batch_size: int, device: torch.device) -> dict:
    """`carlos eval --stride N`: every target once, with up to `context` tokens before it (HF's perplexity
    recipe); the model runs on about context / stride times as many tokens as the standard pass."""
    import numpy as np
    import torch

    windows = sliding_windows(len(tokens), context, stride)
    context = min(context, len(tokens) - 1)
    with torch.inference_mode():
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rows = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s, _ in batch]).astype(np.int64))
            x, y = rows[:, :-1], rows[:, 1:].clone()  # (B, context) each
            for row, (_, first) in enumerate(batch):
                y[row, :first] = -1  # scored by an earlier window
            sums += score_batch(model, x.to(device), y.to(device))
    return summarize(*sums.tolist())


def score_adaptive(model: GPT, tokens, context: int, stride: int, lr: float, clip: float, device) -> np.ndarray:
    """`carlos eval --adapt`: dynamic evaluation (Krause et al. 2018). The sliding windows of score_sliding, one
    at a time in order: each scores its new targets, then takes one SGD step on their mean loss, its gradient
    clipped to norm `clip` (a model trained longer has larger gradients, and unclipped steps made it worse),
    so that every byte is predicted by the model adapted to all the text before it and to none after it.
    Returns the loss in nats of each target, tokens[1:]. The weights change in memory only; the model ends
    adapted to the whole split."""
    import numpy as np
    import torch

    context = min(context, len(tokens) - 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    nats = np.zeros(len(tokens) - 1)
    for start, first in sliding_windows(len(tokens), context, stride):
        row = torch.from_numpy(tokens[start : start + context + 1].astype(np.int64))[None]  # (1, context + 1)
        row = row.to(device)
        x, y = row[:, :-1], row[:, 1:].clone()
        y[:, :first] = -1  # scored by an earlier window
        losses = model.loss(x, y, reduction="none")[first:]  # (new targets,)
        nats[start + first : start + context] = losses.detach().double().cpu().numpy()
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return nats


def _adaptive(model: GPT, data: PreparedData, context: int, stride: int, cfg: EvalConfig, device) -> dict:
    """--adapt: the adaptive scores, printed on their own lines after the standard one (never in its place):
    dynamic evaluation, then (--adapt_order above 0) its mixture with an n-gram of the text before each byte."""
    import numpy as np

    lr, clip, order = cfg.adapt_lr, cfg.adapt_clip, cfg.adapt_order
    tokens = data.windows(cfg.split).stream()
    nats = score_adaptive(model, tokens, context, stride, lr, clip, device)
    n_bytes = float(np.count_nonzero(tokens[1:] < BYTES))
    dynamic = summarize(float(nats.sum()), len(nats), n_bytes)
    print(
        f"adaptive (dynamic evaluation: SGD at lr {lr:g}, gradients clipped to {clip:g}, on each window of {stride} "
        f"new tokens, up to {context} tokens of context): loss {dynamic['loss']:.4f} nats/token, "
        f"bits-per-byte {dynamic['bpb']:.4f}"
    )
    result = {"stride": stride, "context": context, "lr": lr, "clip": clip, "order": order}
    result |= {"dynamic_loss": dynamic["loss"], "dynamic_bpb": dynamic["bpb"], "weight": None}
    if not order:
        return result | {"loss": dynamic["loss"], "bpb": dynamic["bpb"]}
    from carlos.ngram import mix, ngram_probs

    history = data.windows("train").stream(last=cfg.compressor_context) if cfg.split != "train" else tokens[:0]
    ngram = ngram_probs(np.concatenate([history, tokens]), len(history) + 1, data.tokenizer.vocab_size, order)
    mixed, weight = mix(np.exp(-nats), ngram)
    scores = summarize(float(-np.log(mixed).sum()), len(nats), n_bytes)
    after = f"the last {len(history):,} tokens of the train split and " if len(history) else ""
    print(
        f"adaptive, mixed with an order-{order} n-gram of {after}the text before each byte (the model's weight "
        f"ends at {weight:.2f}): loss {scores['loss']:.4f} nats/token, bits-per-byte {scores['bpb']:.4f}"
    )
    return result | {"weight": weight, "loss": scores["loss"], "bpb": scores["bpb"]}


def _sliding(model: GPT, windows, context: int, stride: int, batch: int, device: torch.device) -> dict:
    """--stride: the sliding-window score, printed on its own line beside the standard one."""
    scores = score_sliding(model, windows.stream(), context, stride, batch, device)
    print(
        f"sliding windows (stride {stride}, up to {context} tokens of context): "
        f"loss {scores['loss']:.4f} nats/token, bits-per-byte {scores['bpb']:.4f}"
    )
    return {"stride": stride, "context": context, "loss": scores["loss"], "bpb": scores["bpb"]}


def _compressors(data: PreparedData, split: str, cap: int) -> dict:
    """The reference compressors on the split's bytes, after up to `cap` bytes from the end of the train split
    (none when the split is train itself), printed on their own lines beside the model's numbers."""
    from carlos.compressors import compressed_bpb, ppmd_missing

    text = data.windows(split).text()
    context = data.windows("train").text(last=cap) if split != "train" and cap else b""
    scores = compressed_bpb(context, text)
    after = f"after the last {len(context):,} bytes of the train split" if context else "on their own"
    print(f"compressors on the split's {len(text):,} bytes, {after} (bits-per-byte):")
    print("  " + " · ".join(f"{name} {bpb:.4f}" for name, bpb in scores.items()))
    missing = ppmd_missing()
    if missing:
        print(f"  PPMd not measured: {missing}")
    return {"context_bytes": len(context), **scores}


def evaluate(cfg: EvalConfig) -> dict:
    """`carlos eval`: prints loss, perplexity and bpb of a checkpoint on a split; returns them."""
    data = PreparedData.load(cfg.workdir)
    path = resolve_checkpoint(cfg.workdir, cfg.checkpoint, cfg.run)
    from carlos.checkpoint import build_model, check_checkpoint, load_checkpoint, pick_device
    from carlos.memory import num_params

    device = pick_device(cfg.device)
    ckpt = load_checkpoint(path)
    model_cfg, tok = check_checkpoint(ckpt, path)
    if tok != data.tokenizer:
        raise CarlosError(
            f"checkpoint {path.name} was trained with vocabulary {tok.vocab_size} (add_bos={tok.add_bos}, "
            f"add_eos={tok.add_eos}) but {cfg.workdir} is prepared with {data.tokenizer.vocab_size}; "
            "evaluate it on a workdir prepared like its training data"
        )
    if data.seq_len > model_cfg.block_size:
        raise CarlosError(
            f"{cfg.workdir} is prepared with seq_len={data.seq_len}, beyond the model's context of "
            f"{model_cfg.block_size}; prepare with --seq_len {model_cfg.block_size} or less"
        )
    context = model_cfg.block_size
    if cfg.stride is not None and cfg.stride > context:
        raise CarlosError(f"--stride {cfg.stride} is beyond the model's context of {context}; use {context} or less")
    windows = data.windows(cfg.split)
    batch = min(cfg.batch_size, len(windows))
    what = f"evaluating checkpoint {path} ({num_params(model_cfg):,} parameters) in batches of {batch} x {data.seq_len}"
    fix = "lower --batch_size, or use another --device"
    model = build_model(ckpt, model_cfg, device, what, fix, batch, data.seq_len, kv_cache=False)
    metrics = score_split(model, windows, batch, device)
    if not math.isfinite(metrics["loss"]):  # finite weights can still overflow (a gain of 3e38)
        raise CarlosError(
            f"checkpoint {path} gives a loss of {metrics['loss']} (its weights overflow); use another checkpoint"
        )
    step = ckpt["carlos"].get("step")
    print(f"checkpoint: {path} (step {step:,})" if isinstance(step, int) else f"checkpoint: {path}")
    print(f"split: {cfg.split} ({metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes)")
    print(f"loss: {metrics['loss']:.4f} nats/token")
    print(f"perplexity: {metrics['ppl']:.4f}")
    print(f"bits-per-byte: {metrics['bpb']:.4f}")
    sliding = _sliding(model, windows, context, cfg.stride, batch, device) if cfg.stride is not None else None
    compressors = _compressors(data, cfg.split, cfg.compressor_context) if cfg.compressors else None
    stride = cfg.stride or max(context // 2, 1)
    adaptive = _adaptive(model, data, context, stride, cfg, device) if cfg.adapt else None
    result = {
        "split": cfg.split,
        "loss": metrics["loss"],
        "perplexity": metrics["ppl"],
        "bpb": metrics["bpb"],
        "tokens": metrics["tokens"],
        "bytes": metrics["bytes"],
        "checkpoint": str(path),
        "step": step,
        "sliding": sliding,
        "compressors": compressors,
        "adaptive": adaptive,
    }
    if cfg.json:
        print(json.dumps(result))
    return result
