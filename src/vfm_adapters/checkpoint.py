"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only adapter tensors are written (never the host's), without pickle. The weights file
also carries the config (in its safetensors metadata) and a checksum of the tensors; it
is the commit point of a save, moved into place by one rename, so a save killed at any
moment leaves the previous checkpoint or the new one, whole. Loading is strict and
all-or-nothing: the config's fields, the host, and every tensor's name, shape and dtype
(against a meta-device twin of the model, so nothing is allocated for a bad config),
checksum and finiteness are checked before the model is touched; methods that loading
injected are removed again and earlier values restored if anything fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._adapter_files import CONFIG_NAME, WEIGHTS_NAME
from ._io import write_atomically
from .hosts import describe_host
from .methods.base import (
    AdapterError,
    get_method,
    inject,
    injection_state,
    remove_adapters,
)

FORMAT_NAME = "vfm_adapters"
FORMAT_VERSION = 1
#: Key, in the weights file's metadata, of the config text saved with the tensors.
CONFIG_METADATA_KEY = "vfm_adapters_config"
#: Field (config and weights metadata) holding :func:`tensors_checksum` of the saved tensors.
CHECKSUM_FIELD = "tensors_sha256"
#: Config field holding the SHA-256 of the config itself: tells a config edited by hand
#: from one left over by an interrupted save.
CONFIG_CHECKSUM_FIELD = "config_sha256"
#: Larger adapter_config.json files are refused before reading (a real one is a few KB).
MAX_CONFIG_BYTES = 1 << 20


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

    The weights file, which also carries the config and a checksum of the tensors, is
    moved into place by one rename; ``adapter_config.json`` (a readable copy) follows.
    A save killed at any moment leaves the previous checkpoint or the new one, whole;
    temporaries a killed save left behind are removed by the next save. Other files in
    ``directory`` are left alone.

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
    config[CHECKSUM_FIELD] = tensors_checksum(tensors)
    config[CONFIG_CHECKSUM_FIELD] = _config_checksum(config)
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    # The weights file is the commit point: it carries the config in its metadata, so the
    # one rename that puts it in place switches weights and config together. A process
    # killed before that rename leaves the previous checkpoint whole; killed after it, the
    # new one loads (a stale adapter_config.json is recognised by its config checksum).
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_text, CHECKSUM_FIELD: config[CHECKSUM_FIELD]}
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata=metadata))
    write_atomically(directory / CONFIG_NAME, lambda path: Path(path).write_text(config_text))
    return directory


