"""transformers ``SamVisionModel`` (and the vision encoder inside ``SamModel``)."""

from __future__ import annotations

from torch import nn

from ._lookup import is_instance_of, transformers_spec
from .base import HostFamily, HostSpec
from .registry import register_host

BLOCKS = ("vision_encoder.layers", "layers")
PARTS = {
    "qkv": ("attn.qkv",),
    "attention": ("attn",),
    "mlp": ("mlp",),
    "mlp_input": ("layer_norm2",),
}


def _describe(model: nn.Module) -> HostSpec:
    config = getattr(model.config, "vision_config", model.config)
    return transformers_spec(
        model,
        "transformers.SamVisionModel",
        BLOCKS,
        PARTS,
        num_prefix_tokens=0,
        layout="BHWC",
        global_blocks=tuple(int(i) for i in config.global_attn_indexes),
        config=config,  # SamModel keeps the encoder's widths in its vision_config
    )


register_host(
    HostFamily(
        "transformers.SamVisionModel",
        lambda m: is_instance_of(m, ("SamVisionModel", "SamModel")),
        _describe,
        example='SamVisionModel.from_pretrained("facebook/sam-vit-huge")',
    )
)
