"""Semantic segmentation on top of adapted vision foundation models.

Readers for the standard domain-generalisation datasets (:mod:`.datasets`), aligned
transforms (:mod:`.transforms`), multi-layer features with adapters active and Rein's
neck (:mod:`.features`), light decode heads (:mod:`.heads`) and Mask2Former
(:mod:`.mask2former`) behind one model interface (:mod:`.model`), sliding-window
inference and mIoU (:mod:`.inference`, :mod:`.metrics`), resumable Accelerate training
(:mod:`.config`, :mod:`.build`, :mod:`.optim`, :mod:`.checkpoints`, :mod:`.loop`,
:mod:`.training`) and the synthetic domain-shift demo (:mod:`.synthetic`, ``vfm-adapters demo``).

Example:
    >>> from vfm_adapters.seg import SyntheticScenes, confusion_matrix
    >>> SyntheticScenes("night", num_images=1, size=32)[0]["label"].shape
    torch.Size([32, 32])
"""

from .datasets import (
    ACDC,
    BDD100K,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    GTA5,
    IGNORE_INDEX,
    MAPILLARY_ID_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    Cityscapes,
    DatasetLayoutError,
    FolderDataset,
    Mapillary,
    SegmentationDataset,
    Synthia,
    build_dataset,
)
from .features import BackboneFeatures, InterpolationNeck, MultiLevelNeck, MultiScaleNeck, build_neck, default_layers
from .heads import HEADS, FPNHead, LinearHead, Segmentor
from .model import SegmentationModel, model_loss, segmentation_loss
from .daformer_head import DAFormerHead  # registers HEADS["daformer"]
from .inference import evaluate, predict, slide_inference, whole_inference
from .metrics import ConfusionMeter, confusion_matrix, iou_from_confusion, results_table, summarize
from .sampling import AugmentedStream, StreamSampler, mix_datasets
from .synthetic import DOMAINS, SYNTHETIC_CLASSES, SyntheticScenes
from .build import SEGMENTORS, build_segmentor
from .checkpoints import load_segmentor, save_segmentor
from .config import load_config
from .training import train
from .transforms import (
    Compose,
    Normalize,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    Pad,
    RandomChoiceResize,
    RandomRescale,
    Resize,
    eval_transform,
    train_transform,
)

__all__ = [
    "ACDC", "BDD100K", "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "DOMAINS", "GTA5", "IGNORE_INDEX",
    "MAPILLARY_ID_TO_TRAINID", "SYNTHETIC_CLASSES", "SYNTHIA_ID_TO_TRAINID", "AugmentedStream", "BackboneFeatures",
    "Cityscapes", "Compose", "ConfusionMeter", "DAFormerHead", "DatasetLayoutError", "FPNHead", "FolderDataset", "LinearHead",
    "Mapillary", "MultiScaleNeck", "Normalize", "PhotoMetricDistortion", "RandomCrop", "RandomFlip", "RandomRescale",
    "Resize", "SegmentationDataset", "Segmentor", "StreamSampler", "Synthia", "SyntheticScenes", "build_dataset",
    "build_segmentor", "confusion_matrix", "default_layers", "eval_transform", "evaluate", "iou_from_confusion",
    "load_config", "load_segmentor", "mix_datasets", "predict", "results_table", "save_segmentor",
    "segmentation_loss", "slide_inference", "summarize", "train", "train_transform", "whole_inference",
]
__all__ += ["InterpolationNeck", "MultiLevelNeck", "build_neck", "Pad", "RandomChoiceResize"]
__all__ += ["HEADS", "SEGMENTORS", "SegmentationModel", "model_loss"]
