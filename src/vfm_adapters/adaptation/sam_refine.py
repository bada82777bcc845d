"""Pseudo-label refinement with the Segment Anything Model (CLOUDS: "Collaborating Foundation Models for Domain Generalized Semantic Segmentation").

Given an image and a teacher's pseudo label, :class:`SamRefiner` returns a refined label:

1. every class mask of the pseudo label is split into connected components
   (``scipy.ndimage.label``, 4-connectivity by default);
2. components with at most ``min_component_pixels`` pixels (5000) are dropped;
3. SAM is prompted with ``points_per_component`` (5) random positive points inside each
   kept component (drawn from a seeded generator), multimask output on, and the mask with
   the highest predicted IoU score is kept;
4. pixels claimed by two or more kept masks (of different components) are dropped;
5. the masks of one class are merged and labelled with the component's class;
6. every other pixel is ignored (255): it gets no loss.

So a refined label only holds classes of the teacher's label, only inside SAM masks.
When no component qualifies (every class region is at most ``min_component_pixels``),
the raw teacher label is returned unchanged, as the CLOUDS code does (not an all-ignore
label, which would drop the image from training).
SAM is transformers' ``SamModel`` fed tensors directly (no ``SamProcessor``): the image
is resized so its longer side is the model's input size, normalised with SAM's ImageNet
statistics and padded bottom-right; point prompts ``(x, y)`` are multiplied by the same
factor (``x * scale``, as ``SamProcessor`` and the CLOUDS code do: transformers' prompt
encoder itself adds the half-pixel offset), and the low-resolution masks are upsampled to
the padded input, cropped and resized back.

The default model is :data:`DEFAULT_SAM` (``facebook/sam-vit-base``, the smallest SAM
that ``transformers.SamModel`` loads). The CLOUDS authors default to MobileSAM (a
TinyViT image encoder), which transformers does not load; any ``SamModel`` checkpoint
(``facebook/sam-vit-huge`` for the original SAM) can be given instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seg.datasets import IGNORE_INDEX

__all__ = ["DEFAULT_SAM", "SamRefineConfig", "SamRefiner", "class_components", "merge_masks", "sample_points"]

#: The SAM loaded when a config enables refinement without naming one (the smallest SAM
#: that ``transformers.SamModel`` loads; the CLOUDS authors use MobileSAM).
DEFAULT_SAM = "facebook/sam-vit-base"

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class SamRefineConfig:
    """Options of :class:`SamRefiner` (defaults: CLOUDS).

    Attributes:
        min_component_pixels: A component needs more than this many pixels (5000).
        points_per_component: Positive point prompts per component (5).
        seed: Seed of the point sampling (each ``refine`` call draws from a fresh
            generator seeded by ``seed`` and the call's ``index``).
        connectivity: 4 or 8 (neighbourhood of ``scipy.ndimage.label``).
        mask_threshold: Threshold of SAM's mask logits (0).
        prompts_per_call: Components prompted in one SAM decoder call (memory bound).
        ignore_index: Label of refined-away pixels.
    """

    min_component_pixels: int = 5000
    points_per_component: int = 5
    seed: int = 0
    connectivity: int = 4
    mask_threshold: float = 0.0
    prompts_per_call: int = 64
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.points_per_component < 1:
            raise ValueError("points_per_component must be at least 1")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamRefineConfig":
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"unknown SAM refinement option(s) {unknown}; accepted: {sorted(accepted)}")
        return cls(**dict(values))


def class_components(
    label: np.ndarray | Tensor, min_pixels: int = 5000, ignore_index: int = IGNORE_INDEX, connectivity: int = 4
) -> list[tuple[int, np.ndarray]]:
    """Connected components of every class larger than ``min_pixels``: ``[(class, bool mask)]``.

    Example:
        >>> label = np.array([[0, 0, 1], [2, 0, 1], [2, 255, 0]])
        >>> [(c, int(m.sum())) for c, m in class_components(label, min_pixels=1)]
        [(0, 3), (1, 2), (2, 2)]
    """
    from scipy import ndimage

    label = label.cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    components = []
    for cls in np.unique(label):
        if int(cls) == ignore_index:
            continue
        labelled, count = ndimage.label(label == cls, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=count + 1)
        for index in range(1, count + 1):
            if sizes[index] > min_pixels:
                components.append((int(cls), labelled == index))
    return components


def sample_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random pixels of ``mask`` as ``(x, y)`` rows (without replacement when possible).

    Example:
        >>> mask = np.zeros((4, 4), bool); mask[1, 2] = True
        >>> sample_points(mask, 3, np.random.default_rng(0)).tolist()
        [[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]]
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot sample points from an empty mask")
    picks = rng.choice(len(ys), size=count, replace=len(ys) < count)
    return np.stack([xs[picks], ys[picks]], axis=1).astype(np.float64)


def merge_masks(masks: Tensor | np.ndarray, classes: list[int] | np.ndarray, shape: tuple[int, int],
                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """One label from per-component masks: the component's class where exactly one mask
    claims a pixel, ``ignore_index`` where none or several do.

    Example:
        >>> m = torch.tensor([[[1, 1, 0]], [[0, 1, 1]], [[0, 0, 0]]], dtype=torch.bool)
        >>> merge_masks(m, [3, 5, 7], (1, 3)).tolist()
        [[3, 255, 5]]
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    out = torch.full(tuple(shape), ignore_index, dtype=torch.long)
    if masks.numel() == 0 or masks.shape[0] == 0:
        return out
    claims = masks.sum(0)
    single = claims == 1
    for mask, cls in zip(masks, classes):
        out[mask & single] = int(cls)
    return out


class SamRefiner:
    """Refines pseudo labels with a transformers ``SamModel`` (see the module docstring).

    Args:
        sam: A ``transformers.SamModel``, or a hub id / path loaded with
            ``SamModel.from_pretrained`` on first use (e.g. :data:`DEFAULT_SAM`).
        config: :class:`SamRefineConfig` or a mapping of its fields.

    Example:
        >>> from transformers import SamConfig, SamModel
        >>> from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig,
        ...     SamPromptEncoderConfig, SamVisionConfig)
        >>> sam = SamModel(SamConfig(
        ...     vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1,
        ...         num_attention_heads=2, image_size=32, patch_size=8, window_size=2, global_attn_indexes=[0],
        ...         mlp_dim=16, num_pos_feats=8),
        ...     prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=32, patch_size=8,
        ...         mask_input_channels=4),
        ...     mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=16, num_attention_heads=2,
        ...         iou_head_hidden_dim=16))).eval()
        >>> refiner = SamRefiner(sam, {"min_component_pixels": 10})
        >>> label = torch.zeros(24, 24, dtype=torch.long); label[:, 12:] = 1
        >>> refined = refiner.refine(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8), label)
        >>> refined.shape, set(refined.unique().tolist()) <= {0, 1, 255}
        (torch.Size([24, 24]), True)
    """

    @classmethod
    def from_pretrained(cls, name: str | None = None,
                        config: SamRefineConfig | Mapping[str, Any] | None = None) -> "SamRefiner":
        """A refiner that loads ``transformers.SamModel.from_pretrained(name or DEFAULT_SAM)`` on first use."""
        return cls(name or DEFAULT_SAM, config)

    def __init__(self, sam: nn.Module | str, config: SamRefineConfig | Mapping[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, SamRefineConfig) else SamRefineConfig.from_dict(config or {})
        self._sam: nn.Module | None = None
        self.name = sam if isinstance(sam, str) else None
        if not isinstance(sam, str):
            self._set_model(sam)

    def _set_model(self, sam: nn.Module) -> None:
        self._sam = sam.eval()
        for param in self._sam.parameters():
            param.requires_grad_(False)
        size = sam.config.vision_config.image_size
        self.input_size = int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def sam(self) -> nn.Module:
        """The SAM model; a refiner built from a name loads it here, on first use."""
        if self._sam is None:
            from transformers import SamModel

            self._set_model(SamModel.from_pretrained(self.name))
        return self._sam

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    def preprocess(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(3, H, W)`` 0..255 image -> SAM's ``(1, 3, S, S)`` input and the resized ``(h, w)``."""
        self.sam  # noqa: B018 -- loads a named model (sets input_size)
        height, width = image.shape[-2:]
        scale = self.input_size / max(height, width)
        resized = (int(height * scale + 0.5), int(width * scale + 0.5))
        x = F.interpolate(image[None].float().to(self.device), size=resized, mode="bilinear", align_corners=False)
        mean = torch.tensor(SAM_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(SAM_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        x = F.pad(x, (0, self.input_size - resized[1], 0, self.input_size - resized[0]))
        return x, resized

    @torch.no_grad()
    def prompt(self, image: Tensor, points: np.ndarray) -> tuple[Tensor, Tensor]:
        """Runs SAM with positive point prompts, one prompt set per component.

        Args:
            image: ``(3, H, W)`` image on the 0..255 scale.
            points: ``(N, P, 2)`` prompts as ``(x, y)`` pixel coordinates of ``image``.

        Returns:
            ``(masks, scores)``: SAM's multimask outputs as bool ``(N, M, H, W)`` and their
            predicted IoU ``(N, M)``.
        """
        height, width = image.shape[-2:]
        pixels, resized = self.preprocess(image)
        embeddings = self.sam.get_image_embeddings(pixels)
        scale = torch.tensor([resized[1] / width, resized[0] / height], dtype=torch.float32)
        all_masks, all_scores = [], []
        for start in range(0, len(points), self.config.prompts_per_call):
            chunk = torch.as_tensor(points[start : start + self.config.prompts_per_call], dtype=torch.float32)
            coords = (chunk * scale)[None].to(self.device)  # SAM's resized frame; the encoder adds 0.5
            labels = torch.ones(coords.shape[:-1], dtype=torch.long, device=self.device)
            out = self.sam(image_embeddings=embeddings, input_points=coords, input_labels=labels, multimask_output=True)
            low = out.pred_masks[0].float()  # (n, M, h, w), over the padded S x S input
            n, m = low.shape[:2]
            up = F.interpolate(low.flatten(0, 1)[:, None], size=(self.input_size, self.input_size), mode="bilinear",
                               align_corners=False)[:, :, : resized[0], : resized[1]]
            up = F.interpolate(up, size=(height, width), mode="bilinear", align_corners=False)
            all_masks.append((up[:, 0] > self.config.mask_threshold).view(n, m, height, width).cpu())
            all_scores.append(out.iou_scores[0].float().cpu())
        return torch.cat(all_masks), torch.cat(all_scores)

    def refine(self, image: Tensor, label: Tensor, index: int = 0) -> Tensor:
        """Refines one pseudo label.

        Args:
            image: ``(3, H, W)`` image on the 0..255 scale (uint8 or float).
            label: ``(H, W)`` teacher pseudo label.
            index: Mixed into the point-sampling seed (e.g. the image's stream position).

        Returns:
            The refined ``(H, W)`` label (long, ``ignore_index`` outside kept masks), or
            the teacher's ``label`` itself when no component is large enough.
        """
        cfg = self.config
        shape = tuple(label.shape[-2:])
        if tuple(image.shape[-2:]) != shape:
            raise ValueError(f"image {tuple(image.shape[-2:])} and label {shape} differ in size")
        components = class_components(label, cfg.min_component_pixels, cfg.ignore_index, cfg.connectivity)
        if not components:  # nothing to prompt: keep the teacher's label (CLOUDS)
            return label.to(torch.long).clone()
        rng = np.random.default_rng([cfg.seed, int(index)])
        points = np.stack([sample_points(mask, cfg.points_per_component, rng) for _, mask in components])
        masks, scores = self.prompt(image, points)
        best = masks[torch.arange(len(masks)), scores.argmax(dim=1)]
        return merge_masks(best, [c for c, _ in components], shape, cfg.ignore_index).to(label.device)

    def __call__(self, images: Tensor, labels: Tensor, start_index: int = 0) -> Tensor:
        """Refines a batch: images ``(B, 3, H, W)`` on 0..255, labels ``(B, H, W)``."""
        return torch.stack([self.refine(image, label, start_index + i) for i, (image, label) in enumerate(zip(images, labels))])
