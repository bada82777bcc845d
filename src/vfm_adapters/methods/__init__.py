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
from .rein import Rein, ReinConfig, rein_queries

__all__ = [
    "AdapterError",
    "AdapterMethod",
    "Attachment",
    "MethodConfig",
    "Rein",
    "ReinConfig",
    "adapter_parameters",
    "available_methods",
    "get_method",
    "inject",
    "injected_methods",
    "register_method",
    "rein_queries",
    "remove_adapters",
]
