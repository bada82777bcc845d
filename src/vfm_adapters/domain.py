"""Domain embeddings from CLIP (Domino, "Domain-Aware Fine-Tuning of Foundation Models").

Domain descriptions ``k_1..k_N`` ("a photo taken at night", ...) are encoded once by
CLIP's text tower, ``d_i = CLIP_text(k_i)``. For an image ``x`` with CLIP image embedding
``I = CLIP_image(x)``::

    alpha_i = softmax_i(cos(I, d_i))        W = sum_i alpha_i d_i

``W`` (one row per image) drives the Domino layers of a decode head
(:func:`vfm_adapters.inject_domino`) and can be added to or subtracted from the class
(prompt) embeddings of a text-conditioned backbone (:func:`condition_prompts`).

The ``d_i`` are used as CLIP returns them (projected, not normalised): only the cosine
similarity normalises. The softmax has no temperature in the paper; ``temperature``
(default 1.0, the paper's equation) is this library's extension. Note that CLIP's
cosines lie in a narrow band (roughly 0.1 to 0.35), so with temperature 1 the weights
``alpha`` are close to uniform; CLIP itself uses 0.01 (its logit scale of 100).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_DRIVING_DOMAINS",
    "DomainEmbedder",
    "condition_prompts",
    "domain_embedding",
]

#: Weather, time of day and lighting of driving scenes (ACDC's fog/night/rain/snow, and
#: the conditions between them), phrased as the paper's "a photo taken ..." prompts.
DEFAULT_DRIVING_DOMAINS: tuple[str, ...] = (
    "a photo taken on a clear day",
    "a photo taken on a sunny day with strong sun glare",
    "a photo taken on an overcast day",
    "a photo taken at dawn",
    "a photo taken at dusk",
    "a photo taken at night",
    "a photo taken in fog",
    "a photo taken in rain",
    "a photo taken in snow",
    "a photo taken in a tunnel",
)


def _as_tensor(output: Any) -> Tensor:
    """The embedding from a CLIP ``get_*_features`` result (a tensor in transformers 4,
    a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is projected in 5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"expected an embedding tensor from the encoder, got {type(output).__name__}")


