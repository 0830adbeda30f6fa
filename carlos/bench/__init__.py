"""`carlos bench`: carlos's own training path against a minimal plain PyTorch loop, side by side.

Sections, each written to stdout and between its markers in docs/PERFORMANCE.md:

- throughput (rounds > 0): carlos train and the plain loop train the same model at the same batch and
  seq_len on the same prepared corpus, alternately (A B C A B C ...) in fresh processes so that both see
  the same machine state; a third contender is carlos with all its defaults (its own seq_len and batch),
  a fourth the same as DDP over ddp_processes CPU processes with one thread each, at the same tokens a step.
  tokens/s is the median over steady-state logging windows (the first window, with start-up, is left
  out). Also: FLOP utilization against a matmul peak measured here, peak RSS of each process, KV-cache
  generation against recomputing the context, and `carlos sample` latency against `import torch`.
- quality (budgets): `carlos train --max_time B` with its defaults against the plain loop given the same
  B seconds, both trained on the same train bytes and scored on the same test bytes by the same code.
- scale (prepare_gb > 0): `carlos prepare` of a generated corpus of that size: MB/s and peak RSS.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from carlos.bench.reference import PLAIN
from carlos.config import BenchConfig
from carlos.corpus import Corpus
from carlos.demo_corpus import stdlib_corpus
from carlos.errors import CarlosError
from carlos.files import write_atomic, write_error
from carlos.lock import DirLock
from carlos.manifest import Manifest
from carlos.model import GPT, GPTConfig
from carlos.ownership import Place
from carlos.tokenizer import ByteTokenizer

SECTIONS = {
    "throughput": ("<!-- bench:start -->", "<!-- bench:end -->", "Throughput: `carlos bench`"),
    "quality": ("<!-- quality:start -->", "<!-- quality:end -->", "Quality at equal time: `carlos bench budgets=...`"),
    "scale": ("<!-- scale:start -->", "<!-- scale:end -->", "Scale of data: `carlos bench prepare_gb=...`"),
    "suite": ("<!-- suite:start -->", "<!-- suite:end -->", "Corpora of several kinds: `carlos bench suite=...`"),
}

# carlos's optimizer set to the plain loop's (bench/reference.py's PLAIN) for the like-for-like contender
SAME_OPTIMIZER = ["optimizer=adamw", f"optimizer.weight_decay={PLAIN['weight_decay']}"]
# carlos's model sizes in the plain loop's architecture (GPT-2: learned positions, LayerNorm, GELU)
GPT2 = {"dropout": 0.0, "bias": True, "norm": "layernorm", "mlp": "gelu", "pos": "learned"}
SAME_MODEL = [f"model.{k}={v}" for k, v in GPT2.items()]


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
    block = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff * (1.5 if cfg.mlp == "swiglu" else 1))
    head = cfg.d_model * cfg.vocab_size
    return 6 * (block + head) + 12 * cfg.n_layers * cfg.d_model * cfg.block_size


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


# ---------------------------------------------------------------- running the contenders


def _isolated(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run cmd under a small Python wrapper that reports the child's own peak RSS (Linux: KB)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "sys.stderr.write('\\nMAXRSS_KB ' + str(kb) + '\\n')\n"
        "sys.exit(p.returncode)\n"
    )
    if os.name != "posix":  # no resource module: time and results only
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True), None
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True)
    rss = None
    for line in p.stderr.splitlines():
        if line.startswith("MAXRSS_KB "):
            rss = int(line.split()[1]) / 1024
    return p, rss


def _failed(what: str, p: subprocess.CompletedProcess) -> CarlosError:
    last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return CarlosError(f"bench: {what} failed: {last.removeprefix('carlos: error: ')}")


def _plain(root: Path, data: Path, spec: dict) -> tuple[dict, float | None]:
    code = "import sys; from carlos.bench.reference import _worker_main; _worker_main(*sys.argv[1:])"
    p, rss = _isolated([sys.executable, "-c", code, str(data), json.dumps(spec)], root)
    if p.returncode != 0:
        raise _failed("the plain loop", p)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), rss


def _carlos(py: list[str], root: Path, data: Path, overrides: list[str]) -> tuple[list[dict], float | None]:
    p, rss = _isolated([*py, "train", f"workdir={data}", "overwrite=true", *overrides], root)
    if p.returncode != 0:
        raise _failed("carlos train", p)
    return [json.loads(line) for line in (data / "metrics.jsonl").read_text().splitlines()], rss


def _eval(py: list[str], root: Path, data: Path, *overrides: str) -> dict:
    p = subprocess.run(
        [*py, "eval", f"workdir={data}", "split=test", "checkpoint=best", "json=true", *overrides],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise _failed("carlos eval", p)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _suite_train(py: list[str], root: Path, workdir: Path, overrides: list[str]) -> dict:
    """One run of the suite (overrides name it with run=...): its test bpb, best val bpb and epochs."""
    p, _ = _isolated([*py, "train", f"workdir={workdir}", "overwrite=true", *overrides], root)
    if p.returncode != 0:
        raise _failed("carlos train", p)
    run = next(o.split("=", 1)[1] for o in overrides if o.startswith("run="))
    records = [json.loads(line) for line in (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    train_tokens = json.loads((workdir / "splits.json").read_text())["tokens"]["train"]
    ev = _eval(py, root, workdir, f"run={run}", "adapt=true")
    return {
        "test_bpb": ev["bpb"],
        "adaptive_bpb": ev["adaptive"]["bpb"],
        "compressors": ev["compressors"],
        "val_bpb": min(r["val_bpb"] for r in records if "val_bpb" in r),
        "tokens": records[-1]["tokens"],
        "epochs": records[-1]["tokens"] / train_tokens,
    }


def _prepare(py: list[str], corpus: str, workdir: Path, *overrides: str) -> dict:
    p = subprocess.run(
        [*py, "prepare", f"input={corpus}", f"workdir={workdir}", "overwrite=true", *overrides],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise _failed("carlos prepare", p)
    return json.loads((workdir / "splits.json").read_text())


def _median_time(cmd: list[str], cwd: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if p.returncode != 0:
            raise _failed(" ".join(cmd[2:4]), p)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}{gpu}"
    )


# ---------------------------------------------------------------- the benchmark


def bench(cfg: BenchConfig) -> dict:
    root = Path(os.path.expanduser(cfg.workdir)).resolve()
    if os.path.lexists(root) and not root.is_dir():
        raise CarlosError(f"workdir {cfg.workdir} is a file; pass a directory to --workdir")
    if cfg.input is not None:
        path = Path(os.path.expanduser(cfg.input))  # one file: the scale section copies it
        Corpus([path], "\n\n", cfg.input, one=True).close()  # the corpus's problems, before any work
    fix = "choose a new directory for --workdir, or an earlier bench's"
    with Place(root, "bench", f"--workdir {cfg.workdir}", fix, DirLock(root, "bench", fix=fix)) as place:
        return _bench(cfg, root, place.manifest)  # a directory it made is removed again, when empty, if it fails


def _bench(cfg: BenchConfig, root: Path, manifest: Manifest) -> dict:
    from carlos.compose import compose
    from carlos.config import TrainConfig, parse

    corpus = cfg.input
    if corpus is None:  # written through carlos's record: a corpus.txt of the user's there is never replaced
        corpus = str(root / "corpus.txt")
        text = stdlib_corpus().encode("utf-8")
        manifest.write(Path(corpus), lambda f: f.write(text))
    py = [sys.executable, "-m", "carlos"]
    same, defaults = root / "same_shape", root / "defaults"  # prepared at the bench's seq_len / carlos's own
    info = _prepare(py, corpus, same, f"data.seq_len={cfg.seq_len}")
    default_info = _prepare(py, corpus, defaults)

    train_config = parse(compose("train", [f"workdir={same}", *cfg.train]), TrainConfig)
    vocab = ByteTokenizer.load(same / "tokenizer.json").vocab_size
    model = dataclasses.replace(GPTConfig.for_data(train_config.model, vocab, info["seq_len"]), **GPT2)
    spec = {"model": model.to_dict(), "batch": cfg.batch, "log_interval": cfg.log_interval}
    header = {
        "machine": machine(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "carlos bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "model": model.to_dict(),
        "batch": cfg.batch,
        "train_overrides": list(cfg.train),
        "default_seq_len": default_info["seq_len"],
        "default_batch": train_config.data.micro_batch_size * train_config.trainer.accumulate_grad_batches,
    }
    out: dict = {"header": header}
    output = Path(cfg.output) if cfg.output else root / "PERFORMANCE.md"  # a user's own file only when named
    if cfg.rounds:
        micro = train_config.data.micro_batch_size
        out["throughput"] = _throughput(cfg, py, root, same, defaults, spec, model, micro)
        _emit(output, "throughput", render_throughput({**header, **out["throughput"]}))
    if cfg.budgets:
        out["quality"] = _quality(cfg, py, root, same, defaults, spec)
        _emit(output, "quality", render_quality(header, out["quality"]))
    if cfg.suite:
        from carlos.bench.suite import render_suite, suite_runs

        train = lambda workdir, overrides: _suite_train(py, root, workdir, overrides)  # noqa: E731
        out["suite"] = suite_runs(cfg, train, lambda corpus, w: _prepare(py, str(corpus), w), root)
        _emit(output, "suite", render_suite(_head(header), cfg.against, out["suite"]))
    if cfg.prepare_gb:
        out["scale"] = _scale(cfg, py, root, corpus, manifest)
        _emit(output, "scale", render_scale(header, out["scale"]))
    print(f"wrote {output}")
    return out


def _emit(output: Path, section: str, table: str) -> None:
    print(table, flush=True)
    write_section(output, table, *SECTIONS[section])


def _throughput(
    cfg: BenchConfig, py, root: Path, same: Path, defaults: Path, spec: dict, model: GPTConfig, micro: int
) -> dict:
    steps = [f"trainer.max_steps={cfg.steps}", f"eval_interval={cfg.steps}", f"ckpt_interval={cfg.steps}"]
    quiet = [*steps, f"log_interval={cfg.log_interval}", "sample.tokens=0"]
    contenders = {
        # the same model, batch, seq_len and optimizer (AdamW, its decay) as the plain loop, with every other
        # carlos default: what the harness costs per step, not what Muon's or rotary positions' work costs
        "carlos": lambda: _carlos(
            py,
            root,
            same,
            [*quiet, f"data.micro_batch_size={cfg.batch}", "trainer.accumulate_grad_batches=1", *SAME_OPTIMIZER]
            + SAME_MODEL
            + list(cfg.train),
        ),
        "plain": lambda: _plain(root, same, {**spec, "steps": cfg.steps}),
        "defaults": lambda: _carlos(py, root, defaults, [*quiet, *cfg.train]),
    }
    if cfg.ddp_processes > 1:  # the same tokens a step as "defaults", so the same optimization, over processes
        ddp = _ddp_overrides(cfg.ddp_processes, micro)
        contenders["ddp"] = lambda: _carlos(py, root, defaults, [*quiet, *cfg.train, *ddp])
    peak32 = matmul_peak(torch.float32)
    rates: dict[str, list] = {k: [] for k in contenders}
    memory: dict[str, list] = {k: [] for k in contenders}
    wall: dict[str, list] = {k: [] for k in contenders}
    for r in range(cfg.rounds):
        for kind, run in contenders.items():
            started = time.perf_counter()
            res, rss = run()
            wall[kind].append(time.perf_counter() - started)  # start-up and the end included
            windows = (
                res["tokens_per_s"] if kind == "plain" else [x["tokens_per_s"] for x in res if "tokens_per_s" in x]
            )
            rates[kind].append(statistics.median(windows[1:] or windows))  # the first window holds start-up
            memory[kind].append(rss)
            print(
                f"round {r + 1}/{cfg.rounds} {kind:>8}: {rates[kind][-1]:>10,.0f} tokens/s, {wall[kind][-1]:.1f} s"
                + (f", peak RSS {rss:,.0f} MB" if rss else ""),
                flush=True,
            )
    kv_cfg = GPTConfig(**{**model.to_dict(), "block_size": cfg.kv_context})
    cached, recompute = kv_cache_speed(kv_cfg, cfg.kv_context)
    t_torch = _median_time([sys.executable, "-c", "import torch"], root)
    t_sample = _median_time([*py, "sample", f"workdir={defaults}", "checkpoint=last", "max_new_tokens=200"], root)
    return {
        "steps": cfg.steps,
        "rounds": cfg.rounds,
        "flops_per_token": flops_per_token(model),
        "matmul_peak_gflops": peak32,
        "tokens_per_s": rates,
        "peak_rss_mb": memory,
        "wall_s": wall,
        "ddp_processes": cfg.ddp_processes if "ddp" in contenders else 0,
        "kv_cached_tokens_per_s": cached,
        "kv_recompute_tokens_per_s": recompute,
        "import_torch_s": t_torch,
        "sample_200_s": t_sample,
        "kv_context": cfg.kv_context,
    }


def _ddp_overrides(n: int, micro: int) -> list[str]:
    """carlos's defaults over n CPU processes, each with its share of the micro-batch of `micro` windows."""
    if micro % n:
        raise CarlosError(f"ddp_processes={n} does not divide the micro-batch of {micro}; choose a divisor of it")
    return [
        "trainer.strategy=ddp",
        f"trainer.devices={n}",
        "trainer.accelerator=cpu",
        f"data.micro_batch_size={micro // n}",
    ]


