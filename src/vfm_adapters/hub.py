"""Sharing adapters: Hugging Face Hub ids, ``push_to_hub``, and transformers round trips.

Three things live here, all on top of :mod:`vfm_adapters.checkpoint`'s two-file format
(``adapter_config.json`` + ``adapter_model.safetensors``):

* :func:`resolve_adapter_source` turns what a user passed to ``load_adapters`` into a
  local directory: an existing local directory always wins; anything else that is a
  valid Hub id (``"org/name"``) is fetched with ``huggingface_hub.hf_hub_download``,
  which honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and the local cache exactly as
  transformers and PEFT do. The error says which of the two failed, and why.
* :func:`push_adapters_to_hub` uploads the two files and a generated model card in one
  commit (``HfApi.create_commit``).
* :func:`save_pretrained` / :func:`from_pretrained` carry adapters through a
  transformers model's own directory format. ``model.save_pretrained`` alone cannot:
  the adapter tensors would be written as extra keys that ``from_pretrained`` drops as
  "unexpected" (and LoRA's wrapped projections would be saved under ``base_layer``
  names, leaving the reloaded host's q/k/v randomly initialised). So the host weights are
  written under their original names and the adapters next to them in the usual two
  files; :func:`from_pretrained` loads the host, then re-injects the adapters. Injecting
  into a transformers model also routes that model's own ``save_pretrained`` (and so
  ``push_to_hub``) through :func:`save_pretrained`, with a warning that says how to load
  the result, so the plain path cannot lose the adapters silently either.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import WEIGHTS_NAME, read_adapter_config, save_adapters
from .hub_source import ADAPTER_FILES, LIBRARY_NAME, _hub_failure, _hub_id_problem, _library_version, _local_directory
from .hub_source import resolve_adapter_source  # noqa: F401 - public here too (vfm_adapters.resolve_adapter_source)
from .methods.base import ADAPTERS_ATTRIBUTE, AdapterError, injection_state

MODEL_CARD_NAME = "README.md"


# ---- pushing ------------------------------------------------------------------------------


def _family_example(family: str | None) -> str | None:
    from .hosts.registry import _FAMILIES

    for item in _FAMILIES:
        if item.name == family and item.example:
            return item.example
    return None


def _count_saved_values(weights: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= int(size)
            total += count
    return total


def _card_method_order(config: dict[str, Any]) -> list[str]:
    """The saved methods, in their injection order (``method_order``), then any it does not list."""
    methods = config["methods"]
    return [n for n in config.get("method_order", []) if n in methods] + [
        n for n in methods if n not in config.get("method_order", [])
    ]


def _card_host_line(host: dict[str, Any]) -> str:
    """The card's sentence about the host the adapters were saved from."""
    if host:
        return (
            f"Host: `{host.get('family')}`, width {host.get('embed_dim')}, {host.get('depth')} blocks, "
            f"patch size {host.get('patch_size')}, {host.get('num_prefix_tokens')} prefix token(s)."
        )
    return "Host: none recorded (these methods attach to any module, e.g. a decode head)."


def _card_method_rows(methods: dict[str, dict[str, Any]], order: list[str]) -> str:
    """The rows of the card's table: each method with its options, sorted by name."""
    return "\n".join(
        f"| `{name}` | " + ", ".join(f"`{key}={value!r}`" for key, value in sorted(methods[name].items())) + " |"
        for name in order
    )


def _card_loading_code(host: dict[str, Any], base_model: str | None) -> tuple[str, str]:
    """The loading snippet's import lines and the expression that builds the host."""
    family = host.get("family")
    host_code = base_model and f'from_pretrained("{base_model}")'
    example = _family_example(family)
    imports = ""
    if family and family.startswith("transformers."):
        imports = f"from transformers import {family.split('.', 1)[1]}\n"
    elif family and family.startswith("timm."):
        imports = "import timm\n"
    if base_model and family and family.startswith("transformers."):
        build = f"{family.split('.', 1)[1]}.{host_code}"
    elif base_model and family and family.startswith("timm."):
        build = f'timm.create_model("hf-hub:{base_model}", pretrained=True)'
    elif host:
        build = f"...  # your {family} host: width {host.get('embed_dim')}, {host.get('depth')} blocks"
        if example:
            build += f" (e.g. {example})"
    else:
        build = "...  # the model these adapters were trained on"
    return imports, build