def domain_embedding(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    temperature: float = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The domain embedding ``W = sum_i softmax_i(cos(I, d_i) / t) d_i`` of each image.

    Args:
        image_embeddings: ``I``, shape (B, d).
        text_embeddings: The description embeddings ``D``, shape (N, d).
        temperature: ``t``; 1.0 is the paper's equation (see the module notes).
        return_weights: Also return the weights ``alpha`` (B, N).

    Returns:
        ``W`` (B, d), or ``(W, alpha)``.

    Example:
        >>> import torch
        >>> d = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> w, alpha = domain_embedding(torch.tensor([[3.0, 0.0]]), d, return_weights=True)
        >>> alpha  # softmax of the cosines (1, 0)
        tensor([[0.7311, 0.2689]])
        >>> w
        tensor([[0.7311, 0.5379]])
    """
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ValueError(
            f"expected image embeddings (B, d) and text embeddings (N, d), got shapes "
            f"{tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}"
        )
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"image embeddings have width {image_embeddings.shape[1]} but the description "
            f"embeddings have width {text_embeddings.shape[1]}: use the same CLIP model for both"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    image_embeddings = image_embeddings.to(text_embeddings.dtype)
    cosine = F.normalize(image_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T
    weights = torch.softmax(cosine / temperature, dim=-1)
    embedding = weights @ text_embeddings
    return (embedding, weights) if return_weights else embedding


class DomainEmbedder(nn.Module):
    """Turns images into domain embeddings ``W`` with cached description embeddings.

    The description embeddings are a buffer (moved by ``.to()``, saved in
    ``state_dict``) computed once; calls only run the image encoder. The embedder has no
    trainable parameters of its own; an ``nn.Module`` image encoder is registered as a
    submodule (frozen by :meth:`from_clip` unless told otherwise).

    Args:
        text_embeddings: Description embeddings ``D`` (N, d), e.g. precomputed with CLIP.
        image_encoder: Callable mapping images (B, ...) to embeddings (B, d); may return a
            transformers output whose ``pooler_output`` is the embedding. ``None``: only
            :meth:`embed` (from image embeddings) is available.
        descriptions: The N descriptions, for reference (:meth:`describe`).
        temperature: Softmax temperature; 1.0 is the paper's equation (an extension).

    Example:
        >>> import torch
        >>> encoder = torch.nn.Linear(12, 4)
        >>> embedder = DomainEmbedder(torch.randn(3, 4), image_encoder=encoder)
        >>> embedder(torch.randn(2, 12)).shape
        torch.Size([2, 4])
        >>> torch.allclose(embedder.weights(torch.randn(5, 12)).sum(-1), torch.ones(5))
        True
    """

    text_embeddings: Tensor

    def __init__(
        self,
        text_embeddings: Tensor,
        image_encoder: Callable[[Tensor], Any] | None = None,
        descriptions: Sequence[str] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        text_embeddings = torch.as_tensor(text_embeddings)
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 1:
            raise ValueError(f"text_embeddings must be (N, d) with N >= 1, got shape {tuple(text_embeddings.shape)}")
        if not text_embeddings.is_floating_point():
            text_embeddings = text_embeddings.float()
        if descriptions is not None and len(descriptions) != text_embeddings.shape[0]:
            raise ValueError(f"{len(descriptions)} descriptions for {text_embeddings.shape[0]} text embeddings")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.register_buffer("text_embeddings", text_embeddings.detach().clone())
        self.image_encoder = image_encoder  # registered as a submodule when it is a Module
        self.descriptions = list(descriptions) if descriptions is not None else None
        self.temperature = float(temperature)

    @property
    def embed_dim(self) -> int:
        """Width ``d`` of the embeddings."""
        return self.text_embeddings.shape[1]

    @classmethod
    @torch.no_grad()
    def encode_descriptions(
        cls,
        clip_model: nn.Module,
        tokenizer: Callable[..., Mapping[str, Tensor]],
        descriptions: Sequence[str],
    ) -> Tensor:
        """Encodes descriptions with CLIP's text tower: ``D = CLIP_text(K)`` (N, d).

        ``tokenizer`` is a transformers CLIP tokenizer or processor, or any callable
        called as ``tokenizer(list_of_str, padding=True, return_tensors="pt")`` that
        returns a mapping with ``input_ids`` (and optionally ``attention_mask``).
        """
        descriptions = list(descriptions)
        if not descriptions or not all(isinstance(k, str) and k for k in descriptions):
            raise ValueError(f"descriptions must be a non-empty list of non-empty strings, got {descriptions!r}")
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a CLIPProcessor holds its tokenizer
        inputs = tok(descriptions, padding=True, return_tensors="pt")
        device = next(clip_model.parameters()).device
        kwargs = {"input_ids": inputs["input_ids"].to(device)}
        if inputs.get("attention_mask") is not None:
            kwargs["attention_mask"] = inputs["attention_mask"].to(device)
        return _as_tensor(clip_model.get_text_features(**kwargs)).float()

    @classmethod
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer: Callable[..., Mapping[str, Tensor]],
        descriptions: Sequence[str] = DEFAULT_DRIVING_DOMAINS,
        temperature: float = 1.0,
        freeze_image_encoder: bool = True,
        resize: bool = True,
    ) -> "DomainEmbedder":
        """Builds the embedder from a transformers ``CLIPModel`` and its tokenizer.

        The descriptions are encoded once here; the text tower is not kept. The image
        encoder is ``clip_model.get_image_features``; it expects pixel values normalised
        with CLIP's mean and std (the processor's), and with ``resize`` images of another
        size are bilinearly resized to CLIP's input size first.

        Args:
            clip_model: A transformers ``CLIPModel`` (anything with ``get_text_features``,
                ``get_image_features`` and ``config.vision_config.image_size``).
            tokenizer: Its tokenizer or processor, or a callable (see
                :meth:`encode_descriptions`).
            descriptions: Domain descriptions; default :data:`DEFAULT_DRIVING_DOMAINS`.
            temperature: Softmax temperature (1.0: the paper's equation).
            freeze_image_encoder: Set ``requires_grad=False`` on CLIP's vision tower and
                projection (which are shared with ``clip_model``). ``False`` trains them,
                as in the paper's Figure 2 ("trainable CLIP image encoder").
            resize: Resize images to CLIP's input size when they differ.

        Example:
            >>> import torch, transformers
            >>> cfg = transformers.CLIPConfig(
            ...     text_config=dict(vocab_size=10, hidden_size=16, intermediate_size=32,
            ...         num_hidden_layers=1, num_attention_heads=2, eos_token_id=1),
            ...     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            ...         num_attention_heads=2, image_size=28, patch_size=14), projection_dim=8)
            >>> clip = transformers.CLIPModel(cfg).eval()
            >>> def tokenizer(texts, **kwargs):  # word-level stand-in for CLIPTokenizer
            ...     ids = [[0] + [2 + len(w) % 8 for w in t.split()] + [1] for t in texts]
            ...     n = max(map(len, ids))
            ...     return {"input_ids": torch.tensor([i + [1] * (n - len(i)) for i in ids])}
            >>> embedder = DomainEmbedder.from_clip(clip, tokenizer)
            >>> embedder.text_embeddings.shape  # one row per default description
            torch.Size([10, 8])
            >>> embedder(torch.randn(2, 3, 56, 56)).shape
            torch.Size([2, 8])
        """
        text_embeddings = cls.encode_descriptions(clip_model, tokenizer, descriptions)
        encoder = _CLIPImageEncoder(clip_model, resize=resize)
        if freeze_image_encoder:
            encoder.requires_grad_(False)
        return cls(text_embeddings, image_encoder=encoder, descriptions=descriptions, temperature=temperature)

    def embed(self, image_embeddings: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``W`` (B, d) from image embeddings ``I`` (B, d); with ``return_weights`` also ``alpha``."""
        return domain_embedding(image_embeddings, self.text_embeddings, self.temperature, return_weights)

    def encode_images(self, images: Tensor) -> Tensor:
        """The image embeddings ``I`` (B, d) from the image encoder."""
        if self.image_encoder is None:
            raise RuntimeError(
                "this DomainEmbedder has no image encoder: pass image_encoder=..., or call "
                ".embed(image_embeddings) with precomputed image embeddings"
            )
        embeddings = _as_tensor(self.image_encoder(images))
        if embeddings.ndim != 2 or embeddings.shape[0] != images.shape[0]:
            raise ValueError(
                f"the image encoder must return (B, d) embeddings; for {images.shape[0]} images "
                f"it returned shape {tuple(embeddings.shape)}"
            )
        return embeddings

    def forward(self, images: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The domain embedding ``W`` (B, d) of each image (and ``alpha`` (B, N) if asked)."""
        return self.embed(self.encode_images(images), return_weights)

    def weights(self, images: Tensor) -> Tensor:
        """The weights ``alpha`` (B, N) of the descriptions for each image; rows sum to one."""
        return self.forward(images, return_weights=True)[1]

    def describe(self, images: Tensor, top: int = 3) -> list[list[tuple[str, float]]]:
        """The ``top`` descriptions with the largest weights, per image (for inspection)."""
        weights = self.weights(images)
        names = self.descriptions or [f"domain {i}" for i in range(weights.shape[1])]
        values, indices = weights.topk(min(top, weights.shape[1]), dim=-1)
        return [[(names[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]

    def extra_repr(self) -> str:
        return f"descriptions={self.text_embeddings.shape[0]}, embed_dim={self.embed_dim}, temperature={self.temperature}"


class _CLIPImageEncoder(nn.Module):
    """``get_image_features`` of a CLIP model, keeping only the vision tower and projection."""

    def __init__(self, clip_model: nn.Module, resize: bool = True) -> None:
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection
        self.image_size = int(clip_model.config.vision_config.image_size)
        self.resize = resize

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.resize and tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            pixel_values = F.interpolate(
                pixel_values, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        dtype = self.visual_projection.weight.dtype
        pooled = _as_tensor(self.vision_model(pixel_values=pixel_values.to(dtype)))
        return self.visual_projection(pooled)


def condition_prompts(class_embeddings: Tensor, domain: Tensor, mode: str = "sub") -> Tensor:
    """Domain-aware prompts: class embeddings plus ("add") or minus ("sub") ``W``.

    The paper's Domino-Add (better in-domain) and Domino-Sub (better under domain
    shift; its best generalisation result) combine the domain embedding with the
    class/prompt embeddings of a text-conditioned backbone.

    Args:
        class_embeddings: (K, d), shared by the batch, or (B, K, d).
        domain: The domain embeddings ``W`` (B, d).
        mode: ``"add"`` or ``"sub"``.

    Returns:
        (B, K, d) conditioned class embeddings.

    Example:
        >>> import torch
        >>> e, w = torch.ones(3, 2), torch.tensor([[1.0, 2.0]])
        >>> condition_prompts(e, w, mode="sub")
        tensor([[[ 0., -1.],
                 [ 0., -1.],
                 [ 0., -1.]]])
    """
    if mode not in ("add", "sub"):
        raise ValueError(f"mode must be 'add' or 'sub', got {mode!r}")
    if domain.ndim != 2:
        raise ValueError(f"the domain embedding must be (B, d), got shape {tuple(domain.shape)}")
    if class_embeddings.ndim not in (2, 3):
        raise ValueError(f"class embeddings must be (K, d) or (B, K, d), got shape {tuple(class_embeddings.shape)}")
    if class_embeddings.shape[-1] != domain.shape[-1]:
        raise ValueError(
            f"class embeddings have width {class_embeddings.shape[-1]} but the domain embedding has width "
            f"{domain.shape[-1]}"
        )
    if class_embeddings.ndim == 3 and class_embeddings.shape[0] != domain.shape[0]:
        raise ValueError(
            f"class embeddings are for a batch of {class_embeddings.shape[0]} but the domain embedding for "
            f"{domain.shape[0]}"
        )
    shift = domain.to(class_embeddings.dtype)[:, None, :]
    base = class_embeddings if class_embeddings.ndim == 3 else class_embeddings.unsqueeze(0)
    return base + shift if mode == "add" else base - shift
