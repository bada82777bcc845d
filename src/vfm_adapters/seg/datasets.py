"""Readers for the segmentation datasets of domain-generalisation work, in their real layouts.

Every reader returns, for ``dataset[i]`` (no transform, the file's own resolution)::

    {"image": uint8 tensor (3, H, W), "label": int64 tensor (H, W), "path": str}

with labels already converted to the 19 Cityscapes train ids (0..18) and 255 for
everything that is not evaluated, so that any source can be trained on and any target
evaluated with the same head. Mappings follow the datasets' own definitions and, for Mapillary, the Rein authors' released code.

A reader checks its layout when it is built: a missing root, a missing folder or an
image without its label raises :class:`DatasetLayoutError` naming the layout expected,
rather than failing later inside a data loader worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_files import image_size, read_image, read_label  # re-exported: defined here first
from .label_maps import (  # re-exported: the tables were defined here first
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    IGNORE_INDEX,
    MAPILLARY_ID_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    make_lut,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """A dataset root that does not hold the layout its reader expects."""


def resize_label_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (never blends two class ids).

    Example:
        >>> resize_label_nearest(np.array([[1, 2], [3, 4]]), 4, 4)[::2, ::2].tolist()
        [[1, 2], [3, 4]]
    """
    rows = np.minimum((np.arange(height) + 0.5) * label.shape[0] / height, label.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * label.shape[1] / width, label.shape[1] - 1).astype(np.int64)
    return label[rows][:, cols]


class SegmentationDataset(Dataset):
    """Base of every reader: a list of (image, label) files and an id -> train id table.

    Subclasses find their files in ``__init__`` and call :meth:`_set_files`. ``get``
    applies the optional transform with an explicit random generator, so a training
    stream can make each sample's augmentation depend only on its position in the
    stream (which is what makes resuming exact).

    Attributes:
        classes: Class names for the train ids.
        layout: A one-line description of the expected layout (used in errors).
    """

    classes: tuple[str, ...] = CITYSCAPES_CLASSES
    layout: str = ""
    label_channel: int | None = None
    resize_mismatched_labels: bool = False

    def __init__(self, transform: Callable | None = None, mapping: Mapping[int, int] | None = None) -> None:
        self.transform = transform
        self.mapping = mapping
        self._lut = make_lut(mapping) if mapping is not None else None
        self.samples: list[tuple[Path, Path]] = []

    # -- discovery helpers -------------------------------------------------------------
    def _fail(self, root: Path, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"{type(self).__name__} at {root}: {problem}. Expected layout: {self.layout}")

    def _require_dir(self, root: Path, path: Path) -> Path:
        if not root.is_dir():
            raise self._fail(root, "the root directory does not exist")
        if not path.is_dir():
            raise self._fail(root, f"missing directory {path.relative_to(root) if path.is_relative_to(root) else path}")
        return path

    def _set_files(self, root: Path, samples: list[tuple[Path, Path]]) -> None:
        if not samples:
            raise self._fail(root, "no images found")
        missing = [str(label) for _, label in samples if not label.is_file()]
        if missing:
            raise self._fail(root, f"{len(missing)} image(s) have no label file, e.g. {missing[0]}")
        self.samples = samples

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def label_table(self, index: int) -> np.ndarray | None:
        """The id -> train id table for sample ``index`` (``None``: labels hold train ids)."""
        return self._lut

    def convert_label(self, stored: np.ndarray, table: np.ndarray | None) -> np.ndarray:
        """Maps stored ids to train ids (255 for everything not evaluated)."""
        if table is None:
            out = stored.copy()
            out[(out < 0) | (out >= len(self.classes))] = IGNORE_INDEX
            return out
        return table[np.clip(stored, 0, len(table) - 1)]

    def load(self, index: int) -> dict[str, Any]:
        """The raw sample ``index`` (no transform)."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = self.convert_label(read_label(label_path, self.label_channel), self.label_table(index))
        height, width = image.shape[1:]
        if label.shape != (height, width):
            if not self.resize_mismatched_labels:
                raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image is {width}x{height}")
            label = resize_label_nearest(label, height, width)
        return {"image": image, "label": torch.from_numpy(np.ascontiguousarray(label)), "path": str(image_path)}

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Sample ``index`` with the transform applied using ``rng``."""
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample, rng=rng)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images)"


def _sorted(paths: Iterable[Path]) -> list[Path]:
    # regular files only: a FIFO (or a directory) named like an image would block or fail later
    return sorted((p for p in paths if p.is_file()), key=lambda p: str(p))


