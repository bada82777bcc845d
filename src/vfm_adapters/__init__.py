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
from .optim import param_groups

__all__ = [
    "__version__",
    "adapter_parameters",
    "adapter_state_dict",
    "AdapterError",
    "AdaptFormerConfig",
    "available_methods",
    "condition_prompts",
    "DEFAULT_DRIVING_DOMAINS",
    "describe_host",
    "domain_embedding",
    "DomainEmbedder",
    "DominoConfig",
    "DominoNorm",
    "format_count",
    "HostSpec",
    "inject_adaptformer",
    "inject_domain_rein",
    "inject_domino",
    "inject_lora",
    "inject_rein",
    "inject_vpt",
    "injected_methods",
    "load_adapters",
    "lora_layers",
    "LoRAConfig",
    "merge_lora",
    "parameter_report",
    "read_adapter_config",
    "register_host",
    "rein_queries",
    "ReinConfig",
    "remove_adapters",
    "save_adapters",
    "save_lora_for_peft",
    "set_domain_embedding",
    "supported_families",
    "trainable_parameters",
    "unmerge_lora",
    "UnsupportedModelError",
    "VPTConfig",
]
__all__ += ["param_groups"]
