"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) on q, k, v.

Every query, key and value projection ``W`` (out x in) of every block gets a trainable
low-rank update ``W + (alpha / r) * B A`` with ``A`` (r x in) and ``B`` (out x r);
``B`` starts at zero, so the model is unchanged right after injection.

The layers are PEFT's own (:class:`peft.tuners.lora.layer.Linear`, adapter name
``"default"``), so users get PEFT's merge/unmerge and its state-dict key names. Where a
block has:

* **separate** q/k/v ``Linear`` layers (EVA02-L, transformers ViT/DINOv2/CLIP), each one
  targeted is wrapped: ``3 * r * (c + c)`` parameters per block;
* a **fused** ``qkv`` ``Linear(c, 3c)`` (timm ViT/DINOv2/CLIP, SAM), the fused layer is
  wrapped once, which is LoRA on the q, k and v slices with a shared ``A``:
  ``A`` is (r x c) and ``B`` (3c x r), ``r * (c + 3c)`` parameters per block;
* an attention that **reads** ``qkv.weight`` **directly** (timm ``EvaAttention`` with q/v
  biases: ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``) instead of calling the
  layer, wrapping alone would silently do nothing. The host description says so
  (:attr:`~vfm_adapters.hosts.BlockParts.direct_weight_reads`; for a discovered host,
  injection runs every wrapped block's attention once on a tiny probe input and watches
  whether the wrapper's ``forward`` ran); there the wrapper's ``weight`` attribute is
  switched to return the
  effective weight ``W + (alpha / r) B A`` (a differentiable view, so gradients reach
  ``A`` and ``B``). Input dropout cannot apply on that path (it is a weight-space
  update); a warning says so if ``dropout > 0``.

:func:`merge_lora` folds the update into the host weights (PEFT's ``merge``) and
:func:`unmerge_lora` takes it out again; :func:`save_lora_for_peft` writes a directory
that ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..hosts import HostSpec, UnsupportedModelError
from .base import AdapterError, AdapterMethod, Attachment, MethodConfig, inject, injection_state, register_method

ROLES = ("q", "k", "v")
ADAPTER_NAME = "default"  # PEFT's default adapter name; its key names depend on it


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA's options; the defaults are the Rein paper's LoRA baseline.

    Attributes:
        rank: Rank ``r`` of the update (8: 786,432 parameters on DINOv2-L, 1,179,648 on EVA02-L).
        alpha: Scaling numerator; the update is scaled by ``alpha / rank``. ``None`` means
            ``alpha = rank`` (scale 1).
        dropout: Dropout on the LoRA branch's input (PEFT's ``lora_dropout``), in [0, 1).
        targets: Which of the query, key and value projections to adapt, a non-empty
            subset of ``("q", "k", "v")``. Hosts with a fused ``qkv`` layer accept only all three.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: Sequence[str] = ROLES

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive integer (e.g. 4, 8, 16), got {self.rank!r}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0
            ):
                raise ValueError(f"LoRAConfig.alpha must be None or a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or any(t not in ROLES for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(
                f"LoRAConfig.targets must be a non-empty subset of {list(ROLES)} without repeats, got {self.targets!r}"
            )
        self.targets = tuple(role for role in ROLES if role in targets)  # canonical order

    @property
    def scaling_alpha(self) -> float:
        """The ``alpha`` actually used (``rank`` when ``alpha`` is ``None``)."""
        return float(self.rank if self.alpha is None else self.alpha)


def _peft_lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class LoraLinear(PeftLoraLinear):
        """PEFT's LoRA ``Linear``, whose ``weight`` can be the effective (adapted) weight.

        ``exposes_effective_weight`` is set by injection for hosts whose attention reads
        ``layer.weight`` instead of calling the layer; then ``weight`` returns
        ``W + scaling * B A`` while the adapter is active and not merged.
        """

        exposes_effective_weight: bool = False
        _probing: bool = False  # set while injection probes the attention
        _weight_reads: int = 0

        @property
        def weight(self) -> torch.Tensor:  # type: ignore[override]
            if self._probing:
                self._weight_reads += 1
            base = self.get_base_layer().weight
            if not self.exposes_effective_weight or self.merged or self.disable_adapters:
                return base
            weight = base
            for name in self.active_adapters:
                if name in self.lora_A:
                    weight = weight + self.get_delta_weight(name).to(base.dtype)
            return weight

    # Importable as vfm_adapters.methods.lora.LoraLinear (module __getattr__), so pickling
    # a model that carries LoRA (torch.save(model)) works.
    LoraLinear.__module__, LoraLinear.__qualname__ = __name__, "LoraLinear"
    return LoraLinear


