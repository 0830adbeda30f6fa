"""`carlos <command>`: argv turned into Hydra overrides (script-style flags and Hydra's own spelling), checked
up front (carlos.compose), then run as a Hydra app.

    carlos train --workdir ./run --peak_lr 3e-3          (script-style flags)
    carlos train workdir=./run optimizer.lr=3e-3           (Hydra spelling; both mix)
    python scripts/train.py model=baseline trainer.precision=bf16-mixed

Every problem a user can fix is one line on stderr and exit code 2; CARLOS_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from carlos.compose import compose, conf_dir, ready_hydra, validate
from carlos.config import SCHEMAS, config_keys, text_keys
from carlos.errors import CarlosError, guarded, nearest, stop_handlers
from carlos.openmp import choose_wait_policy

COMMANDS = ("prepare", "train", "eval", "sample", "export", "bench", "report")

# script-style flags: the original script's `--flag value` spellings, per command, in --help's order. Each
# names its config key, or the key's last part where that is unique; FLAG_KEYS names the others
SCRIPT_FLAGS: dict[str, str] = {
    "prepare": "input glob workdir seed overwrite seq_len normalize_nfkc add_bos add_eos val_fraction test_fraction "
    "separator",
    "train": "workdir run seed resume overwrite init_from micro_batch_size grad_accum_steps precision max_steps "
    "max_time peak_lr weight_decay grad_clip warmup_steps min_lr eval_interval eval_tokens ckpt_interval log_interval "
    "sample_prompt sample_tokens wandb_project wandb_entity wandb_run_name wandb_tags wandb_mode",
    "eval": "workdir run checkpoint split json batch_size stride adapt adapt_lr adapt_clip adapt_order device "
    "compressors compressor_context",
    "export": "workdir run checkpoint format out",
    "bench": "input workdir steps rounds log_interval seq_len batch budgets prepare_gb output",
    "sample": "workdir run checkpoint prompt max_new_tokens temperature top_p top_k num_samples seed device",
}
FLAG_KEYS = {  # train's
    "grad_accum_steps": "trainer.accumulate_grad_batches",
    "peak_lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "grad_clip": "trainer.gradient_clip_val",
    "sample_prompt": "sample.prompt",
    "sample_prefix": "sample.prompt",  # its old name, still taken
    "sample_tokens": "sample.tokens",
    **{f"wandb_{name}": f"wandb.{name}" for name in ("project", "entity", "run_name", "tags", "mode")},
}
TEXT_KEYS = set().union(*map(text_keys, SCHEMAS.values()))  # values that stay text, as written
# text keys whose values never hold a comma: in a sweep (-m), a flag's comma separates the values to sweep
CHOICE_KEYS = {"trainer.precision", "trainer.max_time", "wandb.mode", "split", "device", "format"}
RENAMED_KEYS = {"sample.prefix": "sample.prompt"}  # old name -> new name; the old one keeps working
# Hydra's own command-line flags, passed through unchanged, and whether they take a value (--info: optionally).
# Hydra's -r (a single run) is what carlos does anyway; carlos's --run NAME names one
HYDRA_FLAGS: dict[str, bool | None] = {
    **dict.fromkeys(("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name"), True),
    **dict.fromkeys(("-cd", "--config-dir", "--experimental-rerun"), True),
    **dict.fromkeys(("-m", "--multirun", "-h", "--help", "--hydra-help", "--version", "--resolve", "-r"), False),
    **dict.fromkeys(("-sc", "--shell-completion"), False),
    **dict.fromkeys(("-i", "--info"), None),
}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
BOOL_WORDS = {**dict.fromkeys(TRUE_WORDS, "true"), **dict.fromkeys(FALSE_WORDS, "false"), "auto": "auto"}
NUMBER = r"[-+]?([0-9][0-9_.eE+-]*|inf|nan)"
PLAIN_VALUE = re.compile(rf"^{NUMBER}(,{NUMBER})*$|^(true|false|null)$")
SWEEP_FUNCTION = re.compile(r"^(range|choice|interval|glob|tag|shuffle|sort)\(.*\)$")


def hydra_quote(value: str) -> str:
    """Quote text for Hydra's override grammar so that the config receives exactly `value`: spaces,
    commas, quotes, backslashes, Windows paths and a literal '${' included."""
    if "${" in value:  # OmegaConf would read it as an interpolation: escape it, keeping backslashes before it
        value = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    # Hydra's quoted strings: \' is a quote; backslashes before a quote or at the end are doubled
    value = re.sub(r"(\\*)('|\Z)", lambda m: "\\" * (2 * len(m.group(1))) + ("\\'" if m.group(2) else ""), value)
    return f"'{value}'"


# ---------------------------------------------------------------- script-style flags -> overrides


def _format(key: str, value: str, default: Any, sweep: bool = False) -> str:
    if sweep and key in CHOICE_KEYS and "," in value:  # -m --precision 32-true,bf16-mixed: one job per value
        return f"{key}={','.join(hydra_quote(v.strip()) for v in value.split(','))}"
    if key in TEXT_KEYS or (isinstance(default, str) and not (default == "auto" and re.fullmatch(NUMBER, value))):
        return f"{key}={hydra_quote(value)}"  # text; a number where auto is the default stays a number
    if PLAIN_VALUE.match(value) or SWEEP_FUNCTION.match(value):
        return f"{key}={value}"
    return f"{key}={hydra_quote(value)}"


def translate(command: str, args: list[str], defaults: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(Hydra flags, overrides) for the script-style and Hydra-style arguments of one command;
    defaults maps every config key to its default value."""
    leaves = _leaves(defaults)
    hydra_args: list[str] = []
    overrides: list[str] = []
    sweep = any(a in ("-m", "--multirun") for a in args)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in HYDRA_FLAGS:
            i = _hydra_flag(arg, args, i, hydra_args)
        elif not arg.startswith(("-", "~")) and "=" not in arg:
            override, i = _lone_words(command, args, i - 1)
            overrides.append(override)
        elif not arg.startswith("--"):
            overrides.append(_renamed(arg))  # key=value, group=option, +key=value: Hydra's grammar
        else:
            name, eq, inline = arg[2:].partition("=")
            key = _flag_key(command, name, defaults, leaves)
            override, i = _flag_override(key, name, defaults.get(key), inline if eq else None, args, i, sweep)
            overrides.append(override)
    return hydra_args, overrides


