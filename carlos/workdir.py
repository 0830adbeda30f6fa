"""A workdir's layout (what prepare writes, what a run writes beside it) and a prepared workdir read back:
splits.json, tokenizer.json and the memory-mapped data/*.npy windows.

Apart from the Lightning DataModule (carlos/data.py), so that eval, and train's checks of the workdir,
do not wait for Lightning to import before they can refuse a workdir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from carlos.config import SPLITS
from carlos.errors import CarlosError
from carlos.files import read_regular
from carlos.manifest import Manifest
from carlos.tokenizer import ByteTokenizer

PREPARED = ("splits.json", "tokenizer.json", "rng_state.json")  # beside data/{train,val,test}.npy
# the loggers' directories, each written whole by its library (removed only when a carlos run created it)
LOGGER_DIRS = ("wandb", "csv", "tensorboard")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples", ".hydra", *LOGGER_DIRS)  # what --overwrite removes


def prepared_paths(workdir: Path) -> list[Path]:
    return [workdir / name for name in PREPARED] + [workdir / "data" / f"{s}.npy" for s in SPLITS]


RUNS, SWEEPS = "runs", "sweeps"  # WORKDIR/runs/NAME: the runs named with --run; WORKDIR/sweeps/: sweep jobs


def run_dir(workdir: Path, run: str | None) -> Path:
    """Where a run writes: the workdir itself, or WORKDIR/runs/NAME for --run NAME."""
    return Path(workdir) / RUNS / run if run else Path(workdir)


def runs_outputs(workdir: Path) -> list[Path]:
    """The outputs of the runs trained on a workdir's data: its own run's, its named runs' and its sweeps'."""
    return [*(workdir / name for name in RUN_OUTPUTS), workdir / RUNS, workdir / SWEEPS]


def workdir_has_run(workdir: Path, manifest: Manifest) -> bool:
    """Checkpoints that carlos wrote there: of its own run, a named run or a sweep job trained on its data."""
    return any(
        p.suffix == ".pt" and p.parent.name == "checkpoints"
        for out in (workdir / "checkpoints", workdir / RUNS, workdir / SWEEPS)
        for p in manifest.owned_files(out)
    )


def trained_runs(workdir: Path) -> list[str]:
    """How to name each run of a workdir that has a checkpoint, for eval, sample and export: `--run NAME`
    for a named run, `--checkpoint PATH` for a sweep job's best (or last) checkpoint."""
    found = []
    if any((workdir / "checkpoints").glob("*.pt")):
        found.append("the workdir's own run (no --run)")
    for d in sorted((workdir / RUNS).glob("*/checkpoints")):
        if any(d.glob("*.pt")):
            found.append(f"--run {d.parent.name}")
    for d in sorted((workdir / SWEEPS).glob("*/*/checkpoints"), key=lambda p: (p.parts[-3], _number(p.parts[-2]))):
        best = next((d / n for n in ("best.pt", "last.pt") if (d / n).is_file()), None)
        if best is not None:
            found.append(f"--checkpoint {best}")
    return found


def _number(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 62, name)


