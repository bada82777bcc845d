"""transformers ``Dinov2Model`` and ``Dinov2WithRegistersModel``."""

from __future__ import annotations

from torch import nn

from ._lookup import is_instance_of, transformers_spec
from .base import HostFamily, HostSpec
from .registry import register_host

BLOCKS = ("encoder.layer", "encoder.layers", "layers")
PARTS = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "attention": ("attention.attention", "attention"),
    "mlp": ("mlp",),
    "mlp_input": ("norm2",),
}


def _describe_dinov2(model: nn.Module) -> HostSpec:
    return transformers_spec(model, "transformers.Dinov2Model", BLOCKS, PARTS, num_prefix_tokens=1)


def _describe_registers(model: nn.Module) -> HostSpec:
    registers = int(model.config.num_register_tokens)
    return transformers_spec(
        model, "transformers.Dinov2WithRegistersModel", BLOCKS, PARTS, num_prefix_tokens=1 + registers
    )


register_host(
    HostFamily(
        "transformers.Dinov2Model",
        lambda m: is_instance_of(m, ("Dinov2Model",)),
        _describe_dinov2,
        example='Dinov2Model.from_pretrained("facebook/dinov2-large")',
    )
)
register_host(
    HostFamily(
        "transformers.Dinov2WithRegistersModel",
        lambda m: is_instance_of(m, ("Dinov2WithRegistersModel",)),
        _describe_registers,
        example='Dinov2WithRegistersModel.from_pretrained("facebook/dinov2-with-registers-large")',
    )
)
