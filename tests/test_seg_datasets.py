"""Dataset readers on small files written in each dataset's real on-disk layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfm_adapters.seg import datasets as D
from vfm_adapters.seg._png import read_png, write_png16
from vfm_adapters.seg.sampling import AugmentedStream, StreamSampler, mix_datasets, source_schedule
from vfm_adapters.seg.synthetic import SyntheticScenes

RNG = np.random.default_rng(0)


def _image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return pixels


def _label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
        image = Image.frombytes("P", image.size, values.astype(np.uint8).tobytes())
        image.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    image.save(path)


def _expected(stored: np.ndarray, mapping: dict[int, int] | None) -> np.ndarray:
    """Reference mapping, pixel by pixel, independent of the readers' lookup tables."""
    out = np.empty(stored.shape, dtype=np.int64)
    for index, value in np.ndenumerate(stored):
        if mapping is None:
            out[index] = value if value < 19 else 255
        else:
            out[index] = mapping.get(int(value), 255)
    return out


def _all_ids(height: int, width: int, high: int = 256, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, high, (height, width))
    values.flat[:high] = np.arange(high)[: values.size]  # every id appears at least once
    return values


# ------------------------------------------------------------------ Cityscapes
def test_cityscapes_maps_label_ids_pixel_by_pixel(tmp_path):
    ids = _all_ids(16, 20, high=40)
    pixels = _image(tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", 16, 20)
    _label(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    data = D.Cityscapes(tmp_path, "val")
    sample = data[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 16, 20)
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), pixels)
    assert sample["label"].dtype == torch.int64
    assert np.array_equal(sample["label"].numpy(), _expected(ids, D.CITYSCAPES_ID_TO_TRAINID))
    assert sorted(set(sample["label"].unique().tolist()) - {255}) == list(range(19))
    assert sample["path"].endswith("_leftImg8bit.png")


def test_cityscapes_prefers_train_ids_and_checks_layout(tmp_path):
    ids = _all_ids(8, 8, high=40)
    train_ids = np.random.default_rng(3).integers(0, 19, (8, 8))
    train_ids[0, 0] = 255
    _image(tmp_path / "leftImg8bit/train/bonn/bonn_000001_000019_leftImg8bit.png", 8, 8)
    _label(tmp_path / "gtFine/train/bonn/bonn_000001_000019_gtFine_labelIds.png", ids)
    _label(tmp_path / "gtFine/train/bonn/bonn_000001_000019_gtFine_labelTrainIds.png", train_ids)
    _image(tmp_path / "leftImg8bit/train/bonn/bonn_000002_000019_leftImg8bit.png", 8, 8)
    _label(tmp_path / "gtFine/train/bonn/bonn_000002_000019_gtFine_labelIds.png", ids)
    data = D.Cityscapes(tmp_path, "train")
    assert len(data) == 2
    assert np.array_equal(data[0]["label"].numpy(), train_ids)
    assert np.array_equal(data[1]["label"].numpy(), _expected(ids, D.CITYSCAPES_ID_TO_TRAINID))
    with pytest.raises(D.DatasetLayoutError, match="leftImg8bit/<split>/<city>"):
        D.Cityscapes(tmp_path, "val")
    with pytest.raises(D.DatasetLayoutError, match="does not exist"):
        D.Cityscapes(tmp_path / "missing", "train")
    (tmp_path / "gtFine/train/bonn/bonn_000002_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(D.DatasetLayoutError, match="no label file"):
        D.Cityscapes(tmp_path, "train")


# ------------------------------------------------------------------ GTA5
def test_gta5_palette_labels_and_mismatched_sizes(tmp_path):
    ids = _all_ids(12, 18, high=40, seed=2)
    _image(tmp_path / "images/00001.png", 12, 18)
    _label(tmp_path / "labels/00001.png", ids, palette=True)
    # a label map at half the image's size, as some GTA5 files are
    small = _all_ids(6, 9, high=40, seed=4)
    _image(tmp_path / "images/00002.png", 12, 18, seed=5)
    _label(tmp_path / "labels/00002.png", small, palette=True)
    assert Image.open(tmp_path / "labels/00001.png").mode == "P"
    data = D.GTA5(tmp_path)
    assert np.array_equal(data[0]["label"].numpy(), _expected(ids, D.CITYSCAPES_ID_TO_TRAINID))
    resized = data[1]["label"].numpy()
    assert resized.shape == (12, 18)
    assert np.array_equal(resized, _expected(np.repeat(np.repeat(small, 2, 0), 2, 1), D.CITYSCAPES_ID_TO_TRAINID))
    with pytest.raises(D.DatasetLayoutError, match="images/\\*.png"):
        D.GTA5(tmp_path / "nothing")


# ------------------------------------------------------------------ SYNTHIA (16-bit labels)
def test_pillow_truncates_16bit_rgb_so_a_decoder_is_needed(tmp_path):
    values = np.zeros((4, 5, 3), dtype=np.uint16)
    values[..., 0] = 10
    write_png16(tmp_path / "x.png", values)
    assert np.asarray(Image.open(tmp_path / "x.png")).max() == 0  # Pillow keeps only the high byte
    assert read_png(tmp_path / "x.png")[..., 0].tolist() == values[..., 0].tolist()


@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_png_decoder_handles_every_filter(tmp_path, filters, channels):
    values = RNG.integers(0, 65536, (7, 6, channels)).astype(np.uint16)
    write_png16(tmp_path / "f.png", values, filters=filters)
    decoded = read_png(tmp_path / "f.png")
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, values)


