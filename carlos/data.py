"""The LightningDataModule that serves the packed splits (carlos/workdir.py reads them), and its samplers.

A batch is fetched with one fancy-indexing read of the memory map (the sampler hands the dataset a
list of window indices), not one Python call per window.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from carlos.config import TrainDataConfig
from carlos.workdir import PreparedData, WindowDataset


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
    """The prepared splits as batches: `data`'s settings (micro_batch_size, eval_batch_size, num_workers,
    random_offsets) and the run's seed."""

    def __init__(self, prepared: PreparedData, data: TrainDataConfig, seed: int) -> None:
        super().__init__()
        self.prepared, self.seed = prepared, seed
        self.random_offsets, self.num_workers = data.random_offsets, data.num_workers
        self.micro_batch_size, self.eval_batch_size = data.micro_batch_size, data.eval_batch_size

    def setup(self, stage: str) -> None:
        self.train_set = self.prepared.windows("train", shifted=self.random_offsets)
        self.val_set = self.prepared.windows("val")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        # called after Lightning restored a checkpoint, so global_step is the resumed step
        start = trainer.global_step * accumulate
        # the whole run is one epoch; a run bounded by max_time only gets an endless one
        length = min(trainer.max_steps * accumulate, 2**62) if trainer.max_steps > 0 else 10**12
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
        trainer = self.trainer
        return eval_loader(self.val_set, self.eval_batch_size, trainer.global_rank, trainer.world_size)