def _lone_words(command: str, args: list[str], i: int) -> tuple[str, int]:
    """Words that are neither flags nor key=value: `carlos prepare corpus.txt [more.txt ...]` names the
    input; any other command refuses them. Returns the override and the next position."""
    if command != "prepare":
        raise CarlosError(
            f"carlos {command} takes --flag value or key=value, not {args[i]!r}; see carlos {command} --help"
        )
    return _flag_override("input", "input", None, None, args, i)


def _renamed(override: str) -> str:
    """An override of a key under its old name, under its new one."""
    for old, new in RENAMED_KEYS.items():
        for sign in ("", "+", "++", "~"):
            if override.startswith(f"{sign}{old}=") or override == f"~{old}":
                return sign + new + override[len(sign) + len(old) :]
    return override


def _hydra_flag(arg: str, args: list[str], i: int, hydra_args: list[str]) -> int:
    """One of Hydra's own flags, with its value when it takes one; returns the next position."""
    hydra_args.append(arg)
    takes = HYDRA_FLAGS[arg]
    if takes or (takes is None and i < len(args) and args[i] in INFO_CHOICES):
        if i >= len(args):
            raise CarlosError(f"{arg} needs a value")
        hydra_args.append(args[i])
        i += 1
    return i


def _leaves(defaults: dict[str, Any]) -> dict[str, list[str]]:
    leaves: dict[str, list[str]] = {}
    for key in defaults:
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    return leaves


def _flag_key(command: str, name: str, defaults: dict[str, Any], leaves: dict[str, list[str]]) -> str:
    """The config key of --name: a script-style flag's, a dotted key, or a leaf name that is unique."""
    if command == "train" and name == "seq_len":
        raise CarlosError("seq_len is fixed when the data is prepared; run carlos prepare --seq_len N")
    if FLAG_KEYS.get(name) in defaults:
        return FLAG_KEYS[name]
    if name in defaults:
        return name
    if len(leaves.get(name, [])) == 1:
        return leaves[name][0]
    match = nearest(name, [*SCRIPT_FLAGS[command].split(), *defaults]).replace("'", "'--", 1)
    raise CarlosError(f"unknown flag --{name}{match}; see: carlos {command} --help")


def flag_keys(command: str, defaults: dict[str, Any]) -> dict[str, str]:
    """The command's script-style flags with their config keys."""
    leaves = _leaves(defaults)
    return {name: _flag_key(command, name, defaults, leaves) for name in SCRIPT_FLAGS[command].split()}