_LORA_LINEAR: type | None = None


def lora_linear_class() -> type:
    """The ``peft`` LoRA ``Linear`` subclass used for every wrapped projection."""
    global _LORA_LINEAR
    if _LORA_LINEAR is None:
        _LORA_LINEAR = _peft_lora_linear_class()
    return _LORA_LINEAR


def __getattr__(name: str) -> Any:
    if name == "LoraLinear":  # built on first use, so importing this module does not import peft
        return lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _Wrapped:
    block: int
    role: str  # "q", "k", "v" or "qkv"
    parent: nn.Module
    child: str
    layer: nn.Module  # the LoraLinear
    attention: nn.Module | None

    @property
    def key(self) -> str:
        return f"blocks.{self.block}.{self.role}"


def _projection_paths(host: HostSpec, config: LoRAConfig) -> list[tuple[str, str]]:
    parts = host.parts
    if parts.qkv is not None:
        if config.targets != ROLES:
            raise AdapterError(
                f"host family {host.family!r} fuses query, key and value into one Linear ({parts.qkv}); LoRA on it "
                f"adapts all three: use targets=('q', 'k', 'v') (got {config.targets}). A subset needs a host with "
                "separate q/k/v projections."
            )
        return [("qkv", parts.qkv)]
    paths = [(role, getattr(parts, role)) for role in config.targets]
    missing = [role for role, path in paths if path is None]
    if missing:
        raise UnsupportedModelError(
            f"LoRA needs the query/key/value projections of each block, but host family {host.family!r} "
            f"exposes no {'/'.join(missing)} projection (nor a fused qkv)"
            + (" (its blocks are convolutions without attention; use Rein)" if host.layout == "NCHW" else "")
        )
    return paths  # type: ignore[return-value]


def _split(path: str) -> tuple[str, str]:
    return tuple(path.rsplit(".", 1)) if "." in path else ("", path)  # type: ignore[return-value]


