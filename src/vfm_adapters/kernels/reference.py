"""The PyTorch reference of Rein's layer update: the specification every kernel is held to.

With ``f`` the patch tokens (..., n, c), tokens ``T`` (m, c) and the shared layers
``W_t, b_t`` (token to feature) and ``W_f, b_f`` (delta f), as in the Rein paper ("Stronger, Fewer, & Superior")::

    S  = softmax(f T^T / sqrt(c))           over all m tokens
    V  = T[1:] W_t^T + b_t                  token 0 is a sink: its column of S is dropped
    df = (S[:, 1:] V + f) W_f^T + b_f
    out = f + s * df
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rein_update_reference(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
) -> Tensor:
    """Applies one Rein layer to patch tokens ``feats`` (prefix tokens already removed).

    Args:
        feats: Patch tokens, shape (..., n, c).
        tokens: The layer's learnable tokens ``T = A B``, shape (m, c), or (B, m, c) with
            one token set per image (domain-conditioned tokens), B matching ``feats``.
        token_to_feature_weight: ``W_t``, shape (c, c); ``token_to_feature_bias``: ``b_t``.
        delta_weight: ``W_f``, shape (c, c); ``delta_bias``: ``b_f``.
        scale: The learnable scalar ``s``.

    Returns:
        ``f + s * df``, the same shape and dtype as ``feats``.

    Example:
        >>> import torch
        >>> f, t = torch.randn(2, 5, 8), torch.randn(3, 8)
        >>> w = torch.eye(8)
        >>> out = rein_update_reference(f, t, w, None, w, None, torch.tensor(0.0))
        >>> torch.equal(out, f)
        True
    """
    delta = rein_delta_reference(
        feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias
    )
    return feats + scale * delta


def rein_delta_reference(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
) -> Tensor:
    """The unscaled update ``df = (S[:, 1:] V + f) W_f^T + b_f`` of :func:`rein_update_reference`.

    Example:
        >>> import torch
        >>> f, t, w = torch.randn(2, 5, 8), torch.randn(3, 8), torch.eye(8)
        >>> torch.allclose(rein_delta_reference(f, t, w, None, w, None),
        ...                rein_update_reference(f, t, w, None, w, None, torch.tensor(1.0)) - f, atol=1e-6)
        True
    """
    channels = feats.shape[-1]
    if tokens.ndim == 3 and feats.ndim > 3:  # per-image tokens with extra leading dims
        tokens = tokens.reshape(tokens.shape[0], *([1] * (feats.ndim - 3)), *tokens.shape[1:])
    similarity = torch.softmax(feats @ tokens.transpose(-1, -2) * channels**-0.5, dim=-1)
    values = F.linear(tokens[..., 1:, :], token_to_feature_weight, token_to_feature_bias)
    attended = similarity[..., 1:] @ values
    return F.linear(attended + feats, delta_weight, delta_bias)