def adapter_model_card(directory: str | os.PathLike, repo_id: str, base_model: str | None = None) -> str:
    """The ``README.md`` pushed with the adapters: host, methods and options, size, how to load.

    Args:
        directory: An adapter directory (written by :func:`vfm_adapters.save_adapters`).
        repo_id: The Hub repository the card is for (used in the loading snippet).
        base_model: Hub id of the host weights, if any (written to the card's metadata).

    Example:
        >>> import tempfile, timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56), token_length=4, rank=2)
        >>> card = adapter_model_card(va.save_adapters(vit, tempfile.mkdtemp()), "me/rein-tiny")
        >>> "library_name: vfm_adapters" in card, "va.load_adapters(model, \\"me/rein-tiny\\")" in card
        (True, True)
    """
    from huggingface_hub import ModelCardData

    from .report import format_count

    directory = Path(directory)
    config = read_adapter_config(directory)
    host = config.get("host") or {}
    methods: dict[str, dict[str, Any]] = config["methods"]
    order = _card_method_order(config)
    count = _count_saved_values(directory / WEIGHTS_NAME)
    tags = ["vfm-adapters", "parameter-efficient-fine-tuning", *order]
    metadata = ModelCardData(library_name=LIBRARY_NAME, tags=tags, base_model=base_model).to_yaml()
    host_line = _card_host_line(host)
    rows = _card_method_rows(methods, order)
    imports, build = _card_loading_code(host, base_model)
    return f"""---
{metadata}
---

# {repo_id}

Parameter-efficient adapters ({", ".join(order)}) for a vision foundation model, saved with
`vfm_adapters` {config.get("library_version", "?")}
(adapter format version {config.get("format_version", "?")}).

{host_line}

| method | options |
|---|---|
{rows}

Adapter parameters: {count:,} ({format_count(count)}), all in `{WEIGHTS_NAME}`; the host's own
weights are not part of this repository.

## How to load

```python
{imports}import vfm_adapters as va

model = {build}
model = va.load_adapters(model, "{repo_id}")
```

`load_adapters` injects the methods above and loads their tensors strictly (every key and
shape checked); it refuses a host of another width or depth.
"""


