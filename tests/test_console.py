"""What a new user meets in the console: logs a file can hold, help that helps, no traceback, the user's
spelling (a lone path, units of time, a sweep over a flag), consistent numbers and paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carlos.config import parse_max_time

from .conftest import make_corpus
from .conftest import run_cli as run

CARLOS = str(Path(sys.executable).parent / "carlos")
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
TINY += ["--sample_tokens", "4", "--warmup_steps", "1"]


@pytest.fixture
def w(tmp_path, monkeypatch, capsys) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    make_corpus(tmp_path / "corpus.txt")
    assert run(["prepare", "corpus.txt", "--workdir", "w", "--seq_len", "32"], capsys)[0] == 0  # a lone path
    return tmp_path / "w"


@pytest.mark.slow
def test_a_log_file_gets_one_plain_line_per_record_and_no_bar(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    subprocess.run([CARLOS, "prepare", "corpus.txt", "--workdir", "w", "--seq_len", "32"], cwd=tmp_path, check=True)
    # a machine with SLURM installed (an srun on PATH) and W&B logging offline
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # stdout redirected to a file, as `carlos train ... > log.txt` and SLURM do
        argv = [CARLOS, "train", "--workdir", "w", *TINY, "--max_steps", "20", "--eval_interval", "10"]
        argv += ["--log_interval", "5", "--run", "logged", "--wandb_project", "carlos-test"]
        subprocess.run(
            argv, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, check=True
        )
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no colour codes
    assert "Training:" not in text and "Epoch 0" not in text and "srun" not in text
    assert "anonymous" not in text and "git root" not in text and "WARNING" not in text
    lines = text.splitlines()
    train = [line for line in lines if line.startswith("step ") and ": loss " in line]
    val = [line for line in lines if line.startswith("step ") and ": val loss " in line]
    assert [line.split(":")[0] for line in train] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    assert [line.split(":")[0] for line in val] == ["step 10/20", "step 20/20"]
    assert all(", lr " in line and line.endswith(" tokens/s") for line in train)
    assert all(", val bpb " in line for line in val)
    assert lines[-1].startswith("done: 20 steps, ") and lines[-1].endswith(
        f"checkpoints in {Path('w/runs/logged/checkpoints')}"
    )


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="a pseudo-terminal needs POSIX")
def test_a_terminal_gets_one_bar_counting_optimizer_steps_with_the_latest_numbers(tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    import threading

    make_corpus(tmp_path / "corpus.txt")
    subprocess.run([CARLOS, "prepare", "corpus.txt", "--workdir", "w", "--seq_len", "32"], cwd=tmp_path, check=True)
    try:
        master, terminal = pty.openpty()
    except OSError:
        pytest.skip("this machine gives no pseudo-terminal")
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns
    chunks: list[bytes] = []

    def read() -> None:  # drained as it comes: a full pseudo-terminal would block the run
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    argv = [CARLOS, "train", "--workdir", "w", *TINY, "--max_steps", "20", "--eval_interval", "10"]
    argv += ["--log_interval", "5", "trainer.accumulate_grad_batches=2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "40"}  # stale, as CI machines leave it: the terminal wins
    p = subprocess.run(argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    reader.join(30)
    os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert p.returncode == 0, text
    states = [s for s in text.replace("\r", "\n").splitlines() if s.startswith("train")]
    assert len(states) > 1  # redrawn in place, not one line per record
    assert "20/20" in states[-1] and "loss=" in states[-1] and "val_bpb=" in states[-1]  # optimizer steps
    assert "/40" not in text and "Epoch 0" not in text  # not Lightning's count of micro-batches
    assert "step 5/20:" not in text  # the plain lines are for files and pipes


def test_help_lists_the_flags_with_meaning_and_default_and_only_the_commands_groups(tmp_path):
    p = subprocess.run([CARLOS, "train", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "--overwrite         delete an earlier run's outputs (never the prepared data) and start over " in p.stdout
    assert "(default false)" in p.stdout and "--ckpt_interval" in p.stdout and "(default 500)" in p.stdout
    assert "  model: baseline (default), medium, modern" in p.stdout
    assert "  logger: csv, tensorboard, wandb  (none by default)" in p.stdout
    p = subprocess.run([CARLOS, "sample", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "--temperature       divides the logits; 0 always takes the likeliest token (default 0.8)" in p.stdout
    assert "model:" not in p.stdout and "config groups" not in p.stdout  # sample has none
    assert list(tmp_path.iterdir()) == []


def test_every_help_row_is_a_sentence_that_says_its_default_once():
    from carlos.cli import COMMANDS, flag_keys
    from carlos.compose import compose
    from carlos.config import config_keys
    from carlos.help import help_text

    for command in set(COMMANDS) - {"report"}:  # report's help is argparse's usage line
        flags = flag_keys(command, config_keys(compose(command, [])))
        text = help_text(command, flags)
        rows = [line.split(None, 1) for line in text.splitlines() if line.startswith("  --")]
        meanings = [meaning for _, meaning in rows]
        assert [flag for flag, _ in rows] == [f"--{flag}" for flag in flags]
        assert len(set(meanings)) == len(meanings), command  # no two rows alike
        for flag, meaning in rows:
            said = f"carlos {command} {flag}: {meaning}"
            assert not re.search(rf"{flag}\b(?!')", meaning), said  # no row explains a flag by itself
            assert meaning.count("(default") == 1 or meaning.endswith("; required"), said  # one default
            assert not meaning.startswith("("), said  # a meaning first
            assert not re.search(r"\w:\)|:$", meaning), said  # no fragments
            assert not ("null" in meaning and "(default none)" in meaning), said  # the default said twice
        if command == "train":
            assert "--max_steps         optimizer steps (default: trainer.default_steps (5000), or no limit" in text


def test_help_does_not_import_lightning_or_torch():
    code = "import sys; from carlos.cli import main\ntry:\n    main(['train', '--help'])\nfinally:\n"
    code += "    print('torch' in sys.modules, 'lightning' in sys.modules, file=sys.stderr)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stderr.strip().splitlines()[-1] == "False False", p.stderr


def test_help_into_a_closed_pipe_and_cfg_in_a_sweep_end_without_a_traceback(tmp_path):
    p = subprocess.Popen([CARLOS, "sample", "--help"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader went away: carlos sample --help | head -0
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""
    p = subprocess.run(
        [CARLOS, "train", "-m", "seed=1,2", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.strip() == (
        "carlos: error: --cfg shows one run and cannot be combined with -m; drop -m to see the first job's "
        "(the same overrides with each swept key's first value)"
    )


def test_a_lone_word_is_the_input_of_prepare_and_refused_elsewhere(w, capsys):
    assert (w / "splits.json").is_file()
    code, _, err = run(["eval", "w"], capsys)
    assert (
        code == 2
        and err.strip() == "carlos: error: carlos eval takes --flag value or key=value, not 'w'; see carlos eval --help"
    )


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("2m", 120), ("1h30m", 5400), ("1.5h", 5400), ("1d", 86400), ("600", 600), ("00:00:10:00", 600)],
)
def test_max_time_takes_units(text, seconds):
    assert parse_max_time(text).total_seconds() == seconds


@pytest.mark.slow
def test_a_sweep_over_a_text_flag_runs_one_job_per_value(w, capsys):
    argv = ["train", "-m", "--workdir", "w", *TINY, "--max_steps", "2", "--precision", "32-true,bf16-mixed"]
    code, out, _ = run([*argv, "hydra.sweep.dir=w/sweeps/precision"], capsys)
    assert code == 0 and "sweep w/sweeps/precision: 2 jobs, 2 finished, 0 failed" in out
    done = [line for line in out.splitlines() if line.startswith("done: ")]
    assert [line.split("checkpoints in ")[1] for line in done] == [
        str(Path("w/sweeps/precision/0/checkpoints")),
        str(Path("w/sweeps/precision/1/checkpoints")),
    ]  # the same form as a single run's, not Hydra's absolute path


@pytest.mark.slow
def test_eval_prints_thousands_separators_and_resume_says_what_the_schedule_does(w, capsys):
    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "4"], capsys)[0] == 0
    code, out, _ = run(["eval", "--workdir", "w", "--split", "train"], capsys)
    tokens = next(line for line in out.splitlines() if line.startswith("split: "))
    assert code == 0 and tokens.startswith("split: train (16,") and " bytes)" in tokens
    code, out, _ = run(["train", "--workdir", "w", *TINY, "--max_steps", "8", "--resume"], capsys)
    assert code == 0
    assert "schedule: max_steps 4 -> 8, so the lr schedule is stretched over 8 steps: at step 4 the lr is now " in out


def test_bf16_on_a_cpu_without_bf16_instructions_is_named_in_the_precision_line(monkeypatch):
    from carlos import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    _, why = precision.resolve_precision("bf16-mixed", "cpu", 256)
    assert why == "asked for; warning: this CPU has no bf16 instructions, expect it several times slower than 32-true"


def test_report_shows_unset_settings_as_a_dash_and_keeps_the_legend_off_the_curves():
    pytest.importorskip("matplotlib")
    from carlos.report import Run, _figure, table

    records = [{"step": 10, "tokens": 1000, "val_bpb": 3.0, "train_loss": 2.0}]
    runs = [
        Run(Path("a"), "runs/a", {"init_from": None, "optimizer.lr": 0.003, "logger.csv.x": 1}, list(records)),
        Run(Path("b"), "runs/b", {"init_from": "x.pt", "optimizer.lr": 0.001}, list(records)),
    ]
    text = table(runs)
    assert text.splitlines()[0] == "| run | init_from | optimizer.lr | steps | tokens | best val bpb | tokens/s |"
    assert "| runs/a | - | 0.003 |" in text and "None" not in text and "logger" not in text
    fig = _figure(runs)
    plot, below = fig.axes
    assert plot.get_legend() is None and [t.get_text() for t in below.get_legend().get_texts()] == [
        "runs/a (init_from=-, lr=0.003)",
        "runs/b (init_from=x.pt, lr=0.001)",
    ]


def test_openmp_threads_wait_passively_on_a_busy_machine_unless_the_user_chose(monkeypatch):
    from carlos import openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(openmp, "others_cores", lambda: 0.1)  # quiet: OpenMP's own default (spinning)
    assert openmp.choose_wait_policy() is None and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(openmp, "others_cores", lambda: 1.0)  # another process holds a core
    assert openmp.choose_wait_policy() == "PASSIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert openmp.choose_wait_policy() is None and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures through Linux's /proc/stat")
def test_a_process_spinning_on_a_core_is_seen_as_busy():
    from carlos.openmp import others_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert others_cores(0.3) >= 0.5
    finally:
        spinner.kill()


def test_the_progress_bar_draws_at_80_columns_on_a_terminal_that_reports_none(monkeypatch, capsys):
    from types import SimpleNamespace

    import tqdm.std

    from carlos.callbacks import ProgressBar

    # what tqdm reads from a terminal of 0 x 0 (`script`, some CI terminals): -1 x -1, and then it draws nothing
    monkeypatch.setattr(tqdm.std, "_screen_shape_wrapper", lambda: lambda _file: (-1, -1))
    monkeypatch.setattr(os, "get_terminal_size", lambda *_: os.terminal_size((0, 0)))
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    progress = ProgressBar(SimpleNamespace(last={}))
    progress._trainer = SimpleNamespace(max_steps=100, global_step=0, is_global_zero=True)
    bar = progress.init_train_tqdm()
    bar.update(5)
    bar.refresh()
    bar.close()
    drawn = capsys.readouterr().out.split("\r")[-1]
    assert "5/100" in drawn and len(drawn.rstrip("\n")) == 80
