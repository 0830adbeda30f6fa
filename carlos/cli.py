"""`carlos <command>`: the seed's flags turned into Hydra overrides, checked up front, then the Hydra app.

    carlos train --workdir ./run --peak_lr 3e-3          (seed spelling)
    carlos train workdir=./run optimizer.lr=3e-3           (Hydra spelling; both mix)
    python scripts/train.py model=baseline trainer.precision=bf16-mixed

Every problem a user can fix is one line on stderr and exit code 2; CARLOS_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from carlos.config import CarlosError, nearest
from carlos.files import read_regular
from carlos.manifest import RECORD, Manifest

COMMANDS = ("prepare", "train", "eval", "sample", "bench", "report")

# the seed's flags, per command -> config key
SEED_FLAGS: dict[str, dict[str, str]] = {
    "prepare": {
        "input": "input",
        "workdir": "workdir",
        "seed": "seed",
        "overwrite": "overwrite",
        "seq_len": "data.seq_len",
        "normalize_nfkc": "data.normalize_nfkc",
        "add_bos": "data.add_bos",
        "add_eos": "data.add_eos",
        "val_fraction": "data.val_fraction",
        "test_fraction": "data.test_fraction",
        "separator": "data.separator",
    },
    "train": {
        "workdir": "workdir",
        "seed": "seed",
        "resume": "resume",
        "overwrite": "overwrite",
        "micro_batch_size": "data.micro_batch_size",
        "grad_accum_steps": "trainer.accumulate_grad_batches",
        "precision": "trainer.precision",
        "max_steps": "trainer.max_steps",
        "max_time": "trainer.max_time",
        "peak_lr": "optimizer.lr",
        "weight_decay": "optimizer.weight_decay",
        "grad_clip": "trainer.gradient_clip_val",
        "warmup_steps": "schedule.warmup_steps",
        "min_lr": "schedule.min_lr",
        "eval_interval": "eval_interval",
        "ckpt_interval": "ckpt_interval",
        "log_interval": "log_interval",
        "sample_prefix": "sample.prefix",
        "sample_tokens": "sample.tokens",
        "wandb_project": "wandb.project",
        "wandb_entity": "wandb.entity",
        "wandb_run_name": "wandb.run_name",
        "wandb_tags": "wandb.tags",
        "wandb_mode": "wandb.mode",
    },
    "eval": {
        "workdir": "workdir",
        "checkpoint": "checkpoint",
        "split": "split",
        "json": "json",
        "batch_size": "batch_size",
        "device": "device",
    },
    "bench": {
        "input": "input",
        "workdir": "workdir",
        "steps": "steps",
        "rounds": "rounds",
        "log_interval": "log_interval",
        "seq_len": "seq_len",
        "batch": "batch",
        "budgets": "budgets",
        "prepare_gb": "prepare_gb",
        "output": "output",
    },
    "sample": {
        "workdir": "workdir",
        "checkpoint": "checkpoint",
        "prompt": "prompt",
        "max_new_tokens": "max_new_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "num_samples": "num_samples",
        "seed": "seed",
        "device": "device",
    },
}
# keys whose values are always text, even when they look like numbers (a prompt of "42")
TEXT_KEYS = {
    "wandb.tags",
    "input",
    "workdir",
    "checkpoint",
    "split",
    "prompt",
    "sample.prefix",
    "data.separator",
    "wandb.project",
    "wandb.entity",
    "wandb.run_name",
    "wandb.mode",
    "trainer.max_time",
    "trainer.precision",
    "device",
    "output",
    "train",
}
# Hydra's own command-line flags, passed through unchanged (True: takes a value)
HYDRA_FLAGS = {
    "-m": False,
    "--multirun": False,
    "-h": False,
    "--help": False,
    "--hydra-help": False,
    "--version": False,
    "--resolve": False,
    "-r": False,
    "--run": False,
    "-sc": False,
    "--shell-completion": False,
    "-c": True,
    "--cfg": True,
    "-p": True,
    "--package": True,
    "-cp": True,
    "--config-path": True,
    "-cn": True,
    "--config-name": True,
    "-cd": True,
    "--config-dir": True,
    "--experimental-rerun": True,
    "-i": None,
    "--info": None,  # optional value
}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
BOOL_WORDS = {
    "true": "true",
    "yes": "true",
    "on": "true",
    "1": "true",
    "false": "false",
    "no": "false",
    "off": "false",
    "0": "false",
    "auto": "auto",
}
NUMBER = r"[-+]?([0-9][0-9_.eE+-]*|inf|nan)"
PLAIN_VALUE = re.compile(rf"^{NUMBER}(,{NUMBER})*$|^(true|false|null)$")
SWEEP_FUNCTION = re.compile(r"^(range|choice|interval|glob|tag|shuffle|sort)\(.*\)$")


def conf_dir() -> Path:
    """conf/ beside the package in a clone or editable install; carlos/conf inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise CarlosError(f"carlos's configs are missing (looked in {here / 'conf'}); reinstall carlos")