def push_adapters_to_hub(
    model_or_directory: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
) -> Any:
    """Uploads adapters (``adapter_config.json``, ``adapter_model.safetensors``) and a model card.

    The repository is created if needed (``HfApi.create_repo(..., exist_ok=True)``) and
    the three files go up in one commit, so the repository never holds a config without
    its weights. A model is first saved to a temporary directory with
    :func:`vfm_adapters.save_adapters`; a directory is validated before anything is sent.
    The generated ``README.md`` replaces one already in the repository.

    Args:
        model_or_directory: A model with injected adapters, or an adapter directory.
        repo_id: ``"org/name"`` on the Hub.
        private: Visibility of a repository created by this call (``None``: the Hub's default).
        token: Hugging Face token (``None``: the locally saved one).
        commit_message: Defaults to ``"Upload <methods> adapters with vfm_adapters"``.
        revision: Branch to commit to (``None``: the default branch).
        base_model: Hub id of the host weights, written to the model card.

    Returns:
        ``huggingface_hub.CommitInfo`` of the commit.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> push_adapters_to_hub(vit, "me/rein")  # nothing injected: refused before any upload
        Traceback (most recent call last):
        ...
        vfm_adapters.methods.base.AdapterError: this model has no adapters to save; inject a method first (e.g. vfm_adapters.inject_rein)
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(repo_id, str) or _hub_id_problem(repo_id) is not None:
        raise ValueError(f"repo_id must be a Hugging Face Hub id such as 'org/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="vfm_adapters_push_") as scratch:
        if isinstance(model_or_directory, nn.Module):
            directory = save_adapters(model_or_directory, scratch)
        else:
            directory = Path(model_or_directory)
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"{str(model_or_directory)!r} is not a directory; pass a model with adapters or a directory "
                    "written by vfm_adapters.save_adapters"
                )
            read_adapter_config(directory)
            if not (directory / WEIGHTS_NAME).is_file():
                raise FileNotFoundError(f"{directory / WEIGHTS_NAME} not found: the adapter directory has a config but no weights")
        card = adapter_model_card(directory, repo_id, base_model=base_model)
        methods = list(read_adapter_config(directory)["methods"])
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in ADAPTER_FILES]
        operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=card.encode("utf-8")))
        api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_library_version())
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {', '.join(methods)} adapters with vfm_adapters",
            revision=revision,
            repo_type="model",
        )


# ---- transformers: save_pretrained / from_pretrained ---------------------------------------


def _is_transformers_model(model: nn.Module) -> bool:
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.") for cls in type(model).__mro__
    )


def host_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The host's own tensors under their original names: what a plain checkpoint of it holds.

    Adapter modules (under ``model.vfm_adapters``) are left out; layers that LoRA wrapped
    (PEFT's ``base_layer`` convention) are given back their original names. Every host
    parameter present at injection must come out under its original name, or this
    raises instead of writing a checkpoint that would reload wrongly.

    Args:
        model: The model with adapters.
        state_dict: Tensors to filter instead of ``model.state_dict()`` (transformers'
            ``Trainer`` passes its own to ``save_pretrained``); keyed like ``model.state_dict()``.

    Raises:
        AdapterError: LoRA is merged into the host weights, or a method renamed host
            parameters in a way this function cannot undo.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> plain = set(vit.state_dict())
        >>> set(host_state_dict(va.inject_lora(vit, rank=2))) == plain
        True
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if getattr(module, "merged", False):
                raise AdapterError(
                    f"LoRA is merged into the host weights ({name}); call vfm_adapters.unmerge_lora(model) before "
                    "saving, so the host weights are written unmodified and the adapters apart"
                )
            wrapped.append(name)
    result: dict[str, torch.Tensor] = {}
    for key, value in (model.state_dict() if state_dict is None else state_dict).items():
        if key == ADAPTERS_ATTRIBUTE or key.startswith(ADAPTERS_ATTRIBUTE + "."):
            continue
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B ...: adapter tensors, saved apart
            key = f"{owner}.{rest[len('base_layer.'):]}"
        result[key] = value
    state = injection_state(model)
    if state is not None:
        lost = sorted(set(state.original_requires_grad) - set(result))
        if lost:
            raise AdapterError(
                f"cannot write the host's weights under their original names: {lost[:4]}{'...' if len(lost) > 4 else ''} "
                f"are renamed by the injected methods {list(state.configs)}; save the adapters with "
                "vfm_adapters.save_adapters and the host before injecting"
            )
    return result


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Saves a transformers host *and* its adapters to one directory.

    The host goes through its own ``save_pretrained`` (``config.json``,
    ``model.safetensors``; extra arguments are passed on), but with its original tensor
    names and without the adapter tensors, so ``from_pretrained`` reads it cleanly; the
    adapters go beside it as ``adapter_config.json`` + ``adapter_model.safetensors``.
    With ``push_to_hub=True`` (and ``repo_id=``, ``commit_message=``, ``private=``, as for
    transformers) the whole directory is uploaded once both are written. Load it with :func:`from_pretrained` (``va.load_adapters(model, directory)`` also
    reads the adapter files). Everything is checked before the first file is written.

    Example:
        >>> import tempfile, transformers, vfm_adapters as va
        >>> config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
        >>> model = va.inject_rein(transformers.Dinov2Model(config), token_length=4, rank=2)
        >>> out = va.save_pretrained(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors', 'config.json', 'model.safetensors']
    """
    if not _is_transformers_model(model):
        raise TypeError(
            f"vfm_adapters.save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "for other models use vfm_adapters.save_adapters (adapters) and the host's own checkpointing"
        )
    if injection_state(model) is None:
        raise AdapterError("this model has no adapters; use model.save_pretrained for a plain model")
    state_dict = host_state_dict(model, kwargs.pop("state_dict", None))
    if any(t.is_meta for t in state_dict.values()):
        raise AdapterError("cannot save a model on the meta device: its tensors hold no values")
    # transformers' own push_to_hub=True would upload before the adapters are written: push here, after.
    push = kwargs.pop("push_to_hub", False)
    hub_options = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
    main_process = kwargs.get("is_main_process", args[0] if args else True)
    directory = Path(directory)
    type(model).save_pretrained(model, directory, *args, state_dict=state_dict, **kwargs)
    if not main_process:
        return directory
    save_adapters(model, directory)
    if push:
        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.get("token"), library_name=LIBRARY_NAME, library_version=_library_version())
        repo_id = api.create_repo(
            hub_options.get("repo_id", directory.resolve().name), private=hub_options.get("private"), exist_ok=True
        ).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=hub_options.get("commit_message") or "Upload model and vfm_adapters adapters",
            create_pr=hub_options.get("create_pr", False),
        )
    return directory


