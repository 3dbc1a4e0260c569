"""Attention: the probabilities come from the real queries and keys and are frozen; ``out_m = P · v_m``.

Eager attention needs no rule of its own: ``softmax`` is frozen and ``matmul(P, v)`` is linear in ``v``.
The ``"routed"`` variant of ``scaled_dot_product_attention`` also credits where attention goes.

Note [Attention routing credit]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Frozen probabilities (the paper's rule) give a component credit only for what it carries through the
values: a token that matters by *steering* attention (its key draws the query, its query selects the
key) gets none.  Two recent methods credit that path, neither exactly.  Dual Path Attribution (DPA,
arXiv 2603.19742) splits a SwiGLU transformer into a *content path* (values, up projections) and a
*control path* (how information is routed: attention and gating) and propagates a target vector
backwards through both.  Its attention control term is the softmax's Jacobian at the real run (a
first-order linearisation: ``P ⊙ (g·vᵀ − g·z)`` taken back through the rotated keys and queries), and
the paths are mixed with fixed weights (its code takes five, ``q k v gate up``; by default
v 0.5, q 0.25, k 0.25, gate 0.5, up 0.5: ``tracer/backend.py`` of its repository).  UNPACK (arXiv
2605.23393) reads attention and MLP as one key-value template ``φ(S)U`` and, in a backward recursion,
splits the credit reaching a head at (query, key) into K, Q and V branches labelled as composition
modes (equal weights 1/3 by default), the K and Q branches by each writer's part of the scores over a
signed normaliser floored at β·Σ|part| (β = 0.8; ``src/unpack/core/recursion.py``, ``_safe_denom``).
Both rescale linearised shares, so their credits do not add up to the output.  What fxdepass takes
from them is the idea (the score's query and key sides as a path of their own), not their weights;
it keeps DePass's exactness:

* **Score parts.**  With queries ``q = Σ_m q_m`` and keys ``k = Σ_m k_m`` (rest ``r`` last), the
  reference scores are those of the rest alone, ``S⁰ = s·q_r·k_rᵀ + mask``: the scores with every
  attributed component removed (for token seeds on a model without q/k biases ``q_r = k_r = 0``, so
  ``P⁰`` is uniform over the visible keys).  Their difference from the real scores is bilinear in the
  components, ``S − S⁰ = s·(q_c·k_cᵀ + q_c·k_rᵀ + q_r·k_cᵀ)`` with ``q_c = q − q_r``, and is split
  by SPEC §2's symmetric rule among the components, each taking its terms with rest whole:
  ``ΔS_m = s/2·(q_m·(k + k_r)ᵀ + (q + q_r)·k_mᵀ)``.  That is the Shapley value of the score when the
  rest is always present (a bilinear game's pair terms split in halves), and ``Σ_m ΔS_m = S − S⁰``.
* **Output.**  ``out = P⁰·v + (P − P⁰)·v`` with ``P⁰ = softmax(S⁰)``.  The first term is linear in the
  values and goes through them as in frozen mode, ``P⁰·v_m``; the second, the routing term, is shared
  at every (query, key) element by the activation allocation rule (rules/activations.py, the policy's
  mode and temperature) over the components present there (``ΔS_m ≠ 0``), with pre-activation
  ``ΔS_m`` where the key gained probability (``P > P⁰``) and ``−ΔS_m`` where it lost some: credit goes
  to the components that moved the score the way the probability moved.  Where none is present the
  rest takes it.  The shares sum to one, so ``Σ_m out_m = P⁰·v + (P − P⁰)·v = P·v`` exactly.
* **Causality.**  A token's component is exactly zero in queries and keys before its position, so
  its ``ΔS_m`` is zero there and it gets no share; masked keys have ``P = P⁰ = 0``.  The sink option of
  token seeds excludes the sink from routing shares at queries other than its own, as for activations.

Choosing ``P⁰`` as the rest's own attention (not a uniform row for every seed) makes routed mode equal
frozen mode wherever the components do not touch the scores (a head seed's own layer, a value-only
custom seed), and keeps the value term's attention close to the real one when the rest dominates.
The routing term needs every component's score part at once (``M × heads × queries × keys``), so it
runs a chunk of heads at a time; the causal-block runner assembles this op's components in full.
"""
from __future__ import annotations

import math

import torch

from fxdepass.registry import deffrozen, register_rule, rest_only

from .activations import allocate

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


#: score parts held at once by the routed rule (elements): heads are processed in chunks below it
ROUTED_CHUNK = 1 << 24


@register_rule(aten.scaled_dot_product_attention.default, decomposes=("query", "key", "value"), variant="routed",
               allocates=True)
def routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    components: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    mode: str = "softmax",
    temperature: float = 0.1,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output credited through values and through the scores (Note [Attention routing credit]).

    ``components`` holds those of the query, key and value (``None`` where one carries none).

    >>> q, k, v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    >>> parts = [torch.stack([x / 2, x / 2, torch.zeros_like(x)]) for x in (q, k, v)]
    >>> out = routed_attention(q, k, v, is_causal=True, components=tuple(parts))
    >>> torch.allclose(out.sum(0), torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    True
    """
    like = next(c for c in components if c is not None)
    queries, keys, values = (c if c is not None else rest_only(x, like=like)
                             for c, x in zip(components, (query, key, value)))
    probabilities = attention_probabilities(query, key, attn_mask, is_causal, scale)
    reference = attention_probabilities(queries[-1], keys[-1], attn_mask, is_causal, scale)
    out = apply_probabilities(reference, values)
    change = probabilities - reference
    heads, groups = query.shape[-3], query.shape[-3] // key.shape[-3]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    count, per_head = like.shape[0], like.shape[0] * change[..., 0, :, :].numel()
    chunk = max(1, ROUTED_CHUNK // max(per_head, 1))
    for start in range(0, heads, chunk):
        # [.., heads, ...] of this chunk; key heads repeated for grouped-query attention
        select = slice(start, start + chunk)
        kv = torch.arange(heads, device=query.device)[select] // groups
        q_heads, q_parts = query[..., select, :, :], None if components[0] is None else queries[..., select, :, :]
        k_heads, k_parts = key.index_select(-3, kv), None if components[1] is None else keys.index_select(-3, kv)
        parts = torch.zeros(count, *change[..., select, :, :].shape, dtype=change.dtype, device=change.device)
        if q_parts is not None:
            parts += q_parts @ (k_heads + keys[-1].index_select(-3, kv)).transpose(-2, -1)
        if k_parts is not None:
            parts += (q_heads + queries[-1][..., select, :, :]) @ k_parts.transpose(-2, -1)
        parts[-1] = 0.0  # the rest's variation is the reference: no part of the change
        delta = change[..., select, :, :]
        pre_activation = torch.where(delta < 0, -parts, parts).mul_(scale / 2)
        del parts
        batch = None if query.ndim < 4 else 0
        shares = allocate(pre_activation, delta, mode=mode, temperature=temperature, sink=sink,
                          batch_axis=batch, position_axis=query.ndim - 2)
        del pre_activation
        out[..., select, :, :] += shares @ value.index_select(-3, kv)
    return out