def _remove_stale_temporaries(directory: Path) -> None:
    """Deletes temporaries a killed save left behind (``write_atomically`` names them ``.<name>.*.tmp``)."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in directory.glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass


def _config_checksum(config: dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON, without this checksum itself."""
    content = {k: v for k, v in config.items() if k != CONFIG_CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in sorted order).

    Stored in every checkpoint so that a flipped bit or an edited weights file is
    detected on loading.

    Example:
        >>> import torch
        >>> a = tensors_checksum({"w": torch.zeros(2)})
        >>> a == tensors_checksum({"w": torch.zeros(2)}), a == tensors_checksum({"w": torch.ones(2)})
        (True, False)
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated config of an adapter directory: what :func:`load_adapters` would load.

    Normally this is ``adapter_config.json``. A save interrupted after its weights file
    was in place leaves the previous ``adapter_config.json`` beside the new weights; the
    config saved inside the weights file is then the one that belongs to them.

    Example:
        >>> import tempfile, timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56), token_length=4)
        >>> va.read_adapter_config(va.save_adapters(vit, tempfile.mkdtemp()))["methods"]["rein"]["token_length"]
        4
    """
    directory = Path(directory)
    with _open_weights(directory, required=False) as weights:
        return _resolve_config(directory, weights.metadata() if weights is not None else None)


def _parse_config(text: str, source: str) -> dict[str, Any]:
    def refuse_constant(name: str) -> None:
        raise AdapterError(f"{source} holds {name}, which is not valid JSON; it may be corrupted")

    try:
        config = json.loads(text, parse_constant=refuse_constant)
    except RecursionError as error:
        raise AdapterError(f"{source} is nested too deeply to be an adapter config; it is corrupted or not one") from error
    except json.JSONDecodeError as error:
        raise AdapterError(f"{source} is not valid JSON ({error}); it may be truncated or corrupted") from error
    return validate_adapter_config(config, source)


def _read_config_file(directory: Path) -> dict[str, Any] | None:
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is {path.stat().st_size} bytes; an adapter config is a few KB, at most {MAX_CONFIG_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); it may be truncated or corrupted") from error
    return _parse_config(text, str(path))


def _resolve_config(directory: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    """Chooses the config that belongs to the weights file (see :func:`read_adapter_config`)."""
    from_file = _read_config_file(directory)
    embedded_text = (metadata or {}).get(CONFIG_METADATA_KEY)
    if embedded_text is None:  # written before configs were embedded (or by hand): the file decides
        if from_file is None:
            raise FileNotFoundError(
                f"{directory / CONFIG_NAME} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by vfm_adapters.save_adapters)"
            )
        return from_file
    if len(embedded_text) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{directory / WEIGHTS_NAME} carries a config of {len(embedded_text)} bytes; at most {MAX_CONFIG_BYTES}")
    embedded = _parse_config(embedded_text, f"the config saved inside {directory / WEIGHTS_NAME}")
    if from_file is None or from_file == embedded:
        return embedded
    recorded = from_file.get(CONFIG_CHECKSUM_FIELD)
    if recorded is not None and recorded != _config_checksum(from_file):
        changed = sorted(k for k in set(from_file) | set(embedded) if from_file.get(k) != embedded.get(k))
        raise AdapterError(
            f"{directory / CONFIG_NAME} was changed after saving: {changed} differ from the config saved with the "
            f"weights in {WEIGHTS_NAME}. Inject the configuration you want and save again instead of editing the file"
        )
    # A whole config of another save: left over by a save interrupted after its weights
    # file (the commit point) was in place. The config saved with the weights is theirs.
    return embedded


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise AdapterError(f"{source}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_adapter_config(config: Any, source: str = CONFIG_NAME) -> dict[str, Any]:
    """Checks the type of every field of an adapter config; returns it, or raises :class:`AdapterError`.

    Every method's options are checked by its config class (types and values), so a
    config that passes can be injected as it is.

    Example:
        >>> validate_adapter_config({"format": "vfm_adapters", "format_version": "1", "methods": {}})
        Traceback (most recent call last):
        ...
        vfm_adapters.methods.base.AdapterError: adapter_config.json: format_version must be an integer (1), got '1'
    """
    _require(
        isinstance(config, dict) and config.get("format") == FORMAT_NAME,
        source,
        f"not a vfm_adapters adapter config (expected a JSON object with 'format': '{FORMAT_NAME}')",
    )
    version = config.get("format_version")
    _require(_is_int(version), source, f"format_version must be an integer ({FORMAT_VERSION}), got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{source} has format_version {version}; this vfm_adapters reads up to {FORMAT_VERSION}: upgrade it")
    _require(version >= 1, source, f"format_version must be between 1 and {FORMAT_VERSION}, got {version}")
    if "library_version" in config:
        _require(isinstance(config["library_version"], str), source, "library_version must be a string")
    host = config.get("host")
    if host is not None:
        _require(isinstance(host, dict), source, f"host must be an object or null, got {type(host).__name__}")
        for key, kind, check in (
            ("family", "a string", lambda v: isinstance(v, str) and bool(v)),
            ("depth", "a positive integer", lambda v: _is_int(v) and v > 0),
            ("embed_dim", "a positive integer", lambda v: _is_int(v) and v > 0),
            ("num_prefix_tokens", "a non-negative integer", lambda v: _is_int(v) and v >= 0),
            ("patch_size", "a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0)),
            ("layout", "a string", lambda v: isinstance(v, str)),
        ):
            if key in host:
                _require(check(host[key]), source, f"host.{key} must be {kind}, got {host[key]!r}")
    methods = config.get("methods")
    _require(isinstance(methods, dict) and bool(methods), source, "'methods' must be a non-empty object (method name -> options)")
    for name, options in methods.items():
        get_method(name)  # an unknown method names the registered ones
        _require(isinstance(options, dict), source, f"methods.{name} must be an object of options, got {type(options).__name__}")
        try:
            get_method(name).config_class.from_dict(options)
        except (TypeError, ValueError) as error:
            raise AdapterError(f"{source}: methods.{name}: {error}") from error
    if "method_order" in config:
        order = config["method_order"]
        _require(
            isinstance(order, list) and all(isinstance(n, str) for n in order) and sorted(order) == sorted(methods)
            and len(set(order)) == len(order),
            source,
            f"method_order must list each of {sorted(methods)} once, got {order!r}",
        )
    for field in (CHECKSUM_FIELD, CONFIG_CHECKSUM_FIELD):
        if field in config:
            value = config[field]
            _require(
                isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value),
                source,
                f"{field} must be a SHA-256 hex digest, got {value!r}",
            )
    return config


class _open_weights:
    """``safe_open`` of the weights file with clear errors; ``None`` if absent and not required."""

    def __init__(self, directory: Path, required: bool = True) -> None:
        self.path, self.required, self.handle = directory / WEIGHTS_NAME, required, None

    def __enter__(self):
        if not self.path.is_file():
            if self.required and not (self.path.parent / CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"{self.path.parent / CONFIG_NAME} not found: an adapter directory holds {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME} (written by vfm_adapters.save_adapters)"
                )
            if self.required:
                raise FileNotFoundError(f"{self.path} not found: the adapter directory has a config but no weights file")
            return None
        try:
            self.handle = safe_open(str(self.path), framework="pt")
            return self.handle
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise AdapterError(
                f"could not read {self.path}: {error}. The file is truncated or corrupted; save the adapters again"
            ) from error

    def __exit__(self, *exc: Any) -> None:
        handle, self.handle = self.handle, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)


def _check_host(saved: dict[str, Any] | None, model: nn.Module) -> None:
    if not saved:  # saved by host-less methods only (Domino on a decode head): nothing to check
        return
    host = describe_host(model).to_json()
    if "family" in saved and saved["family"] != host["family"]:
        raise AdapterError(
            f"these adapters were saved for a {saved['family']} host; this model is a {host['family']}. "
            "Adapters are tied to the host family they were trained on (its token layout and prefix tokens)"
        )
    for key in ("embed_dim", "depth", "stages"):
        if key in saved and saved[key] != host.get(key):
            raise AdapterError(
                f"these adapters were saved for a host with {key}={saved[key]} ({saved.get('family')}); "
                f"this model has {key}={host.get(key)} ({host['family']})"
            )


def load_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Loads adapters saved by :func:`save_adapters`, injecting methods not yet present.

    ``directory`` may also be a Hugging Face Hub id (``"org/name"``), fetched through
    ``huggingface_hub`` at ``revision`` with ``token``; a local directory of the same
    spelling always wins (see :func:`vfm_adapters.hub_source.resolve_adapter_source`).

    Loading is strict and all-or-nothing. Everything is checked before the model is
    touched: the config's fields and types, the host (family, width, depth), every
    tensor's name, shape and dtype against what the config asks for (read from the
    file's header, before any adapter is allocated), the tensors' checksum and that
    their values are finite. Only then are methods injected and values copied; if
    anything still fails, methods injected here are removed and the previous adapter
    values restored.

    Args:
        model: The host the adapters were trained on (with or without them injected).
        directory: A directory written by :func:`save_adapters`.
        allow_nonfinite: Load tensors holding NaN or inf (refused by default: they come
            from a diverged run).
        revision: Hub revision (branch, tag or commit) when ``directory`` is a hub id.
        token: Hub token when ``directory`` is a hub id.

    Example:
        >>> import tempfile, timm, torch, vfm_adapters as va
        >>> make = lambda: timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                                  embed_dim=64, num_heads=2, img_size=56)
        >>> path = va.save_adapters(va.inject_rein(make()), tempfile.mkdtemp())
        >>> va.injected_methods(va.load_adapters(make(), path))
        ['rein']
    """
    from .hub_source import resolve_adapter_source

    directory = Path(resolve_adapter_source(directory, revision=revision, token=token))
    with _open_weights(directory) as weights:
        config = _resolve_config(directory, weights.metadata())
        _check_host(config.get("host"), model)
        to_inject = _methods_to_inject(model, config)
        expected = _expected_tensors(model, to_inject, list(config["methods"]))
        if expected is not None:
            _check_header(_header(weights), expected, directory / WEIGHTS_NAME)
        tensors = {key: weights.get_tensor(key) for key in weights.keys()}
    _check_values(tensors, config, directory / WEIGHTS_NAME, allow_nonfinite)
    _apply(model, to_inject, tensors, list(config["methods"]), directory / WEIGHTS_NAME)
    return model


