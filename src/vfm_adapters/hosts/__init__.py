"""Model families (hosts): where a ViT's blocks are and what a method may attach to.

Importing this package registers every built-in family. Adding a family is one file
that calls :func:`register_host`.
"""

from .base import BlockParts, HostFamily, HostSpec, StageSpec, UnsupportedModelError
from .registry import describe_host, register_host, supported_families, unregister_host
from . import timm_vit, timm_eva, timm_sam, hf_dinov2, hf_vit, hf_clip, hf_sam  # noqa: F401  (registration)
from . import timm_resnet, timm_convnext, timm_swin, timm_hiera, hf_convnext  # noqa: F401  (stage-wise families)

__all__ = [
    "BlockParts",
    "HostFamily",
    "HostSpec",
    "StageSpec",
    "UnsupportedModelError",
    "describe_host",
    "register_host",
    "supported_families",
    "unregister_host",
]
