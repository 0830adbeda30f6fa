"""`carlos report DIR`: the runs under DIR (a sweep, a workdir, or one run) in a table, best first, and a
plot of validation bits-per-byte against tokens seen.

A run is any directory holding a metrics.jsonl; its settings come from the config snapshot in .hydra/.
Only the settings that differ between the runs are shown, as resolved values.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carlos.config import CarlosError


@dataclass
class Run:
    path: Path
    name: str
    settings: dict[str, Any]
    records: list[dict] = field(default_factory=list)

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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _settings(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    snapshot = run_dir / ".hydra" / "config.yaml"
    if not snapshot.is_file():
        return {}
    cfg = OmegaConf.load(snapshot)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: show it unresolved
        plain = OmegaConf.to_container(cfg, resolve=False)
    return _flatten(plain)


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return out


def find_runs(root: Path) -> list[Run]:
    root = Path(root).expanduser()
    if not root.exists():
        raise CarlosError(f"{root} does not exist; give a run directory, a workdir or a sweep directory")
    files = sorted(root.rglob("metrics.jsonl"), key=lambda p: [(0, int(s)) if s.isdigit() else (1, s) for s in p.parts])
    runs = []
    for f in files:
        name = str(f.parent.relative_to(root)) if f.parent != root else root.name
        runs.append(Run(f.parent, name, _settings(f.parent), _records(f)))
    if not runs:
        raise CarlosError(f"no runs under {root} (no metrics.jsonl); train first, or point at a workdir")
    return runs


def differing(runs: list[Run]) -> list[str]:
    """Settings whose values differ between the runs (all of them... none for a single run)."""
    keys = sorted({k for r in runs for k in r.settings})
    return [k for k in keys if len({json.dumps(r.settings.get(k), sort_keys=True) for r in runs}) > 1]


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def failed_jobs(root: Path) -> list[str]:
    """Sweep jobs that ended without a run (their job.json says why)."""
    out = []
    for f in sorted(Path(root).expanduser().rglob("job.json")):
        job = json.loads(f.read_text(encoding="utf-8"))
        if job.get("status") != "ok":
            out.append(f"failed: {f.parent.name} ({' '.join(job.get('overrides', []))}): {job.get('error')}")
    return out


def table(runs: list[Run]) -> str:
    keys = differing(runs)
    ranked = sorted(runs, key=lambda r: (r.best_bpb is None, r.best_bpb or 0.0))
    head = ["run", *keys, "steps", "tokens", "best val bpb", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        cells = [
            r.name,
            *(_cell(r.settings.get(k)) for k in keys),
            f"{r.last_step:,}",
            f"{r.tokens:,}",
            f"{r.best_bpb:.4f}" if r.best_bpb is not None else "-",
            f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    keys = differing(runs)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        val = r.val
        if not val:
            continue
        label = r.name + ("" if not keys else " (" + ", ".join(f"{k}={r.settings.get(k)}" for k in keys) + ")")
        ax.plot([v["tokens"] for v in val], [v["val_bpb"] for v in val], marker=".", label=label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("carlos runs")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(root: str | Path, output: str | Path | None = None) -> tuple[str, Path]:
    """Print the table and write the plot (default DIR/report.png); returns both."""
    runs = find_runs(Path(root))
    text = table(runs)
    png = plot(runs, Path(output) if output else Path(root).expanduser() / "report.png")
    print(text)
    for line in failed_jobs(Path(root)):
        print(line)
    print(f"plot: {png}")
    return text, png
