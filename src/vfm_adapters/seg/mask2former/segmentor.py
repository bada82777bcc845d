"""The Mask2Former segmentor: host ViT (with adapters) -> block features -> neck -> Mask2Former head.

:class:`Mask2FormerSegmentor` links the head's queries to Rein's tokens when the host
carries a Rein with ``link_queries``; :func:`build_mask2former_segmentor` builds one from
a training config's ``model`` section.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import BackboneFeatures, build_neck, check_stage_scales
from ..model import PixelWeightsUnsupported, check_normalisation
from ..optim import parameter_groups
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .config import Mask2FormerOutput
from .head import Mask2FormerHead

__all__ = ["MASK2FORMER_METHOD_DEFAULTS", "Mask2FormerSegmentor", "build_mask2former_segmentor"]


def _linked_rein(backbone: nn.Module):
    container = getattr(backbone, "vfm_adapters", None)
    if container is None or "rein" not in container:
        return None
    rein = container["rein"]
    return rein if getattr(rein.config, "link_queries", False) else None


class Mask2FormerSegmentor(nn.Module):
    """Host ViT (with adapters) -> block features -> neck -> Mask2Former head.

    The same layout as :class:`~vfm_adapters.seg.heads.Segmentor` (``features``,
    ``neck``, ``head``, ``backbone``, ``decode_modules()``, ``settings``), so training
    and inference code can take either. ``forward`` returns semantic scores ``(B, K, H, W)``
    at the image size (for sliding-window inference and evaluation); training uses
    :meth:`loss`.

    Args:
        backbone: The host model, adapters injected.
        num_classes: Output classes.
        layers: Feature blocks; default :func:`~vfm_adapters.seg.features.default_layers`.
        scales: Neck resampling factors (x4, x2, x1, x0.5 give strides 4/8/16/32 at patch 16).
        link_rein_queries: Use Rein's queries; ``None`` links when the backbone carries a
            Rein with ``link_queries`` (then ``num_queries`` is Rein's token count).
        neck: ``"learnable"`` (default), ``"interpolate"`` (the paper's, parameter-free)
            or ``"multilevel"``; see :func:`~vfm_adapters.seg.features.build_neck`.
        mean: Per-channel mean (0-255 RGB) of the images this model expects.
        std: Per-channel standard deviation, as ``mean``.
        **head_options: Fields of :class:`Mask2FormerHeadConfig`.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32,
        ...                      num_heads=2, img_size=56), token_length=4, query_dim=32)
        >>> seg = Mask2FormerSegmentor(vit, num_classes=3, num_decoder_layers=1, num_heads=2, ffn_dim=32,
        ...                            hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32,
        ...                            num_points=16)
        >>> seg.head.link_rein_queries, seg(torch.randn(1, 3, 56, 56)).shape
        (True, torch.Size([1, 3, 56, 56]))
    """

    #: Set prediction (matching + mask losses): no per-pixel loss to weight.
    per_pixel_loss = False

    #: Method options used with this head unless a config says otherwise: Rein links its
    #: tokens to the object queries, as in the paper.
    method_defaults: Mapping[str, Mapping[str, Any]] = {"rein": {"link_queries": True}}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layers: Sequence[int] | None = None,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        link_rein_queries: bool | None = None,
        neck: str = "learnable",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **head_options: Any,
    ) -> None:
        super().__init__()
        self.mean, self.std = check_normalisation(mean, std)
        self.features = BackboneFeatures(backbone, layers)
        if len(scales) != 4 or len(self.features.layers) != 4:
            raise ValueError(f"the Mask2Former head needs 4 feature layers and 4 neck scales, got layers "
                             f"{self.features.layers} and scales {list(scales)}")
        check_stage_scales(self.features, scales)
        channels = self.features.channels  # one width per map (stages of a hierarchical host differ)
        self.neck = build_neck(neck, channels, scales)
        rein = _linked_rein(backbone)
        if link_rein_queries is None:
            link_rein_queries = rein is not None
        if link_rein_queries:
            if rein is None:
                raise ValueError("link_rein_queries=True needs a backbone with Rein injected (link_queries=True)")
            tokens = rein.config.token_length
            if head_options.setdefault("num_queries", tokens) != tokens:
                raise ValueError(f"num_queries {head_options['num_queries']} differs from Rein's token_length {tokens}")
            head_options.setdefault("query_dim", rein.config.query_dim)
        self.head = Mask2FormerHead(num_classes, self.neck.out_channels, link_rein_queries=bool(link_rein_queries),
                                    **head_options)
        self.num_classes = num_classes
        self.settings = {"num_classes": num_classes, "layers": list(self.features.layers), "head": "mask2former",
                         "scales": [float(s) for s in scales], "link_rein_queries": bool(link_rein_queries), "neck": neck,
                         **{k: v for k, v in head_options.items()}}

    @property
    def backbone(self) -> nn.Module:
        """The host model (registered once, under ``features.model``)."""
        return self.features.model

    def decode_modules(self) -> nn.ModuleDict:
        """The neck and head: the trained parts saved next to the adapters."""
        return nn.ModuleDict({"neck": self.neck, "head": self.head})

    def queries(self) -> Tensor | None:
        """Rein's queries when linked (recomputed from the tokens), else ``None``."""
        if not self.head.link_rein_queries:
            return None
        return _linked_rein(self.backbone).queries()

    def forward_train(self, images: Tensor) -> Mask2FormerOutput:
        """The head's raw output for a batch of normalised images."""
        return self.head(self.neck(self.features(images)), queries=self.queries())

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Training loss of a batch (matching + class, mask and dice losses): images
        ``(B, 3, H, W)``, labels ``(B, H, W)``. Set prediction has no per-pixel loss to
        weight, so ``pixel_weights`` (DACS) is refused."""
        if pixel_weights is not None:
            raise PixelWeightsUnsupported(
                "Mask2Former is trained by set prediction (Hungarian matching, mask and dice losses); it has no "
                "per-pixel loss to weight, so DACS' confidence-weighted pseudo labels cannot train it. Use a "
                "per-pixel head (fpn, linear, daformer) for DACS")
        return self.head.loss(self.forward_train(images), labels)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Semantic scores ``(B, K, H, W)`` at the image size or, given ``labels``, the loss.

        Taking the labels in ``forward`` lets a training loop compute the loss through a
        ``DistributedDataParallel`` wrapper (``model(images, labels)``).
        """
        if labels is not None:
            return self.loss(images, labels)
        return self.head.predict(self.forward_train(images), size=images.shape[-2:])

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                         no_decay: str = "authors") -> list[dict]:
        """AdamW groups (:func:`vfm_adapters.seg.optim.parameter_groups`)."""
        return parameter_groups(self, lr, weight_decay, backbone_lr_mult, no_decay)

    @classmethod
    def from_config(cls, backbone: nn.Module, model_config: Mapping[str, Any]) -> "Mask2FormerSegmentor":
        """The segmentor of a training config's ``model`` section (``head_options`` are head fields)."""
        return cls(backbone, int(model_config["num_classes"]), layers=model_config.get("layers"),
                   scales=model_config["scales"], neck=model_config.get("neck") or "learnable",
                   mean=model_config["mean"], std=model_config["std"],
                   **dict(model_config.get("head_options") or {}))

    @staticmethod
    def build_head(name: str, in_channels: Sequence[int], model_config: Mapping[str, Any]) -> "Mask2FormerHead":
        """A Mask2Former head over a features-only encoder's maps; ``head_options.classifier``
        swaps in CLOUDS' CLIP text classifier (:func:`~vfm_adapters.seg.clip_classifier.build_clip_classifier`)."""
        from ..clip_classifier import build_clip_classifier

        num_classes = int(model_config["num_classes"])
        options = dict(model_config.get("head_options") or {})
        classifier = options.pop("classifier", None)
        head = Mask2FormerHead(num_classes, in_channels, **options)
        if classifier:
            head.class_predictor = build_clip_classifier(classifier, head.config.hidden_dim, num_classes,
                                                         encode=not model_config.get("decoder_checkpoint"))
        return head

    @classmethod
    def from_settings(cls, backbone: nn.Module, settings: Mapping[str, Any], **options: Any) -> "Mask2FormerSegmentor":
        """Rebuilds a segmentor from its ``settings`` (as saved in ``segmentor.json``); ``options``
        (``mean``, ``std``) are passed on.

        Example:
            >>> import timm, vfm_adapters as va
            >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32,
            ...                         num_heads=2, img_size=56)
            >>> tiny = dict(num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32,
            ...             pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16, num_queries=4)
            >>> seg = Mask2FormerSegmentor(vit, 3, **tiny)
            >>> again = Mask2FormerSegmentor.from_settings(vit, seg.settings)
            >>> again.load_state_dict(seg.state_dict())
            <All keys matched successfully>
        """
        saved = dict(settings)
        if saved.pop("head", "mask2former") != "mask2former":
            raise ValueError("these settings are not those of a Mask2Former segmentor")
        return cls(backbone, int(saved.pop("num_classes")), **saved, **options)