def _methods_to_inject(model: nn.Module, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (name, config) of each saved method not yet injected; refuses a differently configured one."""
    state = injection_state(model)
    order = config.get("method_order") or list(config["methods"])
    plan: list[tuple[str, Any]] = []
    for name in order:
        saved_config = get_method(name).config_class.from_dict(config["methods"][name])
        if state is not None and name in state.configs:
            current = state.configs[name].to_dict()
            if current != saved_config.to_dict():
                raise AdapterError(
                    f"{name!r} is injected with {current} but the adapters were saved with {saved_config.to_dict()}"
                )
            continue
        plan.append((name, saved_config))
    return plan


def _meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (allocates nothing)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def _expected_tensors(
    model: nn.Module, to_inject: list[tuple[str, Any]], methods: list[str]
) -> dict[str, torch.Tensor] | None:
    """The adapter tensors (on the meta device) that loading these methods will fill.

    The methods are injected into a meta-device twin of the model, so a config asking
    for a huge adapter allocates nothing and every injection error surfaces before the
    model is touched. ``None`` for a model that cannot be deep-copied: its methods are
    then injected for real and checked before any value is copied (and removed again).
    """
    if to_inject:
        try:
            twin = _meta_twin(model)
        except Exception:  # noqa: BLE001 - an exotic attribute that refuses deepcopy: check after injecting
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real injection warns
            for name, method_config in to_inject:
                inject(twin, name, method_config)
    else:
        twin = model
    return {k: v for k, v in adapter_state_dict(twin).items() if k.split(".", 1)[0] in methods}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _header(weights: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, safetensors dtype name)`` from the file's header, without reading the data."""
    header = {}
    for key in weights.keys():
        view = weights.get_slice(key)
        header[key] = (tuple(view.get_shape()), view.get_dtype())
    return header


def _header_of_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items() if dtype is not None}
    return {k: (tuple(t.shape), names.get(t.dtype, str(t.dtype))) for k, t in tensors.items()}


