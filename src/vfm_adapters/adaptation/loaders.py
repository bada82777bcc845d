"""The data streams of an adaptation run: transforms, loaders, rare-class and mixed batches.

Every stream is a pure function of ``(seed, position)`` (:class:`~vfm_adapters.seg.sampling.StreamSampler`
or :class:`~vfm_adapters.adaptation.dacs.RareClassPositions`) with the loader's own
generator, so a resumed run starts each stream at its step and draws nothing else.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Sampler

from ..seg.config import ConfigError
from ..seg.datasets import build_dataset
from ..seg.label_checks import check_dataset_labels
from ..seg.sampling import AugmentedStream, StreamSampler, collate_samples
from ..seg.transforms import (Compose, Normalize, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomRescale,
                              Resize)
from .data import MixedStream, UnlabelledFolder
from .rare_class import RareClassCrops, RareClassPositions, RareClassSampler, class_pixel_counts
from .self_training import SelfTrainingConfig

__all__ = ["adaptation_transform", "mixes_batches", "training_streams"]

#: The data section that holds a recipe's second (unlabelled) stream.
UNLABELLED_DATA = {"dacs": "target", "self_training": "unlabelled"}


def adaptation_transform(crop_size: tuple[int, int], scale: tuple[int, int] | None,
                         ratio_range: tuple[float, float] | None, cat_max_ratio: float, flip: float,
                         photometric: bool, mean, std) -> Compose:
    """The training pipeline of an adaptation config.

    ``ratio_range=None`` is DAFormer's UDA pipeline: a FIXED keep-ratio resize into
    ``scale`` (GTA5 (1280, 720), Cityscapes (1024, 512)), then the crop; a range gives
    the random rescale of the supervised recipes.

    Example:
        >>> t = adaptation_transform((4, 4), (16, 8), None, 0.75, 0.0, False, (0, 0, 0), (1, 1, 1))
        >>> t.transforms[0]
        Resize(size=None, scale=(16, 8))
    """
    steps: list[Any] = []
    if scale is not None:
        steps.append(Resize(scale=tuple(scale)) if ratio_range is None else RandomRescale(tuple(scale), tuple(ratio_range)))
    steps.append(RandomCrop(tuple(crop_size), cat_max_ratio=float(cat_max_ratio)))
    if flip > 0:
        steps.append(RandomFlip(flip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Normalize(mean, std))
    return Compose(steps)


def _loader_generator(seed: int) -> torch.Generator:
    """A loader's own generator: creating a loader then draws nothing from the global RNG (exact resume)."""
    return torch.Generator().manual_seed(int(seed))


def _build_source(spec: Mapping[str, Any], num_classes: int):
    """The dataset of a ``data`` entry; a labelled one gets a sampled label check (wrong ids fail here, naming a file)."""
    if str(spec.get("type", "")).lower() == "unlabelled":
        return UnlabelledFolder(spec["root"], recursive=bool(spec.get("recursive", True)))
    dataset = build_dataset(spec)
    check_dataset_labels(dataset, num_classes, f"data entry {spec.get('name') or spec.get('type')}")
    return dataset


def _loader(specs, transform, batch: int, seed: int, length: int, workers: int, num_classes: int,
            sampler: Sampler | None = None, start: int = 0):
    sources = [_build_source(spec, num_classes) for spec in specs]
    if sampler is None:
        weights = [float(spec.get("weight", 1.0)) for spec in specs]
        sampler = StreamSampler([len(s) for s in sources], weights, seed=seed, start=start, length=length)
    return DataLoader(AugmentedStream(sources, transform, seed), batch_size=batch, sampler=sampler,
                      num_workers=workers, collate_fn=collate_samples, generator=_loader_generator(seed))


def mixes_batches(config: Mapping[str, Any]) -> bool:
    """Whether the run trains on ONE stream of source and generated images (CLOUDS' ``batch_mode: mixed``).

    Example:
        >>> mixes_batches({"recipe": "self_training", "self_training": {}}), mixes_batches({"recipe": "dacs"})
        (True, False)
    """
    return config["recipe"] == "self_training" and _self_training(config).batch_mode == "mixed"


def _self_training(config: Mapping[str, Any]) -> SelfTrainingConfig:
    return SelfTrainingConfig.from_dict(config["self_training"])


