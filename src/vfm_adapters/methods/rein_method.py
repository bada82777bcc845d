"""The injectable Rein method: one :class:`~vfm_adapters.methods.rein.Rein` after the chosen
blocks of a plain ViT, or one per stage of a hierarchical host (:mod:`.rein_stages`).

This dispatch lives above both modules, so ``rein.py`` (the layer) and ``rein_stages.py``
(its stage-wise use) never import each other in a circle.
"""

from __future__ import annotations

from torch import nn

from ..hosts import HostSpec
from ..kernels import unsupported_reason
from .base import AdapterError, AdapterMethod, Attachment, register_method
from .rein import Rein, ReinConfig, _ReinBlockHook
from .rein_stages import attach_stages, check_stages

__all__ = ["ReinMethod"]

_block_hook = _ReinBlockHook


class ReinMethod(AdapterMethod):
    name = "rein"
    config_class = ReinConfig

    def check(self, model: nn.Module, host: HostSpec, config: ReinConfig) -> None:
        if host.hierarchical:  # one Rein per stage: see rein_stages.py
            return check_stages(host, config)
        config.block_indices(host)
        if config.kernel == "triton":
            why = unsupported_reason(host.embed_dim, config.token_length)
            if why is not None:
                raise AdapterError(
                    f"kernel='triton' cannot take this host: {why} (width {host.embed_dim}, "
                    f"token_length={config.token_length}). Use kernel='auto' (falls back to PyTorch) or kernel='torch'"
                )

    def attach(self, model: nn.Module, host: HostSpec, config: ReinConfig, attachment: Attachment) -> None:
        if host.hierarchical:
            return attach_stages(model, host, config, attachment)
        indices = config.block_indices(host)
        reference = next(model.parameters())
        rein = Rein(
            num_layers=len(indices),
            embed_dim=host.embed_dim,
            config=config,
            patch_size=config.patch_size or host.patch_size,
            device=reference.device,
        )
        attachment.module = rein
        rein.kernel_for(reference)  # "auto" resolved once, at injection (again only for a new device/dtype)
        attachment.extra["blocks"] = indices
        prefix = 0 if host.layout == "BHWC" else host.num_prefix_tokens
        blocks = host.blocks(model)
        for layer, index in enumerate(indices):
            attachment.handles.append(blocks[index].register_forward_hook(_block_hook(rein, layer, prefix)))


register_method(ReinMethod())
