"""Training batches: random window offsets cut the text anew each epoch and resume exactly."""

import numpy as np
import torch

from carlos.data import ShuffledBatches
from carlos.workdir import PreparedData

from .test_prepare import unpack


def test_shifted_windows_are_slices_of_the_token_stream(workdir):
    data = PreparedData.load(workdir)
    ds = data.windows("train", shifted=True)
    L = ds.seq_len
    stream = unpack(np.asarray(ds.windows), data.info["tokens"]["train"])
    starts = [0, 1, L - 1, L, 3 * L + 5, (ds.shiftable - 1) * L + L - 1]
    x, y = ds[starts]
    for row, p in enumerate(starts):
        assert x[row].tolist() == stream[p : p + L].tolist()
        assert y[row].tolist() == stream[p + 1 : p + L + 1].tolist()
    # the tail window (right-aligned) is only ever used whole, with its overlap masked as in evaluation
    tail = ds.tail_index * L
    _, y_tail = ds[[tail]]
    _, y_eval = data.windows("train")[[ds.tail_index]]
    assert torch.equal(y_tail, y_eval)


def test_each_epoch_uses_every_window_once_with_new_offsets():
    n, L, shiftable = 50, 8, 48
    s = ShuffledBatches(n, 5, seed=3, length=40, shift=L, shiftable=shiftable)
    batches = list(s)
    epochs = [sum(batches[i : i + 10], []) for i in (0, 10)]  # 10 batches of 5 = one epoch
    for items in epochs:
        windows, offsets = np.divmod(np.array(items), L)
        assert sorted(windows.tolist()) == list(range(n))
        assert (offsets[windows >= shiftable] == 0).all() and offsets.max() < L
        assert len(set(offsets.tolist())) > 1
    assert epochs[0] != epochs[1]
    # resuming at batch 13 continues the same stream
    assert list(ShuffledBatches(n, 5, seed=3, start=13, length=40, shift=L, shiftable=shiftable)) == batches[13:]
    # without shift: plain window indices
    plain = sum(list(ShuffledBatches(n, 5, seed=3, length=10)), [])
    assert sorted(plain) == list(range(n))