@dataclass
class PreparedData:
    """What prepare wrote into a workdir: splits.json, tokenizer.json and data/*.npy."""

    workdir: Path
    info: dict
    tokenizer: ByteTokenizer

    @property
    def seq_len(self) -> int:
        return int(self.info["seq_len"])

    @classmethod
    def load(cls, workdir: str | Path) -> PreparedData:
        workdir = Path(workdir).expanduser()
        splits = workdir / "splits.json"
        hint = f"run: carlos prepare --input corpus.txt --workdir {workdir}"
        if not splits.is_file():
            raise CarlosError(f"workdir {workdir} is not prepared (no splits.json); {hint}")
        try:
            info = json.loads(read_regular(splits, hint))
            tokenizer = ByteTokenizer.from_dict(json.loads(read_regular(workdir / "tokenizer.json", hint)))
            if not isinstance(info, dict):
                raise ValueError("splits.json is not a record")
        except (OSError, ValueError, AttributeError) as e:
            raise CarlosError(f"workdir {workdir} is half-prepared or damaged ({e}); {hint}") from None
        missing = [s for s in SPLITS if not (workdir / "data" / f"{s}.npy").is_file()]
        if missing:
            raise CarlosError(f"workdir {workdir} is half-prepared (data/{missing[0]}.npy is missing); {hint}")
        data = cls(workdir, info, tokenizer)
        try:
            for split in SPLITS:  # a damaged split is refused now, not after a run has started writing
                data.windows(split)
            if "sha256" not in info:
                raise KeyError("sha256")
        except (KeyError, TypeError, ValueError) as e:
            raise CarlosError(f"workdir {workdir} is damaged (splits.json: bad or missing {e}); {hint}") from None
        return data

    def windows(self, split: str, shifted: bool = False) -> WindowDataset:
        path = self.workdir / "data" / f"{split}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CarlosError(f"{path} cannot be read ({e}); prepare the workdir again") from None
        expected = (self.info["windows"][split], self.seq_len + 1)
        if arr.shape != expected:
            raise CarlosError(f"{path} has shape {arr.shape}, splits.json says {expected}; prepare the workdir again")
        return WindowDataset(arr, n_tokens=int(self.info["tokens"][split]), shifted=shifted)


class WindowDataset(Dataset):
    """Windows of seq_len+1 tokens; item = (inputs, targets), fetched for a whole batch at once.

    Indexed by a list of window indices (evaluation), or with shifted=True by a list of token start
    positions p = window * seq_len + offset (training): a shifted window is the end of one packed window
    followed by the start of the next, which the stride-seq_len packing keeps contiguous."""

    def __init__(self, windows: np.ndarray, n_tokens: int, shifted: bool = False) -> None:
        self.windows = windows
        self.shifted = shifted
        n, width = windows.shape
        self.seq_len = width - 1
        # the last window is right-aligned on the split's end when the tokens did not fill it:
        # its first `tail_overlap` targets were already scored by the window before it
        self.tail_overlap = n * self.seq_len - (n_tokens - 1)
        self.tail_index = n - 1
        # windows 0 .. shiftable-1 can start anywhere inside themselves: the next window continues them
        self.shiftable = n - 1 - (self.tail_overlap > 0)

    def __len__(self) -> int:
        return len(self.windows)

    def stream(self) -> np.ndarray:
        """The split's tokens in order, as one array (the windows without their overlaps)."""
        n, L = len(self.windows), self.seq_len
        n_tokens = n * L + 1 - max(self.tail_overlap, 0)
        tokens = np.empty(n_tokens, dtype=self.windows.dtype)
        tokens[: (n - 1) * L] = np.asarray(self.windows[: n - 1, :L]).reshape(-1)
        tokens[n_tokens - (L + 1) :] = self.windows[n - 1]  # the last window, right-aligned on the end
        return tokens

    def __getitem__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        if self.shifted:
            starts = np.asarray(items, dtype=np.int64)
            index, offset = starts // L, starts % L
            rows = np.asarray(self.windows[index], dtype=np.int64)  # (B, L + 1)
            if offset.any():
                after = np.asarray(self.windows[np.minimum(index + 1, len(self.windows) - 1)], dtype=np.int64)
                stream = np.concatenate([rows[:, :L], after], axis=1)  # (B, 2L + 1): tokens from index * L on
                rows = np.take_along_axis(stream, offset[:, None] + np.arange(L + 1), axis=1)
            indices = index.tolist()
        else:
            rows, indices = np.asarray(self.windows[items], dtype=np.int64), items
        w = torch.from_numpy(rows)  # (B, seq_len + 1)
        x, y = w[:, :-1], w[:, 1:].clone()
        if self.tail_overlap > 0:
            for row, i in enumerate(indices):
                if i == self.tail_index and (not self.shifted or items[row] % L == 0):
                    y[row, : self.tail_overlap] = -1
        return x, y
