"""`carlos bench`: carlos's own training path against a minimal plain PyTorch loop, side by side.

Both train the same model on the same prepared corpus with the same batch, optimizer and clipping.
They run alternately (A B A B ...) in fresh processes, so both see the same machine state, and
tokens/s is the median over steady-state logging windows (the first window, with start-up, is left
out). Also measured: a matmul peak for FLOP utilization, peak memory of each process, KV-cache
generation against recomputing the context, and `carlos sample` latency against `import torch`.
The results go to stdout and into docs/PERFORMANCE.md between bench markers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from carlos.config import BenchConfig, CarlosError
from carlos.model import GPT, GPTConfig
from carlos.prepare import write_stdlib_corpus

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
QSTART, QEND = "<!-- quality:start -->", "<!-- quality:end -->"


# ---------------------------------------------------------------- measurements


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 7) -> float:
    """Median GFLOP/s of an n x n matmul on the CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight that multiplies (the blocks and the
    output head; embedding lookups are free) plus attention scores and mixing, 12 * layers * d_model * T
    (PaLM's estimate, no discount for causality)."""
    block = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff)
    head = cfg.d_model * cfg.vocab_size
    return 6 * (block + head) + 12 * cfg.n_layers * cfg.d_model * cfg.block_size


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
    """The 'write it yourself' baseline: random windows from the array in memory, one forward and
    backward of the whole batch, torch's default AdamW, clipping, 100 warmup steps and a cosine to zero
    over spec["steps"] steps or, with spec["seconds"], over that many seconds of training (a schedule
    fitted to the time budget). Returns tokens/s per logging window; with seconds, also the test split's
    loss and bits-per-byte, scored by the same code as `carlos eval`."""
    torch.manual_seed(spec["seed"])
    data = torch.from_numpy(np.load(Path(workdir) / "data" / "train.npy").astype(np.int64))
    cfg = GPTConfig(**spec["model"])
    model = PlainGPT(cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]))  # torch's default (foreach)
    batch, every, seconds = spec["batch"], spec["log_interval"], spec.get("seconds")
    steps = spec.get("steps") or 10**12
    tokens_per_step = batch * (data.shape[1] - 1)
    rates, start = [], time.perf_counter()
    mark, step = start, 0
    while step < steps:
        progress = (time.perf_counter() - start) / seconds if seconds else step / steps
        if progress >= 1:
            break
        lr = spec["lr"] * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        w = data[torch.randint(len(data), (batch,))]
        x, y = w[:, :-1], w[:, 1:]
        loss = F.cross_entropy(model(x).view(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        opt.step()
        step += 1
        if step % every == 0:
            loss.item()  # a logging loop reads the loss; it also waits for the step to finish
            now = time.perf_counter()
            rates.append(every * tokens_per_step / (now - mark))
            mark = now
    out = {"tokens_per_s": rates, "steps": step, "tokens": step * tokens_per_step}
    if seconds:
        from carlos.data import PreparedData
        from carlos.evaluate import score_split

        model.eval()
        m = score_split(model, PreparedData.load(workdir).windows("test"), 64, torch.device("cpu"))
        out.update(test_loss=m["loss"], test_bpb=m["bpb"])
    return out


def _worker_main(kind: str, workdir: str, spec_json: str) -> None:
    print("RESULT " + json.dumps(plain_loop(workdir, json.loads(spec_json))))


def _plain(root: Path, data: Path, spec: dict) -> tuple[dict, float | None]:
    code = "import sys; from carlos.bench import _worker_main; _worker_main(*sys.argv[1:])"
    p, rss = _isolated([sys.executable, "-c", code, "plain", str(data), json.dumps(spec)], root)
    if p.returncode != 0:
        raise CarlosError(f"bench: plain loop failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), rss


def _carlos(py: list[str], root: Path, overrides: list[str]) -> tuple[list[dict], float | None]:
    data = Path(next(o for o in overrides if o.startswith("workdir=")).split("=", 1)[1])
    (data / "metrics.jsonl").unlink(missing_ok=True)
    p, rss = _isolated([*py, "train", *overrides], root)
    if p.returncode != 0:
        raise CarlosError(f"bench: carlos train failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return [json.loads(line) for line in (data / "metrics.jsonl").read_text().splitlines()], rss


def _isolated(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run cmd under a small Python wrapper that reports the child's own peak RSS (Linux: KB)."""
    wrapper = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "sys.stderr.write('\\nMAXRSS_KB ' + str(kb) + '\\n')\n"
        "sys.exit(p.returncode)\n"
    )
    if os.name != "posix":
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        return p, None
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True)
    rss = None
    for line in p.stderr.splitlines():
        if line.startswith("MAXRSS_KB "):
            rss = int(line.split()[1]) / 1024
    return p, rss


def kv_cache_speed(cfg: GPTConfig, new_tokens: int) -> tuple[float, float]:
    """Greedy tokens/s once the context is full (a prompt of block_size tokens): with the KV cache (which
    slides its window as generation goes on), and recomputing the whole context for every token."""
    from carlos.generate import generate

    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 256, (cfg.block_size,)).tolist()
    generate(model, prompt, 8, temperature=0)  # warm-up
    t = time.perf_counter()
    generate(model, prompt, new_tokens, temperature=0)
    cached = new_tokens / (time.perf_counter() - t)
    ids = torch.tensor([prompt])
    n = max(16, new_tokens // 4)  # recomputing is slow: time fewer tokens
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(ids[:, -cfg.block_size :])[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    recompute = n / (time.perf_counter() - t)
    return cached, recompute


def _median_time(cmd: list[str], cwd: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if p.returncode != 0:
            raise CarlosError(f"bench: {' '.join(cmd[:4])} failed: {p.stderr.strip().splitlines()[-1:]}")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- the benchmark


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({threads} threads), "
        f"Python {platform.python_version()}{gpu}"
    )


def bench(cfg: BenchConfig) -> dict:
    from carlos.cli import compose
    from carlos.config import TrainConfig, parse

    root = Path(cfg.workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    corpus = cfg.input
    if corpus is None:
        corpus = str(root / "corpus.txt")
        write_stdlib_corpus(Path(corpus))
    data = root / "data"
    py = [sys.executable, "-m", "carlos"]
    p = subprocess.run(
        [*py, "prepare", f"input={corpus}", f"workdir={data}", f"data.seq_len={cfg.seq_len}", "overwrite=true"],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise CarlosError(p.stderr.strip().splitlines()[-1].removeprefix("carlos: error: "))

    train_overrides = [
        f"workdir={data}",
        "overwrite=true",
        f"trainer.max_steps={cfg.steps}",
        f"eval_interval={cfg.steps}",
        f"ckpt_interval={cfg.steps}",
        f"log_interval={cfg.log_interval}",
        "sample.tokens=0",
        *cfg.train,
    ]
    tc = parse(compose("train", train_overrides), TrainConfig)
    info = json.loads((data / "splits.json").read_text())
    vocab = 258 if info["add_eos"] else 257 if info["add_bos"] else 256
    model = GPTConfig(
        vocab_size=vocab,
        block_size=info["seq_len"],
        **{
            k: getattr(tc.model, k)
            for k in ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "bias", "norm", "mlp", "pos")
        },
    )
    batch = tc.data.micro_batch_size * tc.trainer.accumulate_grad_batches
    spec = {
        "model": model.to_dict(),
        "batch": batch,
        "steps": cfg.steps,
        "log_interval": cfg.log_interval,
        "lr": tc.optimizer["lr"],
        "betas": list(tc.optimizer.get("betas", (0.9, 0.999))),
        "weight_decay": tc.optimizer.get("weight_decay", 0.0),
        "clip": tc.trainer.gradient_clip_val or 1e9,
        "seed": tc.seed,
    }

    header = {
        "machine": machine(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "carlos bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "model": model.to_dict(),
        "batch": batch,
        "train_overrides": list(cfg.train),
    }
    out: dict = {"header": header}
    if cfg.rounds:
        out["throughput"] = _throughput(cfg, py, root, data, train_overrides, spec, model)
        table = render({**header, **out["throughput"]})
        print(table)
        if cfg.output:
            write_section(Path(cfg.output), table, START, END, "Throughput: `carlos bench`")
    if cfg.budgets:
        rows = []
        for budget in cfg.budgets:
            overrides = [
                f"workdir={data}",
                "overwrite=true",
                "trainer.max_steps=null",
                f"trainer.max_time={budget}",
                *cfg.train,
            ]
            recs, _ = _carlos(py, root, overrides)
            ev = subprocess.run(
                [*py, "eval", f"workdir={data}", "split=test", "checkpoint=best", "json=true"],
                cwd=root,
                capture_output=True,
                text=True,
            )
            if ev.returncode != 0:
                raise CarlosError(f"bench: carlos eval failed: {ev.stderr.strip()}")
            c = json.loads(ev.stdout.strip().splitlines()[-1])
            last = [r for r in recs if "tokens" in r][-1]
            plain, _ = _plain(root, data, {**spec, "steps": None, "seconds": budget})
            row = {
                "budget_s": budget,
                "carlos_test_bpb": c["bpb"],
                "carlos_steps": last["step"],
                "carlos_tokens": last["tokens"],
                "plain_test_bpb": plain["test_bpb"],
                "plain_steps": plain["steps"],
                "plain_tokens": plain["tokens"],
            }
            print(
                f"budget {budget:g} s: carlos test bpb {row['carlos_test_bpb']:.4f} "
                f"({row['carlos_tokens']:,} tokens), plain {row['plain_test_bpb']:.4f} "
                f"({row['plain_tokens']:,} tokens)",
                flush=True,
            )
            rows.append(row)
        out["quality"] = rows
        table = render_quality(header, rows)
        print(table)
        if cfg.output:
            write_section(Path(cfg.output), table, QSTART, QEND, "Quality at equal time: `carlos bench budgets=...`")
    if cfg.output:
        print(f"wrote {cfg.output}")
    return out


def _throughput(cfg: BenchConfig, py, root: Path, data: Path, overrides: list[str], spec: dict, model) -> dict:
    peak32 = matmul_peak(torch.float32)
    results: dict[str, list] = {"carlos": [], "plain": []}
    memory: dict[str, list] = {"carlos": [], "plain": []}
    for r in range(cfg.rounds):
        for kind in ("carlos", "plain"):
            if kind == "carlos":
                recs, rss = _carlos(py, root, overrides)
                rates = [rec["tokens_per_s"] for rec in recs if "tokens_per_s" in rec]
            else:
                res, rss = _plain(root, data, spec)
                rates = res["tokens_per_s"]
            results[kind].append(statistics.median(rates[1:] or rates))  # the first window holds start-up
            memory[kind].append(rss)
            print(
                f"round {r + 1}/{cfg.rounds} {kind:>6}: {results[kind][-1]:>10,.0f} tokens/s"
                + (f", peak RSS {rss:,.0f} MB" if rss else ""),
                flush=True,
            )
    kv_cfg = GPTConfig(**{**model.to_dict(), "block_size": cfg.kv_context})
    cached, recompute = kv_cache_speed(kv_cfg, cfg.kv_context)
    ckpt = data / "checkpoints" / "last.pt"
    t_torch = _median_time([sys.executable, "-c", "import torch"], root)
    t_sample = _median_time([*py, "sample", f"workdir={data}", f"checkpoint={ckpt}", "max_new_tokens=200"], root)
    return {
        "steps": cfg.steps,
        "rounds": cfg.rounds,
        "flops_per_token": flops_per_token(model),
        "matmul_peak_gflops": peak32,
        "carlos_tokens_per_s": results["carlos"],
        "plain_tokens_per_s": results["plain"],
        "carlos_peak_rss_mb": memory["carlos"],
        "plain_peak_rss_mb": memory["plain"],
        "kv_cached_tokens_per_s": cached,
        "kv_recompute_tokens_per_s": recompute,
        "import_torch_s": t_torch,
        "sample_200_s": t_sample,
        "kv_context": cfg.kv_context,
    }


def render_quality(h: dict, rows: list[dict]) -> str:
    lines = [
        f"Machine: {h['machine']}  ",
        f"Date: {h['date']}  ",
        f"Command: `{h['command']}`  ",
        "Both sides train the same model on the same prepared train split for the same wall-clock budget and "
        "are scored on the same test split by the same code (`carlos eval`'s). carlos: `carlos train "
        "--max_time B` with its defaults"
        + (f" plus {' '.join(h['train_overrides'])}" if h["train_overrides"] else "")
        + ", best checkpoint. Plain loop: batch "
        f"{h['batch']}, lr as carlos's peak, 100 warmup steps, cosine to zero fitted to the budget, final weights.",
        "",
        "| budget | carlos test bpb | plain loop test bpb | carlos better by | carlos tokens | plain tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget_s']:g} s | {r['carlos_test_bpb']:.4f} | {r['plain_test_bpb']:.4f} | "
            f"{r['plain_test_bpb'] - r['carlos_test_bpb']:+.4f} | {r['carlos_tokens']:,} | {r['plain_tokens']:,} |"
        )
    return "\n".join(lines)


def render(r: dict) -> str:
    a, b = statistics.median(r["carlos_tokens_per_s"]), statistics.median(r["plain_tokens_per_s"])
    util = lambda tps: tps * r["flops_per_token"] / (r["matmul_peak_gflops"] * 1e9)  # noqa: E731
    mem = lambda xs: f"{max(xs):,.0f} MB" if all(xs) else "n/a"  # noqa: E731
    m = r["model"]
    lines = [
        f"Machine: {r['machine']}  ",
        f"Date: {r['date']}  ",
        f"Command: `{r['command']}`  ",
        f"Model: d_model={m['d_model']}, n_layers={m['n_layers']}, n_heads={m['n_heads']}, d_ff={m['d_ff']}, "
        f"context {m['block_size']}, {r['flops_per_token'] / 1e6:.2f} MFLOP per trained token; batch "
        f"{r['batch']} x {m['block_size']} tokens; {r['steps']} steps a run, {r['rounds']} rounds A B A B; "
        f"carlos overrides: {' '.join(r['train_overrides']) or '(none: the defaults)'}  ",
        f"Matmul peak measured: {r['matmul_peak_gflops']:.0f} GFLOP/s fp32 (1024 x 1024)",
        "",
        "| | tokens/s (median of rounds) | each round | FLOP utilization | peak RSS |",
        "|---|---|---|---|---|",
        f"| carlos train | {a:,.0f} | {', '.join(f'{x:,.0f}' for x in r['carlos_tokens_per_s'])} | "
        f"{util(a):.1%} | {mem(r['carlos_peak_rss_mb'])} |",
        f"| plain PyTorch loop | {b:,.0f} | {', '.join(f'{x:,.0f}' for x in r['plain_tokens_per_s'])} | "
        f"{util(b):.1%} | {mem(r['plain_peak_rss_mb'])} |",
        f"| **ratio carlos / plain** | **{a / b:.2f}** | | | |",
        "",
        "| generation | |",
        "|---|---|",
        f"| KV cache, {r['kv_context']}-token context (full), {r['kv_context']} new tokens | "
        f"{r['kv_cached_tokens_per_s']:,.0f} tokens/s |",
        f"| recomputing the whole {r['kv_context']}-token context each token | "
        f"{r['kv_recompute_tokens_per_s']:,.0f} tokens/s |",
        f"| **KV cache speed-up** | **{r['kv_cached_tokens_per_s'] / r['kv_recompute_tokens_per_s']:.1f}x** |",
        f'| `python -c "import torch"` | {r["import_torch_s"]:.2f} s (median of 3) |',
        f"| `carlos sample --max_new_tokens 200` | {r['sample_200_s']:.2f} s (median of 3), "
        f"{r['sample_200_s'] - r['import_torch_s']:+.2f} s over importing torch |",
    ]
    return "\n".join(lines)


def write_section(path: Path, table: str, start: str, end: str, title: str) -> None:
    """Replace the text between the start and end markers (or append a section) in path."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, path)
