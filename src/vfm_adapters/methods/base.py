"""What every method shares: configs, the registry, and injection that is all-or-nothing.

A method is one :class:`AdapterMethod` subclass and one :class:`MethodConfig` dataclass.
The method's ``attach`` builds its modules and registers hooks on the points the
:class:`~vfm_adapters.hosts.HostSpec` names; this module does the bookkeeping that must be
the same for every method: refusing a second injection of one method, freezing the host,
rolling back a failed injection, and removing adapters so the model is exactly as before.

Injected state lives on the model itself:

* ``model.vfm_adapters``: an ``nn.ModuleDict`` of adapter modules (so ``.to()``,
  ``.parameters()``, ``state_dict()`` and optimisers see them), and
* ``model._vfm_adapters_state``: an :class:`InjectionState` (hooks, configs, the host
  parameters' original ``requires_grad`` flags).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
import sys
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..hosts import HostSpec, describe_host
from .._registry import DuplicateNameError, Registry  # noqa: F401  (DuplicateNameError: documented error of register_method)

ADAPTERS_ATTRIBUTE = "vfm_adapters"
STATE_ATTRIBUTE = "_vfm_adapters_state"


class AdapterError(ValueError):
    """Raised for adapter misuse: a method injected twice, incompatible checkpoints ..."""


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses validate in ``__post_init__``.

    Fields listed in ``runtime_fields`` (such as the kernel choice) describe how to run,
    not what was trained, and are not written to checkpoints.
    """

    runtime_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for name in self.runtime_fields:
            values.pop(name, None)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """Builds the config from JSON values, checking each option's type first.

        Example:
            >>> from vfm_adapters.methods.rein import ReinConfig
            >>> ReinConfig.from_dict({"link_queries": "no"})
            Traceback (most recent call last):
            ...
            vfm_adapters.methods.base.AdapterError: ReinConfig.link_queries must be bool, got 'no'
        """
        if not isinstance(values, dict):
            raise AdapterError(f"{cls.__name__} options must be a mapping of option names to values, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise AdapterError(
                f"{cls.__name__} got unknown option(s) {unknown}; accepted: {sorted(fields)}"
            )
        required = sorted(
            name for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values
        )
        if required:
            raise AdapterError(f"{cls.__name__} needs option(s) {required}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _matches_type(value, hints.get(name, Any)):
                raise AdapterError(f"{cls.__name__}.{name} must be {_type_name(hints[name])}, got {value!r}")
        return cls(**values)


def _matches_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (unknown annotations accept anything)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches_type(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (collections.abc.Sequence, list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches_type(v, item) for v in value)
    return True


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return getattr(annotation, "__name__", str(annotation))


@dataclass
class Attachment:
    """Everything one injected method changed, so that it can be undone.

    ``attach`` appends to it as it goes; if ``attach`` raises, the framework undoes what
    was recorded so far, so a failed injection leaves the model untouched.
    """

    module: nn.Module | None = None
    handles: list[Any] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def revert(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()
        for step in reversed(self.undo):
            step()
        self.undo.clear()


@dataclass
class InjectionState:
    host: HostSpec | None  # None while only host-less methods (e.g. Domino) are injected
    configs: dict[str, MethodConfig] = field(default_factory=dict)
    attachments: dict[str, Attachment] = field(default_factory=dict)
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    keep_trainable: tuple[str, ...] = ()  # the user's ``trainable`` patterns, kept by every freeze


class AdapterMethod:
    """A parameter-efficient method. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # False for methods that attach to any module, not only a ViT (Domino replaces the
    # norms of a decode head): inject() then skips describe_host and passes host=None.
    needs_host: ClassVar[bool] = True
    # Methods this one builds on: they cannot be removed while this one is injected.
    requires: ClassVar[tuple[str, ...]] = ()

    def check(self, model: nn.Module, host: HostSpec, config: MethodConfig) -> None:
        """Raises if the method cannot attach to this host; must not change anything."""

    def attach(self, model: nn.Module, host: HostSpec, config: MethodConfig, attachment: Attachment) -> None:
        raise NotImplementedError

    def parameters(self, model: nn.Module, attachment: Attachment) -> list[nn.Parameter]:
        return list(attachment.module.parameters()) if attachment.module is not None else []

    def state_dict(self, model: nn.Module, attachment: Attachment) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds for this method, keyed without the method prefix."""
        return dict(attachment.module.state_dict()) if attachment.module is not None else {}

    def check_state_dict(self, model: nn.Module, attachment: Attachment, tensors: dict[str, torch.Tensor]) -> None:
        """Raises if ``tensors`` cannot be loaded now; must not change anything.

        :func:`vfm_adapters.load_adapters` calls it for every method before it copies
        anything, so a refusal never leaves some methods loaded and others not.
        """

    def load_state_dict(self, model: nn.Module, attachment: Attachment, tensors: dict[str, torch.Tensor]) -> None:
        attachment.module.load_state_dict(tensors, strict=True)


_METHODS: Registry[AdapterMethod] = Registry("adapter method")


def register_method(method: AdapterMethod, *, replace: bool = False) -> AdapterMethod:
    """Makes ``method`` available by its ``name`` (in configs, checkpoints, :func:`get_method`).

    A name that is already registered is refused, so a plugin cannot silently change
    what a saved checkpoint's method name means; ``replace=True`` replaces it on purpose.

    Raises:
        DuplicateNameError: ``method.name`` is taken and ``replace`` is False.

    Example:
        >>> from vfm_adapters.methods.rein_method import ReinMethod
        >>> register_method(ReinMethod())
        Traceback (most recent call last):
        ...
        vfm_adapters._registry.DuplicateNameError: adapter method 'rein' is already registered (ReinMethod); pass replace=True to replace it
    """
    return _METHODS.register(method.name, method, replace=replace)


def get_method(name: str) -> AdapterMethod:
    if name not in _METHODS:
        raise AdapterError(f"unknown adapter method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


def injection_state(model: nn.Module) -> InjectionState | None:
    return getattr(model, STATE_ATTRIBUTE, None)


def injected_methods(model: nn.Module) -> list[str]:
    """Names of the methods injected into ``model``, in injection order.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> injected_methods(va.inject_rein(vit))
        ['rein']
    """
    state = injection_state(model)
    return list(state.configs) if state is not None else []


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that belongs to an injected adapter."""
    state = injection_state(model)
    if state is None:
        return []
    params: list[nn.Parameter] = []
    for name, attachment in state.attachments.items():
        params.extend(get_method(name).parameters(model, attachment))
    return params


def _adapter_container(model: nn.Module) -> nn.ModuleDict:
    container = getattr(model, ADAPTERS_ATTRIBUTE, None)
    if container is None:
        container = nn.ModuleDict()
        model.add_module(ADAPTERS_ATTRIBUTE, container)
    return container


def matches_trainable(name: str, patterns: Sequence[str]) -> bool:
    """True if a parameter name has a dot-separated part that starts with one of ``patterns``.

    The patterns are module (or parameter) name prefixes, as PEFT's ``modules_to_save``:
    ``"head"`` keeps ``head.weight`` and ``head.fc.bias``, ``"lora_"`` keeps
    ``blocks.0.attn.qkv.lora_A.default.weight``; a dotted pattern such as
    ``"blocks.11"`` must match consecutive parts.

    Example:
        >>> matches_trainable("head.fc.weight", ["head"]), matches_trainable("blocks.1.norm1.weight", ["head"])
        (True, False)
        >>> matches_trainable("blocks.11.mlp.fc1.weight", ["blocks.11"]), matches_trainable("blocks.1.mlp.fc1.weight", ["blocks.11"])
        (True, False)
    """
    parts = name.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        for start in range(len(parts) - len(wanted) + 1):
            window = parts[start : start + len(wanted)]
            if window[:-1] == wanted[:-1] and window[-1].startswith(wanted[-1]):
                return True
    return False


def _foreign_adapter_parameters(model: nn.Module) -> set[int]:
    """Parameters of adapters another library injected (PEFT tuner layers that are not ours)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return set()
    found: set[int] = set()  # our own LoRA layers are PEFT layers too, but their parameters are kept anyway
    for module in model.modules():
        if isinstance(module, tuners.BaseTunerLayer):
            for attribute in tuple(module.adapter_layer_names) + tuple(getattr(module, "other_param_names", ())):
                value = getattr(module, attribute, None)
                if isinstance(value, nn.Module):
                    found.update(id(p) for p in value.parameters())
    return found


def _validate_trainable(trainable: Sequence[str] | str | None) -> tuple[str, ...]:
    patterns = (trainable,) if isinstance(trainable, str) else tuple(trainable or ())
    bad = [p for p in patterns if not isinstance(p, str) or not p or p.startswith(".") or p.endswith(".")]
    if bad:
        raise AdapterError(
            f"trainable must be a list of module-name prefixes such as ['head', 'lora_'], got bad entries {bad!r}"
        )
    return patterns


def _freeze_host(model: nn.Module, state: InjectionState) -> None:
    """Freezes every parameter except adapters', the user's ``trainable`` ones and other libraries' adapters."""
    keep = {id(p) for p in adapter_parameters(model)}
    foreign = _foreign_adapter_parameters(model)
    for name, param in model.named_parameters():
        if id(param) in keep:
            continue
        if matches_trainable(name, state.keep_trainable):
            param.requires_grad_(True)
        elif id(param) in foreign and param.requires_grad:
            continue  # another library's trainable adapter (e.g. the user's own PEFT LoRA) stays trainable
        else:
            param.requires_grad_(False)


def inject(
    model: nn.Module,
    method_name: str,
    config: MethodConfig,
    freeze_host: bool = True,
    trainable: Sequence[str] | str | None = None,
) -> nn.Module:
    """Injects one method into ``model`` in place; on any error the model is unchanged.

    Args:
        model: A supported ViT (see :func:`vfm_adapters.hosts.supported_families`).
        method_name: A registered method, e.g. ``"rein"``.
        config: The method's config.
        freeze_host: Set ``requires_grad=False`` on every parameter that is not an adapter's,
            except those named by ``trainable`` and the trainable adapters of another
            library (PEFT layers the user injected), which stay as they are.
        trainable: Module-name prefixes to keep (or make) trainable while the host is
            frozen, like PEFT's ``modules_to_save``: e.g. ``["head"]`` for a
            classification head (see :func:`matches_trainable`). Remembered for later
            injections into the same model.

    Returns:
        ``model`` itself.

    Example:
        >>> import timm
        >>> from vfm_adapters.methods.rein import ReinConfig
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> _ = inject(vit, "rein", ReinConfig(token_length=10, rank=4))
        >>> sum(p.numel() for p in vit.parameters() if p.requires_grad) > 0
        True
    """
    method = get_method(method_name)
    if not isinstance(config, method.config_class):
        raise AdapterError(f"{method_name} expects a {method.config_class.__name__}, got {type(config).__name__}")
    host = describe_host(model) if method.needs_host else None
    state = injection_state(model)
    if state is not None and method_name in state.configs:
        raise AdapterError(
            f"{method_name!r} is already injected into this model; call "
            f"vfm_adapters.remove_adapters(model, {method_name!r}) first to replace it"
        )
    patterns = _validate_trainable(trainable)
    method.check(model, host, config)

    new_state = state is None
    if new_state:
        state = InjectionState(
            host=host,
            original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        )
    had_container = hasattr(model, ADAPTERS_ATTRIBUTE)
    attachment = Attachment()
    try:
        method.attach(model, host, config, attachment)
        if attachment.module is not None:
            _adapter_container(model)[method_name] = attachment.module
    except BaseException:
        attachment.revert()
        container = getattr(model, ADAPTERS_ATTRIBUTE, None)
        if container is not None and method_name in container:
            del container[method_name]
        if not had_container and hasattr(model, ADAPTERS_ATTRIBUTE):
            delattr(model, ADAPTERS_ATTRIBUTE)
        raise
    state.configs[method_name] = config
    state.attachments[method_name] = attachment
    if state.host is None:
        state.host = host
    state.keep_trainable = tuple(dict.fromkeys(state.keep_trainable + patterns))
    if new_state:
        object.__setattr__(model, STATE_ATTRIBUTE, state)
        from ..hub import guard_save_pretrained  # transformers hosts: save_pretrained keeps the adapters

        guard_save_pretrained(model)
    if freeze_host:
        _freeze_host(model, state)
    return model


def remove_adapters(model: nn.Module, method_name: str | None = None) -> nn.Module:
    """Removes one method (or all) and gives back the original model exactly.

    Hooks come off, adapter modules are deleted, wrapped layers are restored, and once
    the last method is gone every host parameter gets its original ``requires_grad``.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56).eval()
        >>> x = torch.randn(1, 3, 56, 56)
        >>> before = vit(x)
        >>> _ = va.remove_adapters(va.inject_rein(vit))
        >>> torch.equal(vit(x), before)
        True
    """
    state = injection_state(model)
    if state is None:
        if method_name is None:
            return model
        raise AdapterError(f"no adapters are injected into this model (asked to remove {method_name!r})")
    names = list(state.configs) if method_name is None else [method_name]
    for name in names:
        if name not in state.configs:
            raise AdapterError(f"{name!r} is not injected into this model; injected: {list(state.configs)}")
    for other in state.configs:
        needed = [name for name in get_method(other).requires if name in names]
        if other not in names and needed:
            raise AdapterError(
                f"cannot remove {needed[0]!r}: {other!r} builds on it; remove {other!r} first "
                f"(vfm_adapters.remove_adapters(model, {other!r})) or remove every method with remove_adapters(model)"
            )
    for name in reversed(names):
        state.attachments.pop(name).revert()
        state.configs.pop(name)
        container = getattr(model, ADAPTERS_ATTRIBUTE, None)
        if container is not None and name in container:
            del container[name]
    if not state.configs:
        if hasattr(model, ADAPTERS_ATTRIBUTE):
            delattr(model, ADAPTERS_ATTRIBUTE)
        for name, param in model.named_parameters():
            if name in state.original_requires_grad:
                param.requires_grad_(state.original_requires_grad[name])
        object.__delattr__(model, STATE_ATTRIBUTE)
        from ..hub import unguard_save_pretrained

        unguard_save_pretrained(model)
    return model
