"""A prepared workdir read back: splits.json, tokenizer.json and the memory-mapped data/*.npy windows
(the layout of the directories carlos writes is carlos/ownership.py's).

Apart from the Lightning DataModule (carlos/data.py), and without importing torch until a batch is
fetched, so that eval refuses a workdir before torch loads, and train before Lightning does.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carlos.config import SPLITS
from carlos.errors import CarlosError
from carlos.files import read_regular
from carlos.lock import preparing
from carlos.tokenizer import BYTES, ByteTokenizer

if typing.TYPE_CHECKING:
    import torch


def unprepared(workdir: Path, why: str) -> CarlosError:
    """A workdir without (whole) prepared data: being prepared right now (prepare swaps its files in, and
    holds the workdir's lock alone meanwhile), or to be prepared."""
    holder = preparing(workdir)
    if holder is not None:
        return CarlosError(f"workdir {workdir} is being prepared by {holder}; wait for it to finish")
    return CarlosError(f"workdir {workdir} {why}; run: carlos prepare --input corpus.txt --workdir {workdir}")


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
        workdir = Path(os.path.expanduser(workdir))
        splits = workdir / "splits.json"
        if not splits.is_file():
            raise unprepared(workdir, "is not prepared (no splits.json)")
        try:
            hint = f"run: carlos prepare --input corpus.txt --workdir {workdir}"
            info = json.loads(read_regular(splits, hint))
            tokenizer = ByteTokenizer.from_dict(json.loads(read_regular(workdir / "tokenizer.json", hint)))
            if not isinstance(info, dict):
                raise ValueError("splits.json is not a record")
        except (OSError, ValueError, AttributeError) as e:
            raise unprepared(workdir, f"is half-prepared or damaged ({e})") from None
        missing = [s for s in SPLITS if not (workdir / "data" / f"{s}.npy").is_file()]
        if missing:
            raise unprepared(workdir, f"is half-prepared (data/{missing[0]}.npy is missing)")
        data = cls(workdir, info, tokenizer)
        try:
            for split in SPLITS:  # a damaged split is refused now, not after a run has started writing
                data.windows(split)
            if "sha256" not in info:
                raise KeyError("sha256")
        except (KeyError, TypeError, ValueError) as e:
            raise unprepared(workdir, f"is damaged (splits.json: bad or missing {e})") from None
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


class WindowDataset:
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

    def stream(self, last: int | None = None) -> np.ndarray:
        """The split's tokens in order, as one array (the windows without their overlaps); with `last`, only
        its last tokens (read from the windows they are in, not from the whole split)."""
        n, L = len(self.windows), self.seq_len
        first = 0 if last is None else max(0, n - 2 - -(-last // L))  # the first window `last` reaches into
        n_tokens = (n - first) * L + 1 - max(self.tail_overlap, 0)
        tokens = np.empty(n_tokens, dtype=self.windows.dtype)
        tokens[: (n - 1 - first) * L] = np.asarray(self.windows[first : n - 1, :L]).reshape(-1)
        tokens[n_tokens - (L + 1) :] = self.windows[n - 1]  # the last window, right-aligned on the end
        return tokens if last is None else tokens[max(0, n_tokens - last) :]

    def text(self, last: int | None = None) -> bytes:
        """The split's text as bytes (BOS and EOS left out), or the text of its last `last` tokens."""
        tokens = self.stream(last)
        return tokens[tokens < BYTES].astype(np.uint8).tobytes()

    def __getitem__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

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