#: Method options used with this head unless a config says otherwise (kept for existing imports).
MASK2FORMER_METHOD_DEFAULTS = Mask2FormerSegmentor.method_defaults


def build_mask2former_segmentor(model_config: Mapping[str, Any], **head_options: Any) -> Mask2FormerSegmentor:
    """Builds host + adapters + neck + Mask2Former head from a training config's ``model`` section.

    The same as :func:`vfm_adapters.seg.build.build_segmentor` with ``head: mask2former``
    and ``head_options`` given as keyword arguments (tiny sizes in tests; the defaults are
    the paper's head). Rein keeps its query link by default.

    Example:
        >>> seg = build_mask2former_segmentor(
        ...     {"backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 56, "depth": 4,
        ...      "embed_dim": 32, "num_heads": 2}, "methods": ["rein"],
        ...      "method_options": {"rein": {"token_length": 4, "query_dim": 32}}, "num_classes": 3},
        ...     num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
        ...     pixel_decoder_ffn_dim=32, num_points=16)
        >>> seg.head.link_rein_queries, seg.head.config.num_queries
        (True, 4)
    """
    from ..build import build_segmentor
    from ..config import DEFAULTS

    config = {**DEFAULTS["model"], "head": "mask2former", **dict(model_config)}
    if config["head"] != "mask2former":
        raise ValueError(f"build_mask2former_segmentor builds head 'mask2former', the config says {config['head']!r}")
    config["head_options"] = {**dict(config.get("head_options") or {}), **head_options}
    return build_segmentor(config)
