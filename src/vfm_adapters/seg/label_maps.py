"""Label tables shared by the dataset readers: class names, stored id -> train id maps, lookup tables.

Every table maps a dataset's stored label ids to the 19 Cityscapes train ids (0..18);
ids not listed are ignored (:data:`IGNORE_INDEX`, 255). :func:`make_lut` turns a table
into an array that converts a whole label map in one indexing operation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "IGNORE_INDEX",
    "MAPILLARY_ID_TO_TRAINID",
    "SYNTHIA_ID_TO_TRAINID",
    "make_lut",
]

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

#: Cityscapes label ids (also used by GTA5) -> train ids.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

#: SYNTHIA-RAND-CITYSCAPES class ids -> train ids (16 classes; terrain, truck, train absent).
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
    19: 15, 12: 17, 11: 18,
}

#: Mapillary Vistas v1.2 (66 classes) ids -> train ids: the Rein authors' mapping (their
#: name rules in ``tools/convert_datasets/mapillary2cityscape.py``): road includes bike
#: lane, plain crosswalk, parking, service lane and lane markings; sidewalk curb, curb
#: cut and pedestrian area; pole street light and utility pole; sign the sign frame and
#: both sign faces; 41 (manhole) and every other id are ignored (255).
MAPILLARY_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 0, 10: 0, 13: 0, 14: 0, 23: 0, 24: 0,  # road
    2: 1, 9: 1, 11: 1, 15: 1,  # sidewalk
    17: 2, 6: 3, 3: 4,  # building, wall, fence
    44: 5, 45: 5, 47: 5,  # pole
    48: 6,  # traffic light
    46: 7, 49: 7, 50: 7,  # traffic sign
    30: 8, 29: 9, 27: 10, 19: 11,  # vegetation, terrain, sky, person
    20: 12, 21: 12, 22: 12,  # rider (bicyclist, motorcyclist, other rider)
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car, truck, bus, train (on rails), motorcycle, bicycle
}


def make_lut(mapping: Mapping[int, int] | None, size: int = 65536, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A lookup table ``lut[id] = train id`` (``ignore_index`` for unmapped ids).

    A table lookup converts a whole label map in one indexing operation, and covers
    every possible stored value (16-bit labels included), so unknown ids map to ignore
    instead of raising.

    Example:
        >>> lut = make_lut({7: 0, 26: 13})
        >>> lut[[7, 26, 0]].tolist()
        [0, 13, 255]
    """
    lut = np.full(size, ignore_index, dtype=np.int64)
    if mapping is None:
        lut[:] = np.arange(size)
        lut[256:] = ignore_index
        return lut
    for source, target in mapping.items():
        lut[int(source)] = int(target)
    return lut
