"""transformers ``ViTModel`` (and DeiT-style models built on it)."""

from __future__ import annotations

from torch import nn

from ._lookup import is_instance_of, transformers_spec
from .base import HostFamily, HostSpec
from .registry import register_host

BLOCKS = ("layers", "encoder.layer", "encoder.layers")
PARTS = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "attention": ("attention.attention", "attention"),
    # Older versions split the MLP into `intermediate` and `output`, and `output` adds the
    # residual itself; adding to its output is still adding to the MLP branch.
    "mlp": ("mlp", "output"),
    "mlp_input": ("layernorm_after",),
}


def _describe(model: nn.Module) -> HostSpec:
    return transformers_spec(model, "transformers.ViTModel", BLOCKS, PARTS, num_prefix_tokens=1)


register_host(
    HostFamily(
        "transformers.ViTModel",
        lambda m: is_instance_of(m, ("ViTModel",)),
        _describe,
        example='ViTModel.from_pretrained("google/vit-large-patch16-224-in21k")',
    )
)
