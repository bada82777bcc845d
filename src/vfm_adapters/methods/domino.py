"""Domino: domain-adaptive normalisation driven by a CLIP domain embedding.

From "Domain-Aware Fine-Tuning of Foundation Models" (Kaplan et al.). A Domino
layer replaces a normalisation layer of a decode head. Like SPADE, it normalises the
features with their own statistics and modulates them with parameters predicted from
the domain embedding ``W`` (:mod:`vfm_adapters.domain`) by small MLPs::

    f_adp = (f - mean_f) / std_f * gamma(W) + mu(W)

The statistics are those of the layer it replaces, without its affine parameters:
BatchNorm keeps batch statistics in training and running statistics (carried over) in
eval, GroupNorm uses per-sample group statistics, LayerNorm per-token statistics. The
MLPs share a hidden layer (``Linear(d, h) -> ReLU``, as SPADE's shared trunk) and end
in two zero-initialised ``Linear(h, C)`` whose biases are the replaced layer's weight
and bias, so a freshly injected model computes what it computed before.

Two methods are registered:

* ``"domino"`` (:func:`inject_domino`): the paper's layer, on any module (host-less).
* ``"domain_rein"`` (:func:`inject_domain_rein`, in :mod:`.domain_rein`, re-exported
  here): this library's extension, off by default: Rein's tokens are shifted per image
  by ``+/- P W`` with a learned, zero-initialised projection ``P`` (the paper's Add/Sub
  conditioning, applied to Rein's tokens instead of a diffusion model's prompts).

:func:`set_domain_embedding` hands both the batch's ``W`` before the forward pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._conditioning import checked_embedding, positive_int
from .base import AdapterError, AdapterMethod, Attachment, MethodConfig, inject, register_method
from .domain_rein import DomainReinConfig, DomainReinShift, inject_domain_rein  # noqa: F401  (re-exported: their import path before domain_rein.py)

__all__ = [
    "DomainReinShift",
    "DomainReinConfig",
    "DominoConfig",
    "DominoNorm",
    "NORM_TYPES",
    "inject_domain_rein",
    "inject_domino",
    "set_domain_embedding",
]

#: The normalisation layers Domino replaces, by name (configs store names). A layer is
#: replaced when its type is exactly one of these: subclasses that add behaviour (timm's
#: ``BatchNormAct2d`` fuses an activation, ``LayerNorm2d`` permutes) are left alone.
NORM_TYPES: dict[str, type[nn.Module]] = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "SyncBatchNorm": nn.SyncBatchNorm,
    "GroupNorm": nn.GroupNorm,
    "LayerNorm": nn.LayerNorm,
}


def _norm_type_names(types: Iterable[str | type[nn.Module]]) -> tuple[str, ...]:
    if isinstance(types, (str, type)):
        types = (types,)
    names: list[str] = []
    for item in types:
        name = item if isinstance(item, str) else getattr(item, "__name__", repr(item))
        if name not in NORM_TYPES or (not isinstance(item, str) and NORM_TYPES[name] is not item):
            raise ValueError(f"Domino cannot replace {item!r}; supported normalisation types: {sorted(NORM_TYPES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("DominoConfig.types must name at least one normalisation type")
    return tuple(names)


@dataclass
class DominoConfig(MethodConfig):
    """Domino's options.

    Attributes:
        embed_dim: Width ``d`` of the domain embedding (CLIP's projection width: 512 for
            ViT-B CLIP, 768 for ViT-L).
        hidden_dim: Width of the MLPs' shared hidden layer (SPADE uses 128).
        types: Names of the normalisation layers to replace (keys of :data:`NORM_TYPES`).
    """

    embed_dim: int
    hidden_dim: int = 128
    types: Sequence[str] = tuple(NORM_TYPES)

    def __post_init__(self) -> None:
        positive_int("DominoConfig", "embed_dim", self.embed_dim)
        positive_int("DominoConfig", "hidden_dim", self.hidden_dim)
        self.types = _norm_type_names(self.types)


class DominoNorm(nn.Module):
    """``norm(f) * gamma(W) + mu(W)``, replacing one normalisation layer.

    ``norm`` is a copy of the replaced layer without its affine parameters (BatchNorm
    keeps its running statistics, momentum and eps), so the statistics are exactly the
    replaced layer's. ``gamma`` and ``mu`` (B, C) come from :meth:`modulation` and
    broadcast over the channel axis: dim 1 for BatchNorm/GroupNorm inputs (B, C, ...),
    the trailing ``normalized_shape`` for LayerNorm inputs (B, ..., C).

    Args:
        norm: The layer to replace (one of :data:`NORM_TYPES`); it is not modified.
        embed_dim: Width ``d`` of the domain embedding.
        hidden_dim: Width of the MLPs' shared hidden layer.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> layer = DominoNorm(bn, embed_dim=8)
        >>> x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 8)
        >>> layer.set_domain_embedding(w)
        >>> torch.allclose(layer(x), bn(x), atol=1e-6)  # starts as the layer it replaced
        True
    """

    def __init__(self, norm: nn.Module, embed_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        positive_int("DominoNorm", "embed_dim", embed_dim)
        positive_int("DominoNorm", "hidden_dim", hidden_dim)
        if type(norm) not in NORM_TYPES.values():
            raise AdapterError(f"DominoNorm replaces {sorted(NORM_TYPES)}, not {type(norm).__name__}")
        if isinstance(norm, _BatchNorm):
            self.kind, features = "batch", norm.num_features
            self.channel_shape: tuple[int, ...] = (norm.num_features,)
            affine_flag = "affine"
        elif isinstance(norm, nn.GroupNorm):
            self.kind, features = "group", norm.num_channels
            self.channel_shape = (norm.num_channels,)
            affine_flag = "affine"
        else:
            self.kind = "layer"
            self.channel_shape = tuple(norm.normalized_shape)
            features = math.prod(self.channel_shape)
            affine_flag = "elementwise_affine"
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        tensors = [t for t in (weight, bias, *norm.buffers()) if t is not None]
        factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
        if factory and not factory["dtype"].is_floating_point:
            factory.pop("dtype")

        # The replaced layer's statistics without its affine parameters: a copy whose
        # weight and bias are removed (running statistics and hyper-parameters kept).
        self.norm = copy.deepcopy(norm)
        self.norm.weight = None
        self.norm.bias = None
        setattr(self.norm, affine_flag, False)

        self.embed_dim, self.hidden_dim, self.num_features = embed_dim, hidden_dim, features
        self.shared = nn.Sequential(nn.Linear(embed_dim, hidden_dim, **factory), nn.ReLU())
        self.to_gamma = nn.Linear(hidden_dim, features, **factory)
        self.to_mu = nn.Linear(hidden_dim, features, **factory)
        with torch.no_grad():
            nn.init.zeros_(self.to_gamma.weight)
            nn.init.zeros_(self.to_mu.weight)
            if weight is not None:
                self.to_gamma.bias.copy_(weight.detach().reshape(-1))
            else:
                self.to_gamma.bias.fill_(1.0)
            if bias is not None:
                self.to_mu.bias.copy_(bias.detach().reshape(-1))
            else:
                self.to_mu.bias.zero_()
        self._domain_embedding: Tensor | None = None

    def set_domain_embedding(self, embedding: Tensor | None) -> None:
        """Sets the batch's domain embedding ``W`` (B, d) or (d,) for all images; ``None`` clears it."""
        self._domain_embedding = checked_embedding(embedding, self.embed_dim, type(self).__name__)

    def modulation(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma(W), mu(W))``, each (B, C) (C: the flattened channel shape)."""
        hidden = self.shared(embedding.to(self.to_gamma.weight.dtype))
        return self.to_gamma(hidden), self.to_mu(hidden)

    def _embedding_for(self, batch: int) -> Tensor:
        embedding = self._domain_embedding
        if embedding is None:
            raise AdapterError(
                "no domain embedding is set for this Domino layer: call "
                "vfm_adapters.set_domain_embedding(model, W) with W (B, d) before the forward pass"
            )
        if embedding.ndim == 1:
            return embedding.unsqueeze(0).expand(batch, -1)
        if embedding.shape[0] != batch:
            raise AdapterError(
                f"the domain embedding is for a batch of {embedding.shape[0]} images but the features are for "
                f"{batch}: call set_domain_embedding with this batch's embeddings"
            )
        return embedding

    def forward(self, features: Tensor) -> Tensor:
        if self.kind == "layer":
            lead = features.ndim - len(self.channel_shape)
            if lead < 1 or tuple(features.shape[lead:]) != self.channel_shape:
                raise AdapterError(
                    f"Domino (LayerNorm over {self.channel_shape}) expected features (B, ..., "
                    f"{', '.join(map(str, self.channel_shape))}), got shape {tuple(features.shape)}"
                )
            shape = (features.shape[0], *([1] * (lead - 1)), *self.channel_shape)
        else:
            if features.ndim < 2 or features.shape[1] != self.num_features:
                raise AdapterError(
                    f"Domino ({self.kind} norm over {self.num_features} channels) expected features "
                    f"(B, {self.num_features}, ...), got shape {tuple(features.shape)}"
                )
            shape = (features.shape[0], self.num_features, *([1] * (features.ndim - 2)))
        gamma, mu = self.modulation(self._embedding_for(features.shape[0]))
        normalised = self.norm(features)
        return normalised * gamma.reshape(shape).to(normalised.dtype) + mu.reshape(shape).to(normalised.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, features={self.num_features}, embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim}"


def _find_norms(model: nn.Module, types: Sequence[str]) -> dict[int, list[str]]:
    """Paths of the layers to replace, grouped by layer object (a layer may be shared)."""
    wanted = tuple(NORM_TYPES[name] for name in types)
    found: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if type(module) in wanted and not isinstance(module, DominoNorm):
            found.setdefault(id(module), []).append(path)
    return found


class _SetChild:
    """Undo step ``setattr(parent, child, module)``.

    Undo steps and hooks are objects rather than closures: ``copy.deepcopy(model)`` (an
    EMA teacher) copies functions by reference, so a closure would make the copy undo or
    check the original model; a deep-copied object refers to the copy's modules. Objects
    also pickle.
    """

    def __init__(self, parent: nn.Module, child: str, module: nn.Module) -> None:
        self.parent, self.child, self.module = parent, child, module

    def __call__(self) -> None:
        setattr(self.parent, self.child, self.module)


class DominoMethod(AdapterMethod):
    name = "domino"
    config_class = DominoConfig
    needs_host = False

    def check(self, model: nn.Module, host: object, config: DominoConfig) -> None:
        found = _find_norms(model, config.types)
        if not found:
            raise AdapterError(
                f"Domino found no normalisation layer of types {list(config.types)} in {type(model).__name__}"
            )
        if any("" in paths for paths in found.values()):
            raise AdapterError(
                f"the model itself is a {type(model).__name__}: Domino replaces layers inside a module; wrap it "
                "(e.g. in nn.Sequential) first"
            )

    def attach(self, model: nn.Module, host: object, config: DominoConfig, attachment: Attachment) -> None:
        layers: dict[str, DominoNorm] = {}
        for paths in _find_norms(model, config.types).values():
            original = model.get_submodule(paths[0])
            domino = DominoNorm(original, config.embed_dim, config.hidden_dim)
            layers[paths[0]] = domino
            for path in paths:
                parent_name, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child, domino)
                attachment.undo.append(_SetChild(parent, child, original))
        attachment.extra["layers"] = layers

    def parameters(self, model: nn.Module, attachment: Attachment) -> list[nn.Parameter]:
        return [p for layer in attachment.extra["layers"].values() for p in layer.parameters()]

    def state_dict(self, model: nn.Module, attachment: Attachment) -> dict[str, Tensor]:
        # The MLPs and the copied BatchNorm running statistics: what eval outputs depend on.
        return {
            f"{path}.{key}": value
            for path, layer in attachment.extra["layers"].items()
            for key, value in layer.state_dict().items()
        }

    def load_state_dict(self, model: nn.Module, attachment: Attachment, tensors: dict[str, Tensor]) -> None:
        layers: dict[str, DominoNorm] = attachment.extra["layers"]
        expected = set(self.state_dict(model, attachment))
        if set(tensors) != expected:
            raise AdapterError(
                f"Domino weights do not match: missing {sorted(expected - set(tensors))[:8]}, "
                f"unexpected {sorted(set(tensors) - expected)[:8]}"
            )
        for path, layer in layers.items():
            prefix = path + "."
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)


register_method(DominoMethod())


def inject_domino(
    module: nn.Module,
    *,
    embed_dim: int,
    hidden_dim: int = 128,
    types: Iterable[str | type[nn.Module]] = tuple(NORM_TYPES),
    freeze_host: bool = False,
) -> nn.Module:
    """Replaces the normalisation layers of ``module`` (e.g. a decode head) with Domino.

    Each BatchNorm/GroupNorm/LayerNorm (exact types, see :data:`NORM_TYPES`) becomes a
    :class:`DominoNorm` that carries over its statistics and, as the initial output of
    its MLPs, its affine parameters: the module computes exactly what it did before
    until training moves the MLPs. Registered as method ``"domino"``:
    :func:`vfm_adapters.save_adapters`, :func:`vfm_adapters.load_adapters` and
    :func:`vfm_adapters.remove_adapters` (which puts the original layers back) work.
    Before each forward pass call :func:`set_domain_embedding` with the batch's ``W``.

    Args:
        module: Any module; not necessarily a ViT.
        embed_dim: Width ``d`` of the domain embedding.
        hidden_dim: Width of the MLPs' shared hidden layer.
        types: Normalisation types to replace (classes or names).
        freeze_host: Freeze every other parameter of ``module``. Off by default: a
            decode head is normally trained with its Domino layers (the paper trains
            everything). Note that :func:`vfm_adapters.load_adapters` freezes, as for
            every method.

    Returns:
        ``module``, with Domino layers.

    Example:
        >>> import torch, vfm_adapters as va
        >>> head = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1),
        ...                            torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        ...                            torch.nn.Conv2d(16, 4, 1)).eval()
        >>> x = torch.randn(2, 8, 10, 10)
        >>> before = head(x)
        >>> head = va.inject_domino(head, embed_dim=32)
        >>> type(head[1]).__name__
        'DominoNorm'
        >>> _ = va.set_domain_embedding(head, torch.randn(2, 32))
        >>> torch.allclose(head(x), before, atol=1e-5)
        True
    """
    config = DominoConfig(embed_dim=embed_dim, hidden_dim=hidden_dim, types=_norm_type_names(types))
    return inject(module, "domino", config, freeze_host=freeze_host)


def set_domain_embedding(model: nn.Module, embedding: Tensor | None) -> nn.Module:
    """Gives every Domino layer and domain_rein in ``model`` the batch's domain embedding.

    Call it before each forward pass with ``W`` (B, d) for the batch (or (d,) for one
    embedding shared by all images); ``None`` clears it. The width is checked here and
    the batch size in the forward pass.

    Args:
        model: A module with Domino layers and/or domain_rein.
        embedding: ``W``, e.g. from :class:`vfm_adapters.DomainEmbedder`.

    Returns:
        ``model``.

    Example:
        >>> import torch, vfm_adapters as va
        >>> head = va.inject_domino(torch.nn.Sequential(torch.nn.Linear(4, 6),
        ...                         torch.nn.LayerNorm(6)), embed_dim=8)
        >>> head = va.set_domain_embedding(head, torch.randn(3, 8))
        >>> head(torch.randn(3, 10, 4)).shape
        torch.Size([3, 10, 6])
    """
    targets = [m for m in model.modules() if isinstance(m, (DominoNorm, DomainReinShift))]
    if not targets:
        raise AdapterError(
            f"{type(model).__name__} has no Domino layers or domain_rein: call vfm_adapters.inject_domino "
            "or vfm_adapters.inject_domain_rein first"
        )
    if embedding is not None:
        widths = sorted({m.embed_dim for m in targets})
        for width in widths:  # validate every width before changing any layer
            checked_embedding(embedding, width, "this model's Domino layers")
    for target in targets:
        target.set_domain_embedding(embedding)
    return model
