"""vfm_adapters: parameter-efficient fine-tuning of vision foundation models for
domain-generalised semantic segmentation.

Example:
    >>> import timm, vfm_adapters as va
    >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
    ...                         num_heads=2, img_size=56)
    >>> vit = va.inject_rein(vit)
    >>> va.trainable_parameters(vit) > 0
    True
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# Public names and the module that defines each. They are imported on first use (PEP 562),
# so that ``import vfm_adapters`` and ``vfm-adapters --help`` do not pay for torch, timm
# and transformers; ``from vfm_adapters import inject_rein`` works as usual.
_EXPORTS: dict[str, str] = {
    "inject_rein": ".api",
    "adapter_state_dict": ".checkpoint",
    "load_adapters": ".checkpoint",
    "read_adapter_config": ".checkpoint",
    "save_adapters": ".checkpoint",
    "condition_prompts": ".domain",
    "DEFAULT_DRIVING_DOMAINS": ".domain",
    "domain_embedding": ".domain",
    "DomainEmbedder": ".domain",
    "describe_host": ".hosts",
    "HostSpec": ".hosts",
    "register_host": ".hosts",
    "supported_families": ".hosts",
    "UnsupportedModelError": ".hosts",
    "adapter_parameters": ".methods",
    "AdapterError": ".methods",
    "available_methods": ".methods",
    "injected_methods": ".methods",
    "rein_queries": ".methods",
    "ReinConfig": ".methods",
    "remove_adapters": ".methods",
    "AdaptFormerConfig": ".methods.adaptformer",
    "inject_adaptformer": ".methods.adaptformer",
    "DominoConfig": ".methods.domino",
    "DominoNorm": ".methods.domino",
    "inject_domain_rein": ".methods.domino",
    "inject_domino": ".methods.domino",
    "set_domain_embedding": ".methods.domino",
    "inject_lora": ".methods.lora",
    "lora_layers": ".methods.lora",
    "LoRAConfig": ".methods.lora",
    "merge_lora": ".methods.lora",
    "save_lora_for_peft": ".methods.lora",
    "unmerge_lora": ".methods.lora",
    "inject_vpt": ".methods.vpt",
    "VPTConfig": ".methods.vpt",
    "format_count": ".report",
    "parameter_report": ".report",
    "trainable_parameters": ".report",
    "from_pretrained": ".hub",
    "push_adapters_to_hub": ".hub",
    "resolve_adapter_source": ".hub",
    "save_pretrained": ".hub",
    "export_official_rein": ".official",
    "import_official_rein": ".official",
    "HostLoadResult": ".host_weights",
    "load_host_state_dict": ".host_weights",
    "param_groups": ".optim",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from .api import inject_rein
    from .checkpoint import adapter_state_dict, load_adapters, read_adapter_config, save_adapters
    from .domain import DEFAULT_DRIVING_DOMAINS, DomainEmbedder, condition_prompts, domain_embedding
    from .hosts import HostSpec, UnsupportedModelError, describe_host, register_host, supported_families
    from .methods import (
        AdapterError,
        ReinConfig,
        adapter_parameters,
        available_methods,
        injected_methods,
        rein_queries,
        remove_adapters,
    )
    from .methods.domino import DominoConfig, DominoNorm, inject_domain_rein, inject_domino, set_domain_embedding
    from .methods.adaptformer import AdaptFormerConfig, inject_adaptformer
    from .methods.lora import LoRAConfig, inject_lora, lora_layers, merge_lora, save_lora_for_peft, unmerge_lora
    from .methods.vpt import VPTConfig, inject_vpt
    from .report import format_count, parameter_report, trainable_parameters
    from .hub import from_pretrained, push_adapters_to_hub, resolve_adapter_source, save_pretrained
    from .official import export_official_rein, import_official_rein
    from .host_weights import HostLoadResult, load_host_state_dict
    from .optim import param_groups
