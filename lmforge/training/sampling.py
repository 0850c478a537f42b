"""The sampling plan: which examples each optimizer step trains on, in which order, and where a resumed
run continues — the same whatever the number of processes, and computed without reading the data.

Sample k of the run is example perm_e[k mod n] with e = k // n (a seeded permutation per epoch, or the
identity for datasets whose items are random already). Step s trains on samples [s*G, min((s+1)*G,
total)) with G the global batch; each process takes a contiguous share of them and splits it into
micro-batches. So resuming is a jump to a sample number, and a run resumed with another global batch
continues from the sample where it stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from lmforge.data import RandomBlockDataset
from lmforge.training.args import TrainingArguments
from lmforge.training.distributed import World


class SamplingPlan:
    """The run's data order, step by step (see the module docstring).

    With `lengths` (group_by_length), each epoch's permutation is cut into mega-batches of 50 global
    batches, each sorted longest first, so a batch holds examples of similar length (little padding)
    while the mega-batches stay random; the window holding the longest example goes first, so a batch
    too large for memory fails at step 0 rather than hours in."""

    MEGA_BATCHES = 50

    def __init__(
        self,
        n: int,
        total: int,
        global_batch: int,
        micro: int,
        world: World,
        shuffle: bool,
        seed: int,
        base_step: int = 0,
        base_sample: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.n, self.total, self.G, self.micro, self.world = n, total, global_batch, micro, world
        self.shuffle, self.seed, self.lengths = shuffle, seed, lengths
        # a run resumed with another global batch continues from the sample where it stopped
        self.base_step, self.base_sample = base_step, base_sample
        self.steps = base_step + math.ceil(max(total - base_sample, 0) / global_batch)
        self._perm: tuple[int, list[int] | None] = (-1, None)

    def example(self, k: int) -> int:
        """The dataset index of sample number `k` of the run."""
        epoch, i = divmod(k, self.n)
        if not self.shuffle:
            return i
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perm = (epoch, self._grouped(perm) if self.lengths is not None else perm)
        return self._perm[1][i]

    def _grouped(self, perm: list[int]) -> list[int]:
        """`perm` with each mega-batch sorted by length (longest first), the longest window first."""
        size, lengths = self.G * self.MEGA_BATCHES, self.lengths
        assert lengths is not None
        out: list[int] = []
        for a in range(0, len(perm), size):
            out += sorted(perm[a : a + size], key=lambda i: -lengths[i])  # stable: ties keep the random order
        longest = max(range(len(out)), key=lambda k: lengths[out[k]]) // self.G * self.G
        if longest and longest + self.G <= len(out):  # swap whole windows: both stay length-grouped
            out[: self.G], out[longest : longest + self.G] = out[longest : longest + self.G], out[: self.G]
        return out

    def window(self, step: int) -> tuple[int, int]:
        """Sample numbers [start, end) of optimizer step `step` (all processes together)."""
        start = self.base_sample + (step - self.base_step) * self.G
        return start, min(start + self.G, self.total)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step `step`."""
        start, end = self.window(step)
        n, W, r = end - start, self.world.size, self.world.rank
        lo, hi = start + r * n // W, start + (r + 1) * n // W  # this process's share
        return [[self.example(k) for k in range(a, min(a + self.micro, hi))] for a in range(lo, hi, self.micro)]


class PlanSampler(Sampler[list[int]]):
    """Micro-batch index lists from `first_step` on: a DataLoader batch_sampler."""

    def __init__(self, plan: SamplingPlan, first_step: int) -> None:
        self.plan, self.first_step = plan, first_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.plan.steps):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return sum(len(self.plan.micro_batches(s)) for s in range(self.first_step, self.plan.steps))


def build_plan(
    args: TrainingArguments,
    world: World,
    n: int,
    shuffle: bool,
    lengths: Sequence[int] | None,
    base_step: int = 0,
    base_sample: int = 0,
) -> SamplingPlan:
    """The plan of a run over `n` examples with `args` (max_steps, else num_train_epochs), continuing from
    (base_step, base_sample) when resumed with another global batch; `lengths` for group_by_length."""
    W = world.size
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * W
    if args.max_steps > 0:
        total = base_sample + (args.max_steps - base_step) * G
    else:
        total = max(1, round(args.num_train_epochs * n))
    tail = (total - base_sample) % G
    if W > 1 and tail and tail < W:
        total -= tail  # a last window smaller than the number of processes: drop it
        warnings.warn(f"the last {tail} examples do not give every process one; they are skipped", stacklevel=4)
    return SamplingPlan(
        n, total, G, args.per_device_train_batch_size, world, shuffle, args.seed, base_step, base_sample, lengths
    )


def shuffles(dataset: Any) -> bool:
    """Whether the plan permutes `dataset`: not for datasets whose items are random already."""
    return not isinstance(dataset, RandomBlockDataset)


def example_lengths(dataset: Any, column: str) -> list[int]:
    """Each example's length for group_by_length: its `column` field, else the number of its input_ids."""
    lengths = []
    for i in range(len(dataset)):
        item = dataset[i]
        if column in item:
            lengths.append(int(item[column]))
        elif "input_ids" in item:
            lengths.append(len(item["input_ids"]))
        else:
            raise ValueError(
                f"group_by_length needs each example's length: example {i} has neither "
                f"'{column}' (length_column_name) nor 'input_ids' (its keys: {sorted(item)}); "
                "tokenize the examples first or add a length field"
            )
    return lengths
