"""Decisions: comparisons, masks, top-k, sorting and argmax.  Their real values are used (frozen)."""
from __future__ import annotations

import torch

from fxdepass.registry import deffrozen

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