def _check_header(header: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Names, shapes and dtypes of the saved tensors against what the model will hold."""
    saved = set(header)
    missing = sorted(set(expected) - saved)
    unexpected = sorted(saved - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"adapter weights do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    wrong_shapes, wrong_dtypes = [], []
    for key, target in expected.items():
        shape, dtype_name = header[key]
        if shape != tuple(target.shape):
            wrong_shapes.append(f"{key}: saved {shape}, model {tuple(target.shape)}")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        same_kind = dtype is not None and (
            dtype.is_floating_point if target.dtype.is_floating_point else dtype == target.dtype
        )
        if not same_kind:
            wanted = "floating point (F32, F16, BF16 or F64)" if target.dtype.is_floating_point else str(target.dtype)
            wrong_dtypes.append(f"{key} is {dtype_name}, expected {wanted}")
    if wrong_shapes:
        raise AdapterError("adapter weights have the wrong shapes: " + "; ".join(wrong_shapes[:8]))
    if wrong_dtypes:
        raise AdapterError(f"{path} holds tensors of the wrong type: " + "; ".join(wrong_dtypes[:8]))


def _check_values(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path, allow_nonfinite: bool) -> None:
    recorded = config.get(CHECKSUM_FIELD)
    if recorded is not None and tensors_checksum(tensors) != recorded:
        raise AdapterError(
            f"{path} is corrupted: its tensors do not match the checksum recorded when they were saved "
            "(a flipped bit, or a file edited or copied incompletely); save the adapters again"
        )
    if not allow_nonfinite:
        bad = sorted(k for k, t in tensors.items() if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()))
        if bad:
            raise AdapterError(
                f"{path} holds NaN or infinite values in {bad[:8]}{'...' if len(bad) > 8 else ''}: the adapters come "
                "from a diverged run. Pass allow_nonfinite=True to load them anyway"
            )


def _apply(
    model: nn.Module, to_inject: list[tuple[str, Any]], tensors: dict[str, torch.Tensor], methods: list[str], path: Path
) -> None:
    """Injects the missing methods and copies the values; on any error the model is as before."""
    state = injection_state(model)
    # Values of methods already injected, restored if a later step fails.
    kept = {
        k: v.detach().clone() for k, v in adapter_state_dict(model).items() if k.split(".", 1)[0] in methods
    } if state is not None else {}
    injected_here: list[str] = []
    try:
        for name, method_config in to_inject:
            inject(model, name, method_config)
            injected_here.append(name)
        state = injection_state(model)
        expected = {k: v for k, v in adapter_state_dict(model).items() if k.split(".", 1)[0] in methods}
        _check_header(_header_of_tensors(tensors), expected, path)  # done on the twin already, unless it failed
        subsets = {}
        for name in methods:
            prefix = name + "."
            subsets[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            get_method(name).check_state_dict(model, state.attachments[name], subsets[name])
        for name in methods:
            get_method(name).load_state_dict(model, state.attachments[name], subsets[name])
    except BaseException:
        for name in reversed(injected_here):
            remove_adapters(model, name)
        if kept:
            current = adapter_state_dict(model)
            with torch.no_grad():
                for key, value in kept.items():
                    current[key].copy_(value)
        raise