def _flag_override(
    key: str, name: str, default: Any, inline: str | None, args: list[str], i: int, sweep: bool = False
) -> tuple[str, int]:
    """The override for --name (its value inline, or the words after it from position i); returns it
    and the next position. Booleans take an optional word, lists every word up to the next flag."""
    boolean = isinstance(default, bool) or key == "resume"
    if inline is not None:
        value = inline
    elif boolean:
        value = "true"
        if i < len(args) and not args[i].startswith("-") and "=" not in args[i]:
            value, i = args[i], i + 1
    elif key == "input" and name == "input":  # one path (whatever it holds), or several: --input a.txt b.txt
        if i >= len(args):
            raise CarlosError(f"--{name} needs a value")
        values, i = [args[i]], i + 1
        while i < len(args) and not args[i].startswith("-") and "=" not in args[i]:
            values.append(args[i])
            i += 1
        if len(values) > 1:
            return f"input=[{','.join(hydra_quote(v) for v in values)}]", i
        value = values[0]
    elif isinstance(default, list) or key == "wandb.tags":
        values = []
        # a list of overrides (bench's train) takes key=value items; other lists stop at one
        while i < len(args) and not args[i].startswith("-") and ("=" not in args[i] or key == "train"):
            values.append(args[i])
            i += 1
        items = [hydra_quote(v) if key in TEXT_KEYS or not PLAIN_VALUE.match(v) else v for v in values]
        return f"{key}=[{','.join(items)}]", i
    else:
        if i >= len(args):
            raise CarlosError(f"--{name} needs a value")
        value, i = args[i], i + 1
    if not boolean:
        return _format(key, value, default, sweep), i
    word = BOOL_WORDS.get(value.lower())
    if word is None or (word == "auto" and key != "resume"):
        choices = "true, false or auto" if key == "resume" else "true or false"
        raise CarlosError(f"--{name} takes {choices}, got {value!r}")
    return f"{key}={word}", i


# ---------------------------------------------------------------- running


def _runner(command: str) -> Callable:
    """The function that runs a command on its composed config; only that command's module is imported."""
    if command == "train":
        from carlos.train import train

        return train  # it parses the config itself and keeps the composed one for the run's snapshot
    if command == "prepare":
        from carlos.prepare import prepare as run
    elif command == "eval":
        from carlos.evaluate import evaluate as run
    elif command == "sample":
        from carlos.generate import sample as run
    elif command == "export":
        from carlos.export import export as run
    else:
        from carlos.bench import bench as run
    from carlos.config import SCHEMAS, parse

    return lambda cfg: run(parse(cfg, SCHEMAS[command]))


def run_hydra(command: str, hydra_args: list[str], overrides: list[str]) -> Any:
    """Run the command as a Hydra app (a single run, or a multirun with each job under run_job)."""
    import hydra

    from carlos.slurm import refusals
    from carlos.sweep import in_multirun, run_job

    runner = _runner(command)

    def task(cfg):
        if in_multirun():
            return run_job(runner, cfg)
        return guarded(runner, cfg)  # here, or Hydra would print its own report of the exception

    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name=command)(task)
    argv = sys.argv
    sys.argv = [argv[0], *hydra_args, *overrides]
    # Lightning's DDP re-runs this command line for the other ranks without the command's name
    os.environ["CARLOS_COMMAND"] = command
    ready_hydra()
    try:
        with refusals():  # a SLURM sweep that sbatch refuses: one line, not Hydra's traceback
            return app()
    finally:
        sys.argv = argv


USAGE = """usage: carlos <command> [--flag value ...] [key=value ...] [-m] [--cfg job] [--help]

commands:
  prepare   split a UTF-8 corpus, byte-level tokens, packed windows   (carlos prepare --input corpus.txt)
  train     train the tiny GPT on a prepared workdir                  (carlos train --max_steps 2000)
  eval      loss, perplexity and bits-per-byte of a checkpoint        (carlos eval --split test)
  sample    generate text from a checkpoint                           (carlos sample --prompt "\\n")
  export    a checkpoint as safetensors or a Hugging Face directory   (carlos export --format hf --out hf/)
  bench     carlos's training path against a plain PyTorch loop       (carlos bench --input corpus.txt)
  report    table and plot of the runs under a directory              (carlos report carlos_run/sweeps)

`carlos <command> --help` lists the command's flags, config groups and keys."""


def _report(args: list[str]) -> None:
    """carlos report [DIR] [--output FILE.png]: not a Hydra app, it only reads what runs wrote."""
    from carlos.report import report as make_report

    if any(a in ("-h", "--help") for a in args):
        print("usage: carlos report [DIR (default ./carlos_run)] [--output FILE.png (default DIR/report.png)]")
        return
    root, output, i = None, None, 0
    while i < len(args):
        a = args[i]
        if a in ("--output", "-o") or a.startswith(("--output=", "output=")):
            if "=" in a:
                output = a.split("=", 1)[1]
            elif i + 1 < len(args):
                output, i = args[i + 1], i + 1
            else:
                raise CarlosError("--output needs a file name, e.g. --output report.png")
        elif a.startswith("-"):
            raise CarlosError(f"unknown flag {a}{nearest(a.lstrip('-'), ['output'])}; see: carlos report --help")
        elif root is None:
            root = a
        else:
            raise CarlosError(f"carlos report takes one directory, got {root!r} and {a!r}")
        i += 1
    make_report(root or "./carlos_run", output)