def _quality(cfg: BenchConfig, py, root: Path, same: Path, defaults: Path, spec: dict) -> list[dict]:
    rows = []
    for budget in cfg.budgets:
        recs, _ = _carlos(py, root, defaults, [f"trainer.max_time={budget}", *cfg.train])
        c = _eval(py, root, defaults)
        last = [r for r in recs if "tokens" in r][-1]
        plain, _ = _plain(root, same, {**spec, "seconds": budget})
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
            f"budget {budget:g} s: carlos test bpb {row['carlos_test_bpb']:.4f} ({row['carlos_tokens']:,} tokens), "
            f"plain {row['plain_test_bpb']:.4f} ({row['plain_tokens']:,} tokens)",
            flush=True,
        )
        rows.append(row)
    return rows


def _scale(cfg: BenchConfig, py, root: Path, corpus: str, manifest: Manifest) -> dict:
    """Prepare a generated corpus of cfg.prepare_gb GB: this corpus repeated, each copy with its number
    in front (so no two are identical), written in large blocks."""
    big = root / "scale" / "corpus.txt"
    unit = Path(corpus).read_bytes()
    target = int(cfg.prepare_gb * 1e9)

    def write(f) -> None:
        written, i = 0, 0
        while written < target:
            piece = f"== copy {i}\n".encode() + unit[: target - written]
            f.write(piece)
            written, i = written + len(piece), i + 1

    manifest.write(big, write)  # recorded: a file of the user's by that name is never replaced
    workdir = root / "scale" / "run"
    t = time.perf_counter()
    p, rss = _isolated([*py, "prepare", f"input={big}", f"workdir={workdir}", "overwrite=true"], root)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise _failed("carlos prepare (scale)", p)
    size = big.stat().st_size
    big.unlink()
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / 1e6 / seconds, "peak_rss_mb": rss}


