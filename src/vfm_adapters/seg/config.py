"""One config path: defaults + a YAML/JSON file + ``key=value`` overrides, validated as a whole.

``train``, ``eval``, ``adapt`` and the Python API all load a config here, so a config is
complete, typed and checked before a run builds a model or writes a file. The schema is
the defaults tree itself (:data:`DEFAULTS`; the adaptation recipes pass their own); the
generic machinery is :mod:`vfm_adapters.config_tree`:

* a non-empty mapping is a closed section: an unknown key is an error that names the
  key path and suggests the closest accepted key
  (``model.method_options.rein.token_lenght: unknown key; did you mean token_length?``);
* a leaf takes the type of its default: a float default accepts ints and numbers that
  PyYAML reads as strings (``1e-3``), an int default accepts integral numbers, a bool
  default only booleans, a string default only strings (``null`` is accepted everywhere
  and checked by the value rules that follow);
* hooks check what the tree cannot describe: each method's options against its config
  dataclass, each dataset entry against its reader's arguments, and the value ranges.

Overrides are dotted paths with values parsed by ``yaml.safe_load``
(``optim.lr=2e-4 train.batch_size=8 model.methods=[rein] data.train.0.weight=2``); they
are applied to the file's mapping before validation, so an override with a typo fails
exactly like the same typo in the file.

The config reference (every key and its meaning) is in :mod:`vfm_adapters.seg.training`.

Config reference (YAML or JSON; every key optional except the data)::

    model:
      backbone: vit_large_patch14_dinov2   # timm model name
      backbone_kwargs: {img_size: 512}     # passed to timm.create_model
      pretrained: false                    # timm pretrained weights (needs a download)
      patch_resample: timm                 # another patch_size: timm (pseudo-inverse) | bicubic (the Rein authors')
      backbone_checkpoint: null            # a .safetensors/.pt state dict for the host
      methods: [rein]                      # registered methods; [] or [freeze] = head only
      method_options: {rein: {link_queries: false}}
      train_backbone: false                # full fine-tuning (lr x optim.backbone_lr_mult)
      layers: null                         # feature blocks (default [7, 11, 15, 23] of 24)
      scales: [4, 2, 1, 0.5]
      neck: learnable                      # learnable | interpolate (the paper's) | multilevel (CLIP-L)
      head: fpn                            # fpn | linear
      head_channels: 256
      dropout: 0.1
      num_classes: 19
      mean: [123.675, 116.28, 103.53]
      std: [58.395, 57.12, 57.375]
    data:
      train: [{type: gta5, root: data/gta5, weight: 1.0}]
      val: [{type: cityscapes, root: data/cityscapes, split: val, resize: [1024, 512]}]
      crop_size: [512, 512]
      resize: ratio_range                  # ratio_range | short_side_choice (the Rein authors')
      short_sides: null                    # short_side_choice: null = int(crop * x * 0.1), x = 5..20
      max_long_side: null                  # short_side_choice: null = 4 x crop (2048 at 512)
      scale: [1280, 720]                   # ratio_range: keep-ratio rescale target, null = none
      ratio_range: [0.5, 2.0]
      cat_max_ratio: 0.75
      flip: 0.5
      photometric: true
      num_workers: 2
    optim:
      lr: 1.0e-4
      weight_decay: 0.05
      no_decay: authors                    # the Rein authors' names (norms, query/level embeddings,
                                           # Rein tokens and scale; biases decay) | small_tensors
      betas: [0.9, 0.999]
      backbone_lr_mult: 0.1
      poly_power: 0.9
      min_lr: 0.0
      warmup_iters: 0
      warmup_ratio: 1.0e-6
      schedule: poly                       # poly (warm-up x one poly curve) | warmup_poly_restart (the
                                           # authors' ACDC: LinearLR, then PolyLR restarting after warm-up)
      grad_clip: null
    train:
      iterations: 40000
      batch_size: 4                        # per process
      grad_accum: 1
      total_batch_size: null               # if set: grad_accum = total / (batch_size x processes)
      seed: 0
      mixed_precision: auto                # auto = bf16 on CUDA, else no
      log_interval: 50
      checkpoint_interval: 1000
      eval_interval: 0                     # 0 = evaluate only at the end
      output_dir: runs/rein
      log_with: null                       # Accelerate trackers, e.g. tensorboard (extra) or [tensorboard, wandb]
      find_unused_parameters: false        # DDP: needed when some trainable parameter gets no gradient
    eval:
      mode: slide                          # slide | whole
      crop: 512
      stride: 341
      limit: null                          # evaluate on the first N images only
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from typing import Any, Iterable, Mapping

from ..config_tree import (  # noqa: F401 - the generic machinery, re-exported for the loaders built on it
    Check,
    ConfigError,
    apply_overrides,
    dataclass_options,
    merge_config,
    parse_overrides,
    read_config_file,
    read_source,
    unknown_key_error,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ConfigError", "DEFAULTS", "METHOD_DEFAULTS", "check_method_options", "check_methods", "dataset_check",
           "dataset_keys", "load_config", "validate_eval", "validate_optim"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "vit_large_patch14_dinov2", "backbone_kwargs": {}, "pretrained": False, "patch_resample": "timm",
        "backbone_checkpoint": None, "methods": ["rein"], "method_options": {}, "train_backbone": False,
        "layers": None, "scales": [4, 2, 1, 0.5], "neck": "learnable", "head": "fpn", "head_channels": 256, "dropout": 0.1,
        "head_options": {}, "num_classes": 19, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    },
    "data": {
        "train": [], "val": [], "crop_size": [512, 512], "scale": [1280, 720], "ratio_range": [0.5, 2.0],
        "cat_max_ratio": 0.75, "flip": 0.5, "photometric": True, "num_workers": 2,
        "resize": "ratio_range", "short_sides": None, "max_long_side": None,
    },
    "optim": {
        "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "backbone_lr_mult": 0.1, "poly_power": 0.9,
        "min_lr": 0.0, "warmup_iters": 0, "warmup_ratio": 1e-6, "grad_clip": None,
        "no_decay": "authors", "schedule": "poly",
    },
    "train": {
        "iterations": 40000, "batch_size": 4, "grad_accum": 1, "total_batch_size": None, "seed": 0, "mixed_precision": "auto",
        "log_interval": 50, "checkpoint_interval": 1000, "eval_interval": 0, "output_dir": "runs/segmentation",
        "log_with": None, "find_unused_parameters": False,
    },
    "eval": {"mode": "slide", "crop": 512, "stride": 341, "limit": None},
}

#: Method options the segmentation stack sets unless the config says otherwise: the
#: light heads use no object queries, so Rein's query link would be unused parameters
#: (which also breaks DistributedDataParallel).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"rein": {"link_queries": False}}

#: Types of keys whose default is ``null`` (the tree cannot tell them).
NULLABLE_TYPES: dict[str, type] = {
    "model.backbone_checkpoint": str, "data.max_long_side": int, "optim.grad_clip": float,
    "train.total_batch_size": int, "eval.limit": int,
}

#: ``model.methods`` names that inject nothing: a frozen host, full fine-tuning.
PSEUDO_METHODS = ("freeze", "full", "none")

#: Keys of a dataset entry that every reader accepts (the loops read them, not the reader).
DATASET_COMMON_KEYS = ("type", "name", "weight", "resize", "scale")


def load_config(source: str | os.PathLike | Mapping[str, Any] | None = None,
                overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """A complete, validated training config: :data:`DEFAULTS` + a YAML/JSON file (or a dict) + overrides.

    Unknown keys (at any depth: sections, method options, dataset entries) and values of
    the wrong type raise :class:`ConfigError` naming the key path, so a typo never falls
    back to a default and nothing is built or written from a bad config.

    Example:
        >>> cfg = load_config({"train": {"iterations": 10}, "data": {"train": [{"type": "synthetic"}]}},
        ...                   ["optim.lr=2e-4", "model.method_options.rein.token_length=50"])
        >>> cfg["train"]["iterations"], cfg["optim"]["lr"], cfg["model"]["method_options"]
        (10, 0.0002, {'rein': {'token_length': 50}})
        >>> load_config({}, ["model.method_options.rein.token_lenght=50"])
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: model.method_options.rein.token_lenght: unknown key; did you mean token_length? ...
    """
    raw = read_source(source)
    raw = apply_overrides(raw, overrides)
    config = merge_config(DEFAULTS, raw, SEGMENTATION_CHECKS, NULLABLE_TYPES)
    _validate(config)
    return config


def _named_entries(entries: Mapping[str, Any]) -> list[Any]:
    """``{name: entry}`` -> ``[entry + {name}]`` (``data.val`` may be written as a mapping)."""
    return [dict(v, name=k) if isinstance(v, Mapping) else v for k, v in entries.items()]


# ------------------------------------------------------------------------ nested checks
def check_methods(path: str, value: Any) -> list[str]:
    """``model.methods``: registered method names (or freeze / full / none); a string is split on commas.

    Example:
        >>> check_methods("model.methods", "rein,lora")
        ['rein', 'lora']
        >>> check_methods("model.methods", ["reni"])
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: model.methods[0]: unknown method 'reni'; did you mean rein? ...
    """
    if isinstance(value, str):
        value = [m for m in value.split(",") if m]
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of method names, got {value!r}")
    from ..methods.base import available_methods

    accepted = set(available_methods()) | set(PSEUDO_METHODS)
    for i, name in enumerate(value):
        if name not in accepted:
            raise unknown_key_error(f"{path}[{i}]", name, accepted, f"unknown method {name!r}")
    return list(value)


def check_method_options(path: str, value: Any) -> dict[str, dict[str, Any]]:
    """``model.method_options``: per registered method, keys among its config dataclass's fields.

    Values are typed by the field (``"1e-3"`` for a float field is a number); only the
    keys given are returned, so the method's own defaults still apply.

    Example:
        >>> check_method_options("model.method_options", {"lora": {"rank": "8"}})
        {'lora': {'rank': 8}}
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping method -> options, e.g. {{rein: {{token_length: 100}}}}")
    from ..methods.base import available_methods

    from ..methods.base import get_method

    out = {}
    for name, options in value.items():
        if name in PSEUDO_METHODS:  # no adapter, so no options (an empty entry is harmless)
            if options:
                raise ConfigError(f"{path}.{name}: '{name}' injects no adapter and takes no options, got {options!r}")
            out[name] = {}
            continue
        if name not in available_methods():
            raise unknown_key_error(f"{path}.{name}", name, available_methods(), "unknown method")
        out[name] = dataclass_options(f"{path}.{name}", get_method(name).config_class, options)
    return out