class LoRAMethod(AdapterMethod):
    name = "lora"
    config_class = LoRAConfig

    def check(self, model: nn.Module, host: HostSpec, config: LoRAConfig) -> None:
        paths = _projection_paths(host, config)
        from peft.tuners.lora import LoraLayer

        for index, block in enumerate(host.blocks(model)):
            for role, path in paths:
                try:
                    layer = block.get_submodule(path)
                except AttributeError as error:
                    raise UnsupportedModelError(f"block {index} of {host.family!r} has no {path!r}") from error
                if isinstance(layer, LoraLayer):
                    raise AdapterError(
                        f"block {index}'s {path} is already a PEFT LoRA layer; remove the other LoRA first"
                    )
                if not isinstance(layer, nn.Linear):
                    raise UnsupportedModelError(
                        f"LoRA wraps nn.Linear projections; block {index}'s {path} is a {type(layer).__name__}"
                    )

    def attach(self, model: nn.Module, host: HostSpec, config: LoRAConfig, attachment: Attachment) -> None:
        from peft import LoraConfig as PeftLoraConfig

        paths = _projection_paths(host, config)
        peft_config = PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.scaling_alpha,
            lora_dropout=float(config.dropout),
            target_modules=[path for _, path in paths],
            init_lora_weights=True,
            inference_mode=False,
        )
        cls = lora_linear_class()
        wrapped: list[_Wrapped] = []
        attachment.extra["wrapped"] = wrapped
        attention_path = host.parts.attention
        for index, block in enumerate(host.blocks(model)):
            attention = block.get_submodule(attention_path) if attention_path else None
            for role, path in paths:
                parent_path, child = _split(path)
                parent = block.get_submodule(parent_path) if parent_path else block
                base = getattr(parent, child)
                layer = cls(base, ADAPTER_NAME, config=peft_config, r=config.rank, lora_alpha=config.scaling_alpha)
                setattr(parent, child, layer)
                attachment.undo.append(_Restore(parent, child, layer, base))
                wrapped.append(_Wrapped(index, role, parent, child, layer, attention))
        direct = _mark_direct_weight_reads(host, wrapped)
        attachment.extra["direct_weight_blocks"] = direct
        if direct and config.dropout > 0:
            warnings.warn(
                f"LoRA dropout {config.dropout} is not applied in blocks {direct}: their attention reads the "
                "projection weight directly, so LoRA acts there as a weight update without input dropout",
                stacklevel=3,
            )

    def parameters(self, model: nn.Module, attachment: Attachment) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for item in attachment.extra["wrapped"]:
            params.append(item.layer.lora_A[ADAPTER_NAME].weight)
            params.append(item.layer.lora_B[ADAPTER_NAME].weight)
        return params

    def state_dict(self, model: nn.Module, attachment: Attachment) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for item in attachment.extra["wrapped"]:
            tensors[f"{item.key}.lora_A"] = item.layer.lora_A[ADAPTER_NAME].weight
            tensors[f"{item.key}.lora_B"] = item.layer.lora_B[ADAPTER_NAME].weight
        return tensors

    def check_state_dict(self, model: nn.Module, attachment: Attachment, tensors: dict[str, torch.Tensor]) -> None:
        if any(item.layer.merged for item in attachment.extra["wrapped"]):
            raise AdapterError("LoRA is merged into the host weights; call vfm_adapters.unmerge_lora(model) before loading")

    def load_state_dict(self, model: nn.Module, attachment: Attachment, tensors: dict[str, torch.Tensor]) -> None:
        self.check_state_dict(model, attachment, tensors)
        expected = self.state_dict(model, attachment)
        if set(expected) != set(tensors):
            raise AdapterError(f"LoRA weights do not match: expected keys {sorted(expected)[:4]}..., got {sorted(tensors)[:4]}...")
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise AdapterError(f"LoRA weight {key}: saved {tuple(tensors[key].shape)}, model {tuple(target.shape)}")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])


class _Restore:
    """Undo step: unmerge if needed and put the original layer back.

    An object rather than a closure, so ``copy.deepcopy(model)`` (an EMA teacher) maps it
    to the copy's modules instead of the original's.
    """

    def __init__(self, parent: nn.Module, child: str, layer: nn.Module, base: nn.Module) -> None:
        self.parent, self.child, self.layer, self.base = parent, child, layer, base

    def __call__(self) -> None:
        if self.layer.merged:
            with torch.no_grad():
                self.layer.unmerge()
        setattr(self.parent, self.child, self.base)


def _probe_input(host: HostSpec, weight: torch.Tensor) -> torch.Tensor:
    width = int(weight.shape[1])  # the projection's input width (stages of a hierarchical host differ)
    shape = (1, 2, 2, width) if host.layout == "BHWC" else (1, host.num_prefix_tokens + 4, width)
    return torch.zeros(shape, device=weight.device, dtype=weight.dtype)


def _mark_direct_weight_reads(host: HostSpec, wrapped: list[_Wrapped]) -> list[int]:
    """Marks the wrappers whose attention reads their ``weight`` itself; returns their blocks.

    A registered host family states it (``host.parts.direct_weight_reads``). A discovered
    host is probed instead (:func:`_probe_direct_weight_reads`).
    """
    if host.discovered:
        return _probe_direct_weight_reads(host, wrapped)
    direct_blocks: list[int] = []
    for item in wrapped:
        if item.role in host.parts.direct_weight_reads:
            item.layer.exposes_effective_weight = True
            if item.block not in direct_blocks:
                direct_blocks.append(item.block)
    return sorted(direct_blocks)


