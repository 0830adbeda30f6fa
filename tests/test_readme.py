"""Every command of README.md's bash blocks runs as written, in order, in a fresh directory: only the sizes
are made tiny (a small corpus, a tiny model, a few steps), so a broken example fails the tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from carlos.cli import main

from .conftest import make_corpus

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"
SETUP = {"python", "python3", "pip", ".", "make", ".venv/bin/pip"}  # installing: done already for the tests
TINY_MODEL = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64"]
TINY = {
    "prepare": ["--seq_len", "32"],
    "train": [
        *TINY_MODEL,
        "--max_steps",
        "4",
        "--eval_interval",
        "2",
        "--ckpt_interval",
        "2",
        "--micro_batch_size",
        "4",
    ]
    + ["--sample_tokens", "4", "--warmup_steps", "1"],
    "sample": ["--max_new_tokens", "8"],
}


def readme_commands() -> list[list[str]]:
    """The commands of README's ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_readme_has_carlos_commands_and_only_set_up_besides():
    commands = readme_commands()
    assert sum(c[0] == "carlos" for c in commands) >= 15
    assert {c[0] for c in commands} - {"carlos"} <= SETUP


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")  # carlos export --format hf
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "carlos_demo").mkdir()
    make_corpus(tmp_path / "carlos_demo" / "corpus.txt")  # what `make demo` writes first (a smaller one)
    make_corpus(tmp_path / "my.txt", seed=1)
    make_corpus(tmp_path / "other.txt", seed=2)
    for words in readme_commands():
        if words[0] in SETUP:
            continue
        command = words[1]
        tiny = [] if {"--cfg", "--help"} & set(words) else TINY.get(command, [])
        with pytest.raises(SystemExit) as exit_:
            main([*words[1:], *tiny])
            raise SystemExit(0)
        assert exit_.value.code == 0, f"{shlex.join(words)}: {capsys.readouterr().err}"
    assert (tmp_path / "rope_hf" / "config.json").is_file() and (
        tmp_path / "run2" / "checkpoints" / "best.pt"
    ).is_file()


def test_the_docs_numbers_and_lists_come_from_the_code():
    from carlos.cli import COMMANDS
    from carlos.compose import compose
    from carlos.config import ModelConfig
    from carlos.memory import num_params
    from carlos.model import GPTConfig

    seq_len = compose("prepare", []).data.seq_len
    model = GPTConfig.for_data(ModelConfig(**compose("train", []).model), vocab_size=256, block_size=seq_len)
    count = re.search(r"about (\d+)K parameters by default", README.read_text(encoding="utf-8")).group(1)
    assert int(count) == round(num_params(model) / 1000)  # 99,968 for bytes at the default context
    listed = re.search(r"carlos has (\w+) commands: (.*?)\.", (DOCS / "COMMAND_LINE.md").read_text(encoding="utf-8"))
    assert re.findall(r"`(\w+)`", listed.group(2)) == list(COMMANDS)
    assert listed.group(1) == ["one", "two", "three", "four", "five", "six", "seven", "eight"][len(COMMANDS) - 1]