def dataset_keys(kind: str) -> list[str]:
    """The keys a dataset entry of ``type: kind`` accepts: the reader's arguments + :data:`DATASET_COMMON_KEYS`.

    Example:
        >>> dataset_keys("cityscapes")
        ['name', 'resize', 'root', 'scale', 'split', 'type', 'weight']
    """
    from .datasets import DATASETS

    if kind == "synthetic":
        from .synthetic import SyntheticScenes

        reader: Any = SyntheticScenes
    else:
        reader = DATASETS[kind]
    arguments = [p for p in inspect.signature(reader.__init__).parameters if p not in ("self", "transform")]
    return sorted(set(arguments) | set(DATASET_COMMON_KEYS))


def dataset_check(extra_types: Mapping[str, Iterable[str]] | None = None) -> Check:
    """A check for a list of dataset entries; ``extra_types`` adds readers by ``type`` with their keys
    (the adaptation recipes' ``unlabelled`` folders).

    Example:
        >>> check = dataset_check()
        >>> check("data.val", {"fog": {"type": "synthetic", "domain": "fog"}})
        [{'type': 'synthetic', 'domain': 'fog', 'name': 'fog'}]
        >>> check("data.train", [{"type": "synthetic", "domian": "fog"}])
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: data.train[0].domian: unknown key for a synthetic dataset; did you mean domain? ...
    """
    extra = {k: sorted(set(v) | set(DATASET_COMMON_KEYS)) for k, v in (extra_types or {}).items()}

    def check(path: str, value: Any) -> list[dict[str, Any]]:
        from .datasets import DATASETS

        if value is None:
            return []
        if isinstance(value, Mapping):
            value = _named_entries(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of dataset entries such as {{type: cityscapes, root: ...}}")
        kinds = sorted(DATASETS) + ["synthetic"] + sorted(extra)
        entries = []
        for i, entry in enumerate(value):
            where = f"{path}[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: expected a mapping such as {{type: cityscapes, root: ...}}, got {entry!r}")
            if "type" not in entry:
                raise ConfigError(f"{where}.type: missing (one of {', '.join(kinds)})")
            kind = str(entry["type"]).lower()
            if kind not in kinds:
                raise unknown_key_error(f"{where}.type", kind, kinds, f"unknown dataset type {kind!r}")
            accepted = extra[kind] if kind in extra else dataset_keys(kind)
            for key in entry:
                if key not in accepted:
                    raise unknown_key_error(f"{where}.{key}", key, accepted, f"unknown key for a {kind} dataset")
            if "weight" in entry:
                entry = {**entry, **merge_config({"weight": 1.0}, {"weight": entry["weight"]}, prefix=f"{where}.")}
            entries.append(copy.deepcopy(dict(entry)))
        return entries

    return check