def test_synthia_reads_class_from_red_channel(tmp_path):
    classes = _all_ids(10, 13, high=23, seed=6)
    label = np.stack([classes, RNG.integers(0, 3000, classes.shape), np.zeros_like(classes)], -1).astype(np.uint16)
    _image(tmp_path / "RGB/0000001.png", 10, 13)
    (tmp_path / "GT/LABELS").mkdir(parents=True)
    write_png16(tmp_path / "GT/LABELS/0000001.png", label, filters=(0, 1, 2, 3, 4))
    data = D.Synthia(tmp_path)
    assert np.array_equal(data[0]["label"].numpy(), _expected(classes, D.SYNTHIA_ID_TO_TRAINID))
    present = set(data[0]["label"].unique().tolist()) - {255}
    assert present == set(D.SYNTHIA_ID_TO_TRAINID.values()) and len(present) == 16


# ------------------------------------------------------------------ BDD100K, Mapillary, ACDC, folder
def test_bdd100k_train_ids(tmp_path):
    ids = _all_ids(9, 16, high=256, seed=7)
    _image(tmp_path / "images/10k/val/abc-123.jpg", 9, 16)
    _label(tmp_path / "labels/sem_seg/masks/val/abc-123.png", ids)
    sample = D.BDD100K(tmp_path, "val")[0]
    assert sample["image"].shape == (3, 9, 16)
    assert np.array_equal(sample["label"].numpy(), _expected(ids, None))
    with pytest.raises(D.DatasetLayoutError, match="images/10k"):
        D.BDD100K(tmp_path, "train")


def test_mapillary_maps_66_ids(tmp_path):
    ids = _all_ids(9, 11, high=66, seed=8)
    _image(tmp_path / "validation/images/xyz.jpg", 9, 11)
    _label(tmp_path / "validation/labels/xyz.png", ids, palette=True)
    for split in ("validation", "val"):
        sample = D.Mapillary(tmp_path, split)[0]
        assert np.array_equal(sample["label"].numpy(), _expected(ids, D.MAPILLARY_ID_TO_TRAINID))
    assert sorted(set(D.MAPILLARY_ID_TO_TRAINID.values())) == list(range(19))


def test_acdc_conditions(tmp_path):
    for i, condition in enumerate(("fog", "night")):
        stem = f"GOPR{i}_frame_000001"
        _image(tmp_path / f"rgb_anon/{condition}/val/GOPR{i}/{stem}_rgb_anon.png", 6, 8)
        train_ids = np.full((6, 8), i, dtype=np.uint8)
        train_ids[0] = 255
        _label(tmp_path / f"gt/{condition}/val/GOPR{i}/{stem}_gt_labelTrainIds.png", train_ids)
    assert len(D.ACDC(tmp_path, "val", conditions=("fog", "night"))) == 2
    night = D.ACDC(tmp_path, "val", conditions=("night",))
    assert len(night) == 1 and night[0]["label"][1:].eq(1).all() and night[0]["label"][0].eq(255).all()
    with pytest.raises(D.DatasetLayoutError, match="rgb_anon/<condition>"):
        D.ACDC(tmp_path, "val")  # rain and snow are missing
    with pytest.raises(ValueError, match="unknown ACDC condition"):
        D.ACDC(tmp_path, "val", conditions=("sandstorm",))


