"""transformers ``CLIPVisionModel`` (and ``CLIPVisionModelWithProjection``)."""

from __future__ import annotations

from torch import nn

from ._lookup import is_instance_of, transformers_spec
from .base import HostFamily, HostSpec
from .registry import register_host

BLOCKS = ("vision_model.encoder.layers", "encoder.layers")
PARTS = {
    "q": ("self_attn.q_proj",),
    "k": ("self_attn.k_proj",),
    "v": ("self_attn.v_proj",),
    "attention": ("self_attn",),
    "mlp": ("mlp",),
    "mlp_input": ("layer_norm2",),
}


def _describe(model: nn.Module) -> HostSpec:
    return transformers_spec(model, "transformers.CLIPVisionModel", BLOCKS, PARTS, num_prefix_tokens=1)


register_host(
    HostFamily(
        "transformers.CLIPVisionModel",
        lambda m: is_instance_of(m, ("CLIPVisionModel", "CLIPVisionModelWithProjection")),
        _describe,
        example='CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14")',
    )
)
