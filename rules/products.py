"""Products of two decomposed tensors with neither side an activation: the exact symmetric split.

``y_m = (a_m·b + a·b_m) / 2`` sums to ``(a·b + a·b) / 2 = a·b``.  A product whose one side is an
activation (SwiGLU's ``act(g) · u``) never gets here: the analysis freezes the other side, so the
activation's allocation decides the shares (SPEC §2, gated product).
"""
from __future__ import annotations

from typing import Any

import torch

from fxdepass.registry import lookup

from .linear import linear_map


def symmetric_product(op: Any, *args: Any, components: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Split ``op(a, b)`` (bilinear in its two factor arguments) as ``(op(a_m, b) + op(a, b_m)) / 2``.

    Constant terms (``addmm``'s bias) reach the rest component once in each half, so once in total.
    """
    first, second = lookup(op).linear_args
    halves = []
    for position, part in ((first, components[0]), (second, components[1])):
        varied = list(args)
        varied[position] = part
        in_dims = tuple(0 if i == position else None for i in range(len(args)))
        halves.append(linear_map(op, *varied, in_dims=in_dims, **kwargs))
    return (halves[0] + halves[1]) / 2
