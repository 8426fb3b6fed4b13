"""Batches of token sequences from a memory-mapped token shard.

The shard is cut into fixed windows: window i starts at token `i * seq_len` and holds
`seq_len` tokens, or `seq_len + 1` with `targets=True` (inputs `w[:, :-1]`, next-token
labels `w[:, 1:]`; consecutive windows then share one token, so every token but the
first is a label exactly once). Each epoch visits the windows in a permutation drawn
from `(seed, epoch)`. A global batch is `batch_size * world_size` consecutive windows
of that order and rank r takes its r-th slice, so ranks never see the same window in
a step, and the batch at any index can be rebuilt directly (resume from a checkpoint
by passing `start_batch`). Windows that do not fill a whole global batch at the end
of an epoch are skipped, so every rank has the same number of batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_puzzle.data.shards import load_split, read_meta


class TokenBatches:
    """Iterable of LongTensor batches `[batch_size, seq_len]` (`[batch_size, seq_len + 1]` with `targets=True`).

    `path` is a `.npy` shard or a data directory (then `split` picks the shard and a
    `seed` of None takes the seed recorded in its meta.json). `epochs=None` cycles
    forever; `start_batch` is this rank's batch index to start from (its step count).
    """

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int | None = None,
        shuffle: bool = True,
        *,
        targets: bool = False,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        epochs: int | None = 1,
    ):
        path = Path(path)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if path.is_dir():
            self.tokens = load_split(path, split)
            if seed is None:
                seed = int(read_meta(path).get("seed", 0))
        elif path.exists():
            self.tokens = np.load(path, mmap_mode="r")
        else:
            raise FileNotFoundError(f"token shard {path} not found; run `megatron-puzzle data` first")
        if self.tokens.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D token array, got shape {self.tokens.shape}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed = 0 if seed is None else int(seed)
        self.shuffle, self.targets = shuffle, targets
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.epochs = start_batch, epochs
        self.window = seq_len + int(targets)
        self.num_windows = max(0, (len(self.tokens) - self.window) // seq_len + 1)
        global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{path}: {len(self.tokens)} tokens give {self.num_windows} sequences of {self.window} tokens, "
                f"fewer than one global batch ({batch_size} x {world_size} ranks); "
                "lower seq_len or batch_size, or build more tokens"
            )

    def __len__(self) -> int:
        """Batches this rank will yield from `start_batch` on (not defined for `epochs=None`)."""
        if self.epochs is None:
            raise TypeError("an endless TokenBatches (epochs=None) has no length")
        return max(0, self.epochs * self.batches_per_epoch - self.start_batch)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _slice(self, order: np.ndarray, step: int) -> np.ndarray:
        first = (step * self.world_size + self.rank) * self.batch_size
        return order[first : first + self.batch_size]

    def _gather(self, windows: np.ndarray) -> torch.Tensor:
        rows = np.stack([self.tokens[w * self.seq_len : w * self.seq_len + self.window] for w in windows])
        return torch.from_numpy(rows.astype(np.int64))

    def window_indices(self, index: int) -> np.ndarray:
        """Window numbers that make up this rank's batch `index` (counted over all epochs)."""
        epoch, step = divmod(index, self.batches_per_epoch)
        return self._slice(self._order(epoch), step)

    def batch(self, index: int) -> torch.Tensor:
        """This rank's batch `index`, rebuilt from scratch (random access)."""
        return self._gather(self.window_indices(index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = self.start_batch
        order_epoch, order = -1, None
        while self.epochs is None or index < self.epochs * self.batches_per_epoch:
            epoch, step = divmod(index, self.batches_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per batch
                order_epoch, order = epoch, self._order(epoch)
            yield self._gather(self._slice(order, step))
            index += 1
