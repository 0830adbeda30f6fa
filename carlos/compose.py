"""Hydra composition and validation: the config a command will get, composed from conf/ and checked
against its schema before Hydra creates any directory, so that a typo costs a second and a refused
command writes nothing."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from carlos.config import SCHEMAS, config_keys, parse, unknown_key
from carlos.errors import CarlosError, first_line, nearest


def conf_dir() -> Path:
    """conf/ beside the package in a clone or editable install; carlos/conf inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise CarlosError(f"carlos's configs are missing (looked in {here / 'conf'}); reinstall carlos")


def ready_hydra() -> None:
    """Hydra made ready for carlos, before it reads an override or a config:
    - conf/hydra/<group>/<name>.yaml (the Optuna sweeper's search space, the SLURM launcher's settings)
      replace the plugins' registered configs of the same name. Hydra would otherwise use the registered
      one as the file's schema: deprecated since Hydra 1.1, and refused when that schema has a defaults
      list, as Optuna's has. The plugins register when Hydra's plugin scan runs their modules, once a
      process: so the scan runs here first, then the entries that carlos's files replace are dropped.
    - each override is parsed once, and a list in one (prepare's many files) in time linear in its length
      (private.parse_overrides_fast)."""
    from hydra.core.plugins import Plugins

    from carlos.private import drop_registered, parse_overrides_fast

    parse_overrides_fast()
    Plugins.instance()  # the scan (later calls return the same instance and do not scan again)
    root = conf_dir() / "hydra"
    for path in root.rglob("*.yaml"):
        drop_registered(path.relative_to(root).parent.parts, path.name)