def hydra_quote(value: str) -> str:
    """Quote text for Hydra's override grammar so that the config receives exactly `value`: spaces,
    commas, quotes, backslashes, Windows paths and a literal '${' included."""
    if "${" in value:  # OmegaConf would read it as an interpolation: escape it, keeping backslashes before it
        value = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    # Hydra's quoted strings: \' is a quote; backslashes before a quote or at the end are doubled
    value = re.sub(r"(\\*)('|\Z)", lambda m: "\\" * (2 * len(m.group(1))) + ("\\'" if m.group(2) else ""), value)
    return f"'{value}'"


# ---------------------------------------------------------------- composing without running


def prefer_carlos_hydra_configs() -> None:
    """conf/hydra/<group>/<name>.yaml (the Optuna sweeper's search space, the SLURM launcher's settings)
    replace the plugins' registered configs of the same name. Hydra would otherwise use the registered
    one as the file's schema: deprecated since Hydra 1.1, and refused when that schema has a defaults
    list, as Optuna's has. The plugins register when Hydra's plugin scan runs their modules, once a
    process: so the scan runs here first, then the entries that carlos's files replace are dropped."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the scan (later calls return the same instance and do not scan again)
    root = conf_dir() / "hydra"
    for path in root.rglob("*.yaml"):
        node = ConfigStore.instance().repo.get("hydra", {})
        for part in path.relative_to(root).parent.parts:
            node = node.get(part, {})
        node.pop(path.name, None)


def compose(command: str, overrides: list[str], with_hydra: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    prefer_carlos_hydra_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name=command, overrides=overrides, return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()


def flat_keys(cfg, prefix: str = "") -> dict[str, Any]:
    from omegaconf import DictConfig

    out = {}
    for k in cfg:
        node = cfg._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(node, DictConfig):
            out.update(flat_keys(node, full + "."))
        else:
            out[full] = node._value()
    return out


def _group_options(group: str) -> list[str]:
    """The options Hydra knows for a config group: carlos's files, Hydra's own and its plugins'."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    prefer_carlos_hydra_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    finally:
        GlobalHydra.instance().clear()


def _explain_hydra_error(e: Exception, keys: list[str]) -> str:
    msg = str(e).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        public = [k for k in keys if not k.rsplit(".", 1)[-1].startswith("_")]
        return f"unknown key '{key}'{nearest(key, public)}; see the keys with --cfg job"
    m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", msg)
    if m:
        group, option = m.groups()
        options = _group_options(group)
        return f"unknown {group} '{option}'{nearest(option, options)}; choose {group}={'|'.join(options)}"
    return first


