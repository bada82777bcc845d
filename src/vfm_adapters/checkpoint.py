"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only adapter tensors are written (never the host's), without pickle. Files are written
to temporary names and moved into place, so an interrupted save never leaves a
half-written file under the real name. Loading is strict and all-or-nothing: every
file is read and every key and shape checked before the model is touched; methods that
loading injected are removed again if anything fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._io import write_atomically
from .hosts import describe_host
from .methods.base import (
    AdapterError,
    get_method,
    inject,
    injection_state,
    remove_adapters,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "vfm_adapters"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors of every injected method, keyed ``"<method>.<name>"``.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> sorted(va.adapter_state_dict(va.inject_rein(vit)))[:2]
        ['rein.delta_feature.bias', 'rein.delta_feature.weight']
    """
    state = injection_state(model)
    if state is None:
        return {}
    tensors: dict[str, torch.Tensor] = {}
    for name, attachment in state.attachments.items():
        for key, tensor in get_method(name).state_dict(model, attachment).items():
            tensors[f"{name}.{key}"] = tensor
    return tensors


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes the adapters of ``model`` to ``directory`` (created if needed).

    Returns:
        The directory.

    Example:
        >>> import tempfile, timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56))
        >>> out = va.save_adapters(vit, tempfile.mkdtemp())
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    state = injection_state(model)
    if state is None:
        raise AdapterError("this model has no adapters to save; inject a method first (e.g. vfm_adapters.inject_rein)")
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}
    if any(t.is_meta for t in tensors.values()):
        raise AdapterError("cannot save adapters of a model on the meta device: its tensors hold no values")
    tensors = {k: v.cpu() for k, v in tensors.items()}
    from . import __version__

    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "host": state.host.to_json() if state.host is not None else None,
        "methods": {name: cfg.to_dict() for name, cfg in state.configs.items()},
        # JSON keys are written sorted; loading injects in this order (domain_rein needs rein first).
        "method_order": list(state.configs),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    write_atomically(
        directory / CONFIG_NAME,
        lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``adapter_config.json`` from an adapter directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by vfm_adapters.save_adapters)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); it may be truncated or corrupted") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME or not isinstance(config.get("methods"), dict):
        raise AdapterError(f"{path} is not a vfm_adapters adapter config (expected 'format': '{FORMAT_NAME}' and 'methods')")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format_version {config['format_version']}; this vfm_adapters reads up to {FORMAT_VERSION}: upgrade it"
        )
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter directory has a config but no weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"could not read {path}: {error}. The file is truncated or corrupted; save the adapters again") from error


def _check_host(saved: dict[str, Any] | None, model: nn.Module) -> None:
    if not saved:  # saved by host-less methods only (Domino on a decode head): nothing to check
        return
    host = describe_host(model).to_json()
    for key in ("embed_dim", "depth", "stages"):
        if key in saved and saved[key] != host.get(key):
            raise AdapterError(
                f"these adapters were saved for a host with {key}={saved[key]} ({saved.get('family')}); "
                f"this model has {key}={host.get(key)} ({host['family']})"
            )


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads adapters saved by :func:`save_adapters`, injecting methods not yet present.

    Loading is strict: every saved tensor must match an adapter tensor of the same
    shape, and every adapter tensor must be in the file. On any error the model is left
    exactly as it was.

    Example:
        >>> import tempfile, timm, torch, vfm_adapters as va
        >>> make = lambda: timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                                  embed_dim=64, num_heads=2, img_size=56)
        >>> path = va.save_adapters(va.inject_rein(make()), tempfile.mkdtemp())
        >>> va.injected_methods(va.load_adapters(make(), path))
        ['rein']
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    _check_host(config.get("host", {}), model)

    state = injection_state(model)
    injected_here: list[str] = []
    try:
        order = [n for n in config.get("method_order", []) if n in config["methods"]]
        for name in order + [n for n in config["methods"] if n not in order]:
            values = config["methods"][name]
            method = get_method(name)
            saved_config = method.config_class.from_dict(values)
            if state is not None and name in state.configs:
                current = state.configs[name].to_dict()
                if current != saved_config.to_dict():
                    raise AdapterError(
                        f"{name!r} is injected with {current} but the adapters were saved with {saved_config.to_dict()}"
                    )
                continue
            inject(model, name, saved_config)
            state = injection_state(model)
            injected_here.append(name)
        _load_strict(model, tensors, list(config["methods"]))
    except BaseException:
        for name in reversed(injected_here):
            remove_adapters(model, name)
        raise
    return model


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], methods: list[str]) -> None:
    expected = {k: v for k, v in adapter_state_dict(model).items() if k.split(".", 1)[0] in methods}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"adapter weights do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    wrong = [f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise AdapterError("adapter weights have the wrong shapes: " + "; ".join(wrong[:8]))
    state = injection_state(model)
    for name in methods:
        prefix = name + "."
        subset = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        get_method(name).load_state_dict(model, state.attachments[name], subset)
