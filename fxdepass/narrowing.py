"""Narrowing: component passes through fused projections compute only the columns that are read.

Note [Fused projections]
~~~~~~~~~~~~~~~~~~~~~~~~
GPT-2, Falcon, GPT-BigCode and others compute queries, keys and values with one matrix and split
the result.  Queries and keys only feed the frozen attention probabilities, so analysis prunes
their components — but the fused projection still multiplies every component by the whole matrix.
:func:`narrow_fused_projections` rewrites ``projection → views keeping the last axis → split →
one piece`` in the generated graph into a projection by that piece's columns of the weight (and
bias), so the components never hold the unused columns.  Each column of a linear map depends only
on its own weight column, so the result is the same numbers.  Mixture-of-experts kernels that
compute the gate and up projections together (Mixtral's ``gate_up_proj``) narrow the same way: only
the gate half carries components, the up half is used for real.

Note [Seeded projections]
~~~~~~~~~~~~~~~~~~~~~~~~~
Head and neuron seeds split the input of a projection by features (``split_features``): component
``g`` is the value with every feature outside group ``g`` zeroed, ``G + 1`` copies of a hidden layer
that the projection then shrinks to the residual width.  The projection of component ``g`` only
needs group ``g``'s features and the matching weight rows, so :func:`fuse_seeded_projections`
rewrites ``split_features → projection`` into :func:`project_feature_groups`: one batched product
of each group's features by its weight rows, the features in no group (and the bias) going to rest.
The split never exists: at a neuron seed that is ``(G + 1)·N·hidden`` values less.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx

from fxdepass.registry import ProjectionArgs, component_axis, projection_args, rest_only
from fxdepass.rules.linear import getitem, linear_map
from fxdepass.rules.routing import grouped_mm_fallback
from fxdepass.seeds import split_features

__all__ = ["VIEWS", "Projection", "component_op", "component_inputs", "scaled_components",
           "projection", "narrow_fused_projections", "project_into", "fuse_seeded_projections", "project_feature_groups",
           "real_shape", "shape_of", "last_axis"]

aten = torch.ops.aten
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def component_op(node: Any) -> Any:
    """The ATen op a generated ``linear_map`` component node applies, else ``None``."""
    is_map = isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is linear_map
    return node.args[0] if is_map else None


def component_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The component nodes ``node`` reads (those carrying a real value beside them)."""
    return [a for a in node.all_input_nodes if "fxdepass_real" in a.meta]


def scaled_components(node: Any) -> torch.fx.Node | None:
    """The components ``node`` multiplies or divides elementwise by a real value, else ``None``."""
    in_dims = tuple(node.kwargs.get("in_dims", ())) if component_op(node) is not None else ()
    if component_op(node) in (aten.mul.Tensor, aten.div.Tensor) and in_dims == (0, None):
        return node.args[1]
    if component_op(node) is aten.mul.Tensor and in_dims == (None, 0):
        return node.args[2]
    return None


@dataclasses.dataclass(frozen=True)
class Projection:
    """A component node that multiplies components by a constant weight (a linear map or an expert kernel)."""

    node: torch.fx.Node
    #: the components projected
    features: torch.fx.Node
    #: the weight's position among ``node.args`` and its output and input axes
    weight_index: int
    out_axis: int
    in_axis: int
    #: the position of a constant bias among ``node.args``, if there is one
    bias_index: int | None
    #: the position of the real input among ``node.args`` where the rule reads it (expert kernels)
    real_index: int | None = None

    @property
    def weight(self) -> torch.fx.Node:
        return self.node.args[self.weight_index]

    @property
    def bias(self) -> torch.fx.Node | None:
        return None if self.bias_index is None else self.node.args[self.bias_index]


def _matrix_projection(op: Any) -> ProjectionArgs | None:
    """Where ``op``'s operands are when it projects by a weight that is always a matrix (registry Note
    [Projections]): the component passes do not check the weight's rank."""
    found = projection_args(op) if isinstance(op, torch._ops.OpOverload) else None
    return found if found is not None and not found.batched else None


