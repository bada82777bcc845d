"""Deterministic, resumable sampling streams, including mixing several sources at a ratio.

Training draws an endless stream of samples. Here every position ``k`` of that stream
is a pure function of ``(seed, k)``: which source it comes from, which image of that
source, and (through :class:`AugmentedStream`) the random numbers of its augmentation.
So a run resumed at step ``s`` starts the stream at position ``s * batch`` and sees
exactly the samples an uninterrupted run would have seen, with any number of workers.

Mixing: with weights ``w`` the source of each position is the one furthest behind its
share (:func:`source_schedule`), so every prefix of the stream holds the requested
ratio to within one sample (e.g. 50/50 real/synthetic as in Domino), not just in
expectation. Within a
source, images are visited in a fresh random permutation per epoch of that source.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler


class _DeficitSchedule:
    """Sequential source choice: each position goes to the source furthest behind its share."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights))
        self.shares = [float(w) / total for w in weights]
        self.drawn = [0] * len(self.shares)
        self.position = 0

    def next(self) -> int:
        best, best_deficit = 0, -float("inf")
        for i, share in enumerate(self.shares):
            deficit = (self.position + 1) * share - self.drawn[i]
            if share > 0 and deficit > best_deficit + 1e-12:
                best, best_deficit = i, deficit
        self.drawn[best] += 1
        self.position += 1
        return best


def source_schedule(weights: Sequence[float], count: int, start: int = 0) -> list[int]:
    """The sources of stream positions ``start .. start+count-1``.

    Position ``k`` goes to the source with the largest deficit ``(k + 1) * p_i - drawn_i``
    (ties to the lower index), which keeps every source within one sample of its share
    at every position (a 50/50 mix alternates).

    Example:
        >>> source_schedule([1, 1], 6), source_schedule([3, 1], 8)
        ([0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0, 1, 0])
    """
    schedule = _DeficitSchedule(weights)
    for _ in range(start):
        schedule.next()
    return [schedule.next() for _ in range(count)]


class StreamSampler(Sampler):
    """Yields ``(position, index)`` pairs of an endless, seeded stream over one or more sources.

    ``index`` is an index into ``ConcatDataset(sources)``. The stream is sharded for
    distributed training by ``rank``/``world_size``: process ``r`` takes positions
    ``start + r, start + r + world_size, ...``.

    Args:
        sizes: Number of samples of each source.
        weights: Relative share of each source in the stream (default: equal shares,
            i.e. a 50/50 mix for two sources; pass the sizes for size-proportional).
        seed: Seed of the stream.
        start: First position (resume point).
        length: Number of positions to yield (all shards together); ``None`` = endless.
        rank: This process's shard.
        world_size: Number of shards.

    Example:
        >>> sampler = StreamSampler([4, 100], weights=[1, 1], seed=0, length=8)
        >>> [index < 4 for _, index in sampler].count(True)
        4
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        start: int = 0,
        length: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"every source needs at least one sample, got sizes {list(sizes)}")
        weights = [1.0] * len(sizes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights {weights} must be non-negative, not all zero, one per source")
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.cumsum([0] + self.sizes[:-1])
        self.weights = weights
        self.seed, self.start, self.length = int(seed), int(start), length
        self.rank, self.world_size = int(rank), int(world_size)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        schedule = _DeficitSchedule(self.weights)
        single = len(self.sizes) == 1
        if single:
            schedule.drawn, schedule.position = [self.start], self.start
        else:
            for _ in range(self.start):
                schedule.next()
        cache: dict[tuple[int, int], np.ndarray] = {}
        k = self.start
        end = None if self.length is None else self.start + self.length
        while end is None or k < end:
            drawn = schedule.drawn[0] if single else None
            source = 0 if single else schedule.next()
            if single:
                schedule.drawn[0] += 1
            else:
                drawn = schedule.drawn[source] - 1
            if (k - self.start) % self.world_size == self.rank:
                epoch, within = divmod(drawn, self.sizes[source])
                key = (source, epoch)
                if key not in cache:
                    if len(cache) > 8:
                        cache.clear()
                    cache[key] = self._permutation(source, epoch)
                yield k, int(self.offsets[source] + cache[key][within])
            k += 1

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless StreamSampler has no length")
        return len(range(self.rank, self.length, self.world_size))


class AugmentedStream(Dataset):
    """Maps ``(position, index)`` from a :class:`StreamSampler` to a transformed sample.

    The transform's generator is seeded by ``(seed, position)``, so the augmentation of
    a stream position never depends on the worker, the process or earlier samples.

    Args:
        sources: The source datasets (each with ``load(index)`` or ``__getitem__``).
        transform: Called as ``transform(sample, rng=generator)``.
        seed: Seed of the augmentations.
    """

    def __init__(self, sources: Sequence[Dataset], transform: Callable | None = None, seed: int = 0) -> None:
        self.concat = ConcatDataset(list(sources))
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        source_index = int(np.searchsorted(self.concat.cumulative_sizes, index, side="right"))
        source = self.concat.datasets[source_index]
        local = index - (self.concat.cumulative_sizes[source_index - 1] if source_index > 0 else 0)
        sample = source.load(local) if hasattr(source, "load") else source[local]
        sample = dict(sample)
        sample["source"] = source_index
        if self.transform is not None:
            sample = self.transform(sample, rng=np.random.default_rng([self.seed, int(position)]))
        return sample


def mix_datasets(
    sources: Sequence[Dataset],
    weights: Sequence[float] | None = None,
    transform: Callable | None = None,
    seed: int = 0,
    length: int | None = None,
) -> tuple[AugmentedStream, StreamSampler]:
    """A dataset + sampler pair that mixes ``sources`` at ``weights`` (for a DataLoader).

    Example:
        >>> from vfm_adapters.seg.synthetic import SyntheticScenes
        >>> real, synthetic = SyntheticScenes(num_images=3, size=16), SyntheticScenes("fog", 5, size=16)
        >>> data, sampler = mix_datasets([real, synthetic], [0.5, 0.5], length=10)
        >>> sorted(data[key]["source"] for key in sampler)
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    """
    data = AugmentedStream(sources, transform, seed)
    sampler = StreamSampler([len(s) for s in sources], weights, seed=seed, length=length)
    return data, sampler


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of stream samples: stacked ``image``, ``label`` (when every sample has one) and
    ``generated`` flags (when every sample has one), and the list of paths (``None`` where unknown).

    Example:
        >>> batch = collate_samples([{"image": torch.zeros(3, 2, 2), "label": torch.zeros(2, 2), "path": "a.png"},
        ...                          {"image": torch.ones(3, 2, 2), "label": torch.ones(2, 2)}])
        >>> batch["image"].shape, batch["label"].shape, batch["path"]
        (torch.Size([2, 3, 2, 2]), torch.Size([2, 2, 2]), ['a.png', None])
    """
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),
                             "path": [s.get("path") for s in samples]}
    if all("label" in s for s in samples):
        batch["label"] = torch.stack([s["label"] for s in samples])
    if all("generated" in s for s in samples):
        batch["generated"] = torch.tensor([bool(s["generated"]) for s in samples])
    return batch