@contextlib.contextmanager
def _hydra():
    """Hydra initialized on conf/ for the length of the block, and cleared again after it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    ready_hydra()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()


def compose(command: str, overrides: list[str], with_hydra: bool = False):
    """The config `carlos <command> <overrides>` gets (with Hydra's own node when with_hydra)."""
    from hydra import compose as hydra_compose

    with _hydra():
        return hydra_compose(config_name=command, overrides=overrides, return_hydra_config=with_hydra)


def set_by(key: str, value) -> str:
    """`key=value` as the user can find it: named by the experiment preset that set it, when the running
    job's command line chose one and did not set the key itself (the user never typed that key)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    said = f"{key}={value}"
    if not HydraConfig.initialized():
        return said
    job = HydraConfig.get()
    experiment = job.runtime.choices.get("experiment")
    typed = any(o.lstrip("+~").split("=", 1)[0] == key for o in job.overrides.task)
    preset = conf_dir() / "experiment" / f"{experiment}.yaml"
    if not experiment or typed or (preset.is_file() and OmegaConf.select(OmegaConf.load(preset), key) is None):
        return said
    return f"experiment={experiment} sets {said}"


def group_options(group: str) -> list[str]:
    """The options Hydra knows for a config group: carlos's files, Hydra's own and its plugins'."""
    with _hydra() as hydra:
        return sorted(hydra.config_loader().get_group_options(group))


def _explain_hydra_error(e: Exception, keys: list[str], show_keys: str = "--cfg job") -> str:
    msg = str(e).strip()
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        public = [k for k in keys if not k.rsplit(".", 1)[-1].startswith("_")]
        message = unknown_key(m.group(1), public)
        return f"{message}; see the keys with {show_keys}" if message.startswith("unknown key") else message
    m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", msg)
    if m:
        group, option = m.groups()
        options = group_options(group)
        return f"unknown {group} '{option}'{nearest(option, options)}; choose {group}={'|'.join(options)}"
    return first_line(e)


def _no_option(command: str, overrides: list[str]) -> str | None:
    """The refusal of a config group given no option (logger=null, logger=, logger=[csv,null]), which
    Hydra reports naming neither the group nor its options; None when no override is one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        value = override.value()
        values = value if isinstance(value, list) else [value]
        if not any(v is None or v == "" for v in values):
            continue
        group, empty = override.key_or_group, "null" if None in values else "''"
        options = group_options(group)
        if options:
            default = compose(command, [], with_hydra=True).hydra.runtime.choices.get(group) or "none"
            return (
                f"{text}: {empty} is not a {group}; choose {group}={'|'.join(options)}, or leave out {group}= "
                f"for its default ({default})"
            )
    return None


def check_output_dir(key: str, value: str) -> list[Path]:
    """Hydra creates its run (or sweep) directory before the command starts: make sure it can, by
    creating it now and removing again what this made. Returns the directories Hydra will create, for
    removing again (when empty) if the command is refused."""
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        return []
    if os.path.lexists(path):
        raise CarlosError(f"{key}={value} is a file, not a directory; give a directory")
    made, p = [], Path(os.path.abspath(path))
    while not os.path.lexists(p):
        made.append(p)
        p = p.parent
    times = os.stat(p) if os.path.isdir(p) else None
    try:
        for d in reversed(made):
            os.mkdir(d)
    except OSError as e:
        raise CarlosError(f"{key}={value} cannot be created ({e.strerror}); give a directory that can") from None
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        with contextlib.suppress(OSError):  # a refused command leaves even the directory's times as they were
            if times and not os.path.lexists(made[-1]):
                os.utime(p, ns=(times.st_atime_ns, times.st_mtime_ns))
    return made


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job: each swept key with its first value; the sweeper's search
    space (hydra.sweeper.params) left to the sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ready_hydra()
    parser = OverridesParser.create()
    single = []
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors come in several types
            raise CarlosError(
                f"cannot parse override {text!r}: {first_line(e)}; quote values with spaces or commas, e.g. key='a, b'"
            ) from None
        key = o.get_key_element()
        if key.startswith(("hydra.sweeper.params", "+hydra.sweeper.params")):
            continue
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                continue
            text = f"{key}={first}"
        single.append(text)
    return single


def validate(command: str, overrides: list[str], keys: list[str], multirun: bool = False) -> list[Path]:
    """Compose the config the run will get and check it against its schema, before Hydra creates any
    directory. In a sweep, each swept key is checked with its first value. Returns the directories
    Hydra will create (check_output_dir)."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    cfg = composed(command, _first_of_each_sweep(overrides), keys, with_hydra=True)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        output_dir = str(OmegaConf.select(cfg, key, throw_on_missing=True))
    except OmegaConfBaseException as e:
        raise CarlosError(f"invalid value for '{key}': {first_line(e)}; write a literal $ as \\$") from None
    made = check_output_dir(key, output_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    check(command, cfg, overrides, multirun)
    return made


def composed(command: str, overrides: list[str], keys: list[str], with_hydra: bool = False):
    """compose(), its failure told in one line that says what to fix (keys: the command's config keys)."""
    try:
        return compose(command, overrides, with_hydra=with_hydra)
    except CarlosError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra reports composition errors in several types
        raise CarlosError(_no_option(command, overrides) or _explain_hydra_error(e, keys)) from None


def check(command: str, cfg, overrides: list[str], multirun: bool = False) -> None:
    """A composed config (without Hydra's node) against the command's schema, and the rules across keys
    that hold before anything runs."""
    parsed = parse(cfg, SCHEMAS[command])
    slurm = any(o.replace(" ", "").startswith("hydra/launcher=submitit_slurm") for o in overrides)  # or _cpu
    if command == "train" and multirun:
        parsed.check_in_sweep(ranks_started=slurm)
    if command == "bench":
        for name in ("train", "against"):
            _check_train_overrides(name, [str(o) for o in getattr(parsed, name)])


def _check_train_overrides(name: str, overrides: list[str]) -> None:
    """bench's train and against lists, overrides of its carlos train runs: checked as train checks its
    own, before the bench prepares anything (its runs would refuse them only minutes later)."""
    if not overrides:
        return
    flag = next((o for o in overrides if o.startswith("-")), None)
    if flag is not None:
        raise CarlosError(
            f"bench's {name} list takes carlos train's overrides as key=value, not the flag {flag!r}; e.g. "
            f"{name}=['trainer.precision=bf16-mixed'] (or --{name} trainer.precision=bf16-mixed)"
        )
    try:
        try:
            cfg = compose("train", overrides)
        except Exception as e:  # noqa: BLE001 - Hydra reports composition errors in several types
            keys = list(config_keys(compose("train", [])))
            raise CarlosError(_explain_hydra_error(e, keys, "carlos train --cfg job")) from None
        parse(cfg, SCHEMAS["train"])
    except CarlosError as e:
        raise CarlosError(f"bench's {name} list: {e}") from None
