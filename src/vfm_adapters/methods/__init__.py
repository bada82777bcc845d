"""Parameter-efficient methods. Each file registers one method with :mod:`.base`."""

from .base import (
    AdapterError,
    AdapterMethod,
    Attachment,
    MethodConfig,
    adapter_parameters,
    available_methods,
    get_method,
    inject,
    injected_methods,
    register_method,
    remove_adapters,
)
from .rein import Rein, ReinConfig, rein_blocks, rein_queries
from .rein_method import ReinMethod  # registers "rein"
from .lora import LoRAConfig, inject_lora, lora_layers, merge_lora, save_lora_for_peft, unmerge_lora
from .vpt import VisualPrompts, VPTConfig, inject_vpt
from .adaptformer import AdaptFormer, AdaptFormerConfig, inject_adaptformer
from .domain_rein import DomainReinConfig, inject_domain_rein
from .domino import DominoConfig, DominoNorm, inject_domino, set_domain_embedding

__all__ = [
    "ReinMethod",
    "adapter_parameters",
    "AdapterError",
    "AdapterMethod",
    "AdaptFormer",
    "AdaptFormerConfig",
    "Attachment",
    "available_methods",
    "DomainReinConfig",
    "DominoConfig",
    "DominoNorm",
    "get_method",
    "inject",
    "inject_adaptformer",
    "inject_domain_rein",
    "inject_domino",
    "inject_lora",
    "inject_vpt",
    "injected_methods",
    "lora_layers",
    "LoRAConfig",
    "merge_lora",
    "MethodConfig",
    "register_method",
    "Rein",
    "rein_blocks",
    "rein_queries",
    "ReinConfig",
    "remove_adapters",
    "save_lora_for_peft",
    "set_domain_embedding",
    "unmerge_lora",
    "VisualPrompts",
    "VPTConfig",
]