def _probe_direct_weight_reads(host: HostSpec, wrapped: list[_Wrapped]) -> list[int]:
    """Finds attention modules that bypass the wrapped layers' ``forward``; returns their blocks.

    Each block's attention runs once, in eval mode and without gradients, on a small zero
    input. A wrapper whose ``forward`` did not run but whose ``weight`` was read belongs
    to an attention that computes ``F.linear(x, layer.weight, ...)`` itself. A probe that
    fails before touching the layer (an attention that needs extra inputs) marks nothing.
    """
    by_attention: dict[int, list[_Wrapped]] = {}
    for item in wrapped:
        if item.attention is not None:
            by_attention.setdefault(id(item.attention), []).append(item)
    direct_blocks: list[int] = []
    for items in by_attention.values():
        attention = items[0].attention
        calls = {id(item.layer): 0 for item in items}

        def count(module: nn.Module, args: Any) -> None:
            calls[id(module)] += 1

        handles = [item.layer.register_forward_pre_hook(count) for item in items]
        for item in items:
            item.layer._weight_reads, item.layer._probing = 0, True
        modes = {m: m.training for m in attention.modules()}
        attention.eval()
        try:
            with torch.no_grad():
                attention(_probe_input(host, items[0].layer.get_base_layer().weight))
        except Exception:  # noqa: BLE001 - any failure after the projections ran is irrelevant here
            pass
        finally:
            for module, mode in modes.items():
                module.training = mode
            for handle in handles:
                handle.remove()
            for item in items:
                item.layer._probing = False
        for item in items:
            if calls[id(item.layer)]:
                continue
            if item.layer._weight_reads:
                item.layer.exposes_effective_weight = True
                if item.block not in direct_blocks:
                    direct_blocks.append(item.block)
    return sorted(direct_blocks)


register_method(LoRAMethod())


def inject_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = ROLES,
    freeze_host: bool = True,
    trainable: Sequence[str] | str | None = None,
) -> nn.Module:
    """Adds LoRA to the query, key and value projections of every block, in place.

    The defaults are the Rein paper's LoRA baseline: rank 8 on q, k and v, giving
    786,432 trainable parameters on DINOv2-L (fused qkv) and 1,179,648 on EVA02-L
    (separate q/k/v). ``B`` starts at zero, so the output is unchanged until training.
    While injected, a wrapped projection's host weight is named ``...qkv.base_layer.weight``
    (PEFT's layout); :func:`vfm_adapters.remove_adapters` puts the original layers back.

    Args:
        model: A supported timm or transformers ViT (any family with q/k/v projections).
        rank: Rank ``r`` of the update.
        alpha: The update is scaled by ``alpha / rank``; ``None`` means ``alpha = rank``.
        dropout: Dropout on the LoRA branch's input.
        targets: Which projections to adapt, a subset of ``("q", "k", "v")`` (all three on
            fused-qkv hosts).
        freeze_host: Freeze every parameter that is not an adapter's.
        trainable: Module-name prefixes that stay trainable when the host is frozen
            (e.g. ``["head"]``; see :func:`vfm_adapters.methods.base.inject`).

    Returns:
        ``model``, now carrying LoRA.

    Raises:
        ValueError: An invalid option (e.g. ``rank=0``).
        UnsupportedModelError: The model is not a supported ViT.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> va.trainable_parameters(va.inject_lora(vit))  # 2 blocks * 8 * (64 + 192)
        4096
        >>> with torch.device("meta"):
        ...     big = timm.create_model("vit_large_patch14_dinov2")
        >>> va.trainable_parameters(va.inject_lora(big))
        786432
    """
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return inject(model, "lora", config, freeze_host=freeze_host, trainable=trainable)


