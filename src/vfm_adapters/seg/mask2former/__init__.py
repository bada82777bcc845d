"""A Mask2Former decode head made of transformers' Mask2Former parts, with Rein's query link.

The head is the one behind every number of the Rein paper ("Stronger, Fewer, & Superior", CVPR 2024):
a deformable multi-scale pixel decoder (6 layers) over the neck's 4 maps (strides
4/8/16/32), a masked-attention transformer decoder (9 layers, 8 heads, FFN 2048, 256
channels, 100 queries), class and mask predictions after every decoder layer (deep
supervision), Hungarian matching and the class (2.0, no-object 0.1), mask BCE (5.0)
and dice (5.0) losses on 12,544 uncertainty-sampled points.

Parts taken from :mod:`transformers.models.mask2former.modeling_mask2former` (not
copied): ``Mask2FormerPixelDecoder`` (its multi-scale deformable attention runs in pure
PyTorch through ``grid_sample``), ``Mask2FormerMaskedAttentionDecoder``,
``Mask2FormerSinePositionEmbedding``, ``Mask2FormerHungarianMatcher`` and
``Mask2FormerLoss``, all configured through one ``Mask2FormerConfig``.
``Mask2FormerTransformerModule`` (input projections, level embeddings, then the
decoder) creates its query embeddings itself, so it is subclassed: the subclass only
replaces ``forward`` to take the queries from outside, and drops the two query
embedding tables when the queries come from Rein.

Rein's query link: given Rein's queries ``Q`` (m, 256) (:func:`vfm_adapters.rein_queries`),
``Q`` is the positional query embedding of every decoder layer and ``Linear(256, 256)(Q)``
the initial query features. The queries are recomputed from Rein's tokens at every
call, so the head's loss trains the tokens through the link.

Semantic inference multiplies class and mask probabilities:
``einsum("bqc,bqhw->bchw", softmax(class)[..., :-1], sigmoid(mask))``.

The package keeps one job per module: :mod:`~vfm_adapters.seg.mask2former.config` (the
head's options and outputs, semantic inference and targets),
:mod:`~vfm_adapters.seg.mask2former.head` (the head and the query-linked transformer
module), :mod:`~vfm_adapters.seg.mask2former.segmentor` (host + neck + head, and its
builder) and :mod:`~vfm_adapters.seg.mask2former.official` (the authors' mmdet head
names). Every name is importable from ``vfm_adapters.seg.mask2former``.
"""

from __future__ import annotations

from .config import Mask2FormerHeadConfig, Mask2FormerOutput, semantic_inference, semantic_targets
from .head import Mask2FormerHead
from .official import OFFICIAL_HEAD_PREFIX, export_official_head, load_official_head, official_head_mapping
from .segmentor import MASK2FORMER_METHOD_DEFAULTS, Mask2FormerSegmentor, build_mask2former_segmentor

__all__ = [
    "Mask2FormerHead",
    "Mask2FormerHeadConfig",
    "Mask2FormerOutput",
    "Mask2FormerSegmentor",
    "build_mask2former_segmentor",
    "export_official_head",
    "load_official_head",
    "official_head_mapping",
    "semantic_inference",
    "semantic_targets",
]