def test_folder_reader_with_mapping_table(tmp_path):
    ids = _all_ids(5, 7, high=10, seed=9)
    _image(tmp_path / "images/a.png", 5, 7)
    _label(tmp_path / "labels/a.png", ids)
    mapping = {1: 0, 2: 0, 5: 3}
    data = D.build_dataset({"type": "folder", "root": str(tmp_path), "mapping": {"1": 0, "2": 0, "5": 3}})
    assert np.array_equal(data[0]["label"].numpy(), _expected(ids, mapping))
    with pytest.raises(D.DatasetLayoutError, match="missing directory masks"):
        D.FolderDataset(tmp_path, label_dir="masks")
    with pytest.raises(ValueError, match="unknown dataset type"):
        D.build_dataset({"type": "kitti"})


def test_transform_hook_receives_the_generator(tmp_path):
    _image(tmp_path / "images/a.png", 5, 7)
    _label(tmp_path / "labels/a.png", np.zeros((5, 7)))
    seen = []
    data = D.FolderDataset(tmp_path, transform=lambda s, rng=None: seen.append(rng) or s)
    generator = np.random.default_rng(0)
    data.get(0, rng=generator)
    assert seen == [generator]


# ------------------------------------------------------------------ mixing sources
def test_mixing_keeps_the_ratio_in_every_prefix():
    for weights in ([1, 1], [3, 1], [0.2, 0.5, 0.3]):
        sources = source_schedule(weights, 200)
        shares = np.asarray(weights) / sum(weights)
        for k in range(1, 201):
            counts = np.bincount(sources[:k], minlength=len(weights))
            assert np.all(np.abs(counts - k * shares) < 1.0 + 1e-9)


def test_stream_visits_each_source_as_permutations_and_resumes():
    sampler = StreamSampler([3, 5], [1, 1], seed=4, length=30)
    stream = list(sampler)
    first = [i for _, i in stream if i < 3]
    second = [i - 3 for _, i in stream if i >= 3]
    assert sorted(first[:3]) == [0, 1, 2] and sorted(first[3:6]) == [0, 1, 2]
    assert sorted(second[:5]) == list(range(5)) and sorted(second[5:10]) == list(range(5))
    assert list(StreamSampler([3, 5], [1, 1], seed=4, start=11, length=19)) == stream[11:]
    shards = [list(StreamSampler([3, 5], [1, 1], seed=4, length=30, rank=r, world_size=3)) for r in range(3)]
    assert sorted(shards[0] + shards[1] + shards[2]) == stream
    assert list(StreamSampler([3, 5], [1, 1], seed=5, length=30)) != stream


def test_mix_real_and_synthetic_50_50():
    real, synthetic = SyntheticScenes("source", 4, size=16, seed=1), SyntheticScenes("fog", 6, size=16, seed=2)
    data, sampler = mix_datasets([real, synthetic], [0.5, 0.5], seed=0, length=12)
    sources = [data[key]["source"] for key in sampler]
    assert sources.count(0) == 6 and sources.count(1) == 6
    assert isinstance(data, AugmentedStream)


def test_tables_and_file_readers_keep_their_datasets_import_path():
    """The label tables (seg.label_maps) and file readers (seg.image_files) moved; seg.datasets still has them."""
    from vfm_adapters.seg import image_files, label_maps

    for name in label_maps.__all__:
        assert getattr(D, name) is getattr(label_maps, name), name
    for name in image_files.__all__:
        assert getattr(D, name) is getattr(image_files, name), name
    assert D.make_lut(D.SYNTHIA_ID_TO_TRAINID)[[3, 1, 0]].tolist() == [0, 10, D.IGNORE_INDEX]
    assert len(D.CITYSCAPES_CLASSES) == 19 and D.IGNORE_INDEX == 255
