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
from .report import format_count, parameter_report, trainable_parameters

__all__ = [
    "AdapterError",
    "HostSpec",
    "ReinConfig",
    "UnsupportedModelError",
    "__version__",
    "adapter_parameters",
    "adapter_state_dict",
    "available_methods",
    "describe_host",
    "format_count",
    "inject_rein",
    "injected_methods",
    "load_adapters",
    "parameter_report",
    "read_adapter_config",
    "rein_queries",
    "register_host",
    "remove_adapters",
    "save_adapters",
    "supported_families",
    "trainable_parameters",
]
