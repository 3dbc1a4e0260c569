"""Linear and affine ops: each is applied to every component; constant terms go to the rest component.

Note [Constant terms of affine ops]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An op jointly linear in a group of arguments satisfies ``f(x, c) = f(x, 0) + f(0, c)``.  When some of
the group carry components (``x``) and others do not (``c``: a bias, an added constant, a constant piece
of a ``cat``), every component gets ``f(x_m, 0)`` and the rest component additionally gets ``f(0, c)``:
the sum over components is ``f(Σ x_m, 0) + f(0, c) = f(x, c)``.  The component axis is mapped with
``torch.vmap``, so no op needs its dimensions shifted by hand.
"""
from __future__ import annotations

import functools
import operator
from typing import Any

import torch

from fxdepass.registry import ProjectionArgs, add_to_rest, defbilinear, deflinear, lookup, register_rule

aten = torch.ops.aten

# Shape, view and indexing ops: linear in the tensor they act on.
deflinear([
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.repeat_interleave.self_int, aten.diagonal.default, aten.index.Tensor, aten.gather.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.expand_as.default, aten.view_as.default, aten.reshape_as.default, aten.im2col.default, aten.unfold.default,
])
# Fourier transforms (FNet's token mixing) and the views between complex and real numbers: linear over the reals.
deflinear([aten.fft_fft.default, aten.fft_ifft.default, aten.fft_fftn.default, aten.view_as_real.default,
           aten.real.default])
# Reductions and scans.
deflinear([aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.cumsum.default])
# Joining and writing into tensors: linear jointly in every piece written.
deflinear([aten.cat.default, aten.concatenate.default, aten.stack.default], ("tensors",))
deflinear(aten.index_put.default, ("self", "values"))
deflinear([aten.slice_scatter.default, aten.select_scatter.default], ("self", "src"))
deflinear(aten.copy.default, ("src",))  # ``self`` only lends its shape and dtype: every element is overwritten
deflinear(aten.index_add.default, ("self", "source"))
deflinear([aten.scatter_add.default, aten.scatter.src], ("self", "src"))
deflinear([aten.constant_pad_nd.default, aten.pad.default], ("self", "value"))
deflinear(aten.embedding.default, ("weight",))
# Elementwise identities and sums.
deflinear([aten.clone.default, aten.alias.default, aten._to_copy.default, aten.type_as.default,
           aten.neg.default, aten.dropout.default, aten.lift_fresh_copy.default, aten.detach.default,
           aten.mul.Scalar, aten.div.Scalar], elementwise=True)
deflinear([aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
           aten.rsub.Tensor], ("self", "other"), elementwise=True)
deflinear([aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf], ("self", "other"), elementwise=True)
deflinear([aten.masked_fill.Scalar, aten.masked_fill.Tensor], ("self", "value"), elementwise=True)
deflinear(aten.div.Tensor, ("self",), nonlinear=("other",), elementwise=True)
# Projections (registry Note [Projections]): the weight is ``[out, in]`` for ``linear``, ``[in, out]`` otherwise.
deflinear(aten.linear.default, ("input", "bias"),
          projection=ProjectionArgs("input", "weight", axes=(1, 0), bias="bias", unbiased=aten.linear.default))
# Products: linear in either factor; both decomposed is handled by fxdepass.rules.products.
defbilinear([aten.mul.Tensor, aten.multiply.Tensor], ("self", "other"), elementwise=True)
defbilinear(aten.mm.default, (0, 1), projection=ProjectionArgs(0, 1, axes=(0, 1)))
defbilinear(aten.matmul.default, (0, 1), projection=ProjectionArgs(0, 1, axes=(0, 1), batched=True))
defbilinear(aten.bmm.default, (0, 1))
defbilinear(aten.addmm.default, ("mat1", "mat2"), additive=("self",),
            projection=ProjectionArgs("mat1", "mat2", axes=(0, 1), bias="self", unbiased=aten.mm.default))
defbilinear(aten.baddbmm.default, ("batch1", "batch2"), additive=("self",))
defbilinear(aten.einsum.default, ("tensors",))  # linear in each operand of the list
defbilinear([aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding, aten.convolution.default],
            ("input", "weight"), additive=("bias",))


def _slice_scatter(
    self: torch.Tensor, src: torch.Tensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1
) -> torch.Tensor:
    """``slice_scatter`` with ``end`` clamped to the size: its vmap rule overflows on the ``2**63 − 1`` that
    export writes for an open-ended ``x[a:] = …``."""
    end = None if end is None else min(end, self.shape[dim])
    return aten.slice_scatter.default(self, src, dim, start, end, step)


# Ops the components go through in place of the graph's own.  Note [Views of components]: the real
# value's memory layout can make ``view`` legal where the components' layout (from a different kernel)
# does not; ``reshape`` copies only when it must.
_COMPONENT_OP = {aten.view.default: aten.reshape.default, aten._unsafe_view.default: aten.reshape.default,
                 aten.slice_scatter.default: _slice_scatter}


def _shift(dim: int) -> int:
    """A dimension of one component's value as a dimension of the components tensor."""
    return dim + 1 if dim >= 0 else dim


