"""The segmentor of self-training: a (frozen) feature encoder and a decode head that knows its loss.

CLOUDS ("Collaborating Foundation Models for Domain Generalized Semantic Segmentation")
keeps an EMA teacher of the decode head alone, over the shared frozen encoder, so the
model is split in two: ``model.encoder(images)`` (a list of feature maps) and
``model.decoder`` (:class:`DecodeHead`: neck + head, with ``logits`` and ``loss``).
:class:`FeatureSegmentor` builds it from a timm ``features_only`` backbone (CLIP
ConvNeXt-L, :data:`CLIP_CONVNEXT_L`); :func:`from_segmentor` views a
:class:`vfm_adapters.seg.Segmentor` that way; :class:`SourceTrainer` is the source-only
stage 1.

Example:
    >>> from vfm_adapters.seg import LinearHead
    >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
    >>> FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, 3)))(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seg.datasets import IGNORE_INDEX
from ..seg.model import PixelWeightsUnsupported, check_normalisation, segmentation_loss, train_mode
from ..seg.optim import parameter_groups
from ..seg.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CLIP_CONVNEXT_L", "CLIP_MEAN", "CLIP_STD", "DecodeHead", "FeatureSegmentor", "SourceTrainer",
           "TimmFeatureEncoder", "from_segmentor"]

#: OpenCLIP ConvNeXt-L (``convnext_large_d_320``, LAION-2B, "ft soup") in timm: the CLIP
#: ConvNeXt-L image tower behind FC-CLIP and CLOUDS.
CLIP_CONVNEXT_L = "convnext_large_mlp.clip_laion2b_ft_soup_320"
#: CLIP's normalisation on the 0..255 scale.
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)


class TimmFeatureEncoder(nn.Module):
    """A timm ``features_only`` backbone giving 4 maps (strides 4/8/16/32 for a ConvNeXt).

    Args:
        name: timm model name (default: CLIP ConvNeXt-L, :data:`CLIP_CONVNEXT_L`).
        pretrained: Load timm's pretrained weights (needs a download).
        out_indices: Stages to return.
        frozen: Freeze every weight and keep the module in eval mode (CLOUDS).
        **kwargs: Passed to ``timm.create_model``.

    Example:
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0, 1, 2, 3))
        >>> [tuple(f.shape[1:]) for f in enc(torch.randn(1, 3, 64, 64))], enc.channels
        ([(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)], [40, 80, 160, 320])
    """

    def __init__(self, name: str = CLIP_CONVNEXT_L, pretrained: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen: bool = True, **kwargs: Any) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=pretrained, features_only=True,
                                       out_indices=tuple(out_indices), **kwargs)
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())
        self.frozen = bool(frozen)
        if self.frozen:
            for param in self.model.parameters():
                param.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "TimmFeatureEncoder":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.model(images))


class DecodeHead(nn.Module):
    """Optional neck + head over a list of feature maps; knows how to score and to train the output.

    Works with the light heads of :mod:`vfm_adapters.seg.heads` (logits) and with
    :class:`vfm_adapters.seg.mask2former.Mask2FormerHead` (a ``Mask2FormerOutput``: scores via
    ``head.predict``, loss via ``head.loss``, i.e. Hungarian matching on pseudo labels).

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> head = DecodeHead(LinearHead([4, 4], num_classes=3))
        >>> out = head([torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)])
        >>> head.logits(out, (16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, head: nn.Module, neck: nn.Module | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.neck = neck
        self.head = head
        self.ignore_index = ignore_index

    def forward(self, features: Sequence[Tensor]) -> Any:
        maps = self.neck(features) if self.neck is not None else features
        return self.head(maps)

    def logits(self, output: Any, size: Sequence[int]) -> Tensor:
        """Per-pixel class scores ``(B, K, H, W)`` at ``size``."""
        if isinstance(output, Tensor):
            if tuple(output.shape[-2:]) != tuple(size):
                output = F.interpolate(output, size=tuple(size), mode="bilinear", align_corners=False)
            return output
        return self.head.predict(output, size=tuple(size))

    def loss(self, output: Any, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy (255 ignored; weighted by ``pixel_weights`` if given) for logits, the
        head's own loss otherwise (which refuses per-pixel weights)."""
        if not isinstance(output, Tensor):
            if pixel_weights is not None:
                raise PixelWeightsUnsupported(f"{type(self.head).__name__} has no per-pixel loss to weight (DACS); "
                                              "use a per-pixel head (fpn, linear, daformer)")
            return self.head.loss(output, labels)
        return segmentation_loss(output, labels, self.ignore_index, pixel_weights)


class FeatureSegmentor(nn.Module):
    """``encoder`` (list of maps) + ``decoder`` (:class:`DecodeHead`) -> logits at the image size.

    A :class:`~vfm_adapters.seg.model.SegmentationModel`: its loss is the decoder's
    (cross-entropy for a light head, the head's own for Mask2Former).

    Args:
        encoder: Maps normalised images to a list of feature maps.
        decoder: The :class:`DecodeHead` over them.
        mean: Per-channel mean (0-255 RGB) of the images this model expects.
        std: Per-channel standard deviation, as ``mean``.

    Example:
        >>> from vfm_adapters.seg import FPNHead
        >>> enc = TimmFeatureEncoder("convnext_atto")
        >>> seg = FeatureSegmentor(enc, DecodeHead(FPNHead(enc.channels, num_classes=5, channels=16)))
        >>> seg(torch.randn(1, 3, 64, 64)).shape, seg.num_classes
        (torch.Size([1, 5, 64, 64]), 5)
    """

    def __init__(self, encoder: nn.Module, decoder: DecodeHead, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mean, self.std = check_normalisation(mean, std)
        self.num_classes = int(decoder.head.num_classes)

    @property
    def per_pixel_loss(self) -> bool:
        """Whether the head gives logits (per-pixel cross-entropy) rather than having its own loss."""
        return not callable(getattr(self.decoder.head, "loss", None))

    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, images: Tensor) -> Any:
        """Encoder features; without gradients when the encoder is frozen."""
        if self.encoder_trainable():
            return self.encoder(images)
        with torch.no_grad():
            return self.encoder(images)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, H, W)`` at the image size or, given ``labels``, the training loss."""
        if labels is not None:
            return self.loss(images, labels)
        return self.decoder.logits(self.decoder(self.encode(images)), images.shape[-2:])

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """The decoder's loss on the encoded images (:meth:`DecodeHead.loss`)."""
        return self.decoder.loss(self.decoder(self.encode(images)), labels, pixel_weights)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                         no_decay: str = "small_tensors") -> list[dict]:
        """AdamW groups (:func:`vfm_adapters.seg.optim.parameter_groups`): a trainable encoder at
        ``lr * backbone_lr_mult``; no decay on 0/1-d tensors, embeddings and norms."""
        return parameter_groups(self, lr, weight_decay, backbone_lr_mult, no_decay, host=self.encoder)

    def decode_modules(self) -> nn.ModuleDict:
        """The trained part (the decode head), as :class:`vfm_adapters.seg.Segmentor` names it."""
        return nn.ModuleDict({"decoder": self.decoder})


def from_segmentor(segmentor: nn.Module) -> FeatureSegmentor:
    """A :class:`FeatureSegmentor` view of a ``seg.Segmentor`` / ``Mask2FormerSegmentor`` (modules shared).

    The encoder is the segmentor's ``features`` (host + adapters), the decoder its neck +
    head. A Mask2Former head whose queries come from Rein is refused: its decoder would
    depend on the backbone's tokens, and CLOUDS' teacher is the decode head alone.

    Example:
        >>> import timm
        >>> from vfm_adapters.seg import Segmentor
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
        >>> seg = Segmentor(vit, num_classes=3, head_channels=8).eval()
        >>> view = from_segmentor(seg)
        >>> view.decoder.head is seg.head, view(torch.randn(2, 3, 32, 32)).shape
        (True, torch.Size([2, 3, 32, 32]))
    """
    head = segmentor.head
    if getattr(head, "link_rein_queries", False):
        raise ValueError("a Mask2Former head linked to Rein's queries cannot have a decode-head-only teacher; "
                         "build the segmentor with link_rein_queries=False")
    return FeatureSegmentor(segmentor.features, DecodeHead(head, segmentor.neck))


class SourceTrainer:
    """Source-only training of the decode head (CLOUDS stage 1): ``loss = decoder.loss(x_s, y_s)``.

    Its ``decoder.safetensors`` is what stage 2 starts from (``model.decoder_checkpoint``).

    Args:
        model: A :class:`FeatureSegmentor` (or :func:`from_segmentor` of a seg segmentor).
        optimizer: Default AdamW (lr 1e-4, wd 0.05) over trainable parameters.
        scheduler: Optional scheduler stepped every step.
        grad_clip: Gradient norm clip.

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
        >>> trainer = SourceTrainer(FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, 3))))
        >>> out = trainer.step(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long))
        >>> trainer.iteration, out["loss"] > 0
        (1, True)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                 grad_clip: float | None = None) -> None:
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            model = from_segmentor(model)
        self.model = model
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.teacher, self.generator = None, None
        self.iteration = 0

    def step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        """One supervised step on a labelled batch; returns ``{"loss"}``."""
        train_mode(self.model)
        loss = self.model.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return {"loss": float(loss.detach())}
