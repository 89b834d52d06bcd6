"""ZeroSpreadSampler: zero-target items spread evenly among the others, DDP-aware, resumable.

Each epoch both groups (zero-target items, the rest) are shuffled with a generator seeded
by ``(seed, epoch)`` and merged so that the zeros sit at regular intervals: zero ``j`` of
``n_z`` and other ``i`` of ``n_o`` are ordered by their fractional positions
``(j + 1/2) / n_z`` and ``(i + 1/2) / n_o``. Between two zeros there are then at most
``ceil(n_o / n_z)`` other items. Without zero items this is a plain shuffle.

Across ``num_replicas`` ranks the order is padded by repetition to a multiple of the rank
count (or cut, with ``drop_last``) and split into equal **contiguous** chunks: every chunk
of an evenly spread sequence is evenly spread too, whereas the strided split of
``DistributedSampler`` can send every zero to the same rank when the zero period equals
the rank count.

Training passes ``batch_size`` (the per-device batch n) and ``global_batch`` (G = n x ranks x
accumulation): the epoch's order is then cut to a multiple of G and dealt out in blocks of n,
block k to rank k mod W. Global step b then trains on ``order[b*G:(b+1)*G]`` whatever the
number of ranks and micro-steps, so 2 ranks x n = 2 and 1 rank x n = 4 see the same samples in
the same steps, and a run resumed on another number of devices continues the same order.

Exact resume: ``state = sampler.state_dict(position=steps_done * batch_size)`` (the default
position counts indices handed out, which runs ahead of training when DataLoader workers
prefetch); later ``sampler.load_state_dict(state)`` and the next ``__iter__`` yields the rest
of that epoch. ``set_epoch`` with another epoch starts that epoch from its beginning.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from dmmi.errors import DmmiError


def spread_evenly(others: Sequence[int], zeros: Sequence[int]) -> list[int]:
    """Merge ``zeros`` into ``others`` at regular intervals, keeping each group's order."""
    n_o, n_z = len(others), len(zeros)
    if not n_z or not n_o:
        return list(others) + list(zeros)
    out: list[int] = []
    i = j = 0
    while i < n_o or j < n_z:
        # compare (i + 1/2) / n_o with (j + 1/2) / n_z exactly, in integers; ties: other first
        if j >= n_z or (i < n_o and (2 * i + 1) * n_z <= (2 * j + 1) * n_o):
            out.append(others[i])
            i += 1
        else:
            out.append(zeros[j])
            j += 1
    return out


class ZeroSpreadSampler(Sampler):
    """Yields item indices (``with_epoch``: ``(index, epoch)`` pairs) for this rank.

    ``types``: 'zero' / 'one' / 'many' per item (``RefDataset.types``).
    """

    def __init__(self, types: Sequence[str], *, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, with_epoch: bool = False,
                 batch_size: Optional[int] = None, global_batch: Optional[int] = None):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DmmiError(f"sampler: rank {rank} is not in [0, {num_replicas})")
        self.types = list(types)
        self.zero = [i for i, t in enumerate(self.types) if t == "zero"]
        self.other = [i for i, t in enumerate(self.types) if t != "zero"]
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.with_epoch = shuffle, int(seed), drop_last, with_epoch
        n = len(self.types)
        self.batch_size = batch_size
        self.global_batch = global_batch or (batch_size * self.num_replicas if batch_size else None)
        if batch_size is not None:
            if batch_size < 1 or self.global_batch % (batch_size * self.num_replicas):
                raise DmmiError(f"sampler: global batch {self.global_batch} is not a multiple of "
                                f"{batch_size} per rank x {self.num_replicas} ranks")
            self.num_samples = n // self.global_batch * self.global_batch // self.num_replicas
        elif drop_last:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start = 0  # indices of this rank's epoch to skip on the next __iter__ (load_state_dict)
        self._base = self._yielded = 0  # the running iteration's start and count

    def order(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (all ranks, before padding)."""
        zero, other = self.zero, self.other
        if self.shuffle:
            rng = np.random.default_rng([self.seed % (2**63), int(epoch)])
            other = [other[k] for k in rng.permutation(len(other))]
            zero = [zero[k] for k in rng.permutation(len(zero))]
        return spread_evenly(other, zero)

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's ``num_samples`` indices for ``epoch`` (padded by repetition)."""
        order = self.order(epoch)
        if not order:
            return []
        if self.batch_size is not None:  # blocks of n, block k to rank k mod W (module docstring)
            n, w = self.batch_size, self.num_replicas
            usable = len(order) // self.global_batch * self.global_batch
            return [i for k in range(self.rank, usable // n, w) for i in order[k * n:(k + 1) * n]]
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        order = order[: self.total_size]
        return order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]

    def __iter__(self) -> Iterator:
        epoch, start = self.epoch, self.start
        indices = self.rank_indices(epoch)[start:]
        self._base, self._yielded = start, 0
        self.start = 0  # a resumed epoch is resumed once
        for i in indices:
            self._yielded += 1
            yield (i, epoch) if self.with_epoch else i

    def __len__(self) -> int:
        return self.num_samples - self.start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; another epoch than the current one starts from its beginning."""
        if int(epoch) != self.epoch:
            self.start = self._base = self._yielded = 0
        self.epoch = int(epoch)

    def state_dict(self, position: Optional[int] = None) -> dict:
        """Where this rank is: epoch and ``position`` (indices of the epoch consumed)."""
        if position is None:
            position = self.start + self._base + self._yielded
        return {"epoch": self.epoch, "position": int(position), "seed": self.seed, "num_items": len(self.types),
                "num_zero": len(self.zero), "num_replicas": self.num_replicas, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        checks = [("num_items", len(self.types)), ("num_zero", len(self.zero))]
        if self.batch_size is None:  # contiguous chunks depend on the rank count (batch blocks do not)
            checks.append(("num_replicas", self.num_replicas))
        for key, mine in checks:
            if key in state and state[key] != mine:
                raise DmmiError(f"sampler state: saved with {key}={state[key]}, this run has {mine}; "
                                "cannot resume the same order")
        position = int(state.get("position", 0))
        if not 0 <= position <= self.num_samples:
            raise DmmiError(f"sampler state: position {position} outside [0, {self.num_samples}]")
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.start = position
        self._base = self._yielded = 0