def check_output_dir(key: str, value: str) -> list[Path]:
    """Hydra creates its run (or sweep) directory before the command starts: make sure it can, by
    creating it now and removing again what this made. Returns the directories Hydra will create, for
    removing again (when empty) if the command is refused."""
    path = Path(value).expanduser()
    if path.is_dir():
        return []
    if os.path.lexists(path):
        raise CarlosError(f"{key}={value} is a file, not a directory; give a directory")
    made, p = [], Path(os.path.abspath(path))
    while not os.path.lexists(p):
        made.append(p)
        p = p.parent
    try:
        for d in reversed(made):
            os.mkdir(d)
    except OSError as e:
        raise CarlosError(f"{key}={value} cannot be created ({e.strerror}); give a directory that can") from None
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return made


def validate(command: str, overrides: list[str], keys: list[str], hydra_args: tuple[str, ...] = ()) -> list[Path]:
    """Compose the config the run will get and check it against its schema, before Hydra creates any
    directory: a typo costs a second, and a refused command writes nothing. In a sweep, each swept
    key is checked with its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from carlos import config as schemas

    parser = OverridesParser.create()
    single = []
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CarlosError(
                f"cannot parse override {text!r}: {first}; quote values with spaces or commas, e.g. key='a, b'"
            ) from None
        key = o.get_key_element()
        if key.startswith(("hydra.sweeper.params", "+hydra.sweeper.params")):
            continue  # the sweeper's search space, read by the sweeper itself
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                continue
            text = f"{key}={first}"
        single.append(text)
    try:
        cfg = compose(command, single, with_hydra=True)
    except CarlosError:
        raise
    except Exception as e:
        raise CarlosError(_explain_hydra_error(e, keys)) from None
    multirun = any(a in ("-m", "--multirun") for a in hydra_args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        output_dir = str(OmegaConf.select(cfg, key, throw_on_missing=True))
    except OmegaConfBaseException as e:
        raise CarlosError(f"invalid value for '{key}': {str(e).splitlines()[0]}; write a literal $ as \\$") from None
    made = check_output_dir(key, output_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    schema = {
        "bench": schemas.BenchConfig,
        "prepare": schemas.PrepareConfig,
        "train": schemas.TrainConfig,
        "eval": schemas.EvalConfig,
        "sample": schemas.GenerateConfig,
    }[command]
    parsed = schemas.parse(cfg, schema)
    slurm = any(o.replace(" ", "") == "hydra/launcher=submitit_slurm" for o in overrides)
    if command == "train" and multirun and not slurm and parsed.trainer.several_processes:
        parsed.trainer.refuse_in_sweep()
    return made


# ---------------------------------------------------------------- seed flags -> overrides


def _format(key: str, value: str, default: Any) -> str:
    if key in TEXT_KEYS or isinstance(default, str):
        return f"{key}={hydra_quote(value)}"
    if PLAIN_VALUE.match(value) or SWEEP_FUNCTION.match(value):
        return f"{key}={value}"
    return f"{key}={hydra_quote(value)}"


def translate(command: str, args: list[str], defaults: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(Hydra flags, overrides) for the seed-style and Hydra-style arguments of one command;
    defaults maps every config key to its default value."""
    leaves: dict[str, list[str]] = {}
    for key in defaults:
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    hydra_args: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in HYDRA_FLAGS:
            i = _hydra_flag(arg, args, i, hydra_args)
        elif not arg.startswith("--"):
            overrides.append(arg)  # key=value, group=option, +key=value: Hydra's grammar
        else:
            name, eq, inline = arg[2:].partition("=")
            key = _flag_key(command, name, defaults, leaves)
            override, i = _flag_override(key, name, defaults.get(key), inline if eq else None, args, i)
            overrides.append(override)
    return hydra_args, overrides


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


def _flag_key(command: str, name: str, defaults: dict[str, Any], leaves: dict[str, list[str]]) -> str:
    """The config key of --name: a seed flag, a dotted key, or a leaf name that is unique."""
    flags = SEED_FLAGS[command]
    if command == "train" and name == "seq_len":
        raise CarlosError("seq_len is fixed when the data is prepared; run carlos prepare --seq_len N")
    if name in flags:
        return flags[name]
    if name in defaults:
        return name
    if len(leaves.get(name, [])) == 1:
        return leaves[name][0]
    match = nearest(name, [*flags, *defaults]).replace("'", "'--", 1)
    raise CarlosError(f"unknown flag --{name}{match}; see: carlos {command} --help")