def projection(node: Any) -> Projection | None:
    """``node`` as a :class:`Projection` of its components, if it is one.

    >>> projection(module_node).weight                                       # doctest: +SKIP
    layers_0_mlp_down_proj_weight
    """
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is grouped_mm_fallback:
        return Projection(node, node.kwargs["components"], 1, 2, 1, None, 0)  # weight [experts, in, out]
    found = _matrix_projection(component_op(node))
    if found is None:
        return None
    args, in_dims = node.args[1:], tuple(node.kwargs["in_dims"]) + (None,) * len(node.args)  # the op's own
    has_bias = isinstance(found.bias_of(args), torch.fx.Node)
    if in_dims[found.features] != 0 or in_dims[found.weight] is not None or (has_bias and in_dims[found.bias] is not None):
        return None
    in_axis, out_axis = found.axes
    # positions among ``node.args``, the op's own shifted by the op in front
    return Projection(node, args[found.features], 1 + found.weight, out_axis, in_axis, 1 + found.bias if has_bias else None)


def project_into(total: torch.Tensor, args: tuple) -> bool:
    """Add the projection ``linear_map(*args)`` of components, without its bias, into ``total`` in
    place as one matrix product; ``False`` (nothing done) where the layouts do not allow it.

    >>> project_into(total, (aten.mm.default, components, weight))        # doctest: +SKIP
    True
    """
    found = _matrix_projection(args[0])
    if found is None:
        return False
    x, w = args[1 + found.features], args[1 + found.weight]
    if not total.is_contiguous() or x.dtype != total.dtype or w.dtype != total.dtype:
        return False
    total.view(-1, total.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w if found.axes == (0, 1) else w.t())
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


def shape_of(node: torch.fx.Node) -> list[sympy.Expr] | None:
    """The shape of ``node``'s value, sizes as sympy expressions (``None`` if it is not a tensor)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return [size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size) for size in value.shape]


def real_shape(node: torch.fx.Node) -> list[sympy.Expr] | None:
    """The shape of a component node's real value, sizes as sympy expressions."""
    return shape_of(node.meta["fxdepass_real"])


def last_axis(node: Any) -> Any:
    """The last axis of a node's value, the real value for a component node (``None`` for anything
    that is not a tensor with axes)."""
    real = node.meta.get("fxdepass_real", node) if isinstance(node, torch.fx.Node) else None
    value = real.meta.get("val") if real is not None else None
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.ndim else None


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
    views, source_node = [], source
    while component_op(source_node) in VIEWS and len(source_node.users) == 1 and source_node.args[2][-1] == width:
        views.append(source_node)
        source_node = source_node.args[1]
    found = projection(source_node)
    if piece is None or found is None or len(source_node.users) != 1 or last_axis(source_node) != width:
        return 0  # the views must keep the projection's columns as the last axis, unchanged
    graph, (start, length) = split.graph, piece
    args = list(source_node.args)
    with graph.inserting_before(source_node):  # names: the original's, with the columns kept
        for position, along in ((found.weight_index, found.out_axis), (found.bias_index, 0)):
            if position is not None:
                args[position] = _call(graph, torch.narrow, (args[position], along, start, length), {}, args[position])
        narrowed = _call(graph, source_node.target, tuple(args), dict(source_node.kwargs), source_node)
    narrowed.meta["fxdepass_columns"] = length  # of its real value's (the memory estimate reads it)
    for view in reversed(views):
        with graph.inserting_before(view):
            shape = [*view.args[2][:-1], length]
            narrowed = _call(graph, linear_map, (view.args[0], narrowed, shape, *view.args[3:]), dict(view.kwargs), view)
            narrowed.meta["fxdepass_columns"] = length
    narrowed.meta["fxdepass_real"] = next(iter(split.users)).meta["fxdepass_real"]  # the piece: same shape
    for reader in list(split.users):
        reader.replace_all_uses_with(narrowed)
    return 1