def _search_path(hydra_args: list[str], overrides: list[str]) -> list[str]:
    """--config-dir as the override that makes the up-front validation find the configs there too
    (presets of your own: experiment=NAME); Hydra's run reads the flag itself."""
    dirs = [hydra_args[i + 1] for i, a in enumerate(hydra_args[:-1]) if a in ("-cd", "--config-dir")]
    if not dirs or any(o.lstrip("+").startswith("hydra.searchpath=") for o in overrides):
        return []
    paths = ",".join(hydra_quote("file://" + os.path.abspath(os.path.expanduser(d))) for d in dirs)
    return [f"hydra.searchpath=[{paths}]"]


@contextlib.contextmanager
def _paths_printable() -> Iterator[None]:
    """A path that is not UTF-8 (Python keeps its bytes as lone surrogates) printed as the bytes it is, as ls
    prints it, where a strict stdout (Python's under most UTF-8 locales) would fail the command after its
    work: prepare's summary, train's last line. Set back when the command ends."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    if errors != "strict" or not hasattr(stream, "reconfigure"):
        yield
        return
    stream.reconfigure(errors="surrogateescape")
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):  # a stream closed meanwhile
            stream.reconfigure(errors=errors)


def main(argv: list[str] | None = None) -> None:
    """`carlos <command>`: everything under the failure policy, with SIGTERM turned into Stopped so that
    a stopped command cleans up after itself (train hands SIGTERM to Lightning once it trains), and given
    back when it ends."""
    if "LOCAL_RANK" not in os.environ or "CARLOS_STARTED" not in os.environ:  # a DDP rank keeps its command's
        os.environ["CARLOS_STARTED"] = repr(time.time())  # where --max_time's clock starts (train.job_started)
    with stop_handlers(), _paths_printable():
        try:
            guarded(_main, list(sys.argv[1:] if argv is None else argv))
        finally:
            os.environ.pop("CARLOS_STARTED", None)  # a later train() in this process starts its own clock
            # a reader that went away (carlos sample --help | head): a quiet exit here, not a traceback at exit
            guarded(sys.stdout.flush)


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = argv[0]
    if command not in COMMANDS and os.environ.get("CARLOS_COMMAND") in COMMANDS and "LOCAL_RANK" in os.environ:
        # a DDP rank that Lightning started by re-running our command line (sys.argv without the command)
        command, argv = os.environ["CARLOS_COMMAND"], [os.environ["CARLOS_COMMAND"], *argv]
    if command not in COMMANDS:
        raise CarlosError(f"unknown command '{command}'{nearest(command, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    if command == "report":
        _report(argv[1:])
        return
    if command != "prepare" and "LOCAL_RANK" not in os.environ:  # a DDP rank keeps its command's choice
        choose_wait_policy()  # before torch loads
    defaults = config_keys(compose(command, []))
    hydra_args, overrides = translate(command, argv[1:], defaults)
    one_run = [a for a in hydra_args if a in ("-c", "--cfg", "-i", "--info", "-r", "-sc", "--shell-completion")]
    if one_run and any(a in ("-m", "--multirun") for a in hydra_args):
        raise CarlosError(
            f"{one_run[0]} shows one run and cannot be combined with -m; drop -m to see the first job's "
            "(the same overrides with each swept key's first value)"
        )
    made: list[Path] = []
    if any(a in ("-h", "--help") for a in hydra_args):
        from carlos.help import help_text

        print(help_text(command, flag_keys(command, defaults)))
        return
    if not any(a in ("--hydra-help", "--version", "-i", "--info", "-sc", "--shell-completion") for a in hydra_args):
        multirun = any(a in ("-m", "--multirun") for a in hydra_args)
        made = validate(command, overrides + _search_path(hydra_args, overrides), list(defaults), multirun=multirun)
    try:
        run_hydra(command, hydra_args, overrides)
    except SystemExit as e:
        if e.code:  # refused or failed: the run directory Hydra made for it goes again, when empty
            for d in made:
                try:
                    os.rmdir(d)
                except OSError:
                    break
        raise


if __name__ == "__main__":
    main()