def _reshape(x: torch.Tensor, shape: Any) -> torch.Tensor:
    return x.reshape(x.shape[0], *shape)


# Note [Direct component kernels]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch.vmap costs tens of microseconds a call, as much as the op itself on a small block of
# components.  The most frequent ops, with the components first and every other argument constant,
# run directly on the components tensor: its component axis is first, so dimensions shift by one;
# elementwise ops broadcast a constant of lower rank the way vmap would.
_DIRECT = {
    aten.view.default: _reshape, aten._unsafe_view.default: _reshape, aten.reshape.default: _reshape,
    aten.transpose.int: lambda x, a, b: x.transpose(_shift(a), _shift(b)),
    aten.permute.default: lambda x, dims: x.permute(0, *map(_shift, dims)),
    aten.unsqueeze.default: lambda x, dim: x.unsqueeze(_shift(dim)),
    aten.mm.default: torch.matmul,
    aten.linear.default: torch.nn.functional.linear,
}


def _direct(op: Any, args: tuple, in_dims: tuple, kwargs: dict) -> torch.Tensor | None:
    """``op`` applied directly to the components (Note [Direct component kernels]), or ``None``."""
    varies = [d == 0 or (isinstance(d, (list, tuple)) and 0 in d) for d in in_dims]
    if not varies or in_dims[0] != 0 or any(varies[1:]):
        return None
    if op in _DIRECT and not kwargs:
        return _DIRECT[op](*args)
    lower = all(not isinstance(a, torch.Tensor) or a.ndim < args[0].ndim for a in args[1:])
    if lookup(op).elementwise and lower:
        return op(*args, **kwargs)
    return None


def _split_constant_terms(args: tuple, in_dims: tuple, additive: tuple[int, ...]) -> tuple[list, list | None]:
    """Split ``args`` into (constant terms zeroed, components zeroed), see Note [Constant terms of affine ops].

    The second list is ``None`` when there is no constant term (the common case: nothing to add to rest).
    """

    def is_constant(x: Any, has_components: bool, position: int) -> bool:
        return (not has_components and position in additive and isinstance(x, (torch.Tensor, int, float))
                and not isinstance(x, bool))

    def leaves(i: int, arg: Any, dims: Any) -> list[tuple[Any, bool]]:
        if isinstance(arg, (list, tuple)):
            dims = dims if isinstance(dims, (list, tuple)) else [dims] * len(arg)
            return [(x, d == 0) for x, d in zip(arg, dims)]
        return [(arg, dims == 0)]

    if not any(is_constant(x, c, i) for i, (a, d) in enumerate(zip(args, in_dims)) for x, c in leaves(i, a, d)):
        return list(args), None
    varying, constant = [], []
    for i, (arg, dims) in enumerate(zip(args, in_dims)):
        pairs = []
        for x, has_components in leaves(i, arg, dims):
            if has_components:
                pairs.append((x, x.new_zeros(x.shape[1:])))
            elif is_constant(x, has_components, i):
                pairs.append((torch.zeros_like(x) if isinstance(x, torch.Tensor) else 0, x))
            else:
                pairs.append((x, x))
        if isinstance(arg, (list, tuple)):
            varying.append([p[0] for p in pairs])
            constant.append([p[1] for p in pairs])
        else:
            varying.append(pairs[0][0])
            constant.append(pairs[0][1])
    return varying, constant


def linear_map(op: Any, *args: Any, in_dims: tuple, **kwargs: Any) -> Any:
    """Apply ``op`` to every component of the arguments marked ``0`` in ``in_dims``.

    >>> x = torch.randn(3, 2, 4)                       # 3 components of a [2, 4] tensor
    >>> y = linear_map(aten.linear.default, x, torch.randn(5, 4), torch.randn(5), in_dims=(0, None, None))
    >>> y.shape                                        # the bias went to the rest component
    torch.Size([3, 2, 5])
    """
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    rule = lookup(op)
    projected = rule.projection
    # A projection's constant bias is one add to the rest component: the components go through the
    # product without it, instead of a product with a zero bias (a pass over every component for nothing).
    if (projected is not None and projected.unbiased is not None and not kwargs
            and isinstance(projected.bias_of(args), torch.Tensor) and in_dims[projected.bias] is None):
        unbiased = linear_map(projected.unbiased, *projected.without_bias(args), in_dims=projected.without_bias(in_dims))
        return projected.bias_to_rest(unbiased, args)
    varying, constant = _split_constant_terms(args, in_dims, rule.additive_args)
    direct = None if constant is not None else _direct(op, args, in_dims, kwargs)
    if direct is not None:
        return direct
    out = torch.vmap(functools.partial(_COMPONENT_OP.get(op, op), **kwargs), in_dims=in_dims)(*varying)
    if constant is not None:
        out = add_to_rest(out, op(*constant, **kwargs))
    return out


@register_rule(operator.getitem, decomposes=0)
def getitem(sequence: Any, index: int, *, components: Any) -> torch.Tensor:
    """Pick one output of a multi-output op (``split``, ``chunk``): the components of that output."""
    return components[index]
