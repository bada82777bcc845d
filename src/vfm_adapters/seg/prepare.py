"""Preparing dataset files on disk the way a published protocol expects.

:func:`halve_mapillary` is the Rein authors' Mapillary step
(``tools/convert_datasets/mapillary_resize.py``): every image and label of a split is
stored again at half its width and height, the image with bicubic resampling, the
label with nearest-neighbour resampling (so no two ids are ever blended), in the same
layout, so :class:`~vfm_adapters.seg.datasets.Mapillary` reads the result as is. Their
evaluation then resizes the half-size image keep-ratio into (1024, 512) and scores
against the half-size label.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from .._io import write_atomically

#: JPEG quality of the halved images: Pillow's default, which the authors' script uses.
JPEG_QUALITY = 75


def half_size(width: int, height: int) -> tuple[int, int]:
    """``(width // 2, height // 2)``: the authors' half size (odd sides round down).

    Example:
        >>> half_size(3264, 2448), half_size(1365, 1025)
        ((1632, 1224), (682, 512))
    """
    if width < 2 or height < 2:
        raise ValueError(f"an image of {width}x{height} cannot be halved")
    return width // 2, height // 2


def halve_mapillary(root: str | os.PathLike, output: str | os.PathLike, splits: Sequence[str] = ("validation",),
                    overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Writes half-size copies of Mapillary Vistas images and labels under ``output``.

    Reads ``<root>/<split>/images/*.jpg`` and ``<root>/<split>/labels/*.png`` (or
    ``<split>/v1.2/labels``) and writes ``<output>/<split>/images`` and
    ``<output>/<split>/labels``. Every file is written atomically; files already in
    ``output`` are kept (a stopped run continues) unless ``overwrite``.

    Returns:
        ``{"written": n, "kept": n}``.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> root, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp()) / "half"
        >>> for sub in ("validation/images", "validation/labels"):
        ...     (root / sub).mkdir(parents=True)
        >>> Image.new("RGB", (10, 6)).save(root / "validation/images/a.jpg")
        >>> Image.fromarray(np.zeros((6, 10), np.uint8)).save(root / "validation/labels/a.png")
        >>> halve_mapillary(root, out)
        {'written': 1, 'kept': 0}
        >>> Image.open(out / "validation/images/a.jpg").size, Image.open(out / "validation/labels/a.png").size
        ((5, 3), (5, 3))
    """
    from PIL import Image

    root, output = Path(root), Path(output)
    if output.resolve() == root.resolve():
        raise ValueError(f"the output {output} is the dataset itself; choose another directory (nothing is replaced)")
    aliases = {"train": "training", "val": "validation"}
    jobs: list[tuple[Path, Path, Path, Path]] = []
    for split in splits:
        split = aliases.get(split, split)
        images = root / split / "images"
        labels = root / split / "labels"
        if not labels.is_dir() and (root / split / "v1.2" / "labels").is_dir():
            labels = root / split / "v1.2" / "labels"
        if not images.is_dir() or not labels.is_dir():
            raise FileNotFoundError(f"{root} has no {split}/images and {split}/labels (or {split}/v1.2/labels); "
                                    "expected a Mapillary Vistas v1.2 download")
        for image in sorted(images.glob("*.jpg")):
            label = labels / f"{image.stem}.png"
            if not label.is_file():
                raise FileNotFoundError(f"image {image} has no label {label}")
            jobs.append((image, label, output / split / "images" / image.name, output / split / "labels" / label.name))
    counts = {"written": 0, "kept": 0}
    for index, (image_path, label_path, image_out, label_out) in enumerate(jobs):
        if not overwrite and image_out.is_file() and label_out.is_file():
            counts["kept"] += 1
        else:
            image_out.parent.mkdir(parents=True, exist_ok=True)
            label_out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(image_path) as image, Image.open(label_path) as label:
                if image.size != label.size:
                    raise ValueError(f"label {label_path} is {label.size} but its image is {image.size}")
                size = half_size(*image.size)
                small_image = image.convert("RGB").resize(size, resample=Image.BICUBIC)
                small_label = label.resize(size, resample=Image.NEAREST)  # palette and ids kept
            write_atomically(image_out, lambda p: small_image.save(p, format="JPEG", quality=JPEG_QUALITY))
            write_atomically(label_out, lambda p: small_label.save(p, format="PNG"))
            counts["written"] += 1
        if progress is not None:
            progress(index + 1, len(jobs))
    return counts
