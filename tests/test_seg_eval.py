"""Metrics on hand-computed confusion matrices; whole vs sliding-window inference; evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vfm_adapters as va
from vfm_adapters.seg.datasets import FolderDataset
from vfm_adapters.seg.heads import Segmentor
from vfm_adapters.seg.inference import evaluate, predict, slide_inference, whole_inference, window_starts
from vfm_adapters.seg.metrics import ConfusionMeter, confusion_matrix, iou_from_confusion, results_table, summarize


def test_confusion_matrix_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    # gt 0: predicted 0, 1 | gt 1: 1, 1, 2 | gt 2: 2, 0 | the 255 pixel is not counted
    expected = [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert confusion_matrix(prediction, label, 3).tolist() == expected
    iou = iou_from_confusion(np.array(expected))
    # IoU_0 = 1 / (2 + 2 - 1) ; IoU_1 = 2 / (3 + 3 - 2) ; IoU_2 = 1 / (2 + 2 - 1)
    assert np.allclose(iou, [1 / 3, 2 / 4, 1 / 3])
    summary = summarize(np.array(expected), ["a", "b", "c"])
    assert summary["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert summary["aAcc"] == pytest.approx(100 * 4 / 7)
    assert summary["IoU"]["b"] == pytest.approx(50.0)
    assert summary["pixels"] == 7


def test_absent_classes_are_left_out_of_the_mean():
    matrix = np.array([[4, 0, 0], [0, 0, 0], [1, 0, 5]])  # class 1 neither in gt nor predicted
    iou = iou_from_confusion(matrix)
    assert math.isnan(iou[1])
    assert summarize(matrix)["mIoU"] == pytest.approx(100 * (4 / 5 + 5 / 6) / 2)
    # a class in the ground truth but never predicted counts as 0
    matrix = np.array([[4, 0], [3, 0]])
    assert summarize(matrix)["mIoU"] == pytest.approx(100 * (4 / 7 + 0) / 2)


def test_meter_accumulates_and_ignores_out_of_range():
    meter = ConfusionMeter(2)
    meter.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    meter.update(torch.tensor([1, 1]), torch.tensor([1, 255]))
    assert meter.matrix.tolist() == [[1, 0], [0, 1]]
    assert meter.summary()["mIoU"] == 100.0


def test_results_table_layout():
    table = results_table({"rein": {"a": {"mIoU": 50.0}, "b": {"mIoU": 30.0}}, "lora": {"a": {"mIoU": 40.0}, "b": {"mIoU": float("nan")}}})
    lines = table.splitlines()
    assert lines[0] == "| run | a | b | avg |"
    assert lines[2] == "| rein | 50.0 | 30.0 | 40.0 |"
    assert "n/a" in lines[3]
    single = results_table({"citys": {"mIoU": 61.25, "IoU": {"road": 90.0}}}, per_class=True)
    assert "| - | 61.2 |" in single or "| - | 61.3 |" in single
    assert "| road | 90.0 |" in single


def test_window_placement():
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(100, 512, 341) == [0]
    assert window_starts(2048, 512, 341)[-1] == 2048 - 512


def test_sliding_window_of_a_pixelwise_model_equals_whole_image():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 1)
    for size, crop, stride in [((37, 53), 16, 10), ((10, 12), 32, 20), ((64, 64), 64, 43)]:
        images = torch.randn(2, 3, *size)
        assert torch.allclose(slide_inference(model, images, 5, crop, stride), whole_inference(model, images), atol=1e-5)


def _tiny_segmentor(image_size: int = 32) -> Segmentor:
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=image_size,
                            patch_size=8, dynamic_img_size=True)
    return Segmentor(va.inject_rein(vit, token_length=4, rank=2, link_queries=False), 4, head_channels=8).eval()


def test_sliding_window_equals_whole_image_when_one_crop_covers_it():
    model = _tiny_segmentor()
    images = torch.randn(2, 3, 32, 32)
    whole = whole_inference(model, images)
    assert torch.equal(slide_inference(model, images, 4, crop=32, stride=21), whole)
    # an image smaller than the crop is one window, unpadded (as in mmseg): the same as whole-image inference
    small = torch.randn(1, 3, 24, 32)
    assert torch.equal(slide_inference(model, small, 4, crop=40, stride=21), whole_inference(model, small))
    # overlapping windows on a larger image average every pixel at least once
    large = slide_inference(model, torch.randn(1, 3, 48, 64), 4, crop=32, stride=16)
    assert large.shape == (1, 4, 48, 64) and torch.isfinite(large).all()


class _Decoder(torch.nn.Module):
    """Reads the class back from an image that encodes it (channel 0 = 20 * class)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :1]  # normalised with mean 0, std 1 below: the raw pixel value
        classes = torch.arange(3, dtype=x.dtype).view(1, 3, 1, 1) * 20
        return -(value - classes).abs() + self.anchor


def test_evaluate_on_a_folder_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    expected = np.zeros((3, 3), dtype=np.int64)
    for i in range(3):
        label = rng.integers(0, 3, (12, 16))
        image = np.repeat((label * 20).astype(np.uint8)[..., None], 3, -1)
        stored = label.copy()
        stored[0, :4] = 255  # ignored pixels
        if i == 2:
            image[5:, :] = 0  # corrupt the bottom of the last image: predicted class 0 there
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(stored.astype(np.uint8)).save(tmp_path / "labels" / f"{i}.png")
        predicted = image[..., 0] // 20
        valid = stored != 255
        np.add.at(expected, (stored[valid], predicted[valid]), 1)
    data = FolderDataset(tmp_path, classes=["a", "b", "c"])
    options = dict(mean=(0, 0, 0), std=(1, 1, 1))
    result = evaluate(_Decoder(), data, 3, mode="slide", crop=8, stride=5, **options)
    assert result["images"] == 3
    assert result["mIoU"] == pytest.approx(summarize(expected)["mIoU"])
    assert result["IoU"]["b"] == pytest.approx(summarize(expected, ["a", "b", "c"])["IoU"]["b"])
    assert result["mIoU"] < 100
    # resized inference is resized back to the label's resolution (uniform images: no boundary blur)
    uniform = tmp_path / "uniform"
    for i in range(3):
        for folder, array in (("images", np.full((12, 16, 3), 20 * i, np.uint8)), ("labels", np.full((12, 16), i, np.uint8))):
            (uniform / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(uniform / folder / f"{i}.png")
    resized = evaluate(_Decoder(), FolderDataset(uniform), 3, mode="whole", resize=(40, 30), limit=2, **options)
    assert resized["images"] == 2 and resized["mIoU"] == pytest.approx(100.0)
    assert predict(_Decoder(), data[0]["image"], 3, mode="whole", **options).shape == (12, 16)
