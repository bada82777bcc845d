"""A name -> object table that refuses to overwrite a name by accident.

Methods, host families and decode heads are looked up by name in saved checkpoints and
configs, so silently replacing one (a plugin that reuses ``"rein"``, a module imported
twice under two names) would change what a saved file means. Replacing is allowed, but
only when asked for with ``replace=True`` (as PEFT's registry refuses a duplicate).
"""

from __future__ import annotations

from typing import Generic, TypeVar

Value = TypeVar("Value")


class DuplicateNameError(ValueError):
    """Raised when a name is registered twice without ``replace=True``."""


class Registry(dict, Generic[Value]):
    """A ``dict`` whose item assignment refuses a name that is already present.

    Reading is plain ``dict`` reading; ``registry[name] = value`` and
    :meth:`register` raise :class:`DuplicateNameError` for a name already present unless
    ``replace=True`` is given to :meth:`register`.

    Example:
        >>> heads = Registry("head")
        >>> _ = heads.register("fpn", int)
        >>> heads.register("fpn", float)
        Traceback (most recent call last):
        ...
        vfm_adapters._registry.DuplicateNameError: head 'fpn' is already registered (int); pass replace=True to replace it
        >>> heads.register("fpn", float, replace=True) is float
        True
    """

    def __init__(self, kind: str, entries: dict[str, Value] | None = None) -> None:
        super().__init__()
        self.kind = kind
        for name, value in (entries or {}).items():
            self[name] = value

    def register(self, name: str, value: Value, *, replace: bool = False) -> Value:
        """Adds ``value`` under ``name``; refuses a taken name unless ``replace``."""
        if replace:
            super().__setitem__(name, value)
        else:
            self[name] = value
        return value

    def __setitem__(self, name: str, value: Value) -> None:
        if name in self:
            raise duplicate_name_error(self.kind, name, self[name])
        super().__setitem__(name, value)


def duplicate_name_error(kind: str, name: str, existing: object) -> DuplicateNameError:
    """The error for registering ``name`` twice, naming what already holds it."""
    holder = getattr(existing, "__qualname__", None) or type(existing).__qualname__
    return DuplicateNameError(f"{kind} {name!r} is already registered ({holder}); pass replace=True to replace it")
