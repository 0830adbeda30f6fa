"""carlos bench's baseline: the plain PyTorch loop a user could write in 150 lines, independent of carlos's
model and training path. Run in a process of its own (`_worker_main`), so that the two contenders see
the same machine state."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The plain loop's recipe, fixed here rather than taken from carlos's config so that tuning carlos's
# defaults never moves the baseline: what a careful hand-written script does (nanoGPT's choices).
PLAIN = {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup": 100, "clip": 1.0, "seed": 1337}


class PlainGPT(torch.nn.Module):
    """The model of the 'write it yourself' script, nanoGPT-style and independent of carlos.model, so
    that nothing carlos does to its own model reaches the baseline: GPT-2 blocks (pre-LayerNorm,
    fused qkv, causal SDPA, GELU MLP), learned positions, tied embeddings, GPT-2 init."""

    def __init__(self, vocab: int, block: int, d: int, n_layers: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        nn = torch.nn
        self.n_heads = n_heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "qkv": nn.Linear(d, 3 * d),
                    "proj": nn.Linear(d, d),
                    "ln2": nn.LayerNorm(d),
                    "fc": nn.Linear(d, d_ff),
                    "out": nn.Linear(d_ff, d),
                }
            )
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                torch.nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe.weight[:T]
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )


def plain_loop(workdir: str, spec: dict) -> dict:
    """The 'write it yourself' baseline: random windows from the train array in memory, one forward and
    backward of the whole batch, torch's default AdamW with decay on matrices, clipping, a linear warmup
    and a cosine to zero over spec["steps"] steps or, with spec["seconds"], over that many seconds of
    training (a schedule fitted to the time budget). Returns tokens/scores per logging window; with seconds,
    also the test split'scores loss and bits-per-byte, scored by the same code as `carlos eval`."""
    torch.manual_seed(PLAIN["seed"])
    data = torch.from_numpy(np.load(Path(workdir) / "data" / "train.npy").astype(np.int64))
    shape = spec["model"]
    sizes = ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_ff")
    model = PlainGPT(*(shape[k] for k in sizes))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": PLAIN["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=PLAIN["lr"], betas=tuple(PLAIN["betas"]))
    batch, every, seconds = spec["batch"], spec["log_interval"], spec.get("seconds")
    steps = spec.get("steps") or 10**12
    tokens_per_step = batch * (data.shape[1] - 1)
    rates, start = [], time.perf_counter()
    mark, step = start, 0
    while step < steps:
        progress = (time.perf_counter() - start) / seconds if seconds else step / steps
        if progress >= 1:
            break
        lr = PLAIN["lr"] * min(1.0, (step + 1) / PLAIN["warmup"]) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        w = data[torch.randint(len(data), (batch,))]
        loss = model.loss(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PLAIN["clip"])
        opt.step()
        step += 1
        if step % every == 0:
            loss.item()  # a logging loop reads the loss; it also waits for the step to finish
            now = time.perf_counter()
            rates.append(every * tokens_per_step / (now - mark))
            mark = now
    out = {"tokens_per_s": rates, "steps": step, "tokens": step * tokens_per_step}
    if seconds:
        from carlos.evaluate import score_split
        from carlos.workdir import PreparedData

        model.eval()
        scores = score_split(model, PreparedData.load(workdir).windows("test"), 64, torch.device("cpu"))
        out.update(test_loss=scores["loss"], test_bpb=scores["bpb"])
    return out


def _worker_main(workdir: str, spec_json: str) -> None:
    print("RESULT " + json.dumps(plain_loop(workdir, json.loads(spec_json))))
