"""FC-CLIP-style query classifier: class scores from CLIP text embeddings of the class names.

CLOUDS ("Collaborating Foundation Models for Domain Generalized Semantic Segmentation")
builds on FC-CLIP ("Convolutions Die Hard: Open-Vocabulary Segmentation with Single Frozen
Convolutional CLIP"): the Mask2Former decoder does not end in a plain ``Linear`` over the
classes. Each query's hidden state goes through a 3-layer MLP into CLIP's text space, is
L2-normalised and compared with

* the text embedding of every class name: CLIP's text encoder over the name in each of
  14 templates (``"a photo of a {}."``, ...; :data:`CLIP_TEMPLATES`), every text embedding
  normalised, averaged over the templates and normalised again; a class may have several
  names (``"person, pedestrian"``) whose scores are max-pooled;
* a learned ``void`` embedding (the no-object class);

with a learnable temperature: ``logits = min(exp(logit_scale), 100) * cos(q, t)``,
``logit_scale`` starting at ``ln(1 / 0.07)``.

:class:`CLIPTextClassifier` replaces :class:`~vfm_adapters.seg.mask2former.Mask2FormerHead`'s
``class_predictor`` (``(B, Q, hidden) -> (B, Q, K + 1)``); :func:`class_name_embeddings`
computes the text side from any text encoder, :func:`transformers_text_encoder` with a
``transformers`` CLIP model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLIP_TEMPLATES", "DEFAULT_TEXT_MODEL", "CLIPTextClassifier", "build_clip_classifier",
           "class_name_embeddings", "transformers_text_encoder"]

#: The 14 prompt templates of FC-CLIP and CLOUDS (ViLD's).
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

#: A 768-d CLIP text tower that ``transformers`` loads. The CLOUDS authors use the text
#: tower of their OpenCLIP ConvNeXt-L (also 768-d), which needs ``open_clip``.
DEFAULT_TEXT_MODEL = "openai/clip-vit-large-patch14"


def class_name_embeddings(class_names: Sequence[str], encode_text: Callable[[list[str]], Tensor],
                          templates: Sequence[str] = CLIP_TEMPLATES) -> tuple[Tensor, list[int]]:
    """Template-averaged, normalised text embeddings of every name of every class.

    Args:
        class_names: One entry per class; synonyms separated by commas (``"car, cars"``).
        encode_text: Maps a list of strings to ``(n, D)`` text embeddings.
        templates: Prompt templates with one ``{}``.

    Returns:
        ``(embeddings (N, D), names per class)`` with ``N`` the number of names.

    Example:
        >>> encode = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])
        >>> emb, counts = class_name_embeddings(["car", "person, rider"], encode, ["a {}", "the {}."])
        >>> emb.shape, counts, torch.allclose(emb.norm(dim=1), torch.ones(3))
        (torch.Size([3, 2]), [1, 2], True)
    """
    names, counts = [], []
    for entry in class_names:
        synonyms = [n.strip() for n in str(entry).split(",") if n.strip()]
        if not synonyms:
            raise ValueError(f"empty class name in {list(class_names)}")
        names.extend(synonyms)
        counts.append(len(synonyms))
    texts = [template.format(name) for name in names for template in templates]
    with torch.no_grad():
        embedded = F.normalize(encode_text(texts).float(), dim=-1)
    embedded = embedded.view(len(names), len(templates), -1).mean(1)
    return F.normalize(embedded, dim=-1), counts


def transformers_text_encoder(model_name: str = DEFAULT_TEXT_MODEL, device: str | torch.device = "cpu"
                              ) -> Callable[[list[str]], Tensor]:
    """``texts -> CLIP text embeddings`` with ``transformers``' ``CLIPModel`` (downloads once)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_name).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_name)

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        out = []
        for start in range(0, len(texts), 256):
            tokens = tokenizer(texts[start : start + 256], padding=True, return_tensors="pt").to(device)
            features = model.get_text_features(**tokens)
            out.append(getattr(features, "pooler_output", features).cpu())
        return torch.cat(out)

    return encode