# ---------------------------------------------------------------- tables


def _head(h: dict) -> list[str]:
    return [f"Machine: {h['machine']}  ", f"Date: {h['date']}  ", f"Command: `{h['command']}`  "]


def render_throughput(r: dict) -> str:
    shape = r["model"]
    lines = [
        *_head(r),
        f"Model: d_model={shape['d_model']}, n_layers={shape['n_layers']}, n_heads={shape['n_heads']}, "
        f"d_ff={shape['d_ff']}, "
        f"context {shape['block_size']}, {r['flops_per_token'] / 1e6:.2f} MFLOP per trained token; batch "
        f"{r['batch']} x {shape['block_size']} tokens; {r['steps']} steps a run, {r['rounds']} rounds; "
        f"carlos overrides: {' '.join(r['train_overrides']) or '(none)'}  ",
        f"Matmul peak measured: {r['matmul_peak_gflops']:.0f} GFLOP/s fp32 (1024 x 1024)",
        "",
        *_training_rows(r),
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


def _training_rows(r: dict) -> list[str]:
    tps, wall = r["tokens_per_s"], r.get("wall_s", {})
    mem = lambda k: f"{max(r['peak_rss_mb'][k]):,.0f} MB" if all(r["peak_rss_mb"][k]) else "n/a"  # noqa: E731
    util = lambda k: f"{statistics.median(tps[k]) * r['flops_per_token'] / (r['matmul_peak_gflops'] * 1e9):.1%}"  # noqa: E731

    def row(label: str, k: str, flops: bool = False) -> str:
        each = ", ".join(f"{x:,.0f}" for x in tps[k])
        secs = f"{statistics.median(wall[k]):.1f} s" if wall.get(k) else "n/a"
        return (
            f"| {label} | {statistics.median(tps[k]):,.0f} | {each} | {util(k) if flops else ''} | {secs} | {mem(k)} |"
        )

    def ratio(label: str, a: str, b: str) -> str:
        # each round's ratio compares runs made minutes apart, so the machine's drift cancels out
        rs = [x / y for x, y in zip(tps[a], tps[b], strict=True)]
        return f"| **{label}** (median of the rounds' ratios) | **{statistics.median(rs):.2f}** | " + (
            ", ".join(f"{x:.2f}" for x in rs) + " | | | |"
        )

    shape, n = f"{r['batch']} x {r['model']['block_size']}", r.get("ddp_processes", 0)
    lines = [
        "| | tokens/s (median of rounds) | each round | FLOP utilization | a run, start-up included | peak RSS |",
        "|---|---|---|---|---|---|",
        row(f"carlos train, batch {shape}, AdamW and GPT-2 blocks like the plain loop", "carlos", True),
        row(f"plain PyTorch loop, batch {shape}", "plain", True),
        ratio("ratio carlos / plain", "carlos", "plain"),
        row(f"carlos train with all its defaults (batch {r['default_batch']} x {r['default_seq_len']})", "defaults"),
    ]
    if n:
        label = f"the same as DDP over {n} CPU processes, one thread each ({r['default_batch'] // n} windows each)"
        lines += [row(label, "ddp"), ratio("ratio DDP / one process", "ddp", "defaults")]
    return lines


def render_quality(h: dict, rows: list[dict]) -> str:
    plain = (
        f"Plain loop: batch {h['batch']} x {h['model']['block_size']}, lr {PLAIN['lr']:g}, {PLAIN['warmup']} warmup "
        "steps, a cosine to zero fitted to the budget, AdamW betas "
        f"{tuple(PLAIN['betas'])} with decay {PLAIN['weight_decay']} on matrices, GPT-2 init; its final weights."
    )
    lines = [
        *_head(h),
        "Both train the baseline-sized model on the same train bytes for the same wall-clock budget and are scored "
        "on the same test bytes by the same code (`carlos eval`'s). carlos: `carlos train --max_time B` with all "
        f"its defaults (batch {h['default_batch']} x {h['default_seq_len']})"
        + (f" plus {' '.join(h['train_overrides'])}" if h["train_overrides"] else "")
        + f", its best checkpoint. {plain}",
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


def render_scale(h: dict, s: dict) -> str:
    rss = f"{s['peak_rss_mb']:,.0f} MB" if s["peak_rss_mb"] else "n/a"
    return "\n".join(
        [
            *_head(h),
            "A generated corpus (the bench corpus repeated, each copy numbered), prepared with the defaults.",
            "",
            "| corpus | wall time | throughput | peak RSS |",
            "|---|---|---|---|",
            f"| {s['bytes'] / 1e9:.2f} GB | {s['seconds']:.1f} s | {s['mb_per_s']:,.0f} MB/s | {rss} |",
        ]
    )


def write_section(path: Path, table: str, start: str, end: str, title: str) -> None:
    """Replace the text between the start and end markers (or append a section) in path."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e, "--output") from None
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), "--output")