def _flag_override(key: str, name: str, default: Any, inline: str | None, args: list[str], i: int) -> tuple[str, int]:
    """The override for --name (its value inline, or the words after it from position i); returns it
    and the next position. Booleans take an optional word, lists every word up to the next flag."""
    boolean = isinstance(default, bool) or key == "resume"
    if inline is not None:
        value = inline
    elif boolean:
        value = "true"
        if i < len(args) and not args[i].startswith("-") and "=" not in args[i]:
            value, i = args[i], i + 1
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
        return _format(key, value, default), i
    word = BOOL_WORDS.get(value.lower())
    if word is None or (word == "auto" and key != "resume"):
        choices = "true, false or auto" if key == "resume" else "true or false"
        raise CarlosError(f"--{name} takes {choices}, got {value!r}")
    return f"{key}={word}", i


# ---------------------------------------------------------------- running


def report(e: BaseException) -> None:
    if os.environ.get("CARLOS_DEBUG"):
        traceback.print_exception(e)
    print(f"carlos: error: {e}", file=sys.stderr)


class Stopped(BaseException):
    """SIGTERM asked the command to stop. A BaseException, like KeyboardInterrupt, so that no handler of
    ordinary errors swallows it while every `finally` (temporary files, locks) still runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum)


_stop.carlos_stop = True  # train hands these signals to Lightning's graceful stop, and only these handlers
# the signals whose default action ends the process without a word; SIGINT raises KeyboardInterrupt anyway
STOP_SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, n)]


def fail(e: BaseException) -> None:
    """The failure policy, in one place. A problem the user can fix: one line, exit code 2. A stop asked
    for by a signal: one line, exit code 128 + the signal, as a shell reports it. Anything else is a bug
    in carlos: one line saying so, exit code 1. CARLOS_DEBUG=1 adds the traceback to each."""
    if isinstance(e, CarlosError):
        report(e)
        sys.exit(2)
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        # the reader of stdout went away (carlos sample | head): stop quietly, as other command-line tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a process that SIGPIPE ended
    if os.environ.get("CARLOS_DEBUG"):
        traceback.print_exception(e)
    if isinstance(e, (KeyboardInterrupt, Stopped)):
        name = "Ctrl+C" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"carlos: stopped by {name}; nothing half-written was left", file=sys.stderr)
        sys.exit(128 + (signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signum))
    what = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    print(
        f"carlos: error: unexpected {what}; this is a bug in carlos, please report it with the output of "
        "CARLOS_DEBUG=1",
        file=sys.stderr,
    )
    sys.exit(1)


def guarded(fn: Callable, *args: Any) -> Any:
    """fn(*args) under the failure policy (SystemExit passes: it is already an exit code)."""
    try:
        return fn(*args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every way out goes through fail()
        fail(e)


def _runner(command: str) -> Callable:
    if command == "prepare":
        from carlos.config import PrepareConfig, parse
        from carlos.prepare import prepare

        def run(cfg):
            rec = prepare(parse(cfg, PrepareConfig))
            mb = rec["size"] / 1e6
            print(
                f"prepared {cfg.workdir}: "
                + ", ".join(
                    f"{s} {rec['splits'][s]['bytes']:,} bytes -> {rec['windows'][s]:,} windows"
                    for s in ("train", "val", "test")
                )
                + f" of {rec['seq_len'] + 1} tokens ({rec['dtype']}); {mb:,.1f} MB in {rec['seconds']:.1f} s "
                f"({mb / rec['seconds']:,.1f} MB/s)"
            )

        return run
    if command == "train":
        from carlos.train import train

        return train
    if command == "bench":
        from carlos.bench import bench
        from carlos.config import BenchConfig, parse

        return lambda cfg: bench(parse(cfg, BenchConfig))
    if command == "eval":
        from carlos.config import EvalConfig, parse
        from carlos.evaluate import evaluate

        return lambda cfg: evaluate(parse(cfg, EvalConfig))
    from carlos.config import GenerateConfig, parse
    from carlos.generate import sample

    return lambda cfg: sample(parse(cfg, GenerateConfig))


def _sweep_job(runner: Callable, cfg) -> Any:
    """One job of a multirun: its outcome goes to job.json in its directory, and a failure does not end
    the sweep (Hydra's basic sweeper would stop at the first failed job's exception once the batch is
    done, and skip its end-of-sweep callbacks). A failed job returns NaN, which Optuna records as a
    failed trial."""
    import json
    import math

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    record: dict[str, Any] = {"job": hc.job.num, "overrides": list(hc.overrides.task), "status": "ok"}
    earlier = _written(out)
    try:
        value = runner(cfg)
        if isinstance(value, float) and math.isfinite(value):
            record["objective"] = value
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded, the sweep goes on
        why = str(e) if isinstance(e, CarlosError) else f"{type(e).__name__}: {e}"
        record.update(status="failed", error=why.splitlines()[0] if why else type(e).__name__)
        print(f"carlos: job {hc.job.num} failed: {record['error']}", file=sys.stderr)
        value = float("nan")
        REFUSED[hc.job.num] = record
        if earlier is not None and _written(out) == earlier:
            # refused before it wrote anything, in the directory of an earlier sweep's job: its results stay
            return value
        log = "".join(traceback.format_exception(e)).encode("utf-8")
        with contextlib.suppress(CarlosError):  # the job's result matters more than its traceback
            Manifest(out).write(out / "error.log", lambda f: f.write(log))
    try:
        Manifest(out).write(out / "job.json", lambda f: f.write((json.dumps(record) + "\n").encode("utf-8")))
    except CarlosError as e:
        print(f"carlos: job {hc.job.num}: {e}", file=sys.stderr)
    return value


def _written(job_dir: Path) -> tuple[int, int] | None:
    """(size, mtime) of a job directory's record of written files, None before its first job wrote there."""
    try:
        st = os.stat(job_dir / RECORD)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