class CLIPTextClassifier(nn.Module):
    """FC-CLIP's query classifier (see the module docstring): ``(..., hidden) -> (..., K + 1)``.

    Args:
        hidden_dim: Width of the decoder's query states.
        embed_dim: Width of the text embeddings ``D``.
        names_per_class: Names of each class (their scores are max-pooled); default one each.
        num_classes: ``K`` when ``names_per_class`` is not given.
        mlp_layers: Layers of the class MLP (3).

    The text embeddings are a buffer (saved with the head): fill them with
    :meth:`set_text_embeddings` (or load a checkpoint); the forward refuses to run before.

    Example:
        >>> clf = CLIPTextClassifier(hidden_dim=8, embed_dim=4, num_classes=3)
        >>> clf.set_text_embeddings(torch.randn(3, 4))
        >>> clf(torch.randn(2, 5, 8)).shape     # 3 classes + void
        torch.Size([2, 5, 4])
        >>> round(clf.logit_scale.exp().item(), 4)
        14.2857
    """

    def __init__(self, hidden_dim: int, embed_dim: int, names_per_class: Sequence[int] | None = None,
                 num_classes: int | None = None, mlp_layers: int = 3) -> None:
        super().__init__()
        if names_per_class is None:
            if num_classes is None:
                raise ValueError("give names_per_class or num_classes")
            names_per_class = [1] * int(num_classes)
        self.names_per_class = [int(n) for n in names_per_class]
        dims = [hidden_dim] * mlp_layers + [embed_dim]
        layers: list[nn.Module] = []
        for i in range(mlp_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < mlp_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.class_embed = nn.Sequential(*layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.void_embedding = nn.Embedding(1, embed_dim)
        self.register_buffer("text_embeddings", torch.zeros(sum(self.names_per_class), embed_dim))
        self.register_buffer("text_ready", torch.zeros((), dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return len(self.names_per_class)

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        """Stores the ``(N, D)`` class-name embeddings (normalised here)."""
        if tuple(embeddings.shape) != tuple(self.text_embeddings.shape):
            raise ValueError(f"text embeddings must be {tuple(self.text_embeddings.shape)} (names x D), "
                             f"got {tuple(embeddings.shape)}")
        with torch.no_grad():
            self.text_embeddings.copy_(F.normalize(embeddings.float(), dim=-1))
            self.text_ready.fill_(True)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.text_embeddings.device.type != "meta" and not bool(self.text_ready):
            raise RuntimeError("CLIPTextClassifier has no text embeddings: call set_text_embeddings "
                               "(class_name_embeddings) or load a checkpoint that holds them")
        query = F.normalize(self.class_embed(hidden), dim=-1)
        void = F.normalize(self.void_embedding.weight, dim=-1)
        scale = torch.clamp(self.logit_scale.exp(), max=100)
        scores = scale * query @ torch.cat([self.text_embeddings.to(query.dtype), void.to(query.dtype)]).T
        pooled, start = [], 0
        for count in self.names_per_class:
            pooled.append(scores[..., start : start + count].amax(dim=-1))
            start += count
        pooled.append(scores[..., -1])
        return torch.stack(pooled, dim=-1)


def build_clip_classifier(spec: Mapping[str, Any], hidden_dim: int, num_classes: int, encode: bool = True) -> nn.Module:
    """CLOUDS' FC-CLIP-style classifier from a ``head_options.classifier`` mapping.

    Keys: ``type: clip``; ``class_names`` (default: Cityscapes' 19 when ``num_classes`` is
    19); ``text_model`` (a transformers CLIP id, :data:`~vfm_adapters.seg.clip_classifier.DEFAULT_TEXT_MODEL`);
    ``embed_dim`` (768); ``templates`` (the 14 of FC-CLIP). The class names are encoded
    now unless ``encode`` is False (a checkpoint will fill them) or the parameters live
    on the meta device.

    Example:
        >>> with torch.device("meta"):
        ...     clf = build_clip_classifier({"type": "clip"}, hidden_dim=16, num_classes=19)
        >>> type(clf).__name__, clf.num_classes, tuple(clf.text_embeddings.shape)
        ('CLIPTextClassifier', 19, (19, 768))
    """
    from .config import ConfigError
    from .datasets import CITYSCAPES_CLASSES

    spec = dict(spec)
    accepted = {"type", "class_names", "text_model", "embed_dim", "templates"}
    unknown = sorted(set(spec) - accepted)
    if unknown or spec.get("type", "clip") != "clip":
        raise ConfigError(f"head_options.classifier: type must be 'clip' and keys among {sorted(accepted)}, "
                                       f"got {dict(spec)}")
    names = spec.get("class_names")
    if names is None:
        if num_classes != len(CITYSCAPES_CLASSES):
            raise ConfigError("head_options.classifier.class_names is needed unless num_classes is 19 "
                                           "(Cityscapes)")
        names = list(CITYSCAPES_CLASSES)
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for {num_classes} classes")
    counts = [len([n for n in str(name).split(",") if n.strip()]) for name in names]
    classifier = CLIPTextClassifier(hidden_dim, int(spec.get("embed_dim", 768)), counts)
    if encode and classifier.text_embeddings.device.type != "meta":
        text = transformers_text_encoder(spec.get("text_model") or DEFAULT_TEXT_MODEL)
        embeddings, _ = class_name_embeddings(names, text, spec.get("templates") or CLIP_TEMPLATES)
        classifier.set_text_embeddings(embeddings)
    return classifier
