"""Shared fixtures: a small generated corpus, a prepared workdir, and config composition."""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

# One torch thread, here and in every command a test starts (inherited through the environment): the
# models are tiny, and on a loaded 2-core host two threads made a 12-step train 20 times slower
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import settings
from omegaconf import OmegaConf

from carlos.compose import compose, conf_dir
from carlos.config import PrepareConfig, parse
from carlos.model import GPTConfig
from carlos.prepare import prepare

torch.set_num_threads(1)  # also where torch was imported before this file set the environment
# a suite started in the background (`make test &`, nohup) inherits SIGINT and SIGHUP ignored, and so would
# every command a test starts: they get the defaults back, as the commands of a terminal's shell have them
signal.signal(signal.SIGINT, signal.default_int_handler)
if hasattr(signal, "SIGHUP"):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
settings.register_profile("suite", max_examples=60)
settings.register_profile("deep", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "have",
    "an",
    "but",
    "not",
    "are",
    "his",
]


def make_corpus(path: Path, n_lines: int = 600, seed: int = 0) -> Path:
    """Deterministic text with paragraphs (blank lines), some non-ASCII, ~25 KB."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if i % 17 == 0:
            words.append("café ﬁn")  # a ligature NFKC rewrites
        lines.append(" ".join(words).capitalize() + ".")
        if i % 5 == 4:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


def record_as_carlos(root: Path, *paths: Path) -> None:
    """Files a test put under root by hand, recorded as if carlos had written them (carlos/manifest.py)."""
    from carlos.manifest import Manifest

    Manifest(root).claim(*paths)


def prepare_workdir(corpus: Path, workdir: Path, *overrides: str) -> Path:
    cfg = compose("prepare", [f"input={corpus}", f"workdir={workdir}", "data.seq_len=32", *overrides])
    prepare(parse(cfg, PrepareConfig))
    return workdir


@pytest.fixture
def workdir(corpus: Path, tmp_path: Path) -> Path:
    return prepare_workdir(corpus, tmp_path / "run")


def train_cfg(workdir: Path, *overrides: str):
    """A tiny, fast training config on a prepared workdir."""
    return compose(
        "train",
        [
            f"workdir={workdir}",
            "trainer.max_steps=12",
            "trainer.accumulate_grad_batches=2",
            "data.micro_batch_size=4",
            "eval_interval=6",
            "ckpt_interval=4",
            "log_interval=3",
            "sample.tokens=16",
            "schedule.warmup_steps=2",
            *overrides,
        ],
    )


def gpt_config(**settings) -> GPTConfig:
    """conf/model/baseline.yaml's model with vocabulary 256 and context 256, with settings changed."""
    baseline = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "baseline.yaml"))
    return GPTConfig(**{**baseline, "vocab_size": 256, "block_size": 256, **settings})


# a tiny model (with a learned position table: several damaged-checkpoint cases are about it) and a run
# that validates, checkpoints and logs every 2 steps
TINY_MODEL = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "model.pos=learned"]
TINY_RUN = [*TINY_MODEL, "--micro_batch_size", "4", "--eval_interval", "2", "--ckpt_interval", "2"]
TINY_RUN += ["--log_interval", "1", "--sample_tokens", "8", "--warmup_steps", "1"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A directory with corpus.txt and w: prepared from it (seq_len 32) and trained 4 steps with TINY_RUN
    (checkpoints step_000002, step_000004, best and last), through carlos.cli.main in this process. Built
    once for the whole session, pytest-xdist's workers included (the first builds it under a file lock,
    the others wait and read it). Never change it: copy_trained puts a copy where a test needs one."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, under xdist
    root = shared / "trained"
    with FileLock(str(shared / "trained.lock")):
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build_trained(root)
            (root / ".built").touch()
    return root


def _build_trained(root: Path) -> None:
    from carlos.cli import main

    make_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "disabled")
        main(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"])
        main(["train", "--workdir", "w", *TINY_RUN, "--max_steps", "4"])


def copy_trained(trained: Path, to: Path) -> Path:
    """The trained fixture's corpus.txt and w, copied into the directory `to` (made if missing); returns it."""
    shutil.copytree(trained, to, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".built"))
    return to


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """carlos.cli.main in this process, as the console script calls it: (exit code, stdout, stderr)."""
    from carlos.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err