REFUSED: dict[int, dict] = {}  # this process's failed jobs, for the summary (an earlier job.json may stay)


FAILED_JOBS: list[dict] = []  # filled by SweepSummary at the end of a multirun; main() exits 1 if any


class SweepSummary(HydraCallback):
    """Hydra callback (conf/train.yaml, hydra.callbacks): at the end of a multirun, one line a job from
    the job.json files, failed jobs with their reason, and the best objective. Reads the files rather
    than Hydra's job returns, which a launcher like submitit runs in other processes."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        """A new sweep directory inside the workdir is recorded as carlos's before Hydra creates it, so that
        `prepare --overwrite` can remove the runs trained on the old data."""
        sweep, workdir = Path(str(config.hydra.sweep.dir)), Path(str(config.workdir)).expanduser()
        REFUSED.clear()
        if not workdir.is_dir() or os.path.lexists(sweep):
            return
        with contextlib.suppress(CarlosError):  # unrecorded, it is only left in place by a later prepare
            manifest = Manifest(workdir)
            if manifest.rel(sweep) not in (None, "."):
                # the directory, Hydra's multirun.yaml and submitit's logs; each job keeps its own record
                manifest.claim(sweep, kind="dir")
                manifest.claim(sweep / "multirun.yaml")
                manifest.claim(sweep / ".submitit", kind="tree")

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        import json

        sweep = Path(str(config.hydra.sweep.dir))
        jobs = []
        for d in sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            job = {"job": int(d.name), "overrides": [], "status": "failed", "error": "no result"}
            try:
                found = json.loads(read_regular(d / "job.json", "skipped"))
                if isinstance(found, dict) and found.get("job") == job["job"]:
                    job = {**job, **found}
            except (CarlosError, ValueError):  # missing, or cut short by a kill
                pass
            jobs.append(REFUSED.get(job["job"], job))
        # name each job by the overrides that differ between the jobs: the swept ones
        shared = set.intersection(*(set(j["overrides"]) for j in jobs if j["overrides"])) if jobs else set()
        name = lambda j: " ".join(o for o in j["overrides"] if o not in shared or len(jobs) == 1)  # noqa: E731
        failed = [j for j in jobs if j["status"] != "ok"]
        FAILED_JOBS[:] = failed
        print(f"sweep {sweep}: {len(jobs)} jobs, {len(jobs) - len(failed)} finished, {len(failed)} failed")
        for j in jobs:
            what = f"  job {j['job']} ({name(j) or 'no overrides'}): "
            if j["status"] != "ok":
                print(what + f"FAILED: {j['error']}")
            elif "objective" in j:
                print(what + f"best val bpb {j['objective']:.4f}")
            else:
                print(what + "done")
        scored = [j for j in jobs if "objective" in j]
        if scored:
            best = min(scored, key=lambda j: j["objective"])
            print(f"best: job {best['job']} ({name(best)}), val bpb {best['objective']:.4f}")


def run_hydra(command: str, hydra_args: list[str], overrides: list[str]) -> Any:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    runner = _runner(command)

    def task(cfg):
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return _sweep_job(runner, cfg)
        return guarded(runner, cfg)  # here, or Hydra would print its own report of the exception

    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name=command)(task)
    argv = sys.argv
    sys.argv = [argv[0], *hydra_args, *overrides]
    # Lightning's DDP re-runs this command line for the other ranks without the command's name
    os.environ["CARLOS_COMMAND"] = command
    FAILED_JOBS.clear()
    prefer_carlos_hydra_configs()
    try:
        result = app()
    finally:
        sys.argv = argv
    if FAILED_JOBS:
        sys.exit(1)
    return result


USAGE = """usage: carlos <command> [--flag value ...] [key=value ...] [-m] [--cfg job] [--help]