class Cityscapes(SegmentationDataset):
    """Cityscapes (``split`` in train/val/test), 2048x1024.

    Reads ``*_gtFine_labelTrainIds.png`` when present (written by the official
    ``createTrainIdLabelImgs`` script) and otherwise maps ``*_gtFine_labelIds.png``
    itself, so the dataset works straight after download.

    Example:
        >>> Cityscapes("/nonexistent", "val")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.seg.datasets.DatasetLayoutError: Cityscapes at /nonexistent: the root directory does not exist. Expected layout: ...
    """

    layout = ("<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
              "<root>/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)")

    def __init__(self, root: str | os.PathLike, split: str = "val", transform: Callable | None = None) -> None:
        super().__init__(transform)
        root = Path(root)
        images = self._require_dir(root, root / "leftImg8bit" / split)
        self._require_dir(root, root / "gtFine" / split)
        samples, needs_mapping = [], []
        image_files = _sorted(images.glob("*/*_leftImg8bit.png"))
        for image in image_files:
            stem = image.name[: -len("_leftImg8bit.png")]
            folder = root / "gtFine" / split / image.parent.name
            train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
            samples.append(train_ids if train_ids.is_file() else folder / f"{stem}_gtFine_labelIds.png")
            needs_mapping.append(not train_ids.is_file())
        self._set_files(root, list(zip(image_files, samples)))
        self._needs_mapping = needs_mapping
        self._id_lut = make_lut(CITYSCAPES_ID_TO_TRAINID)

    def label_table(self, index: int) -> np.ndarray | None:  # noqa: D102
        return self._id_lut if self._needs_mapping[index] else None


class GTA5(SegmentationDataset):
    """GTA5 (24,966 images, 1914x1052), labels in Cityscapes ids.

    A few GTA5 label maps are not the size of their image. They are resized to the
    image size with nearest-neighbour interpolation (ids are never blended), so every
    sample is aligned. Labels already converted to ``labels/*_labelTrainIds.png`` (as
    mmseg's converter writes) are used as they are.
    """

    layout = "<root>/images/*.png and <root>/labels/*.png (same file names, Cityscapes label ids)"
    resize_mismatched_labels = True

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        super().__init__(transform, CITYSCAPES_ID_TO_TRAINID)
        root = Path(root)
        images = self._require_dir(root, root / "images")
        labels = self._require_dir(root, root / "labels")
        samples = []
        self._converted = []
        for image in _sorted(images.glob("*.png")):
            converted = labels / f"{image.stem}_labelTrainIds.png"
            self._converted.append(converted.is_file())
            samples.append((image, converted if converted.is_file() else labels / image.name))
        self._set_files(root, samples)

    def label_table(self, index: int) -> np.ndarray | None:  # noqa: D102
        return None if self._converted[index] else self._lut


