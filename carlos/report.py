"""`carlos report DIR`: the runs under DIR (a sweep, a workdir, or one run) in a table, best first, and a
plot of validation bits-per-byte against tokens seen.

A run is any directory holding a metrics.jsonl; its settings come from the config snapshot in .hydra/.
Only the settings that differ between the runs are shown, as resolved values.

Files damaged by a crash, a full disk or a hand edit never stop the report: a run with nothing readable
is skipped and named, damaged lines and settings are left out and noted, and the plot is skipped with its
reason when it cannot be written. The table always comes first, so it is printed whatever the plot does.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import math
import os
import stat
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carlos.config import flatten
from carlos.errors import CarlosError
from carlos.files import kind_of, printable
from carlos.manifest import Manifest
from carlos.ownership import misplaced

NUMBERS = ("step", "tokens", "val_bpb", "tokens_per_s")  # the fields the table and the plot read
NAMING = {"run"}  # settings that only name the run, which the table's first column already shows
UNSHOWN = ("logger.",)  # settings that change where records go, never the run's numbers
UNNAMED = {"hydra", "experiment", "logger"}  # conf/ groups whose options are not a run's whole setting of a key


class Unreadable(Exception):
    """A run with nothing to show; the message says why, for its `skipped:` line."""


@dataclass
class Run:
    path: Path
    name: str
    settings: dict[str, Any]  # {} when the run has no usable config snapshot
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out of a damaged run, one line each

    @property
    def val(self) -> list[dict]:
        return [r for r in self.records if "val_bpb" in r]

    @property
    def best_bpb(self) -> float | None:
        return min((r["val_bpb"] for r in self.val), default=None)

    @property
    def last_step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)

    @property
    def tokens(self) -> int:
        return max((r.get("tokens", 0) for r in self.records), default=0)

    @property
    def tokens_per_s(self) -> float | None:
        rates = [r["tokens_per_s"] for r in self.records if "tokens_per_s" in r]
        return statistics.median(rates) if rates else None


def _text(path: Path) -> str:
    """OSError when path cannot be read or is not a regular file (a FIFO would block the report),
    UnicodeDecodeError (a ValueError) when it is not UTF-8."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"it is {kind_of(st)}")
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def _settings(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The run's flattened config snapshot, or {} and what is wrong with the snapshot."""
    import yaml
    from omegaconf import OmegaConf

    snapshot = run_dir / ".hydra" / "config.yaml"
    if not snapshot.is_file():
        return {}, None
    try:
        text = _text(snapshot)
    except OSError as e:
        return {}, f"cannot be read ({e.strerror})"
    except UnicodeDecodeError:
        return {}, "is not UTF-8 text"
    try:
        # OmegaConf would read a bare word at the top as a key, so ask its YAML parser for the shape first
        if not isinstance(yaml.compose(text, Loader=yaml.SafeLoader), (yaml.MappingNode, type(None))):
            return {}, "is not a mapping of settings"
        cfg = OmegaConf.load(io.StringIO(text))
    except Exception:  # noqa: BLE001 - the YAML parser and OmegaConf's grammar raise many kinds on damaged text
        return {}, "is not valid YAML"
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: show it unresolved
        plain = OmegaConf.to_container(cfg, resolve=False)
    return flatten(plain), None


@functools.cache
def presets() -> dict[str, dict[str, dict[str, Any]]]:
    """{group: {option: its settings, flattened under the keys it sets}} of the config groups in conf/
    whose options each set the whole of the same keys (model, optimizer, schedule, precision)."""
    from omegaconf import OmegaConf

    from carlos.compose import conf_dir

    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(conf_dir().glob("*/*.yaml")):
        group, text = path.parent.name, path.read_text(encoding="utf-8")
        if group not in UNNAMED:
            package = text.split()[2] if text.startswith("# @package ") else group
            settings = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            groups.setdefault(group, {})[path.stem] = flatten({package: settings})
    return groups


def _named(settings: dict[str, Any], groups: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """A run's settings, with {group: option} added for each group whose settings are exactly one option's."""
    named = dict(settings)
    for group, options in groups.items():
        keys = {k for option in options.values() for k in option}
        mine = {k: v for k, v in settings.items() if k in keys}
        same = [name for name, option in options.items() if _same(option) == _same(mine)]
        if same:
            named[group] = same[0]
    return named


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False  # JSON's true and false are ints to Python, but no count or loss
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: no plot could place it
        return False


def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None when it is damaged: not a JSON object, or one of NUMBERS is there
    but is not a finite number."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # garbage, a line cut short, or nested deeper than Python goes
        return None
    if not isinstance(record, dict) or not all(_finite(record[k]) for k in NUMBERS if k in record):
        return None
    return record


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cut_short(tail: str) -> bool:
    """Whether the unterminated last line of a metrics.jsonl is the start of a record."""
    if not tail.startswith("{"):
        return False
    try:
        json.loads(tail)
    except (ValueError, RecursionError):
        return True
    return False


def _records(path: Path) -> tuple[list[dict], int]:
    """The good records of a metrics.jsonl and how many damaged lines were left out; Unreadable when
    there is nothing to show."""
    try:
        text = _text(path)
    except OSError as e:
        raise Unreadable(f"metrics.jsonl cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:  # carlos writes ASCII only, so this is not a metrics file any more
        raise Unreadable("metrics.jsonl is not UTF-8 text") from None
    *lines, tail = text.split("\n")
    if _cut_short(tail):
        tail = ""  # a run's normal end when it crashed, or a record being written right now: not damage
    found = [_record(line) for line in [*lines, tail] if line.strip()]
    good = [r for r in found if r is not None]
    damaged = len(found) - len(good)
    if damaged and not good:
        raise Unreadable(f"no readable record in metrics.jsonl, {_plural(damaged, 'damaged line')}")
    return good, damaged


def _read_run(metrics: Path, name: str) -> Run:
    records, damaged = _records(metrics)
    settings, problem = _settings(metrics.parent)
    run = Run(metrics.parent, name, _named(settings, presets()) if settings else {}, records)
    if damaged:
        run.notes.append(f"{_plural(damaged, 'damaged line')} in metrics.jsonl skipped")
    if problem:
        run.notes.append(f".hydra/config.yaml {problem}; shown without settings")
    return run


def read_runs(root: str | Path) -> tuple[list[Run], list[tuple[str, str]]]:
    """The runs under root that can be read, and (name, why) for each run that cannot; refuses when
    there is no readable run."""
    root = Path(os.path.expanduser(root))
    if not root.exists():
        raise CarlosError(f"{root} does not exist; give a run directory, a workdir or a sweep directory")
    files = sorted(root.rglob("metrics.jsonl"), key=lambda p: [(0, int(s)) if s.isdigit() else (1, s) for s in p.parts])
    runs, skipped = [], []
    for f in files:
        # a name that is not UTF-8 is shown with U+FFFD: the table's stdout and the plot's fonts take text only
        name = printable(f.parent.relative_to(root) if f.parent != root else root.name)
        try:
            runs.append(_read_run(f, name))
        except Unreadable as e:
            skipped.append((name, str(e)))
    if not runs and skipped:
        named = ", ".join(f"{name} ({why})" for name, why in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise CarlosError(f"no readable runs under {root}: {named}{more}")
    if not runs:
        raise CarlosError(f"no runs under {root} (no metrics.jsonl); train first, or point at a workdir")
    return runs, skipped


def find_runs(root: str | Path) -> list[Run]:
    return read_runs(root)[0]


def _same(value: Any) -> str:
    """A key to compare setting values by; a hand-edited snapshot may hold what JSON cannot sort."""
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except TypeError:
        return repr(value)


def differing(runs: list[Run]) -> list[str]:
    """Settings whose values differ between the runs (all of them... none for a single run). Runs without
    settings are left out: their unknown values differ from nothing. Where every run's settings of a group
    are exactly one of its options (model=modern), the group's one column replaces those of its keys;
    otherwise its keys are shown one by one."""
    known = [r for r in runs if r.settings]
    keys = sorted({k for r in known for k in r.settings if not k.startswith(UNSHOWN)} - NAMING)
    keys = [k for k in keys if len({_same(r.settings.get(k)) for r in known}) > 1]
    for group, options in presets().items():  # a group's name, or its keys one by one
        named = all(group in r.settings for r in known)
        owned = {k for option in options.values() for k in option} if named else {group}
        keys = [k for k in keys if k not in owned]
    return keys


def _cell(run: Run, key: str) -> str:
    """A setting as the table and the legend show it: "-" for unset (None) or unknown."""
    value = run.settings.get(key) if run.settings else None
    if value is None:
        return "-"
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def _label(run: Run, keys: list[str]) -> str:
    """The run's name and its differing settings (by their last key part when that is unambiguous),
    wrapped so that a legend of many settings stays narrow."""
    import textwrap

    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k for k in keys}
    settings = ", ".join(f"{short[k]}={_cell(run, k)}" for k in keys)
    return "\n".join(textwrap.wrap(f"{run.name} ({settings})" if keys else run.name, 70))


def _job_line(f: Path) -> str | None:
    """The `failed:` line for one job.json, or None for a job that finished."""
    try:
        job = json.loads(_text(f))
    except OSError as e:
        return f"failed: {printable(f.parent.name)} (job.json cannot be read: {e.strerror})"
    except (ValueError, RecursionError):  # cut short, not JSON, or not UTF-8 (a ValueError too)
        job = None
    overrides = job.get("overrides", []) if isinstance(job, dict) else None
    if not isinstance(job, dict) or not isinstance(job.get("status"), str) or not isinstance(overrides, list):
        return f"failed: {printable(f.parent.name)} (job.json is damaged)"
    if job["status"] == "ok":
        return None
    why = " ".join(str(job.get("error", "no reason recorded")).splitlines())  # one line, whatever was written
    return f"failed: {printable(f.parent.name)} ({' '.join(str(o) for o in overrides)}): {why}"


def failed_jobs(root: Path) -> list[str]:
    """Sweep jobs that ended without a run (their job.json says why)."""
    lines = (_job_line(f) for f in sorted(Path(os.path.expanduser(root)).rglob("job.json")))
    return [line for line in lines if line]


def table(runs: list[Run]) -> str:
    keys = differing(runs)
    ranked = sorted(runs, key=lambda r: (r.best_bpb is None, r.best_bpb or 0.0))
    head = ["run", *keys, "steps", "tokens", "best val bpb", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        cells = [
            r.name,
            *(_cell(r, k) for k in keys),
            f"{r.last_step:,}",
            f"{r.tokens:,}",
            f"{r.best_bpb:.4f}" if r.best_bpb is not None else "-",
            f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(runs: list[Run]):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    keys = differing(runs)
    labels = {r.path: _label(r, keys) for r in runs}  # by path: two names may print the same
    legend_lines = sum(label.count("\n") + 1 for label in labels.values())
    # the legend gets an area of its own below the plot, as tall as its lines: it never covers a curve
    fig, (ax, below) = plt.subplots(
        2, 1, figsize=(8, 5 + 0.17 * legend_lines), height_ratios=[5, 0.17 * legend_lines + 0.01]
    )
    below.axis("off")
    for r in runs:
        val = [v for v in r.val if "tokens" in v]
        if not val:
            continue
        (line,) = ax.plot([v["tokens"] for v in val], [v["val_bpb"] for v in val], marker=".", label=labels[r.path])
        train = [t for t in r.records if "tokens" in t and _finite(t.get("train_loss"))]
        if train:  # nats per token -> bits per token, which is bits per byte for byte tokens
            bits = [t["train_loss"] / math.log(2) for t in train]
            ax.plot([t["tokens"] for t in train], bits, color=line.get_color(), alpha=0.35, linewidth=1)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("bits per byte: validation (dots), train (faint)")
    ax.set_title("carlos runs")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        below.legend(*ax.get_legend_handles_labels(), fontsize="small", loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def _save(fig, path: Path, fmt: str) -> None:
    """Through carlos's record of what it wrote (carlos/manifest.py), as a plot: only a plot an earlier
    report wrote is ever replaced, and through a temporary file, so a write that fails halfway (disk
    full) leaves neither half a plot nor a damaged older one."""
    inside = misplaced(path.parent, None)  # a plot beside a directory's own outputs would be taken for one
    if inside:
        raise CarlosError(f"{path.parent} {inside}; pass another --output")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = Manifest(path.parent, where="--output")
    if os.path.lexists(path) and record.entries.get(record.rel(path)) != "plot":
        raise CarlosError(f"{path} exists and carlos report did not write it; pass another --output")
    record.write(path, lambda f: fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight"), kind="plot")


def _why(e: Exception, path: Path) -> str:
    if isinstance(e, (FileExistsError, NotADirectoryError)):  # from mkdir: a file where a folder should be
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        return f"{blocker} is a file, not a folder"
    if isinstance(e, OSError):
        return f"{path}: {e.strerror or e}"
    return f"{path}: {(str(e).splitlines() or [type(e).__name__])[0]}"  # a backend's own complaint (pgf: no LaTeX)


def plot(runs: list[Run], path: Path) -> tuple[Path | None, str]:
    """Write the plot to path, in the format its extension names, else PNG whatever the name; returns the
    path written (None when it could not be) and the line that says so."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # an extra: the table is the report, the plot an addition
        return None, "plot: skipped (matplotlib is not installed; pip install 'carlos[plot]')"
    if path.is_dir():
        return None, f"plot: skipped ({path} is a directory)"
    fig = _figure(runs)
    named = path.suffix[1:].lower()
    fmt = named if named in fig.canvas.get_supported_filetypes() else "png"
    try:
        _save(fig, path, fmt)
    except CarlosError as e:
        return None, f"plot: skipped ({e})"
    except (OSError, RuntimeError) as e:
        return None, f"plot: skipped ({_why(e, path)})"
    finally:
        plt.close(fig)
    return path, f"plot: {path}" + ("" if fmt == named else f" ({fmt.upper()})")


def report(root: str | Path, output: str | Path | None = None) -> tuple[str, Path | None]:
    """Print the table, what was left out of it, and write the plot (default DIR/report.png); returns the
    table and the plot's path (None when it could not be written)."""
    runs, skipped = read_runs(root)
    text = table(runs)
    print(text)
    for r in runs:
        for note in r.notes:
            print(f"note: run {r.name}: {note}")
    for name, why in skipped:
        print(f"skipped: {name} ({why})")
    for line in failed_jobs(Path(root)):
        print(line)
    written, line = plot(runs, Path(output) if output else Path(os.path.expanduser(root)) / "report.png")
    print(printable(line))
    return text, written
