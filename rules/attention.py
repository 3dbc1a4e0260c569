"""Attention: the probabilities come from the real queries and keys and are frozen; ``out_m = P · v_m``.

Eager attention needs no rule of its own: ``softmax`` is frozen and ``matmul(P, v)`` is linear in ``v``.
"""
from __future__ import annotations

import math

import torch

from fxdepass.registry import deffrozen, register_rule

aten = torch.ops.aten

deffrozen([aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
           aten._safe_softmax.default])


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The probabilities ``softmax(q·kᵀ·scale + mask)`` of ``scaled_dot_product_attention``, ``[…, Sq, Sk]``.

    Rows with every key masked get zeros, as PyTorch's own attention does; with grouped-query
    attention each key head serves its group of query heads.
    """
    groups = query.shape[-3] // key.shape[-3]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def values_by_head(components: torch.Tensor) -> torch.Tensor:
    """Components of values ``[M, …, Hkv, Sk, D]`` copied into the layout attention multiplies,
    ``[…·Hkv, Sk, M·D]``: components folded into the columns.  A caller that owns the values can
    drop them before :func:`apply_to_values_by_head` (one values-sized copy less at the peak)."""
    moved = components.movedim(0, -2)  # [..., Hkv, Sk, M, D]
    return moved.reshape(-1, moved.shape[-3], moved.shape[-2] * moved.shape[-1])


def apply_probabilities(probabilities: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """``P · v_m`` for every component: ``[…, H, Sq, Sk]`` and ``[M, …, Hkv, Sk, D]`` → ``[M, …, H, Sq, D]``.

    One product batched over heads with the components folded into its columns, so ``P`` is never
    copied per component; with grouped-query attention each of the ``Hkv`` value heads serves
    ``H / Hkv`` query heads without being repeated.

    >>> apply_probabilities(torch.rand(2, 5, 5), torch.randn(3, 1, 5, 4)).shape
    torch.Size([3, 2, 5, 4])
    """
    return apply_to_values_by_head(probabilities, values_by_head(components), components.shape)


def apply_to_values_by_head(probabilities: torch.Tensor, by_head: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """:func:`apply_probabilities` on ``values_by_head(components)``, ``shape`` being the components' shape."""
    count, *batch, kv_heads, _, width = shape
    heads, queries, keys = probabilities.shape[-3:]
    grouped = probabilities.reshape(-1, (heads // kv_heads) * queries, keys)  # [...·Hkv, r·Sq, Sk]
    out = torch.bmm(grouped, by_head).view(*batch, kv_heads, heads // kv_heads, queries, count, width)
    return out.movedim(-2, 0).reshape(count, *batch, heads, queries, width)


@register_rule(aten.scaled_dot_product_attention.default, decomposes="value")
def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    components: torch.Tensor,
) -> torch.Tensor:
    """Each component of ``value`` through the frozen attention probabilities (GQA: kv heads repeated)."""
    return apply_probabilities(attention_probabilities(query, key, attn_mask, is_causal, scale), components)