def fuse_seeded_projections(module: torch.fx.GraphModule) -> int:
    """Compute every projection of a feature-split seed group by group (Note [Seeded projections]);
    returns how many were fused.

    >>> fuse_seeded_projections(module_seeded_at_a_down_projection)       # doctest: +SKIP
    1
    """
    count = 0
    for split in [n for n in module.graph.nodes if n.op == "call_function" and n.target is split_features]:
        # readouts upstream of the seed read the split only for its number of components
        counting = [u for u in split.users if u.target is rest_only]
        found = [projection(u) for u in split.users if u.target is not rest_only]
        if len(found) != 1 or found[0] is None or found[0].features is not split or found[0].real_index is not None:
            continue
        node, op = found[0].node, found[0].node.args[0]
        args = list(node.args[1:])  # the op's own, the unsplit value in place of the features
        args[projection_args(op).features] = split.args[0]
        with module.graph.inserting_before(node):
            fused = _call(module.graph, project_feature_groups, (op, *args), {"groups": split.kwargs["groups"]}, node)
        fused.meta["fxdepass_real"] = node.meta["fxdepass_real"]
        for reader in counting:
            reader.replace_input_with(split, fused)
        node.replace_all_uses_with(fused)
        module.graph.erase_node(node)
        module.graph.erase_node(split)
        count += 1
    if count:
        module.recompile()
    return count


def project_feature_groups(op: Any, *args: Any, groups: int | tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The components of the projection ``op(*args)`` with its features (``value``) split as
    ``split_features(value, groups=groups)``, made group by group (Note [Seeded projections]):
    ``[G + 1, *rows, out]``, rest last.  ``args`` are the op's own, ``value`` in the features' place.

    >>> x, w = torch.randn(3, 4), torch.randn(4, 2)
    >>> torch.allclose(project_feature_groups(torch.ops.aten.mm.default, x, w, groups=2).sum(0), x @ w)
    True
    """
    found = projection_args(op)
    value, weight = args[found.features], args[found.weight]
    width = value.shape[-1]
    weight = weight if found.axes == (0, 1) else weight.t()  # [in, out]
    if isinstance(groups, int):
        groups = tuple(tuple(range(g * width // groups, (g + 1) * width // groups)) for g in range(groups))
    groups = [list(dict.fromkeys(i % width for i in group)) for group in groups]
    rows = value.reshape(-1, width)
    held = component_axis()  # only the groups this process holds (registry Note [Sharded components])
    start, end = held.held(len(groups))
    out = rows.new_empty(end - start + held.rest, rows.shape[0], weight.shape[1])
    tile = _tile(groups)
    if tile:  # consecutive equal ranges (heads): views of the features and weight rows, no copy
        own = slice(start * tile, end * tile)
        torch.bmm(rows[:, own].reshape(-1, end - start, tile).transpose(0, 1),
                  weight[own].reshape(end - start, tile, -1), out=out[:end - start])
        rest: slice | list[int] = slice(len(groups) * tile, width)
    else:
        longest = max(len(group) for group in groups)
        # short groups are padded with a zero feature column (and any weight row: it meets only zeros)
        index = torch.tensor([group + [width] * (longest - len(group)) for group in groups[start:end]], device=value.device)
        padded = torch.cat((rows, rows.new_zeros(rows.shape[0], 1)), dim=1)
        torch.bmm(padded[:, index].movedim(1, 0), weight[index.clamp(max=width - 1)], out=out[:end - start])
        rest = sorted(set(range(width)).difference(*groups))
    if held.rest:
        rest_rows = rows[:, rest]
        if rest_rows.shape[1]:
            torch.mm(rest_rows, weight[rest], out=out[-1])
        else:
            out[-1].zero_()
    out = out.reshape(out.shape[0], *value.shape[:-1], weight.shape[1])
    return found.bias_to_rest(out, args)


def _tile(groups: list[list[int]]) -> int:
    """The width of groups that are consecutive equal ranges from feature 0 (0 if they are not)."""
    tile = len(groups[0])
    expected = [list(range(g * tile, (g + 1) * tile)) for g in range(len(groups))]
    return tile if tile and groups == expected else 0