class Synthia(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES (9,400 images, 1280x760).

    Labels are 16-bit RGB PNGs whose *red* channel holds the class id: the first
    channel in the file's RGB order, i.e. the last channel of OpenCV's BGR read
    (``cv2.imread(..., IMREAD_UNCHANGED)[:, :, -1]``). Pillow truncates 16-bit colour
    PNGs to their high byte (every class would read as 0), so labels are decoded with
    torchvision's 16-bit PNG decoder.
    """

    layout = "<root>/RGB/*.png and <root>/GT/LABELS/*.png (16-bit PNG, class id in the red channel)"
    label_channel = 0

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        super().__init__(transform, SYNTHIA_ID_TO_TRAINID)
        root = Path(root)
        images = self._require_dir(root, root / "RGB")
        labels = self._require_dir(root, root / "GT" / "LABELS")
        self._set_files(root, [(image, labels / image.name) for image in _sorted(images.glob("*.png"))])


class BDD100K(SegmentationDataset):
    """BDD100K 10k semantic segmentation (7000 train / 1000 val, 1280x720), labels in train ids."""

    layout = "<root>/images/10k/<split>/*.jpg and <root>/labels/sem_seg/masks/<split>/*.png (train ids)"

    def __init__(self, root: str | os.PathLike, split: str = "val", transform: Callable | None = None) -> None:
        super().__init__(transform)
        root = Path(root)
        images = self._require_dir(root, root / "images" / "10k" / split)
        labels = self._require_dir(root, root / "labels" / "sem_seg" / "masks" / split)
        self._set_files(root, [(image, labels / f"{image.stem}.png") for image in _sorted(images.glob("*.jpg"))])


class Mapillary(SegmentationDataset):
    """Mapillary Vistas v1.2 (``split``: training/validation; train/val accepted).

    The 66 v1.2 ids are mapped to the 19 Cityscapes classes as the Rein authors do
    (:data:`MAPILLARY_ID_TO_TRAINID`). Labels are read from ``<split>/labels`` or, in a
    Vistas 2.0 download, from ``<split>/v1.2/labels``. The authors evaluate on files
    halved first (``vfm-adapters prepare mapillary --half``, same layout), resized
    keep-ratio into (1024, 512) for inference (``scale: [1024, 512]`` in ``data.val``)
    and scored against the half-size labels.
    """

    layout = "<root>/<training|validation>/images/*.jpg and <root>/<training|validation>/labels/*.png (v1.2 ids)"
    _ALIASES = {"train": "training", "val": "validation", "test": "testing"}

    def __init__(self, root: str | os.PathLike, split: str = "validation", transform: Callable | None = None) -> None:
        super().__init__(transform, MAPILLARY_ID_TO_TRAINID)
        root = Path(root)
        split = self._ALIASES.get(split, split)
        images = self._require_dir(root, root / split / "images")
        labels = root / split / "labels"
        if not labels.is_dir() and (root / split / "v1.2" / "labels").is_dir():
            labels = root / split / "v1.2" / "labels"
        self._require_dir(root, labels)
        self._set_files(root, [(image, labels / f"{image.stem}.png") for image in _sorted(images.glob("*.jpg"))])


class ACDC(SegmentationDataset):
    """ACDC adverse conditions (fog, night, rain, snow; 1920x1080), labels in train ids."""

    layout = ("<root>/rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
              "<root>/gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png")
    CONDITIONS = ("fog", "night", "rain", "snow")

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        conditions: Sequence[str] = CONDITIONS,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform)
        root = Path(root)
        if isinstance(conditions, str):
            conditions = (conditions,)
        unknown = sorted(set(conditions) - set(self.CONDITIONS))
        if unknown:
            raise ValueError(f"unknown ACDC condition(s) {unknown}; choose from {self.CONDITIONS}")
        samples = []
        for condition in conditions:
            images = self._require_dir(root, root / "rgb_anon" / condition / split)
            self._require_dir(root, root / "gt" / condition / split)
            for image in _sorted(images.glob("*/*_rgb_anon.png")):
                stem = image.name[: -len("_rgb_anon.png")]
                samples.append((image, root / "gt" / condition / split / image.parent.name / f"{stem}_gt_labelTrainIds.png"))
        self._set_files(root, samples)


class FolderDataset(SegmentationDataset):
    """Any dataset laid out as ``images/`` + ``labels/`` with matching file stems.

    Args:
        root: Directory holding the two folders.
        mapping: Stored id -> train id table; ``None`` when labels already hold train
            ids (values outside ``0..len(classes)-1`` become 255).
        image_dir: Image folder name, relative to ``root``.
        label_dir: Label folder name, relative to ``root``.
        label_suffix: Appended to an image's stem to name its label.
        classes: Class names (default: the 19 Cityscapes classes).
        transform: Optional transform.
    """

    layout = "<root>/<image_dir>/*.(png|jpg|...) and <root>/<label_dir>/<stem><label_suffix>"

    def __init__(
        self,
        root: str | os.PathLike,
        mapping: Mapping[int, int] | None = None,
        image_dir: str = "images",
        label_dir: str = "labels",
        label_suffix: str = ".png",
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform, mapping)
        if classes is not None:
            self.classes = tuple(classes)
        root = Path(root)
        self.layout = f"<root>/{image_dir}/*.(png|jpg|...) and <root>/{label_dir}/<stem>{label_suffix}"
        images = self._require_dir(root, root / image_dir)
        labels = self._require_dir(root, root / label_dir)
        files = [p for p in _sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        self._set_files(root, [(image, labels / f"{image.stem}{label_suffix}") for image in files])


DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": Cityscapes,
    "gta5": GTA5,
    "synthia": Synthia,
    "bdd100k": BDD100K,
    "mapillary": Mapillary,
    "acdc": ACDC,
    "folder": FolderDataset,
}


def build_dataset(spec: Mapping[str, Any], transform: Callable | None = None) -> Dataset:
    """Builds a reader from a config entry such as ``{"type": "cityscapes", "root": ..., "split": "val"}``.

    ``type: synthetic`` builds :class:`vfm_adapters.seg.synthetic.SyntheticScenes`;
    keys other than ``type``, ``name`` and ``weight`` are passed to the reader.

    Example:
        >>> ds = build_dataset({"type": "synthetic", "domain": "fog", "num_images": 2, "size": 32})
        >>> ds[0]["image"].shape
        torch.Size([3, 32, 32])
    """
    options = {k: v for k, v in spec.items() if k not in ("type", "name", "weight", "resize", "scale")}
    kind = str(spec.get("type", "")).lower()
    if kind == "synthetic":
        from .synthetic import SyntheticScenes

        return SyntheticScenes(transform=transform, **options)
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset type {kind!r}; available: {sorted(DATASETS) + ['synthetic']}")
    if "mapping" in options and options["mapping"] is not None:
        options["mapping"] = {int(k): int(v) for k, v in dict(options["mapping"]).items()}
    if "conditions" in options:
        options["conditions"] = tuple(options["conditions"]) if not isinstance(options["conditions"], str) else (options["conditions"],)
    return DATASETS[kind](transform=transform, **options)
