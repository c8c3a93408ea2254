"""Micro-batches built ahead by DataLoader worker processes, in the order the training loader defines.

Notable choices:
- The order is the TrainLoader's alone: micro-batch j after a cursor is built by worker j mod W, and the DataLoader
  hands workers' outputs back round-robin, so the stream equals `TrainLoader._micro(cursor, j)` in sequence whatever
  W. A resume or any jump of the cursor starts a fresh stream there.
- Workers decode media (JPEG/PNG/WAV from the memory-mapped store) while the model computes; a batch's tensors are
  pinned when CUDA is present so that the copy to the device overlaps compute (`Batch.pin_memory`).
- Workers are forked from the rank: they inherit the loader and its read-only memory maps (nothing is pickled), and
  never touch the process group or the device.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class _Stream(IterableDataset):
    def __init__(self, loader, cursor: int):
        self.loader, self.cursor = loader, cursor

    def __iter__(self):
        info = get_worker_info()
        me, n = (info.id, info.num_workers) if info else (0, 1)
        j, cursor = 0, self.cursor
        while True:
            for a in range(self.loader.grad_accum):
                if j % n == me:
                    yield self.loader._micro(cursor, a)
                j += 1
            cursor += self.loader.global_rows


class Prefetcher:
    """`take(cursor)`: the grad_accum micro-batches of the step at `cursor`, built by `workers` processes ahead."""

    def __init__(self, loader, workers: int, prefetch: int = 2):
        self.loader, self.workers, self.prefetch = loader, workers, prefetch
        self._it, self._at = None, None

    def take(self, cursor: int) -> list:
        if self._it is None or self._at != cursor:
            self.close()
            dl = DataLoader(_Stream(self.loader, cursor), batch_size=None, num_workers=self.workers,
                            prefetch_factor=self.prefetch, pin_memory=torch.cuda.is_available())
            self._it = iter(dl)
        out = [next(self._it) for _ in range(self.loader.grad_accum)]
        self._at = cursor + self.loader.global_rows
        return out

    def close(self) -> None:
        if self._it is not None:
            self._it._shutdown_workers()
            self._it = None