def _mixed_precision(path: str, value: Any) -> str:
    value = "no" if value is False else value  # YAML reads an unquoted `no` as false
    if value not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(f"{path} must be auto, no, bf16 or fp16, got {value!r}")
    return value


SEGMENTATION_CHECKS: dict[str, Check] = {
    "model.methods": check_methods, "model.method_options": check_method_options,
    "data.train": dataset_check(), "data.val": dataset_check(), "train.mixed_precision": _mixed_precision,
}


# ----------------------------------------------------------------------------- value rules
def _validate(config: dict[str, Any]) -> None:
    train = config["train"]
    for key in ("iterations", "batch_size", "grad_accum"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if config["optim"]["schedule"] not in ("poly", "warmup_poly_restart"):
        raise ConfigError("optim.schedule must be 'poly' or 'warmup_poly_restart' (the authors' ACDC schedule)")
    if config["data"]["resize"] not in ("ratio_range", "short_side_choice"):
        raise ConfigError("data.resize must be 'ratio_range' or 'short_side_choice' (the Rein authors' recipe)")
    if config["eval"]["mode"] not in ("slide", "whole"):
        raise ConfigError("eval.mode must be 'slide' or 'whole'")
    validate_eval(config["eval"])
    validate_optim(config["optim"], config["train"])


def _number(section: str, key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
    """Refuses a value that is not a finite real number in the given range (bools included)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{section}.{key} must be a finite number in {interval}, got {value!r}")


def validate_optim(oc: Mapping[str, Any], tc: Mapping[str, Any]) -> None:
    """Optimiser and schedule values that cannot silently train wrongly (a negative grad_clip flips gradients).

    Example:
        >>> validate_optim({**DEFAULTS["optim"], "grad_clip": -1.0}, DEFAULTS["train"])
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: optim.grad_clip (null = no clipping) must be a finite number in (0, inf], got -1.0
    """
    _number("optim", "lr", oc.get("lr"), 0.0, low_open=True)
    _number("optim", "weight_decay", oc.get("weight_decay"), 0.0)
    _number("optim", "backbone_lr_mult", oc.get("backbone_lr_mult"), 0.0)
    _number("optim", "poly_power", oc.get("poly_power"), 0.0)
    _number("optim", "min_lr", oc.get("min_lr", 0.0), 0.0, float(oc["lr"]))
    _number("optim", "warmup_ratio", oc.get("warmup_ratio"), 0.0, 1.0)
    betas = oc.get("betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    for beta in betas:
        _number("optim", "betas", beta, 0.0, 1.0, high_open=True)
    if oc.get("grad_clip") is not None:
        _number("optim", "grad_clip (null = no clipping)", oc["grad_clip"], 0.0, low_open=True)
    for section, values, key, minimum in (("optim", oc, "warmup_iters", 0), ("train", tc, "log_interval", 1),
                                          ("train", tc, "checkpoint_interval", 0), ("train", tc, "eval_interval", 0)):
        value = values.get(key)
        if key in values and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")


def validate_eval(ev: Mapping[str, Any]) -> None:
    """Sliding-window sizes that cover every pixel, and a positive image limit.

    Example:
        >>> validate_eval({"crop": 256, "stride": 341})
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: eval.stride (341) must not exceed eval.crop (256): ...
    """
    crop, stride, limit = ev.get("crop"), ev.get("stride"), ev.get("limit")
    for key, value in (("crop", crop), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"eval.{key} must be a positive integer, got {value!r}")
    if stride > crop:
        raise ConfigError(f"eval.stride ({stride}) must not exceed eval.crop ({crop}): pixels between windows "
                          "would be in no window")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"eval.limit must be a positive integer or null, got {limit!r}")