def _lora_attachment(model: nn.Module) -> Attachment:
    state = injection_state(model)
    if state is None or "lora" not in state.attachments:
        raise AdapterError("this model has no LoRA injected; call vfm_adapters.inject_lora(model) first")
    return state.attachments["lora"]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers injected into ``model``, by qualified module name.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_lora(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56))
        >>> list(va.lora_layers(vit))
        ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
    """
    wanted = {id(item.layer) for item in _lora_attachment(model).extra["wrapped"]}
    return {name: module for name, module in model.named_modules() if id(module) in wanted}


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds LoRA into the host weights (``W <- W + scaling * B A``); the output stays the same.

    A merged model runs at the host's speed. LoRA's ``A`` and ``B`` are kept, so
    :func:`unmerge_lora` can take the update out again (exact up to float rounding),
    and :func:`vfm_adapters.remove_adapters` unmerges before it restores the layers.
    Do not train while merged (the update would not receive gradients).

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = va.inject_lora(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56)).eval()
        >>> with torch.no_grad():
        ...     for p in va.adapter_parameters(vit): _ = p.normal_()
        >>> x = torch.randn(1, 3, 56, 56)
        >>> before = vit(x)
        >>> torch.allclose(va.merge_lora(vit)(x), before, atol=1e-4)
        True
    """
    with torch.no_grad():
        for item in _lora_attachment(model).extra["wrapped"]:
            if not item.layer.merged:
                item.layer.merge(adapter_names=[ADAPTER_NAME])
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Takes merged LoRA updates out of the host weights again (inverse of :func:`merge_lora`).

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = va.inject_lora(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56))
        >>> w = vit.blocks[0].attn.qkv.base_layer.weight.detach().clone()
        >>> with torch.no_grad():
        ...     for p in va.adapter_parameters(vit): _ = p.normal_()
        >>> _ = va.unmerge_lora(va.merge_lora(vit))
        >>> torch.allclose(vit.blocks[0].attn.qkv.base_layer.weight, w, atol=1e-5)
        True
    """
    with torch.no_grad():
        for item in _lora_attachment(model).extra["wrapped"]:
            if item.layer.merged:
                item.layer.unmerge()
    return model


def save_lora_for_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes the injected LoRA in PEFT's own format, for ``peft.PeftModel.from_pretrained``.

    The directory gets PEFT's ``adapter_config.json`` (written by ``peft.LoraConfig``:
    ``peft_type`` LORA, ``r``, ``lora_alpha``, the qualified ``target_modules``) and
    ``adapter_model.safetensors`` with PEFT's key names
    (``base_model.model.<module>.lora_A.weight``). Only a model carrying LoRA alone can be
    written this way, and not one whose attention reads the projection weight directly
    (timm EVA02 with fused qkv and q/v biases): PEFT would silently ignore LoRA there.

    Args:
        model: A model with LoRA injected by :func:`inject_lora` and no other method.
        directory: Where to write (created if needed).

    Returns:
        The directory.

    Example:
        >>> import tempfile, timm, torch, peft, vfm_adapters as va
        >>> make = lambda: timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                                  embed_dim=64, num_heads=2, img_size=56).eval()
        >>> torch.manual_seed(0); vit = va.inject_lora(make())  # doctest: +ELLIPSIS
        <...>
        >>> with torch.no_grad():
        ...     for p in va.adapter_parameters(vit): _ = p.normal_(std=0.1)
        >>> path = va.save_lora_for_peft(vit, tempfile.mkdtemp())
        >>> torch.manual_seed(0); other = make()  # doctest: +ELLIPSIS
        <...>
        >>> loaded = peft.PeftModel.from_pretrained(other, path)
        >>> x = torch.randn(1, 3, 56, 56)
        >>> torch.allclose(loaded(x), vit(x), atol=1e-5)
        True
    """
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    from .._io import write_atomically

    state = injection_state(model)
    attachment = _lora_attachment(model)
    others = [name for name in state.configs if name != "lora"]
    if others:
        raise AdapterError(f"PEFT's format holds LoRA only; this model also carries {others}")
    direct = attachment.extra["direct_weight_blocks"]
    if direct:
        raise AdapterError(
            f"the attention of blocks {direct} reads its projection weight directly (e.g. timm EVA02 with fused qkv "
            "and q/v biases); PEFT would silently ignore LoRA there. Use vfm_adapters.save_adapters, or merge_lora"
        )
    config: LoRAConfig = state.configs["lora"]
    names = lora_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in names.items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer, part)[ADAPTER_NAME].weight.detach()
            if tensor.is_meta:
                raise AdapterError("cannot save adapters of a model on the meta device: its tensors hold no values")
            tensors[f"base_model.model.{name}.{part}.weight"] = tensor.contiguous().cpu()
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.scaling_alpha,
        lora_dropout=float(config.dropout),
        target_modules=sorted(names),
        inference_mode=True,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "adapter_model.safetensors", lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config_dict = peft_config.to_dict()
    write_atomically(
        directory / "adapter_config.json",
        lambda path: Path(path).write_text(json.dumps(_jsonable(config_dict), indent=2, sort_keys=True) + "\n"),
    )
    return directory


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):  # enums
        return value.value
    return value
