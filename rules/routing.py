"""Decisions and mixture-of-experts routing.

Comparisons, masks, top-k, sorting and argmax are frozen: their real values are used, so a router's
probabilities and expert choices are fixed at their values from the normal run (SPEC §2).  What the
chosen experts compute is linear in their input: the gather of a token's rows (``index``), the expert
kernel (:func:`grouped_mm_fallback`, below), the scaling by frozen router weights (``mul``) and the
scatter back (``index_put``/``index_add``/``sum``) all have linear rules.
"""
from __future__ import annotations

import torch

from fxdepass.registry import deffrozen, register_rule

aten = torch.ops.aten

deffrozen([
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
    aten.isnan.default, aten.isinf.default, aten.any.default, aten.any.dim, aten.all.default,
    aten.topk.default, aten.sort.default, aten.argsort.default, aten.argmax.default, aten.argmin.default,
    aten.max.dim, aten.min.dim, aten.max.default, aten.min.default, aten.amax.default, aten.amin.default,
    aten.sign.default, aten.cumprod.default,
    # Values that depend only on their input's shape, dtype and device.
    aten.sym_size.int, aten.sym_numel.default, aten._assert_tensor_metadata.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
])


@register_rule("transformers::grouped_mm_fallback", 0)
def grouped_mm_fallback(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, *, components: torch.Tensor) -> torch.Tensor:
    """transformers' expert kernel: rows ``offs[e-1]:offs[e]`` of ``input`` times ``weight[e]``; linear in ``input``.

    Every component of a row goes through the row's expert: components become extra rows beside their
    row (``[M, S, d]`` → ``[S·M, d]``), so expert ``e`` owns rows ``M·offs[e-1]:M·offs[e]``.

    >>> grouped_mm_fallback(x, w, offs, components=parts).sum(0)   # == the real output  # doctest: +SKIP
    """
    count = components.shape[0]
    rows = components.transpose(0, 1).reshape(-1, components.shape[-1])
    out = torch.ops.transformers.grouped_mm_fallback(rows, weight, offs * count)
    return out.reshape(input.shape[0], count, -1).transpose(0, 1)