def _view_without_adapters(directory: Path, view: Path) -> None:
    """Links every entry of ``directory`` except the adapter files into ``view``.

    transformers (with PEFT installed) treats a directory holding ``adapter_config.json``
    as a PEFT adapter and fails on ours; the host must be read from a view without it.
    """
    for entry in directory.iterdir():
        if entry.name in ADAPTER_FILES:
            continue
        os.symlink(entry.resolve(), view / entry.name, target_is_directory=entry.is_dir())


def from_pretrained(
    model_class: Any,
    source: str | os.PathLike,
    *args: Any,
    revision: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Loads a transformers host and its adapters saved by :func:`save_pretrained`.

    ``model_class.from_pretrained`` reads the host (extra arguments are passed on), then
    :func:`vfm_adapters.load_adapters` re-injects the saved methods and loads their
    tensors strictly. ``source`` is a local directory (it always wins) or a Hub id,
    fetched with ``huggingface_hub.snapshot_download`` (cache and ``HF_HUB_OFFLINE``
    honoured).

    Args:
        model_class: A transformers model class (``Dinov2Model``, ``AutoModel`` ...).
        source: Directory or Hub id holding ``config.json``, the host weights and the
            adapter files.
        revision: Branch, tag or commit of a Hub repository.
        token: Hugging Face token for private repositories.

    Raises:
        FileNotFoundError: ``source`` is neither a directory here nor fetchable from the
            Hub, or it holds no adapter files (then use ``model_class.from_pretrained``).

    Example:
        >>> import tempfile, torch, transformers, vfm_adapters as va
        >>> config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
        >>> model = va.inject_rein(transformers.Dinov2Model(config).eval(), token_length=4, rank=2)
        >>> path = va.save_pretrained(model, tempfile.mkdtemp())
        >>> again = va.from_pretrained(transformers.Dinov2Model, path)
        >>> x = torch.randn(1, 3, 28, 28)
        >>> va.injected_methods(again), torch.equal(again(x).last_hidden_state, model(x).last_hidden_state)
        (['rein'], True)
    """
    from .checkpoint import load_adapters

    directory = _local_directory(source, revision)
    if directory is None:
        if not isinstance(source, str) or _hub_id_problem(source) is not None:
            raise FileNotFoundError(f"{str(source)!r} is not a directory here, and it is not a Hugging Face Hub id either")
        from huggingface_hub import snapshot_download

        try:
            directory = Path(
                snapshot_download(
                    source, revision=revision, token=token, library_name=LIBRARY_NAME, library_version=_library_version()
                )
            )
        except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear message
            raise FileNotFoundError(
                f"{source!r} is not a directory here, and {_hub_failure(source, revision, 'the snapshot', error)}"
            ) from error
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} holds no {' / '.join(missing)}: it is not a model saved with vfm_adapters.save_pretrained "
            f"(for a plain model use {getattr(model_class, '__name__', 'the class')}.from_pretrained)"
        )
    with tempfile.TemporaryDirectory(prefix="vfm_adapters_host_") as view:
        _view_without_adapters(directory, Path(view))
        model = model_class.from_pretrained(view, *args, **kwargs)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "name_or_path"):
        config.name_or_path = str(source)  # not the temporary view it was read from
    return load_adapters(model, directory)


class _SavePretrainedWithAdapters:
    """Stands in for an injected transformers model's ``save_pretrained``.

    An instance attribute (not a patch of the class), installed at injection and removed
    with the last adapter. A plain class instance rather than a bound method, so that
    ``copy.deepcopy`` and pickling of the model keep working.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
        directory = save_pretrained(self.model, save_directory, *args, **kwargs)
        warnings.warn(
            f"{type(self.model).__name__}.save_pretrained wrote the host weights and, beside them, the vfm_adapters "
            f"adapters ({', '.join(injection_state(self.model).configs)}) to {directory}. Load both with "
            f"vfm_adapters.from_pretrained({type(self.model).__name__}, {str(directory)!r}); "
            f"{type(self.model).__name__}.from_pretrained alone does not restore the adapters.",
            UserWarning,
            stacklevel=2,
        )
        return directory


def guard_save_pretrained(model: nn.Module) -> None:
    """Called at injection: routes a transformers model's ``save_pretrained`` through :func:`save_pretrained`."""
    if _is_transformers_model(model) and "save_pretrained" not in vars(model):
        object.__setattr__(model, "save_pretrained", _SavePretrainedWithAdapters(model))


def unguard_save_pretrained(model: nn.Module) -> None:
    """Called when the last adapter is removed: the class's own ``save_pretrained`` again."""
    if isinstance(vars(model).get("save_pretrained"), _SavePretrainedWithAdapters):
        del vars(model)["save_pretrained"]
