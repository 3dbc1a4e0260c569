"""Normalisation: the scale (1/rms or 1/σ) is frozen at its real value; everything else is linear.

RMSNorm usually has no op of its own: it reaches us as ``x * rsqrt(mean(x**2) + eps) * w``.  ``pow``
and ``rsqrt`` are gates (fxdepass.registry Note [Kinds of ops]) so the statistics are frozen and the
two ``mul``s are linear in ``x``.  ``layer_norm`` and ``rms_norm`` (``torch.nn.RMSNorm``) are single
ops and get rules here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fxdepass.registry import add_to_rest, deffrozen, defgate, register_rule

aten = torch.ops.aten

defgate([aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.rsqrt.default, aten.sqrt.default,
         aten.reciprocal.default, aten.abs.default, aten.square.default])
deffrozen([aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim, aten.var_mean.correction,
           aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim, aten.native_layer_norm.default])


@register_rule(aten.layer_norm.default, decomposes="input")
def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
    *,
    components: torch.Tensor,
) -> torch.Tensor:
    """``(x_m − mean(x_m)) / σ(x)·w``: centring per component, σ from the real input, bias to rest."""
    dims = tuple(range(-len(normalized_shape), 0))
    inverse_std = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
    out = (components - components.mean(dims, keepdim=True)) * inverse_std
    if weight is not None:
        out = out * weight
    return out if bias is None else add_to_rest(out, bias)


@register_rule(aten.rms_norm.default, decomposes="input")
def rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    components: torch.Tensor,
) -> torch.Tensor:
    """``x_m / rms(x)·w``: the scale from the real input (``torch.nn.RMSNorm``; eps defaults to the dtype's)."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    out = components * torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps)
    return out if weight is None else out * weight
