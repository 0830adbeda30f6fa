"""Every key of every command's config, given values of the wrong type, out of range and at the extremes.

The schema matrix (fast): every key x value, checked in-process the way the command line checks a command
before it runs anything (carlos.cli.translate, then carlos.compose.validate: Hydra's composition and the
command's schema). A value is refused in one line that names its key, or accepted.

End to end (slow): a representative subset, run for real through carlos.cli.main in a copy of the
session's trained fixture; train runs with --overwrite on it, the most sensitive case (a value refused late
would already have deleted the old run). Every key at least once, with a value its schema accepts where
one does, and every value at least once. A refused value leaves every file with its name and its bytes;
an accepted one reaches the command (the config it ran with holds the value the schema made of it) and the
command ends well, or runs on until a timer stops it (sample 10**23 tokens). bench's real work is minutes
of measurements in subprocesses: an accepted bench value stops where that work begins."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import math
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from carlos.cli import main, translate
from carlos.compose import _explain_hydra_error, check, compose, composed, validate
from carlos.config import SCHEMAS, config_keys, parse
from carlos.errors import CarlosError

from .conftest import TINY_RUN, copy_trained

BASE = {
    "prepare": ["--input", "corpus.txt", "--workdir", "w", "--seq_len", "32", "--overwrite"],
    "train": ["--workdir", "w", *TINY_RUN, "--max_steps", "2", "--max_time", "6", "--overwrite"],
    "eval": ["--workdir", "w"],
    "sample": ["--workdir", "w", "--max_new_tokens", "4"],
    "export": ["--workdir", "w", "--out", "exported"],
    "bench": ["--workdir", "b", "output=null", "rounds=0"],
}
VALUES = [
    "abc",
    "''",
    "[1,2]",
    "{a: 1}",
    "null",
    "true",
    "-1",
    "0",
    "2.5",
    "1e-300",
    "1e308",
    "-1e308",
    "inf",
    "-inf",
    "nan",
    "99999999999999999999999",
    "-99999999999999999999999",
    "'\\ud800'",
    "'${x}'",
]
LONG_RUN = 99  # the exit code of a run the timer stopped: it was accepted and still running
DEFAULTS = {command: config_keys(compose(command, [])) for command in BASE}
KEYS = [(command, key) for command in BASE for key in DEFAULTS[command]]
RUNNERS = {  # the function each command runs, as carlos.cli._runner imports it
    "prepare": "carlos.prepare.prepare",
    "train": "carlos.train.train",
    "eval": "carlos.evaluate.evaluate",
    "sample": "carlos.generate.sample",
    "export": "carlos.export.export",
    "bench": "carlos.bench.bench",
}


def refusal(command: str, key: str, value: str) -> str | None:
    """What the command line says of `carlos COMMAND BASE key=value` before it runs anything (translate,
    validate): None when it accepts it, else its one-line refusal."""
    defaults = DEFAULTS[command]
    try:
        _, overrides = translate(command, [*BASE[command], f"{key}={value}"], defaults)
        validate(command, overrides, list(defaults))
    except CarlosError as e:
        return str(e)
    return None


@functools.cache
def _composed_base(command: str) -> DictConfig:
    _, overrides = translate(command, BASE[command], DEFAULTS[command])
    return composed(command, overrides, list(DEFAULTS[command]))


def schema_refusal(command: str, key: str, value: str) -> str | None:
    """refusal(), a hundred times faster: BASE's config is composed once, and key=value applied to it by
    Hydra's own code for an override of a key (its grammar, then the step that ends each composition),
    before the same checks (carlos.compose.check). Hydra's whole composition takes about 0.1 s, too much
    for every key x value; test_each_value_... checks that the two agree."""
    defaults = DEFAULTS[command]
    try:
        _, overrides = translate(command, [*BASE[command], f"{key}={value}"], defaults)
        cfg = copy.deepcopy(_composed_base(command))
        try:
            override = OverridesParser.create().parse_override(overrides[-1])
            ConfigLoaderImpl._apply_overrides_to_config([override], cfg)  # private: a test may lean on it
        except Exception as e:  # noqa: BLE001 - as carlos.compose.composed tells Hydra's errors
            raise CarlosError(_explain_hydra_error(e, list(defaults))) from None
        check(command, cfg, overrides)
    except CarlosError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("schema")


@pytest.mark.parametrize("i, command, key", [(i, *k) for i, k in enumerate(KEYS)], ids=[f"{c}-{k}" for c, k in KEYS])
def test_each_value_is_accepted_or_refused_in_one_line_that_names_its_key(i, command, key, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    for value in VALUES:
        said = schema_refusal(command, key, value)
        if said is not None:
            assert "\n" not in said, (value, said)
            assert key in said or key.rsplit(".", 1)[-1] in said, (value, said)
    # the fast check agrees with the command line's own, on one value per key, every value at least once
    value = VALUES[i % len(VALUES)]
    assert schema_refusal(command, key, value) == refusal(command, key, value), value


# ---------------------------------------------------------------- end to end


def files(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def field(cfg: Any, key: str) -> Any:
    """The value at a dotted key of a parsed config (dataclasses and dicts)."""
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _stop(signum, frame):
    raise SystemExit(LONG_RUN)


def _accepted_value(i: int, command: str, key: str) -> str:
    """A value the schema accepts for the key, the first from VALUES turned by i, so that the keys try
    different ones; the first of them when the schema accepts none."""
    turned = VALUES[i % len(VALUES) :] + VALUES[: i % len(VALUES)]
    return next((v for v in turned if refusal(command, key, v) is None), turned[0])


# every key once (with a value its schema accepts, where one does), and every value once, with keys spread
E2E = [(command, key, None) for command, key in KEYS]
E2E += [(*KEYS[(7 * j) % len(KEYS)], value) for j, value in enumerate(VALUES)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGALRM stops long runs")
@pytest.mark.parametrize(
    "command, key, value", E2E, ids=[f"{c}-{k}" + ("" if v is None else f"={v}") for c, k, v in E2E]
)
def test_a_value_is_refused_before_writing_or_reaches_the_command(
    command, key, value, trained, tmp_path, monkeypatch, capsys
):
    copy_trained(trained, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("CARLOS_DEBUG", raising=False)
    if value is None:
        value = _accepted_value(KEYS.index((command, key)), command, key)
    if command == "bench":  # its work is measurements in subprocesses: an accepted value stops there
        import carlos.bench

        monkeypatch.setattr(carlos.bench, "_prepare", lambda *a, **k: sys.exit(0))
    ran = _record_config(command, monkeypatch)
    before = files(tmp_path)
    code, err = _run_timed([command, *BASE[command], f"{key}={value}"], capsys)
    assert "Traceback" not in err, err
    assert code in (0, 2, LONG_RUN), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("carlos: error: "), err
        assert files(tmp_path) == before, f"refused after writing: {lines[0]}"
        return
    assert "carlos: error" not in err, err
    _, base = translate(command, BASE[command], DEFAULTS[command])
    given = parse(compose(command, [*base, f"{key}={value}"]), SCHEMAS[command])
    assert ran, f"{key}={value} was accepted, yet the command never ran"
    assert same(field(ran[0], key), field(given, key)), (field(ran[0], key), field(given, key))


def _record_config(command: str, monkeypatch) -> list:
    """The parsed config each run of the command receives, appended to the list returned."""
    module, name = RUNNERS[command].rsplit(".", 1)
    real = getattr(importlib.import_module(module), name)
    ran: list = []

    def record(cfg):
        ran.append(parse(cfg, SCHEMAS[command]) if isinstance(cfg, DictConfig) else cfg)
        return real(cfg)

    monkeypatch.setattr(RUNNERS[command], record)
    return ran


def _run_timed(argv: list[str], capsys) -> tuple[int, str]:
    """carlos.cli.main(argv), stopped after 30 s (LONG_RUN); (exit code, stderr)."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
            raise SystemExit(0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return exit_.value.code, capsys.readouterr().err


# Hydra's own keys (test_errors.py has hydra.run.dir=/proc/nope, hydra.foo and hydra/launcher=nope)
HYDRA = [
    (["train", "hydra.run.dir=corpus.txt"], "is a file, not a directory"),
    (["eval", "hydra.run.dir=corpus.txt/inside"], "cannot be created"),
    (["sample", "hydra.run.dir=/dev/null/x"], "cannot be created"),
    (["train", "-m", "hydra.sweep.dir=corpus.txt"], "is a file, not a directory"),
    (["train", "-m", "hydra.sweep.dir=/proc/nope/sweep"], "cannot be created"),
    (["prepare", "hydra.job.nme=x"], "unknown key 'hydra.job.nme'"),
    (["train", "-m", "hydra/sweeper=optuan"], "did you mean 'optuna'"),
    (["train", "hydra.run.dir='${nowhere}'"], "hydra.run.dir"),
]


@pytest.mark.parametrize("argv, expect", HYDRA, ids=[" ".join(a) for a, _ in HYDRA])
def test_hydras_own_keys_are_refused_in_one_line_before_writing(argv, expect, trained, tmp_path, monkeypatch, capsys):
    copy_trained(trained, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], *BASE[argv[0]], *argv[1:]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("carlos: error: "), lines
    assert expect in lines[0], lines[0]
    assert files(tmp_path) == before
