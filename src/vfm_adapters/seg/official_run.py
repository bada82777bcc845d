"""An authors' released Rein + Mask2Former model as a run directory (``vfm-adapters convert``).

The tensor conversions are :mod:`vfm_adapters.official` (Rein, DINOv2) and
:mod:`vfm_adapters.seg.mask2former.official` (the head); this module builds the
segmentor a training config describes, loads them into it and saves it with
:func:`~vfm_adapters.seg.checkpoints.save_segmentor`, so ``vfm-adapters eval`` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._io import write_atomically
from ..official import OFFICIAL_REIN_PREFIX, import_official_rein, load_official_dinov2, read_official_checkpoint
from .build import build_segmentor
from .checkpoints import save_segmentor
from .config import ConfigError, load_config
from .mask2former import load_official_head

__all__ = ["convert_official_rein"]


def convert_official_rein(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                          config: str | os.PathLike | Mapping[str, Any], *,
                          backbone: str | os.PathLike | None = None, overwrite: bool = False,
                          log: Callable[[str], None] | None = None) -> Path:
    """Writes an authors' Rein + Mask2Former checkpoint as a run directory that ``vfm-adapters eval`` reads.

    The segmentor is built from ``config`` (``head: mask2former``, Rein injected with
    the checkpoint's sizes, a neck WITHOUT parameters as in the authors' setup), then
    the authors' Rein (:func:`~vfm_adapters.official.import_official_rein`), head
    (:func:`~vfm_adapters.seg.mask2former.load_official_head`) and, if given, the
    converted DINOv2 (:func:`~vfm_adapters.official.load_official_dinov2`; or ``backbone.*`` host keys of a
    full checkpoint) are loaded, all names and shapes checked first. The directory
    gets ``adapters/``, ``head.safetensors``, ``segmentor.json``, ``config.json`` and,
    with backbone weights, ``backbone.safetensors`` (the config's ``pretrained`` is then
    turned off, so evaluation uses exactly these weights).

    Args:
        checkpoint: The authors' checkpoint (``backbone.reins.*`` and ``decode_head.*``).
        output_dir: The run directory to write.
        config: A training config (path or dict) describing the same model.
        backbone: The authors' converted DINOv2 file (``dinov2_converted.pth``).
        overwrite: Replace a run already in ``output_dir``.
        log: Called with a note about keys that belong to neither the backbone nor the
            head (they are not used; ``segmentor.json`` lists them under ``ignored_keys``).

    Returns:
        ``output_dir``.
    """
    config = load_config(config)
    model_config = config["model"]
    output_dir = _convert_target(model_config, output_dir, overwrite)
    state = read_official_checkpoint(checkpoint)
    has_rein = any(k.startswith(OFFICIAL_REIN_PREFIX) for k in state)
    _check_methods_fit_checkpoint(model_config, has_rein)
    backbone_source = _official_backbone_source(state, model_config, backbone)
    segmentor = _build_segmentor_for_official(config, backbone_source)
    host = segmentor.backbone
    if has_rein:
        import_official_rein(host, state)
    load_official_head(segmentor, state)
    saved_model_config = dict(model_config)
    extra = _conversion_record(checkpoint, config, state, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    if backbone_source is not None:
        _write_official_backbone(host, backbone_source, output_dir)
        # load_segmentor reads backbone.safetensors when host_trained is set; nothing is downloaded.
        saved_model_config.update(pretrained=False, backbone_checkpoint=None)
        extra["host_trained"] = True
    saved_config = dict(config, model=saved_model_config)
    write_atomically(output_dir / "config.json", lambda p: Path(p).write_text(json.dumps(saved_config, indent=2) + "\n"))
    save_segmentor(segmentor, output_dir, saved_model_config, extra)
    return output_dir


def _convert_target(model_config: Mapping[str, Any], output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``output_dir`` as a path; refuses a config without the authors' head, and a directory holding a run."""
    if model_config.get("head") != "mask2former":
        raise ConfigError(f"the authors' checkpoints hold a Mask2Former head: set model.head: mask2former "
                          f"(the config says {model_config.get('head')!r})")
    output_dir = Path(output_dir)
    existing = [n for n in ("segmentor.json", "head.safetensors", "adapters", "backbone.safetensors") if (output_dir / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{output_dir} already holds a run ({', '.join(existing)}); pass overwrite=True (--overwrite) "
                          "to replace it or choose another directory")
    return output_dir


def _check_methods_fit_checkpoint(model_config: Mapping[str, Any], has_rein: bool) -> None:
    """The config injects exactly Rein when the checkpoint holds Rein, and nothing when it does not."""
    methods = [m for m in (model_config.get("methods") or []) if m not in ("freeze", "none")]
    if has_rein and methods != ["rein"]:
        raise ConfigError(f"the checkpoint holds Rein: the config must inject exactly Rein (model.methods: [rein]), "
                          f"it has {model_config.get('methods')}")
    if not has_rein and methods:
        raise ConfigError(f"the checkpoint holds no Rein (a frozen-backbone model): set model.methods: [freeze], "
                          f"the config has {model_config.get('methods')}")


def _official_backbone_source(state: Mapping[str, Any], model_config: Mapping[str, Any],
                              backbone: str | os.PathLike | None) -> str | os.PathLike | Mapping[str, Any] | None:
    """Where the host's weights come from; refuses a conversion with no host weights at all.

    The given file, else the checkpoint's own ``backbone.*`` host keys, else None (the config loads the host).
    """
    host_in_checkpoint = any(k.startswith("backbone.") and not k.startswith(OFFICIAL_REIN_PREFIX) for k in state)
    backbone_source = backbone if backbone is not None else (state if host_in_checkpoint else None)
    if backbone_source is None and not (model_config.get("pretrained") or model_config.get("backbone_checkpoint")):
        raise ConfigError("no backbone weights: pass the authors' converted DINOv2 (--backbone dinov2_converted.pth), "
                          "or a config whose model loads the host (pretrained / backbone_checkpoint)")
    return backbone_source


def _build_segmentor_for_official(config: Mapping[str, Any], backbone_source: Any) -> nn.Module:
    """The config's segmentor (seeded), refused if its neck has parameters the authors' checkpoint lacks."""
    model_config = config["model"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["train"]["seed"]))
        # With the authors' backbone file the host's own source (e.g. timm weights) is not needed.
        segmentor = build_segmentor(dict(model_config, pretrained=False, backbone_checkpoint=None)
                                    if backbone_source is not None else model_config)
    neck_parameters = sum(p.numel() for p in segmentor.neck.parameters())
    if neck_parameters:
        raise ConfigError(
            f"the config's neck has {neck_parameters} parameters, which the authors' checkpoint does not hold: their "
            "neck only resizes the block outputs (bilinear x4, x2, x1, x0.5). Use the parameter-free neck "
            "(model.neck: interpolate)"
        )
    return segmentor


def _conversion_record(checkpoint: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, Any],
                       log: Callable[[str], None] | None) -> dict[str, Any]:
    """What ``segmentor.json`` records about the conversion: seed, source and the keys left unused (logged)."""
    extra: dict[str, Any] = {"seed": int(config["train"]["seed"]), "converted_from": str(checkpoint)}
    ignored = sorted(k for k in state if not k.startswith(("backbone.", "decode_head.")))
    if ignored:
        extra["ignored_keys"] = ignored
        if log is not None:
            log(f"not used ({len(ignored)} keys outside backbone. and decode_head.): {ignored[:5]}"
                f"{'...' if len(ignored) > 5 else ''}")
    return extra


def _write_official_backbone(host: nn.Module, backbone_source: Any, output_dir: Path) -> None:
    """Loads the authors' converted DINOv2 into ``host`` and writes the host's weights to ``backbone.safetensors``."""
    from safetensors.torch import save_file

    load_official_dinov2(host, backbone_source)
    host_state = {k: v.detach().cpu().contiguous() for k, v in host.state_dict().items()
                  if not k.startswith("vfm_adapters.")}
    write_atomically(output_dir / "backbone.safetensors", lambda p: save_file(host_state, p))