commands:
  prepare   split a UTF-8 corpus, byte-level tokens, packed windows   (carlos prepare --input corpus.txt)
  train     train the tiny GPT on a prepared workdir                  (carlos train --max_steps 2000)
  eval      loss, perplexity and bits-per-byte of a checkpoint        (carlos eval --split test)
  sample    generate text from a checkpoint                           (carlos sample --prompt "\\n")
  bench     carlos's training path against a plain PyTorch loop       (carlos bench --input corpus.txt)
  report    table and plot of the runs under a directory              (carlos report carlos_run/sweeps)

`carlos <command> --help` lists the command's flags, config groups and keys."""


def _flag_help(command: str) -> str:
    lines = [f"carlos {command}: seed flags (each maps onto a config key; key=value works too)"]
    for flag, key in SEED_FLAGS[command].items():
        lines.append(f"  --{flag:<18} {key}")
    return "\n".join(lines) + "\n"


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


def main(argv: list[str] | None = None) -> None:
    """`carlos <command>`: everything under the failure policy, with SIGTERM turned into Stopped so that
    a stopped command cleans up after itself (train hands SIGTERM to Lightning once it trains)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:  # a handler someone installed (submitit's) stays
                signal.signal(sig, _stop)
    guarded(_main, list(sys.argv[1:] if argv is None else argv))


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
    defaults = flat_keys(compose(command, []))
    hydra_args, overrides = translate(command, argv[1:], defaults)
    made: list[Path] = []
    if any(a in ("-h", "--help") for a in hydra_args):
        print(_flag_help(command))
    elif not any(a in ("--hydra-help", "--version", "-i", "--info", "-sc", "--shell-completion") for a in hydra_args):
        made = validate(command, overrides, list(defaults), tuple(hydra_args))
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
