"""Memory-mapped packed splits and the LightningDataModule that serves them.

A batch is fetched with one fancy-indexing read of the memory map (the sampler hands the dataset a
list of window indices), not one Python call per window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from carlos.config import SPLITS, CarlosError
from carlos.tokenizer import ByteTokenizer


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
            info = json.loads(splits.read_text(encoding="utf-8"))
            tokenizer = ByteTokenizer.load(workdir / "tokenizer.json")
        except (OSError, ValueError) as e:
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


class ShuffledBatches(Sampler[list[int]]):
    """Batches drawn from one endless stream of permutations of the windows.

    The stream is perm(seed, 0) + perm(seed, 1) + ...; with several ranks, consecutive batches go to
    consecutive ranks. The position is a number of batches, so a resumed run starts exactly where the
    checkpoint left off (Lightning re-creates the dataloader and does not skip batches by itself).

    With shift (the seq_len), each epoch also draws every window a random start offset inside it and the
    batches hold token start positions (WindowDataset(shifted=True)): the model sees the text cut
    differently in every epoch instead of the same windows over and over, as nanoGPT's random crops do.
    Windows that the next one does not continue (the tail) keep offset 0.
    """

    def __init__(
        self,
        n_windows: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        length: int = 0,
        rank: int = 0,
        world: int = 1,
        shift: int = 0,
        shiftable: int = 0,
    ) -> None:
        self.n, self.batch_size, self.seed = n_windows, batch_size, seed
        self.start, self.length, self.rank, self.world = start, length, rank, world
        self.shift, self.shiftable = shift, shiftable

    def __len__(self) -> int:
        return self.length

    def _epoch(self, e: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + e)
        perm = torch.randperm(self.n, generator=g)
        if not self.shift:
            return perm.tolist()
        offsets = torch.randint(self.shift, (self.n,), generator=g)
        offsets[perm >= self.shiftable] = 0
        return (perm * self.shift + offsets).tolist()

    def __iter__(self):
        step = self.batch_size * self.world
        pos = (self.start * self.world + self.rank) * self.batch_size  # index into the endless stream
        epoch, items = -1, None
        for _ in range(self.length - self.start):
            batch = []
            for k in range(pos, pos + self.batch_size):
                e, i = divmod(k, self.n)
                if e != epoch:
                    epoch, items = e, self._epoch(e)
                batch.append(items[i])
            yield batch
            pos += step


def eval_batches(n_windows: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Every window exactly once, in order, split across ranks without padding."""
    mine = list(range(rank, n_windows, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def eval_loader(dataset: WindowDataset, batch_size: int, rank: int = 0, world: int = 1) -> DataLoader:
    return DataLoader(dataset, sampler=eval_batches(len(dataset), batch_size, rank, world), batch_size=None)


class ByteDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: PreparedData,
        micro_batch_size: int,
        eval_batch_size: int,
        seed: int,
        num_workers: int = 0,
        random_offsets: bool = True,
    ) -> None:
        super().__init__()
        self.data = data
        self.random_offsets = random_offsets
        self.micro_batch_size = micro_batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers

    def setup(self, stage: str) -> None:
        self.train_set = self.data.windows("train", shifted=self.random_offsets)
        self.val_set = self.data.windows("val")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        # called after Lightning restored a checkpoint, so global_step is the resumed step
        start = trainer.global_step * accumulate
        # the whole run is one epoch; a run bounded by max_time only gets an endless one
        length = trainer.max_steps * accumulate if trainer.max_steps > 0 else 10**12
        sampler = ShuffledBatches(
            len(self.train_set),
            self.micro_batch_size,
            self.seed,
            start=start,
            length=max(length, start),
            rank=trainer.global_rank,
            world=trainer.world_size,
            shift=self.train_set.seq_len if self.random_offsets else 0,
            shiftable=self.train_set.shiftable,
        )
        return DataLoader(
            self.train_set,
            sampler=sampler,
            batch_size=None,
            num_workers=self.num_workers,
            # a private generator: creating the iterator must not draw from the global RNG
            generator=torch.Generator(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        return eval_loader(self.val_set, self.eval_batch_size, t.global_rank, t.world_size)