def training_streams(config: Mapping[str, Any], start: int, end: int
                     ) -> tuple[Iterator[dict[str, Any]], Iterator[dict[str, Any]] | None]:
    """The source batches and, for DACS / separate self-training, the unlabelled batches of steps ``[start, end)``.

    :func:`mixes_batches`: one stream of source and generated images.
    ``data.rare_class_sampling``: DAFormer's rare-class source crops.

    Example:
        >>> from vfm_adapters.adaptation.config import load_adaptation_config
        >>> config = load_adaptation_config({"recipe": "dacs", "model": {"num_classes": 7},
        ...     "data": {"source": [{"type": "synthetic", "num_images": 2, "size": 40}],
        ...              "target": [{"type": "synthetic", "domain": "night", "num_images": 2, "size": 40}],
        ...              "crop_size": [32, 32], "scale": None, "target_scale": None, "num_workers": 0},
        ...     "train": {"batch_size": 2}})
        >>> source, target = training_streams(config, start=0, end=1)
        >>> batch = next(source)
        >>> batch["image"].shape, batch["label"].shape, next(target)["image"].shape
        (torch.Size([2, 3, 32, 32]), torch.Size([2, 32, 32]), torch.Size([2, 3, 32, 32]))
    """
    dc, tc = config["data"], config["train"]
    batch, seed, count = int(tc["batch_size"]), int(tc["seed"]), (end - start) * int(tc["batch_size"])
    if mixes_batches(config):
        return _mixed_batches(config, start * batch, count), None
    if dc["rare_class_sampling"]:
        source = _rare_class_batches(config, start * batch, count)
    else:
        source = _plain_batches(config, dc["source"], _transform(config, dc["scale"]), seed, start * batch, count)
    key = UNLABELLED_DATA.get(config["recipe"])
    if key is None:
        return source, None
    target = _plain_batches(config, dc[key], _transform(config, dc["target_scale"]), seed + 1, start * batch, count)
    return source, target


def _transform(config: Mapping[str, Any], scale, photometric: bool | None = None) -> Compose:
    dc, mc = config["data"], config["model"]
    ratio = tuple(dc["ratio_range"]) if dc["ratio_range"] is not None else None
    return adaptation_transform(tuple(dc["crop_size"]), tuple(scale) if scale else None, ratio, dc["cat_max_ratio"],
                                dc["flip"], dc["photometric"] if photometric is None else photometric,
                                mc["mean"], mc["std"])


def _plain_batches(config: Mapping[str, Any], specs, transform, seed: int, start: int, count: int):
    tc, dc = config["train"], config["data"]
    return iter(_loader(specs, transform, int(tc["batch_size"]), seed, count, int(dc["num_workers"]),
                        int(config["model"]["num_classes"]), start=start))


def _mixed_batches(config: Mapping[str, Any], start: int, count: int):
    """CLOUDS: one stream of source (rescale, crop, ColorAugSSD, flip) and generated (crop, flip) images."""
    dc, mc, tc = config["data"], config["model"], config["train"]
    seed, batch = int(tc["seed"]), int(tc["batch_size"])
    sources = [_build_source(spec, int(mc["num_classes"])) for spec in dc["source"]]
    generated = [_build_source(spec, int(mc["num_classes"])) for spec in dc["unlabelled"]]
    source_t = _transform(config, dc["scale"], photometric=True)
    generated_t = Compose([RandomCrop(tuple(dc["crop_size"])), RandomFlip(dc["flip"]), Normalize(mc["mean"], mc["std"])])
    factor = float(_self_training(config).generated_repeat_factor)
    stream = MixedStream(sources + generated, [source_t] * len(sources) + [generated_t] * len(generated), seed,
                         [False] * len(sources) + [True] * len(generated))
    weights = [float(len(d)) for d in sources] + [factor * len(d) for d in generated]
    sampler = StreamSampler([len(d) for d in sources + generated], weights, seed=seed, start=start, length=count)
    return iter(DataLoader(stream, batch_size=batch, sampler=sampler, num_workers=int(dc["num_workers"]),
                           collate_fn=collate_samples, generator=_loader_generator(seed)))


def _rare_class_batches(config: Mapping[str, Any], start: int, count: int):
    """DAFormer's rare-class sampling of the (single) source dataset."""
    dc, mc, tc = config["data"], config["model"], config["train"]
    rcs, seed = dc["rare_class_sampling"], int(tc["seed"])
    if len(dc["source"]) != 1:
        raise ConfigError("rare-class sampling needs exactly one source dataset")
    source_data = _build_source(dc["source"][0], int(mc["num_classes"]))
    counts = class_pixel_counts(source_data, int(mc["num_classes"]), rcs.get("cache"))
    min_pixels = int(rcs.get("min_pixels", 3000))
    sampler = RareClassPositions(RareClassSampler(counts, float(rcs.get("temperature", 0.01)), min_pixels, count, seed),
                                 start=start)
    crops = RareClassCrops(source_data, _transform(config, dc["scale"]), seed, min_pixels,
                           float(rcs.get("min_crop_ratio", 0.5)))
    return iter(DataLoader(crops, batch_size=int(tc["batch_size"]), sampler=sampler, num_workers=int(dc["num_workers"]),
                           collate_fn=collate_samples, generator=_loader_generator(seed)))
