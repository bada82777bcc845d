"""The data of self-training: unlabelled (e.g. generated) images, and one stream mixing
them with the labelled source.

Example:
    >>> stream = MixedStream([[{"image": torch.zeros(3, 2, 2), "label": torch.zeros(2, 2, dtype=torch.long)}],
    ...                       [{"image": torch.ones(3, 2, 2)}]], [None, None])
    >>> len(stream), stream[(0, 1)]["generated"]
    (2, True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..seg.datasets import IGNORE_INDEX, IMAGE_SUFFIXES, read_image

__all__ = ["MixedStream", "UnlabelledFolder"]


class UnlabelledFolder(Dataset):
    """Images of a folder (recursively), without labels: ``{"image": uint8 (3, H, W), "path"}``.

    Args:
        root: The folder (e.g. generated street scenes).
        transform: Optional ``transform(sample, rng=...)`` (the seg transforms work on
            samples without a label).
        recursive: Also read sub-folders.

    Example:
        >>> import tempfile; from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.new("RGB", (5, 4)).save(f"{root}/a.png")
        >>> data = UnlabelledFolder(root)
        >>> len(data), data[0]["image"].shape, "label" in data[0]
        (1, torch.Size([3, 4, 5]), False)
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, recursive: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"unlabelled image folder {self.root} does not exist")
        pattern = self.root.rglob("*") if recursive else self.root.glob("*")
        self.files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> dict[str, Any]:
        """The raw image ``index`` (no transform)."""
        return {"image": read_image(self.files[index]), "path": str(self.files[index])}

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample, rng=rng) if self.transform is not None else sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)


class MixedStream(Dataset):
    """One stream over labelled source and unlabelled (generated) sets, each with its own transform.

    Keyed by ``(position, index)`` like :class:`vfm_adapters.seg.AugmentedStream` (index
    into the concatenation); each sample gets ``"generated"`` (bool) and, for unlabelled
    images, an all-ignore ``"label"`` so a batch stacks.

    Example:
        >>> src = [{"image": torch.zeros(3, 4, 4), "label": torch.ones(4, 4, dtype=torch.long)}]
        >>> gen = [{"image": torch.ones(3, 4, 4)}]
        >>> stream = MixedStream([src, gen], [None, None])
        >>> [(s["generated"], int(s["label"][0, 0])) for s in (stream[(0, 0)], stream[(1, 1)])]
        [(False, 1), (True, 255)]
    """

    def __init__(self, sources: Sequence[Any], transforms: Sequence[Callable | None], seed: int = 0,
                 generated: Sequence[bool] = (False, True), ignore_index: int = IGNORE_INDEX) -> None:
        if not (len(sources) == len(transforms) == len(generated)):
            raise ValueError("one transform and one generated flag per source")
        self.sources, self.transforms, self.generated = list(sources), list(transforms), [bool(g) for g in generated]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.seed, self.ignore_index = int(seed), ignore_index

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = (int(k) for k in key)
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        data, local = self.sources[source], index - int(self.offsets[source])
        sample = dict(data.load(local) if hasattr(data, "load") else data[local])
        if self.transforms[source] is not None:
            sample = self.transforms[source](sample, rng=np.random.default_rng([self.seed, position]))
        sample = dict(sample)
        sample["generated"] = self.generated[source]
        if "label" not in sample:
            sample["label"] = torch.full(tuple(sample["image"].shape[-2:]), self.ignore_index, dtype=torch.long)
        return sample
