"""Narrowing: component passes through fused projections compute only the columns that are read.

Note [Fused projections]
~~~~~~~~~~~~~~~~~~~~~~~~
GPT-2, Falcon, GPT-BigCode and others compute queries, keys and values with one matrix and split
the result.  Queries and keys only feed the frozen attention probabilities, so analysis prunes
their components — but the fused projection still multiplies every component by the whole matrix.
:func:`narrow_fused_projections` rewrites ``projection → views keeping the last axis → split →
one piece`` in the generated graph into a projection by that piece's columns of the weight (and
bias), so the components never hold the unused columns.  Each column of a linear map depends only
on its own weight column, so the result is the same numbers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxdepass.rules.linear import getitem, linear_map

__all__ = ["PROJECTIONS", "VIEWS", "component_op", "narrow_fused_projections", "project_into"]

aten = torch.ops.aten
#: linear maps with a constant weight: op → (features argument, weight argument, weight's output
#: axis, bias argument), argument positions counting the op itself as 0 (as ``linear_map``'s args)
PROJECTIONS = {aten.linear.default: (1, 2, 0, 3), aten.addmm.default: (2, 3, 1, 1), aten.mm.default: (1, 2, 1, None)}
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def component_op(node: Any) -> Any:
    """The ATen op a generated ``linear_map`` component node applies, else ``None``."""
    is_map = isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is linear_map
    return node.args[0] if is_map else None


def project_into(total: torch.Tensor, args: tuple) -> bool:
    """Add the projection ``linear_map(*args)`` of components, without its bias, into ``total`` in
    place as one matrix product; ``False`` (nothing done) where the layouts do not allow it.

    >>> project_into(total, (aten.mm.default, components, weight))        # doctest: +SKIP
    True
    """
    op = args[0]
    if op not in PROJECTIONS:
        return False
    features, weight, axis, _ = PROJECTIONS[op]
    x, w = args[features], args[weight]
    if not total.is_contiguous() or x.dtype != total.dtype or w.dtype != total.dtype:
        return False
    total.view(-1, total.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w if axis == 1 else w.t())
    return True


def narrow_fused_projections(module: torch.fx.GraphModule) -> int:
    """Narrow every fused projection of ``module`` whose components are read through one piece of a
    split (Note [Fused projections]); returns how many were narrowed.

    >>> narrow_fused_projections(decomposed_gpt2_module)       # doctest: +SKIP
    12
    """
    count = sum(_narrow(node) for node in list(module.graph.nodes) if component_op(node) in _SPLITS)
    if count:
        module.graph.eliminate_dead_code()
        module.recompile()
    return count


def _piece(split: torch.fx.Node, width: int) -> tuple[int, int] | None:
    """``(start, length)`` of the one piece of ``split`` that is read, if only one is."""
    readers = list(split.users)
    if not readers or any(r.target is not getitem or r.args[1] != readers[0].args[1] for r in readers):
        return None
    index, sizes = readers[0].args[1], split.args[2]
    if isinstance(sizes, int):
        starts = list(range(0, width, sizes))
        return starts[index], min(sizes, width - starts[index])
    if all(isinstance(s, int) for s in sizes):
        return sum(sizes[:index]), sizes[index]
    return None


def _width(node: torch.fx.Node) -> Any:
    """The last axis of a component node's real value."""
    value = node.meta["fxdepass_real"].meta.get("val")
    return value.shape[-1] if isinstance(value, torch.Tensor) else None


def _call(graph: torch.fx.Graph, target: Any, args: tuple, kwargs: dict, like: torch.fx.Node) -> torch.fx.Node:
    """A node computing ``target``, named and annotated after the node ``like`` it narrows."""
    node = graph.create_node("call_function", target, args, kwargs, name=f"{like.name}_cols")
    node.meta = dict(like.meta) if like.op == "call_function" else {}
    return node


def _narrow(split: torch.fx.Node) -> int:
    source = split.args[1]
    value = source.meta["fxdepass_real"].meta.get("val")
    dim = split.args[3] if len(split.args) > 3 else 0
    if not isinstance(value, torch.Tensor) or dim not in (-1, value.ndim - 1) or not isinstance(value.shape[-1], int):
        return 0
    width = value.shape[-1]
    piece = _piece(split, width)
    views, projection = [], source
    while component_op(projection) in VIEWS and len(projection.users) == 1 and projection.args[2][-1] == width:
        views.append(projection)
        projection = projection.args[1]
    op = component_op(projection)
    if piece is None or op not in PROJECTIONS or len(projection.users) != 1 or _width(projection) != width:
        return 0  # the views must keep the projection's columns as the last axis, unchanged
    features, weight, axis, bias = PROJECTIONS[op]
    in_dims = projection.kwargs["in_dims"]
    has_bias = bias is not None and len(projection.args) > bias and projection.args[bias] is not None
    if in_dims[features - 1] != 0 or in_dims[weight - 1] is not None or (has_bias and in_dims[bias - 1] is not None):
        return 0
    graph, (start, length) = split.graph, piece
    args = list(projection.args)
    with graph.inserting_before(projection):  # names: the original's, with the columns kept
        for position, along in ((weight, axis), (bias if has_bias else None, 0)):
            if position is not None:
                args[position] = _call(graph, torch.narrow, (args[position], along, start, length), {}, args[position])
        narrowed = _call(graph, linear_map, tuple(args), dict(projection.kwargs), projection)
    for view in reversed(views):
        with graph.inserting_before(view):
            shape = [*view.args[2][:-1], length]
            narrowed = _call(graph, linear_map, (view.args[0], narrowed, shape, *view.args[3:]), dict(view.kwargs), view)
    narrowed.meta["fxdepass_real"] = next(iter(split.users)).meta["fxdepass_real"]  # the piece: same shape
    for reader in list(split.users):
        reader.replace_all_uses_with(narrowed)
    return 1
